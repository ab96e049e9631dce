"""bevdepth.ops.precision: the fp32 island under autocast and the autocast device type."""
import torch

from bevdepth.ops.precision import autocast_device_type, autocast_off


def test_autocast_device_type_falls_back_to_cpu():
    assert autocast_device_type(torch.device('cuda', 0)) == 'cuda'
    assert autocast_device_type('npu:1') == 'npu'
    assert autocast_device_type('mps') == 'mps'
    assert autocast_device_type(torch.device('meta')) == 'cpu'
    assert autocast_device_type(None) == 'cpu'


def test_autocast_off_keeps_float32_inside_a_bf16_block():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
        with autocast_off(a.device):
            assert (a @ b).dtype == torch.float32
