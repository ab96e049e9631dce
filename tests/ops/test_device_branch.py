"""The device-branch switch (bevdepth.ops.device_branch): forcing, precedence, bad values, autocast types, and
the DCN 'auto' backend it drives. The projection branches are tested in tests/layers/backbones/test_matrixvt.py."""
import pytest
import torch

from bevdepth.ops import deform_conv
from bevdepth.ops.device_branch import (FORCE_ENV, autocast_device_type, autocast_off, branch_type,
                                        forced_branch)


def test_default_is_the_tensor_device(device_branch):
    assert forced_branch() is None
    assert branch_type(torch.device('cpu')) == 'cpu' and branch_type('cuda:1') == 'cuda'
    assert branch_type('npu:0') == 'npu'


def test_forcing_applies_to_cpu_tensors_only(device_branch):
    with device_branch('npu'):
        assert branch_type('cpu') == 'npu' and forced_branch() == 'npu'
        assert branch_type(torch.device('cuda', 0)) == 'cuda'  # a real accelerator keeps its own branch
        with device_branch(None):
            assert branch_type('cpu') == 'cpu'
        assert branch_type('cpu') == 'npu'
    assert branch_type('cpu') == 'cpu'


def test_environment_variable_and_precedence(device_branch, monkeypatch):
    monkeypatch.setenv(FORCE_ENV, 'CUDA')
    assert branch_type('cpu') == 'cuda'
    with device_branch('cpu'):
        assert branch_type('cpu') == 'cpu'
    monkeypatch.setenv(FORCE_ENV, 'gpu')
    with pytest.raises(ValueError, match=f'{FORCE_ENV}: device branch must be one of cpu, cuda, npu'):
        branch_type('cpu')
    with pytest.raises(ValueError, match='force_device_branch'):
        with device_branch('tpu'):
            pass


def test_autocast_device_type_per_branch(device_branch):
    assert autocast_device_type('cpu') == 'cpu'
    with device_branch('cuda'):
        assert autocast_device_type('cpu') == 'cuda'
    with device_branch('npu'):  # no torch_npu here: torch has no 'npu' autocast, the island falls back to 'cpu'
        assert autocast_device_type('cpu') == ('npu' if hasattr(torch, 'npu') else 'cpu')
    assert autocast_device_type('mps') in ('mps', 'cpu')


def test_autocast_off_disables_cpu_autocast_by_default(device_branch):
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with autocast_off(torch.device('cpu')):
            assert not torch.is_autocast_enabled('cpu')
            assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
        assert torch.is_autocast_enabled('cpu')


def test_dcn_auto_backend_follows_the_branch(device_branch, monkeypatch):
    # A forced 'cuda' branch runs torchvision's kernel on CPU; its output equals the grid_sample decomposition.
    calls = []
    real = deform_conv.tv_deform_conv2d

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(deform_conv, 'tv_deform_conv2d', spy)
    torch.manual_seed(0)
    module = deform_conv.DeformConv2dPack(8, 8, 3, padding=1)
    torch.nn.init.normal_(module.conv_offset.weight, std=0.1)
    x = torch.randn(2, 8, 10, 12)
    expected = module(x)
    assert not calls
    with device_branch('cuda'):
        forced = module(x)
    assert calls
    torch.testing.assert_close(forced, expected, rtol=1e-4, atol=1e-5)
