"""The seed-compatible CLI: flag parsing, Trainer mapping, checkpoint discovery and checks."""
import inspect
import os
import time
import types

import pytest
import torch
import pytorch_lightning as pl
from pytorch_lightning.strategies import DDPStrategy

from bevdepth.configs import settings
from bevdepth.engine import cli
from bevdepth.models import checkpoints
from bevdepth.engine.errors import CheckpointMismatchError, UsageError


def parse(*argv, defaults=None):
    return cli.parse_args('exp', list(argv), defaults)


def test_seed_flags_parse():
    args = parse('-b', '2', '--gpus', '8', '--amp_backend', 'native', '--precision', '16', '--learning_rate',
                 '0.000003125', '--max_epoch', '24', '--seed', '0')
    assert (args.batch_size_per_device, args.gpus, args.max_epochs, args.seed) == (2, 8, 24, 0)
    assert args.learning_rate == pytest.approx(3.125e-6) and args.precision == '16'
    args = parse('--evaluate', '--ckpt_path', 'x.pth')
    assert args.evaluate and not args.predict
    assert parse('--eval', '--ckpt_path', 'x.pth').evaluate
    assert parse('-p', '--ckpt_path', 'x.pth').predict
    assert parse('--resume').resume == 'auto'
    assert parse('--resume', 'a/b.ckpt').resume == 'a/b.ckpt'
    assert parse('--limit_train_batches', '3').limit_train_batches == 3
    assert parse('--limit_train_batches', '0.25').limit_train_batches == 0.25
    defaults = parse()
    assert defaults.batch_size_per_device == settings.SETTINGS_BY_NAME['batch_size_per_device'].default == 8
    assert defaults.learning_rate == pytest.approx(2e-4 / 64) and defaults.max_epochs == 24
    assert parse(defaults={'version': 'v1.0-mini', 'max_epochs': 3}).max_epochs == 3
    assert parse('--max_epochs', '5', defaults={'max_epochs': 3}).max_epochs == 5
    no_gpu = parse('--gpus', '0')  # the Lightning 1.x spelling of "CPU"
    assert no_gpu.gpus is None and no_gpu.accelerator == 'cpu'


@pytest.mark.parametrize('argv, message', [
    (['--learning_rate', '0'], 'learning_rate must be > 0'),
    (['--learning_rate=-1e-3'], 'learning_rate must be > 0'),
    (['-e'], 'need --ckpt_path'),
    (['-p'], 'need --ckpt_path'),
    (['-e', '-p', '--ckpt_path', 'x'], 'not allowed with'),
    (['--gpus', '2', '--devices', '4'], 'disagree'),
    (['--devices', 'zero'], "invalid int_or_auto value: 'zero'"),
    (['--batch_size_per_device', '0'], '--batch_size_per_device must be >= 1, got 0'),
    (['-e', '--ckpt_path', 'x', '--resume'], '--resume is for training'),
])
def test_bad_flags_give_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert message in capsys.readouterr().err


def test_precision_and_accelerator_resolution():
    assert cli.resolve_precision('16', 'cuda') == '16-mixed'
    assert cli.resolve_precision('bf16', 'cpu') == 'bf16-mixed'
    assert cli.resolve_precision('32', 'cpu') == '32-true'
    with pytest.raises(UsageError, match='fp16'):
        cli.resolve_precision('16', 'cpu')
    assert cli.resolve_accelerator('cpu', None) == 'cpu'
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match='--accelerator cpu --devices N'):
            cli.resolve_accelerator('auto', 8)


def test_trainer_kwargs_map_the_seed_defaults():
    args = parse('--accelerator', 'cpu', '--devices', '2', '--max_epochs', '3', '--limit_train_batches', '4')
    kwargs = cli.build_trainer_kwargs(args, 'cpu', 2, '32-true')
    assert kwargs['gradient_clip_val'] == 5 and kwargs['limit_val_batches'] == 0
    assert kwargs['num_sanity_val_steps'] == 0 and kwargs['max_epochs'] == 3
    assert kwargs['limit_train_batches'] == 4 and kwargs['use_distributed_sampler'] is False
    assert isinstance(kwargs['strategy'], DDPStrategy)
    assert kwargs['strategy']._process_group_backend == 'gloo'
    assert any(type(plugin).__name__ == 'AtomicTorchCheckpointIO' for plugin in kwargs['plugins'])
    single = cli.build_trainer_kwargs(parse('--accelerator', 'cpu'), 'cpu', 1, '32-true')
    assert single['strategy'] == 'auto'


def test_atomic_checkpoint_io_leaves_no_partial_file(tmp_path):
    io = cli._AtomicCheckpointIO.create()
    path = tmp_path / 'checkpoints' / 'a.ckpt'
    io.save_checkpoint({'state_dict': {'model.w': torch.ones(2)}}, path)
    assert os.listdir(tmp_path / 'checkpoints') == ['a.ckpt']
    assert torch.equal(io.load_checkpoint(path)['state_dict']['model.w'], torch.ones(2))


