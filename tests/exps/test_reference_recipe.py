"""The reference recipe by default: the seed's command resolves to it, and the R50 experiments start from
torchvision's ImageNet ResNet-50 (IMAGENET1K_V1) exactly as the reference does. No test touches the network."""
import os
import subprocess
import sys

import pytest
import torch
import torchvision

from bevdepth.engine import cli
from bevdepth.layers.backbones import imagenet_weights
from exps.nuscenes.MatrixVT.matrixvt_bev_depth_lss_r50_256x704_128x128_24e_ema import EXP_NAME, MatrixVT_Exp

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MATRIXVT_SCRIPT = os.path.join(REPO_ROOT, 'exps', 'nuscenes', 'MatrixVT',
                               'matrixvt_bev_depth_lss_r50_256x704_128x128_24e_ema.py')
SEED_COMMAND = ['-b', '8', '--gpus', '8', '--amp_backend', 'native', '--precision', '16', '--learning_rate',
                '0.000003125', '--max_epoch', '24', '--seed', '0']


def _parse(argv):
    return cli.parse_args(EXP_NAME, argv, model_class=MatrixVT_Exp)


def test_seed_command_resolves_to_the_reference_recipe(monkeypatch):
    args = _parse(SEED_COMMAND)
    # A machine with 8 GPUs, seen from this CPU-only one: only the device layer is replaced.
    monkeypatch.setattr(cli.devices_helpers, 'trainer_device_kwargs',
                        lambda **kwargs: dict(kwargs, plugins=None, strategy='ddp'))
    devices = cli.resolve_devices(args, 'cuda')
    precision = cli.resolve_precision(args.precision, 'cuda')
    trainer_kwargs = cli.build_trainer_kwargs(args, 'cuda', devices, precision)
    assert (devices, precision) == (8, '16-mixed')
    assert trainer_kwargs['gradient_clip_val'] == 5 and trainer_kwargs['max_epochs'] == 24
    assert cli.effective_learning_rate(args.learning_rate, args.batch_size_per_device,
                                       devices * args.num_nodes) == pytest.approx(2e-4)
    assert cli.pretrained_source(args.config, loads_checkpoint=False) == 'torchvision'

    model = cli.build_lightning_module(MatrixVT_Exp, args.config)
    recipe = '\n'.join(cli.recipe_lines(args, 'train', 'cuda', devices, precision, model))
    for line in ('cuda x 8 per node x 1 node(s)', 'precision        16-mixed\n',
                 '3.125e-06 per image x 8 per device x 8 devices = 0.0002 (global batch 64)',
                 'epochs           24, lr schedule multistep (x0.1 at epochs [19, 23])', 'EMA              on', 'CBGS             on',
                 'gradient clip    5.0', 'image backend    opencv'):
        assert line in recipe + '\n', (line, recipe)


def test_precision_defaults_to_fp16_amp_on_accelerators_and_fp32_on_cpu():
    args = _parse([arg for arg in SEED_COMMAND if arg not in ('--precision', '16')])
    assert args.precision is None
    assert cli.resolve_precision(args.precision, 'cuda') == '16-mixed'
    assert cli.resolve_precision(args.precision, 'npu') == '16-mixed'
    assert cli.resolve_precision(args.precision, 'cpu') == '32-true'


def test_pretrained_is_only_used_by_a_new_training_run():
    config = _parse([]).config
    assert cli.pretrained_source(config, loads_checkpoint=True) is None
    assert cli.pretrained_source(dict(config, pretrained='none'), loads_checkpoint=False) is None
    assert cli.pretrained_source(dict(config, pretrained='/x/r50.pth'), loads_checkpoint=False) == '/x/r50.pth'
    args = _parse(['--image_backend', 'pillow', '--no-cbgs'])
    model = cli.build_lightning_module(MatrixVT_Exp, args.config)
    assert (model.image_backend, model.data_use_cbgs) == ('pillow', False)
    assert model.model.backbone.img_backbone.pretrained_path is None  # building never loads nor fetches


