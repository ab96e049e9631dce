"""ONNX translations used while exporting MatrixVT_Det (see ``onnx_export``).

* ``torch.inverse`` of 4x4 matrices -> an explicit adjugate / determinant expression (ONNX has no matrix
  inverse); ``inverse_4x4`` is the same formula in eager mode.
* ``torchvision::deform_conv2d`` -> the standard ONNX ``DeformConv`` (opset 19), or, with ``dcn_mode(model,
  'grid_sample')``, DCNv1 rewritten as ``grid_sample`` + a grouped 1x1 conv (``deform_conv2d_grid_sample``) for
  runtimes without ``DeformConv``.
"""
import contextlib

import torch

from bevdepth.deploy.errors import DeployError
from bevdepth.ops.deform_conv import deform_conv2d_grid_sample  # noqa: F401  (re-exported)

__all__ = ['inverse_4x4', 'register_onnx_symbolics', 'deform_conv2d_grid_sample', 'dcn_mode']


# --------------------------------------------------------------------------------------------------------
# 4x4 inverse without a matrix-inverse op
# --------------------------------------------------------------------------------------------------------
def _adjugate_4x4(a):
    """Adjugate and determinant of a 4x4 matrix given as nested lists of scalars (anything with + - *).

    Cofactor expansion through the six 2x2 minors of the top two rows (s*) and of the bottom two rows (c*).
    Shared by the eager ``inverse_4x4`` and the ONNX symbolic, so both compute the same expression.
    Returns (rows, det) with rows a 4x4 nested list of the adjugate entries.
    """
    s0 = a[0][0] * a[1][1] - a[1][0] * a[0][1]
    s1 = a[0][0] * a[1][2] - a[1][0] * a[0][2]
    s2 = a[0][0] * a[1][3] - a[1][0] * a[0][3]
    s3 = a[0][1] * a[1][2] - a[1][1] * a[0][2]
    s4 = a[0][1] * a[1][3] - a[1][1] * a[0][3]
    s5 = a[0][2] * a[1][3] - a[1][2] * a[0][3]
    c5 = a[2][2] * a[3][3] - a[3][2] * a[2][3]
    c4 = a[2][1] * a[3][3] - a[3][1] * a[2][3]
    c3 = a[2][1] * a[3][2] - a[3][1] * a[2][2]
    c2 = a[2][0] * a[3][3] - a[3][0] * a[2][3]
    c1 = a[2][0] * a[3][2] - a[3][0] * a[2][2]
    c0 = a[2][0] * a[3][1] - a[3][0] * a[2][1]
    det = s0 * c5 - s1 * c4 + s2 * c3 + s3 * c2 - s4 * c1 + s5 * c0
    rows = [
        [a[1][1] * c5 - a[1][2] * c4 + a[1][3] * c3, a[0][2] * c4 - a[0][1] * c5 - a[0][3] * c3,
         a[3][1] * s5 - a[3][2] * s4 + a[3][3] * s3, a[2][2] * s4 - a[2][1] * s5 - a[2][3] * s3],
        [a[1][2] * c2 - a[1][0] * c5 - a[1][3] * c1, a[0][0] * c5 - a[0][2] * c2 + a[0][3] * c1,
         a[3][2] * s2 - a[3][0] * s5 - a[3][3] * s1, a[2][0] * s5 - a[2][2] * s2 + a[2][3] * s1],
        [a[1][0] * c4 - a[1][1] * c2 + a[1][3] * c0, a[0][1] * c2 - a[0][0] * c4 - a[0][3] * c0,
         a[3][0] * s4 - a[3][1] * s2 + a[3][3] * s0, a[2][1] * s2 - a[2][0] * s4 - a[2][3] * s0],
        [a[1][1] * c1 - a[1][0] * c3 - a[1][2] * c0, a[0][0] * c3 - a[0][1] * c1 + a[0][2] * c0,
         a[3][1] * s1 - a[3][0] * s3 - a[3][2] * s0, a[2][0] * s3 - a[2][1] * s1 + a[2][2] * s0],
    ]
    return rows, det


def inverse_4x4(mats):
    """Inverse of (..., 4, 4) matrices by the adjugate formula (what the exported graph computes)."""
    if mats.shape[-2:] != (4, 4):
        raise DeployError(f'inverse_4x4 needs (..., 4, 4) matrices, got shape {tuple(mats.shape)}')
    entries = [[mats[..., i, j] for j in range(4)] for i in range(4)]
    rows, det = _adjugate_4x4(entries)
    adjugate = torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)
    return adjugate / det[..., None, None]