def test_latest_checkpoint_and_run_version(tmp_path):
    assert cli.find_latest_checkpoint(tmp_path) is None
    older = tmp_path / 'lightning_logs' / 'version_0' / 'checkpoints' / 'epoch=0-step=5.ckpt'
    newer = tmp_path / 'lightning_logs' / 'version_1' / 'checkpoints' / 'step=7.ckpt'
    for path in (older, newer):
        path.parent.mkdir(parents=True)
        torch.save({'state_dict': {}}, path)
    now = time.time()
    os.utime(older, (now - 100, now - 100))
    (older.parent / 'last.ckpt').symlink_to(older.name)
    assert cli.find_latest_checkpoint(tmp_path) == str(newer)
    assert cli.version_of_checkpoint(newer, tmp_path) == 1
    assert cli.version_of_checkpoint(tmp_path / 'elsewhere.ckpt', tmp_path) is None


class Holder(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Linear(2, width), torch.nn.BatchNorm1d(width))


def test_checkpoint_of_another_architecture_is_one_clear_error(tmp_path):
    path = tmp_path / '3.pth'
    state = {'model.' + name: value for name, value in Holder(4).model.state_dict().items()}
    state['model.extra.weight'] = torch.zeros(1)
    torch.save({'epoch': 3, 'global_step': 9, 'state_dict': state}, path)
    with pytest.raises(CheckpointMismatchError) as error:
        checkpoints.load_network_weights(Holder(5).model, str(path), owner='Holder')
    message = str(error.value)
    assert '\n' not in message and 'does not fit Holder' in message
    assert "1 unexpected keys ['extra.weight']" in message
    assert '0.weight (4, 2) vs (5, 2)' in message
    del state['model.extra.weight']
    torch.save({'epoch': 3, 'global_step': 9, 'state_dict': state}, path)
    target = Holder(4)
    checkpoints.load_network_weights(target.model, str(path))
    assert torch.equal(target.model[0].weight, state['model.0.weight'])


def test_missing_truncated_or_foreign_checkpoint_files(tmp_path):
    with pytest.raises(CheckpointMismatchError, match='does not exist: check --ckpt_path'):
        checkpoints.read_checkpoint(str(tmp_path / 'nope.pth'))
    torch.save({'weights': 1}, tmp_path / 'other.pth')
    with pytest.raises(CheckpointMismatchError, match="expected a dict with 'state_dict'"):
        checkpoints.read_checkpoint(str(tmp_path / 'other.pth'))
    good = tmp_path / 'good.pth'
    torch.save({'state_dict': {'model.w': torch.ones(1000)}}, good)
    (tmp_path / 'cut.pth').write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    with pytest.raises(CheckpointMismatchError, match=r'cut.pth cannot be read \(.*\): .*copy or download it again'):
        checkpoints.read_checkpoint(str(tmp_path / 'cut.pth'))
    (tmp_path / 'text.pth').write_text('not a checkpoint at all')
    with pytest.raises(CheckpointMismatchError, match='text.pth cannot be read'):
        checkpoints.read_checkpoint(str(tmp_path / 'text.pth'))
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(CheckpointMismatchError, match='is empty'):
        checkpoints.read_checkpoint(str(tmp_path / 'empty.pth'))


def test_every_flag_has_one_definition_derived_from_the_settings_table():
    parser = cli.build_parser('exp')
    by_dest = {}
    for action in parser._actions:
        if action.option_strings and action.dest != 'help':
            by_dest.setdefault(action.dest, []).append(action)
    for setting in settings.SETTINGS:  # one flag per setting, with the table's spellings, type and help
        (action,) = by_dest.pop(setting.name)
        assert set(action.option_strings) >= {setting.flag, *setting.aliases}
        assert setting.help in action.help
        if setting.boolean:
            assert f'--no-{setting.name}' in action.option_strings
        else:
            assert action.type is setting.parse and action.nargs == setting.nargs
    trainer = cli.passthrough_trainer_arguments()
    for name in trainer:
        (action,) = by_dest.pop(f'trainer.{name}')
        assert action.option_strings == [f'--{name}']
    for name in {**cli.ENGINE_OWNED_TRAINER_ARGS, **cli.LIGHTNING_1_ARGS}:
        (action,) = by_dest.pop(name)
        assert isinstance(action, cli._Refuse)
    assert set(by_dest) == {'evaluate', 'predict', 'ckpt_path', 'resume', 'print_config'}
    every_trainer_argument = set(inspect.signature(pl.Trainer.__init__).parameters) - {'self'}
    reachable = set(trainer) | set(cli.ENGINE_OWNED_TRAINER_ARGS) | set(settings.SETTINGS_BY_NAME)
    assert every_trainer_argument <= reachable, every_trainer_argument - reachable


