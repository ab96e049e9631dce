"""SECONDFPN neck: layer choice per stride, reference keys, output shapes, init."""
import pathlib

import pytest
import torch
from torch import nn

from bevdepth.layers.backbones.second_fpn import SECONDFPN

FIXTURE_KEYS = pathlib.Path(__file__).resolve().parents[2] / 'fixtures' / 'matrixvt_state_dict.txt'


def _reference_shapes(prefix):
    shapes = {}
    for line in FIXTURE_KEYS.read_text().splitlines():
        key, shape = line.split(' ', 1)
        if key.startswith(prefix):
            shapes[key[len(prefix):]] = () if shape == 'scalar' else tuple(
                int(v) for v in shape.strip('(,)').split(',') if v.strip())
    return shapes


def test_image_neck_layers_keys_and_shapes():
    neck = SECONDFPN(in_channels=[256, 512, 1024, 2048], upsample_strides=[0.25, 0.5, 1, 2],
                     out_channels=[128, 128, 128, 128])
    assert {k: tuple(v.shape) for k, v in neck.state_dict().items()} == _reference_shapes('backbone.img_neck.')
    layer_types = [type(block[0]) for block in neck.deblocks]
    assert layer_types == [nn.Conv2d, nn.Conv2d, nn.ConvTranspose2d, nn.ConvTranspose2d]
    assert [block[0].stride for block in neck.deblocks] == [(4, 4), (2, 2), (1, 1), (2, 2)]
    for block in neck.deblocks:
        assert block[0].bias is None
        assert block[1].eps == 1e-3 and block[1].momentum == 0.01
        assert isinstance(block[2], nn.ReLU)
    feats = [torch.randn(1, 256, 16, 32), torch.randn(1, 512, 8, 16), torch.randn(1, 1024, 4, 8),
             torch.randn(1, 2048, 2, 4)]
    out = neck(feats)
    assert isinstance(out, list) and len(out) == 1
    assert out[0].shape == (1, 512, 4, 8)


def test_bev_neck_keys_and_concat_order():
    neck = SECONDFPN(in_channels=[80, 160, 320, 640], upsample_strides=[1, 2, 4, 8], out_channels=[64, 64, 64, 64])
    assert {k: tuple(v.shape) for k, v in neck.state_dict().items()} == _reference_shapes('head.neck.')
    neck.eval()
    feats = [torch.randn(1, 80, 16, 16), torch.randn(1, 160, 8, 8), torch.randn(1, 320, 4, 4),
             torch.randn(1, 640, 2, 2)]
    out = neck(feats)[0]
    assert out.shape == (1, 256, 16, 16)
    # Level i lands in channels [64 i, 64 i + 64).
    torch.testing.assert_close(out[:, 128:192], neck.deblocks[2](feats[2]))


def test_init_weights_touches_only_transposed_convs():
    torch.manual_seed(0)
    neck = SECONDFPN(in_channels=[64, 64], upsample_strides=[0.5, 4], out_channels=[32, 256])
    conv_before = neck.deblocks[0][0].weight.detach().clone()
    neck.init_weights()
    assert torch.equal(neck.deblocks[0][0].weight, conv_before)
    weight = neck.deblocks[1][0].weight  # (in, out, k, k); torch's fan_out is in * k * k for transposed convs
    expected_std = (2.0 / (weight.shape[0] * 16)) ** 0.5
    assert abs(weight.std().item() - expected_std) / expected_std < 0.05


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match='one entry per level'):
        SECONDFPN(in_channels=[8, 8], out_channels=[8], upsample_strides=[1, 2])
    with pytest.raises(ValueError, match='integer'):
        SECONDFPN(in_channels=[8], out_channels=[8], upsample_strides=[1.5])
    neck = SECONDFPN(in_channels=[8, 8], out_channels=[8, 8], upsample_strides=[1, 1])
    with pytest.raises(ValueError, match='got 1 levels'):
        neck([torch.randn(1, 8, 2, 2)])
