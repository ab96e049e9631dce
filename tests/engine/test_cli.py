"""The seed-compatible CLI: flag parsing, Trainer mapping, checkpoint discovery and checks."""
import argparse
import os
import time
import types

import pytest
import torch
from pytorch_lightning.strategies import DDPStrategy

from bevdepth.engine import cli
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
    assert defaults.batch_size_per_device == cli.DEFAULT_BATCH_SIZE_PER_DEVICE
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
    (['--devices', 'zero'], 'positive integer'),
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
        cli.load_weights(Holder(5), str(path))
    message = str(error.value)
    assert '\n' not in message and 'does not fit Holder' in message
    assert "1 unexpected keys ['model.extra.weight']" in message
    assert 'model.0.weight (4, 2) vs (5, 2)' in message
    del state['model.extra.weight']
    torch.save({'epoch': 3, 'global_step': 9, 'state_dict': state}, path)
    target = Holder(4)
    cli.load_weights(target, str(path))
    assert torch.equal(target.model[0].weight, state['model.0.weight'])


def test_missing_or_foreign_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        cli.load_checkpoint_state_dict(str(tmp_path / 'nope.pth'))
    torch.save({'weights': 1}, tmp_path / 'other.pth')
    with pytest.raises(CheckpointMismatchError, match="expected a dict with 'state_dict'"):
        cli.load_checkpoint_state_dict(str(tmp_path / 'other.pth'))


class WithOwnFlags:
    """Stands for an experiment adding its own flags (the seed's add_model_specific_args hook)."""

    @staticmethod
    def add_model_specific_args(parser):
        parser.add_argument('--final_dim', type=int, nargs=2, default=[64, 192])
        parser.add_argument('--ida_aug', action=argparse.BooleanOptionalAction, default=True)
        return parser


def test_experiment_flags_are_parsed_and_listed_for_the_model():
    args = cli.parse_args('exp', ['--final_dim', '96', '256', '--no-ida_aug'], model_class=WithOwnFlags)
    assert args.final_dim == [96, 256] and args.ida_aug is False
    assert sorted(args.model_arg_names) == ['final_dim', 'ida_aug']
    args = cli.parse_args('exp', [], defaults={'final_dim': [32, 64]}, model_class=WithOwnFlags)
    assert args.final_dim == [32, 64] and args.ida_aug is True
    assert parse().model_arg_names == []
    with pytest.raises(SystemExit):
        parse('--final_dim', '96', '256')  # not a flag of the plain CLI


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