def test_trainer_flags_reach_the_trainer_typed():
    args = parse('--accelerator', 'cpu', '--strategy', 'ddp', '--accumulate_grad_batches', '2', '--max_steps', '10',
                 '--check_val_every_n_epoch', '1', '--sync_batchnorm', 'true', '--limit_val_batches', '0.5',
                 '--max_time', '00:01:00:00')
    assert args.trainer_args == {'strategy': 'ddp', 'accumulate_grad_batches': 2, 'max_steps': 10,
                                 'check_val_every_n_epoch': 1, 'sync_batchnorm': True, 'limit_val_batches': 0.5,
                                 'max_time': '00:01:00:00'}
    kwargs = cli.build_trainer_kwargs(args, 'cpu', 1, '32-true')
    for name, value in args.trainer_args.items():
        assert kwargs[name] == value
    assert kwargs['gradient_clip_val'] == 5.0  # the reference's, now a setting
    assert cli.build_trainer_kwargs(parse('--gradient_clip_val', '0'), 'cpu', 1, '32-true')['gradient_clip_val'] is None


@pytest.mark.parametrize('argv, message', [
    (['--logger', 'csv'], '--logger: the engine logs to TensorBoard'),
    (['--use_distributed_sampler', 'false'], '--use_distributed_sampler: the engine uses its own seeded, resumable'),
    (['--replace_sampler_ddp', 'false'], 'renamed use_distributed_sampler in Lightning 2'),
    (['--terminate_on_nan', 'true'], '--max_bad_steps'),
    (['--track_grad_norm', '2'], 'grad_norm'),
    (['--max_steps', 'ten'], "--max_steps takes int, got 'ten'"),
    (['--head_chanels', '16'], 'unrecognized arguments: --head_chanels (did you mean --head_channels?)'),
    (['--accumulate_grad_batch', '2'], 'did you mean --accumulate_grad_batches?'),
])
def test_engine_owned_removed_and_misspelt_flags_get_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_resume_from_checkpoint_is_resume():
    assert parse('--resume_from_checkpoint', 'a/b.ckpt').resume == 'a/b.ckpt'


def test_saved_structural_settings_win_unless_given(capsys):
    config = settings.resolve(object, {})
    saved = dict(config, head_channels=16, final_dim=[64, 192], batch_size_per_device=3)
    merged = cli.merge_saved_config(config, set(), saved, 'x.pth')
    assert merged['head_channels'] == 16 and merged['final_dim'] == [64, 192]
    assert merged['batch_size_per_device'] == config['batch_size_per_device']  # not structural: this run's
    given = dict(config, head_channels=32)
    merged = cli.merge_saved_config(given, {'head_channels'}, saved, 'x.pth')
    assert merged['head_channels'] == 32
    assert 'warning: --head_channels 32 given, but x.pth was trained with 16; using 32' in capsys.readouterr().err


def test_progress_bar_choice():
    assert cli.progress_bar_enabled('on') and not cli.progress_bar_enabled('off')
    kwargs = cli.build_trainer_kwargs(parse('--progress_bar', 'off'), 'cpu', 1, '32-true')
    assert kwargs['enable_progress_bar'] is False


def test_dataloader_worker_errors_become_one_line():
    reraised = RuntimeError('Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call '
                            'last):\n  File "x.py", line 3, in f\n    raise DataError(msg)\n'
                            'bevdepth.datasets.errors.DataError: image file a/b.jpg does not exist: check data_root\n')
    assert cli.one_line_message(reraised) == 'image file a/b.jpg does not exist: check data_root'
    assert cli.one_line_message(ValueError('plain: message')) == 'plain: message'
    assert cli.one_line_message(KeyError()) == 'KeyError'


def test_check_data_names_the_missing_piece(tmp_path):
    model = types.SimpleNamespace(train_info_paths=str(tmp_path / 'nuscenes_infos_train.pkl'))
    args = parse('--data_root', str(tmp_path / 'nope'), '--version', 'v1.0-mini')
    with pytest.raises(FileNotFoundError, match='dataroot .*nope not found: pass --data_root'):
        cli._check_data(args, model)
    args = parse('--data_root', str(tmp_path), '--version', 'v1.0-mini')
    with pytest.raises(FileNotFoundError, match="tables 'v1.0-mini' not found under .*--version"):
        cli._check_data(args, model)
    (tmp_path / 'v1.0-mini').mkdir()
    with pytest.raises(FileNotFoundError, match='nuscenes_infos_train.pkl not found: run python scripts/gen_info.py'):
        cli._check_data(args, model)
    (tmp_path / 'nuscenes_infos_train.pkl').write_bytes(b'')
    cli._check_data(args, model)
