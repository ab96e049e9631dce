"""DeformConv2dPack: mmcv parameter layout, torchvision backend vs a plain bilinear-sampling reference, and the
NPU branch driven through a stand-in ``torch_npu`` module."""
import sys
import types

import pytest
import torch

from bevdepth.ops import deform_conv
from bevdepth.ops.deform_conv import DeformConv2dPack, deform_conv2d, deform_conv2d_npu, npu_offset_order


def bilinear_zero_pad(img, y, x):
    """Sample img (C, H, W) at real (y, x) with zero outside, like the DCN kernels (corner-wise validity)."""
    channels, height, width = img.shape
    y0, x0 = int(torch.floor(y)), int(torch.floor(x))
    out = torch.zeros(channels, dtype=img.dtype)
    if y <= -1 or y >= height or x <= -1 or x >= width:
        return out
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < height and 0 <= xx < width:
                out = out + wy * wx * img[:, yy, xx]
    return out


def reference_deform_conv(x, offset, weight, stride, padding, dilation, groups, deform_groups, mask=None):
    """Loop implementation of DCN: offsets interleaved (dy, dx) per deform group and kernel tap."""
    batch, in_ch, height, width = x.shape
    out_ch, in_per_group, kh, kw = weight.shape
    out_h = (height + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    out_w = (width + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    ch_per_dg = in_ch // deform_groups
    out_per_group = out_ch // groups
    out = torch.zeros(batch, out_ch, out_h, out_w, dtype=x.dtype)
    for b in range(batch):
        for oy in range(out_h):
            for ox in range(out_w):
                # columns (in_ch, kh, kw) of deformed samples
                cols = torch.zeros(in_ch, kh, kw, dtype=x.dtype)
                for g in range(deform_groups):
                    for i in range(kh):
                        for j in range(kw):
                            tap = i * kw + j
                            dy = offset[b, 2 * (g * kh * kw + tap), oy, ox]
                            dx = offset[b, 2 * (g * kh * kw + tap) + 1, oy, ox]
                            py = oy * stride - padding + i * dilation + dy
                            px = ox * stride - padding + j * dilation + dx
                            val = bilinear_zero_pad(x[b, g * ch_per_dg:(g + 1) * ch_per_dg], py, px)
                            if mask is not None:
                                val = val * mask[b, g * kh * kw + tap, oy, ox]
                            cols[g * ch_per_dg:(g + 1) * ch_per_dg, i, j] = val
                for grp in range(groups):
                    w = weight[grp * out_per_group:(grp + 1) * out_per_group]
                    c = cols[grp * in_per_group:(grp + 1) * in_per_group]
                    out[b, grp * out_per_group:(grp + 1) * out_per_group, oy, ox] = (w * c).flatten(1).sum(1)
    return out


def test_state_dict_layout_matches_mmcv():
    dcn = DeformConv2dPack(16, 16, kernel_size=3, padding=1, groups=4)
    shapes = {k: tuple(v.shape) for k, v in dcn.state_dict().items()}
    assert list(shapes) == ['weight', 'conv_offset.weight', 'conv_offset.bias']
    assert shapes == {'weight': (16, 4, 3, 3), 'conv_offset.weight': (18, 16, 3, 3), 'conv_offset.bias': (18,)}
    assert torch.count_nonzero(dcn.conv_offset.weight) == 0 and torch.count_nonzero(dcn.conv_offset.bias) == 0


def test_zero_offsets_equal_plain_grouped_conv():
    torch.manual_seed(0)
    dcn = DeformConv2dPack(8, 12, kernel_size=3, padding=1, groups=4)
    x = torch.randn(2, 8, 5, 7)
    expected = torch.nn.functional.conv2d(x, dcn.weight, padding=1, groups=4)
    torch.testing.assert_close(dcn(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('backend', ['torchvision', 'grid_sample'])
@pytest.mark.parametrize('deform_groups', [1, 2])
def test_cpu_backends_match_bilinear_reference(deform_groups, backend):
    torch.manual_seed(1)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    dcn = DeformConv2dPack(8, 8, kernel_size=3, padding=1, groups=4, deform_groups=deform_groups).double()
    dcn.backend = backend
    # Non-zero offsets, including some that push samples outside the map.
    torch.nn.init.normal_(dcn.conv_offset.weight, std=0.3)
    torch.nn.init.uniform_(dcn.conv_offset.bias, -1.5, 1.5)
    offset = dcn.conv_offset(x).detach()
    expected = reference_deform_conv(x, offset, dcn.weight.detach(), 1, 1, 1, 4, deform_groups)
    torch.testing.assert_close(dcn(x).detach(), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('backend', ['torchvision', 'grid_sample'])
def test_stride_dilation_against_reference(backend):
    torch.manual_seed(2)
    x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    weight = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    offset = torch.randn(1, 18, 3, 3, dtype=torch.float64)
    out = deform_conv2d(x, offset, weight, stride=2, padding=1, dilation=2, groups=2, backend=backend)
    expected = reference_deform_conv(x, offset, weight, 2, 1, 2, 2, 1)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_gradients_flow_to_input_weight_and_offset_conv():
    torch.manual_seed(3)
    dcn = DeformConv2dPack(8, 8, kernel_size=3, padding=1, groups=4)
    torch.nn.init.normal_(dcn.conv_offset.weight, std=0.1)
    x = torch.randn(1, 8, 6, 6, requires_grad=True)
    dcn(x).square().sum().backward()
    for grad in (x.grad, dcn.weight.grad, dcn.conv_offset.weight.grad, dcn.conv_offset.bias.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize('stride, dilation, groups, deform_groups', [(1, 1, 4, 1), (2, 2, 2, 2)])
def test_grid_sample_backend_gradients_equal_torchvision(stride, dilation, groups, deform_groups):
    """The CPU default (grid_sample decomposition) trains exactly like torchvision's kernel: same output and
    the same gradients for input, offsets, weight and bias (float64, offsets reaching past the border)."""
    torch.manual_seed(7)
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    weight = torch.randn(8, 8 // groups, 3, 3, dtype=torch.float64)
    bias = torch.randn(8, dtype=torch.float64)
    out_h, out_w = (7 + 2 - 2 * dilation - 1) // stride + 1, (9 + 2 - 2 * dilation - 1) // stride + 1
    offset = 2.5 * torch.randn(2, 2 * deform_groups * 9, out_h, out_w, dtype=torch.float64)
    upstream = torch.randn(2, 8, out_h, out_w, dtype=torch.float64)
    results = {}
    for backend in ('torchvision', 'grid_sample'):
        leaves = [t.clone().requires_grad_() for t in (x, offset, weight, bias)]
        out = deform_conv2d(leaves[0], leaves[1], leaves[2], stride, 1, dilation, groups, deform_groups, leaves[3],
                            backend=backend)
        out.backward(upstream)
        results[backend] = [out.detach()] + [leaf.grad for leaf in leaves]
    for name, got, expected in zip(('output', 'x', 'offset', 'weight', 'bias'), results['grid_sample'],
                                   results['torchvision']):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9, msg=f'{name} differs')


def test_auto_backend_is_grid_sample_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(deform_conv, 'deform_conv2d_grid_sample',
                        lambda *args: calls.append('grid_sample') or torch.zeros(1, 4, 5, 5))
    deform_conv2d(torch.randn(1, 4, 5, 5), torch.zeros(1, 18, 5, 5), torch.randn(4, 4, 3, 3), padding=1)
    assert calls == ['grid_sample']
    with pytest.raises(ValueError, match='backend must be one of'):
        deform_conv2d(torch.randn(1, 4, 5, 5), torch.zeros(1, 18, 5, 5), torch.randn(4, 4, 3, 3), backend='cuda')


def test_bad_offset_channels_raise():
    with pytest.raises(ValueError, match='offset has'):
        deform_conv2d(torch.randn(1, 4, 5, 5), torch.randn(1, 10, 5, 5), torch.randn(4, 4, 3, 3), padding=1)


def test_bad_groups_raise():
    with pytest.raises(ValueError, match='divisible'):
        DeformConv2dPack(6, 8, 3, groups=4)


def test_npu_offset_order_is_all_x_then_all_y():
    index = npu_offset_order(3, 3, 2)
    assert index.tolist() == list(range(1, 36, 2)) + list(range(0, 36, 2))


class FakeTorchNpu(types.ModuleType):
    """Stand-in for torch_npu: implements npu_deformable_conv2d's documented contract on CPU and records calls.

    Contract: x NCHW, weight (out, in / groups, kh, kw), offset = [all dx, all dy, mask] on channels,
    stride / dilation [1, 1, sh, sw], padding [top, bottom, left, right], modulated=True; returns
    (output, deformed_offsets_output).
    """

    def __init__(self):
        super().__init__('torch_npu')
        self.calls = []

    def npu_deformable_conv2d(self, x, weight, offset, bias, kernel_size, stride, padding, dilation=(1, 1, 1, 1),
                              groups=1, deformable_groups=1, modulated=True):
        self.calls.append(dict(kernel_size=list(kernel_size), stride=list(stride), padding=list(padding),
                               dilation=list(dilation), groups=groups, deformable_groups=deformable_groups,
                               modulated=modulated, offset_channels=offset.shape[1], bias=bias))
        kh, kw = kernel_size
        taps = deformable_groups * kh * kw
        dx, dy, mask = offset[:, :taps], offset[:, taps:2 * taps], offset[:, 2 * taps:]
        assert padding[0] == padding[1] and padding[2] == padding[3]
        # back to torchvision's interleaved (dy, dx)
        interleaved = torch.stack([dy, dx], dim=2).flatten(1, 2)
        from torchvision.ops import deform_conv2d as tv
        out = tv(x, interleaved, weight, bias=bias, stride=tuple(stride[2:]), padding=(padding[0], padding[2]),
                 dilation=tuple(dilation[2:]), mask=mask)
        return out, torch.empty(0)


@pytest.fixture
def fake_torch_npu(monkeypatch):
    fake = FakeTorchNpu()
    monkeypatch.setitem(sys.modules, 'torch_npu', fake)
    return fake


def test_npu_function_with_stand_in_matches_torchvision(fake_torch_npu):
    torch.manual_seed(4)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    weight = torch.randn(8, 2, 3, 3, dtype=torch.float64)
    offset = torch.randn(2, 36, 5, 6, dtype=torch.float64)
    out = deform_conv2d_npu(x, offset, weight, stride=1, padding=1, dilation=1, groups=4, deform_groups=2)
    expected = reference_deform_conv(x, offset, weight, 1, 1, 1, 4, 2)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    call = fake_torch_npu.calls[-1]
    assert call == dict(kernel_size=[3, 3], stride=[1, 1, 1, 1], padding=[1, 1, 1, 1], dilation=[1, 1, 1, 1],
                        groups=4, deformable_groups=2, modulated=True, offset_channels=54, bias=None)


def test_module_dispatches_to_npu_branch(fake_torch_npu, monkeypatch):
    torch.manual_seed(5)
    dcn = DeformConv2dPack(8, 8, kernel_size=3, padding=1, groups=4)
    torch.nn.init.normal_(dcn.conv_offset.weight, std=0.3)
    x = torch.randn(1, 8, 5, 5)
    expected = dcn(x)
    assert fake_torch_npu.calls == []
    monkeypatch.setattr(deform_conv, '_is_npu', lambda tensor: True)
    out = dcn(x)
    assert len(fake_torch_npu.calls) == 1
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_npu_branch_without_torch_npu_fails_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch_npu', None)  # makes `import torch_npu` raise ImportError
    with pytest.raises(RuntimeError, match='needs torch_npu'):
        deform_conv2d_npu(torch.randn(1, 4, 5, 5), torch.zeros(1, 18, 5, 5), torch.randn(4, 4, 3, 3), padding=1)


def test_low_precision_input_computes_in_fp32_and_keeps_dtype():
    torch.manual_seed(6)
    dcn = DeformConv2dPack(8, 8, kernel_size=3, padding=1, groups=4)
    torch.nn.init.normal_(dcn.conv_offset.weight, std=0.1)
    x = torch.randn(1, 8, 5, 5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = dcn(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), dcn(x), rtol=0.05, atol=0.05)