class _OnnxScalar:
    """A graph value with + - * so ``_adjugate_4x4`` can be emitted as ONNX Mul / Add / Sub nodes."""

    def __init__(self, graph, value):
        self.graph = graph
        self.value = value

    def __add__(self, other):
        return _OnnxScalar(self.graph, self.graph.op('Add', self.value, other.value))

    def __sub__(self, other):
        return _OnnxScalar(self.graph, self.graph.op('Sub', self.value, other.value))

    def __mul__(self, other):
        return _OnnxScalar(self.graph, self.graph.op('Mul', self.value, other.value))


def _linalg_inv_symbolic(g, x):
    """ONNX symbolic of ``aten::linalg_inv`` for (..., 4, 4) inputs (ONNX has no Inverse op)."""
    sizes = x.type().sizes() if x.type().kind() == 'TensorType' else None
    if not sizes or list(sizes[-2:]) != [4, 4]:
        raise RuntimeError(f'ONNX export of torch.inverse only supports (..., 4, 4) matrices, got {sizes}')

    def index(i):
        return g.op('Constant', value_t=torch.tensor(i, dtype=torch.long))

    row_values = [g.op('Gather', x, index(i), axis_i=-2) for i in range(4)]
    entries = [[_OnnxScalar(g, g.op('Gather', row_values[i], index(j), axis_i=-1)) for j in range(4)]
               for i in range(4)]
    rows, det = _adjugate_4x4(entries)
    minus_one = index([-1])
    minus_two = index([-2])
    stacked_rows = [g.op('Concat', *[g.op('Unsqueeze', entry.value, minus_one) for entry in row], axis_i=-1)
                    for row in rows]
    adjugate = g.op('Concat', *[g.op('Unsqueeze', row, minus_two) for row in stacked_rows], axis_i=-2)
    det = g.op('Unsqueeze', det.value, index([-1, -2]))
    return g.op('Div', adjugate, det)


# --------------------------------------------------------------------------------------------------------
# Deformable convolution: native ONNX DeformConv, or a GridSample decomposition
# --------------------------------------------------------------------------------------------------------
def _deform_conv2d_symbolic(g, inp, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                            groups, offset_groups, use_mask):
    """``torchvision::deform_conv2d`` -> ONNX ``DeformConv`` (opset 19). Offsets share torchvision's layout:
    (B, 2 * offset_groups * kh * kw, oH, oW), interleaved (dy, dx) per tap."""
    from torch.onnx import symbolic_helper

    kernel_h, kernel_w = weight.type().sizes()[2:]
    ints = [symbolic_helper._get_const(v, 'i', name) for v, name in (
        (stride_h, 'stride_h'), (stride_w, 'stride_w'), (pad_h, 'pad_h'), (pad_w, 'pad_w'), (dil_h, 'dil_h'),
        (dil_w, 'dil_w'), (groups, 'groups'), (offset_groups, 'offset_groups'))]
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, offset_groups = ints
    inputs = [inp, weight, offset, bias]
    if symbolic_helper._get_const(use_mask, 'b', 'use_mask'):
        inputs.append(mask)
    return g.op('DeformConv', *inputs, dilations_i=[dil_h, dil_w], group_i=groups,
                kernel_shape_i=[kernel_h, kernel_w], offset_group_i=offset_groups,
                pads_i=[pad_h, pad_w, pad_h, pad_w], strides_i=[stride_h, stride_w])


def register_onnx_symbolics(opset):
    """Register our exporters for ``torchvision::deform_conv2d`` (-> DeformConv) and ``aten::linalg_inv``
    (-> adjugate formula) with the TorchScript-based ONNX exporter. Idempotent."""
    from torch.onnx import register_custom_op_symbolic

    if opset >= 19:
        register_custom_op_symbolic('torchvision::deform_conv2d', _deform_conv2d_symbolic, 19)
    register_custom_op_symbolic('aten::linalg_inv', _linalg_inv_symbolic, 9)


@contextlib.contextmanager
def dcn_mode(model, dcn):
    """Temporarily route every ``DeformConv2dPack`` of ``model`` through the chosen DCN implementation:
    'native' traces torchvision's op (-> ONNX DeformConv), 'grid_sample' the decomposition (whatever the
    device's usual backend is)."""
    from bevdepth.ops.deform_conv import DeformConv2dPack

    backend = {'native': 'torchvision', 'grid_sample': 'grid_sample'}[dcn]
    modules = [module for module in model.modules() if isinstance(module, DeformConv2dPack)]
    previous = [module.backend for module in modules]
    for module in modules:
        module.backend = backend
    try:
        yield
    finally:
        for module, saved in zip(modules, previous):
            module.backend = saved