@pytest.fixture
def imagenet_cache(tmp_path, monkeypatch):
    """A temporary TORCH_HOME holding a ResNet-50 state dict in torchvision's layout under V1's file name."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))

    def no_network(*args, **kwargs):
        raise AssertionError('the test must not download')

    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)
    torch.manual_seed(3)
    state_dict = torchvision.models.resnet50(weights=None).state_dict()
    os.makedirs(imagenet_weights.cache_dir())
    torch.save(state_dict, imagenet_weights.cached_weights_path(50))
    return state_dict


def test_imagenet_weights_load_into_the_backbone(imagenet_cache):
    model = cli.build_lightning_module(MatrixVT_Exp, _parse([]).config)
    assert model.load_pretrained_image_backbone('torchvision') == 318
    backbone = model.model.backbone.img_backbone
    assert backbone.pretrained_path == imagenet_weights.cached_weights_path(50)
    own = backbone.state_dict()
    expected = {key: value for key, value in imagenet_cache.items() if not key.startswith('fc.')}
    assert backbone.pretrained_tensors_loaded == len(expected) == len(own) == 318
    for key, value in expected.items():
        assert torch.equal(own[key], value), key
    assert f'{imagenet_weights.cached_weights_path(50)} (318 tensors loaded' in cli.describe_pretrained(model.model)


@pytest.mark.slow
def test_a_training_step_on_real_data_keeps_the_imagenet_stem_frozen(imagenet_cache, real_mini_copy, tmp_path,
                                                                     capsys):
    root = tmp_path / 'run'
    model = cli.run_cli(MatrixVT_Exp, EXP_NAME, use_ema=True, exit_on_user_error=False, argv=[
        '--accelerator', 'cpu', '-b', '1', '--max_epochs', '1', '--limit_train_batches', '1', '--no-cbgs',
        '--num_workers', '0', '--progress_bar', 'off', '--data_root', str(real_mini_copy),
        '--version', 'v1.0-mini', '--default_root_dir', str(root)])
    out = capsys.readouterr().out
    assert 'resnet50-0676ba61.pth (318 tensors loaded, fc.* not used)' in out
    backbone = model.model.backbone.img_backbone
    assert model.trainer.global_step == 1
    for name in ('conv1.weight', 'bn1.weight', 'bn1.bias', 'bn1.running_mean', 'bn1.running_var'):
        assert torch.equal(backbone.state_dict()[name], imagenet_cache[name]), name  # frozen stem, BN in eval
    assert not any(param.requires_grad for param in (*backbone.conv1.parameters(), *backbone.bn1.parameters()))
    assert not torch.equal(backbone.layer1[0].conv1.weight.detach(), imagenet_cache['layer1.0.conv1.weight'])


def test_offline_without_the_weights_fails_in_one_line_before_writing(real_mini_copy, tmp_path):
    torch_home = tmp_path / 'empty_torch_home'
    run_dir = tmp_path / 'run'
    # torchvision's V2 file is there, but only V1 may be used.
    os.makedirs(torch_home / 'hub' / 'checkpoints')
    (torch_home / 'hub' / 'checkpoints' / 'resnet50-11ad3fa6.pth').write_bytes(b'v2')
    blocked = 'http://127.0.0.1:9'  # the discard port: nothing listens, the connection is refused at once
    env = dict(os.environ, TORCH_HOME=str(torch_home), https_proxy=blocked, HTTPS_PROXY=blocked, no_proxy='',
               NO_PROXY='', PYTHONPATH=REPO_ROOT)
    result = subprocess.run(
        [sys.executable, MATRIXVT_SCRIPT, '--accelerator', 'cpu', '-b', '1', '--max_epochs', '1',
         '--data_root', str(real_mini_copy), '--version', 'v1.0-mini', '--default_root_dir', str(run_dir)],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    for part in ('resnet50-0676ba61.pth', str(torch_home / 'hub' / 'checkpoints'), '--pretrained PATH',
                 '--pretrained none'):
        assert part in errors[0]
    assert not run_dir.exists()
    assert sorted(os.listdir(torch_home / 'hub' / 'checkpoints')) == ['resnet50-11ad3fa6.pth']
