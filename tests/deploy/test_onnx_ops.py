"""bevdepth.deploy.onnx_ops: the 4x4 inverse and the deformable convolution exported to ONNX, checked on
onnxruntime against PyTorch / torchvision."""
import io

import numpy as np
import pytest
import torch
import torchvision

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')

from bevdepth.deploy.onnx_ops import (dcn_mode, deform_conv2d_grid_sample, inverse_4x4,  # noqa: E402
                                      register_onnx_symbolics)
from bevdepth.ops.deform_conv import DeformConv2dPack  # noqa: E402


def _ort_run(model_bytes, feeds):
    session = ort.InferenceSession(model_bytes, providers=['CPUExecutionProvider'])
    return session.run(None, feeds)


# ------------------------------------------------------------------------------------------- building blocks
def test_inverse_4x4_matches_torch_inverse():
    torch.manual_seed(0)
    mats = torch.randn(3, 6, 4, 4, dtype=torch.float64) + 2 * torch.eye(4, dtype=torch.float64)
    assert torch.allclose(inverse_4x4(mats), torch.inverse(mats), atol=1e-10)
    with pytest.raises(ValueError, match='4, 4'):
        inverse_4x4(torch.eye(3))


def test_linalg_inv_exports_as_adjugate_graph():
    register_onnx_symbolics(19)

    class Inverse(torch.nn.Module):
        def forward(self, mats):
            return torch.inverse(mats)

    torch.manual_seed(0)
    mats = torch.randn(2, 6, 4, 4) + 3 * torch.eye(4)
    buffer = io.BytesIO()
    torch.onnx.export(Inverse(), (mats,), buffer, dynamo=False, opset_version=19, input_names=['m'])
    op_types = {node.op_type for node in onnx.load_from_string(buffer.getvalue()).graph.node}
    assert 'Inverse' not in op_types and 'Div' in op_types
    out = _ort_run(buffer.getvalue(), {'m': mats.numpy()})[0]
    assert np.abs(out - torch.inverse(mats).numpy()).max() < 1e-5


@pytest.mark.parametrize('channels, out_channels, groups, deform_groups, size, stride, padding, dilation', [
    (16, 16, 4, 1, (9, 11), 1, 1, 1),  # the DepthNet DCN layout (groups 4, one offset group)
    (8, 6, 2, 2, (7, 5), 2, 1, 2),
    (4, 4, 1, 1, (1, 6), 1, 1, 1),  # a 1-pixel-high map (align_corners=False mapping must hold)
])
def test_grid_sample_dcn_matches_torchvision(channels, out_channels, groups, deform_groups, size, stride, padding,
                                             dilation):
    torch.manual_seed(0)
    x = torch.randn(2, channels, *size)
    weight = torch.randn(out_channels, channels // groups, 3, 3)
    bias = torch.randn(out_channels)
    out_h = (size[0] + 2 * padding - dilation * 2 - 1) // stride + 1
    out_w = (size[1] + 2 * padding - dilation * 2 - 1) // stride + 1
    offset = 3 * torch.randn(2, 2 * deform_groups * 9, out_h, out_w)
    offset[:, :, 0, 0] = -1.0  # samples exactly on the zero-padding border
    expected = torchvision.ops.deform_conv2d(x, offset, weight, bias, stride=stride, padding=padding,
                                             dilation=dilation)
    got = deform_conv2d_grid_sample(x, offset, weight, (stride, stride), (padding, padding), (dilation, dilation),
                                    groups, deform_groups, bias)
    assert (got - expected).abs().max() < 1e-4


@pytest.mark.parametrize('dcn, opset, op_type', [('native', 19, 'DeformConv'), ('grid_sample', 17, 'GridSample')])
def test_deform_conv_pack_exports_and_matches(dcn, opset, op_type):
    torch.manual_seed(0)
    module = DeformConv2dPack(32, 32, 3, padding=1, groups=4).eval()
    torch.nn.init.normal_(module.conv_offset.weight, std=0.3)  # non-zero offsets (zero-init is a plain conv)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dcn = module

        def forward(self, x):
            return self.dcn(x)

    holder = Holder().eval()
    x = torch.randn(2, 32, 8, 12)
    register_onnx_symbolics(opset)
    buffer = io.BytesIO()
    with dcn_mode(holder, dcn), torch.no_grad():
        torch.onnx.export(holder, (x,), buffer, dynamo=False, opset_version=opset, input_names=['x'])
    assert 'forward' not in vars(module)  # the patch is undone
    op_types = {node.op_type for node in onnx.load_from_string(buffer.getvalue()).graph.node}
    assert op_type in op_types
    with torch.no_grad():
        expected = holder(x).numpy()
    assert np.abs(_ort_run(buffer.getvalue(), {'x': x.numpy()})[0] - expected).max() < 1e-4
