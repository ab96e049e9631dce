"""Deformable convolution (DCNv1) with mmcv's ``DeformConv2dPack`` parameter layout, no compiled mmcv ops.

The reference builds ``DepthNet.depth_conv[4]`` as mmcv ``DCN`` = ``DeformConv2dPack`` (upstream
``bevdepth/layers/backbones/base_lss_fpn.py`` ``DepthNet``, through ``mmcv.cnn.build_conv_layer``):
a ``weight`` of shape (out, in / groups, k, k), no bias, and a ``conv_offset`` Conv2d (with bias,
zero-initialised) predicting 2 * deform_groups * k * k offset channels laid out per deform group and
kernel tap as interleaved (dy, dx) -- the same layout as ``torchvision.ops.deform_conv2d``.

Backends, chosen by the input tensor's device (``backend='auto'``):
- CPU: ``deform_conv2d_grid_sample``, DCNv1 as ``grid_sample`` of the k x k taps + one grouped 1x1 conv. Same
  values as torchvision's kernel (exact bilinear sampling with zero padding, up to float summation order) and
  autograd through two stock ops: fwd+bwd measured 14x faster than torchvision's CPU kernel on the tiny
  config's DepthNet DCN and 7x on the full one (its backward loops per sample on one thread).
- CUDA / anything else: ``torchvision.ops.deform_conv2d`` (autograd included).
- Ascend NPU (``x.device.type == 'npu'``): ``torch_npu.npu_deformable_conv2d``, imported lazily. That kernel
  is the modulated (v2) one: it wants the offsets re-ordered as all dx first, then all dy (the
  ``sort_index_fp`` permutation of mmcv's NPU path), followed by a modulation mask that we fill with ones
  (DCNv1 == DCNv2 with mask 1). Weight is passed as the usual (out, in / groups, kh, kw) tensor; stride and
  dilation are 4-lists in NCHW order and padding is (top, bottom, left, right). torch_npu registers its own
  autograd for this op, so gradients flow without a hand-written backward.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from bevdepth.ops.device_branch import branch_type

__all__ = ['DeformConv2dPack', 'deform_conv2d', 'deform_conv2d_grid_sample', 'deform_conv2d_npu', 'npu_offset_order']

BACKENDS = ('auto', 'torchvision', 'grid_sample', 'npu')


def _is_npu(tensor):
    """True when the tensor lives on an Ascend NPU (kept as a function so tests can force the NPU branch)."""
    return tensor.device.type == 'npu'


def npu_offset_order(kernel_h, kernel_w, deform_groups, device=None):
    """Channel permutation from interleaved (dy, dx) offsets to the NPU kernel's (all dx, then all dy) order.

    Returns a long tensor ``index`` with ``offset_npu = offset.index_select(1, index)``.
    """
    num = 2 * deform_groups * kernel_h * kernel_w
    return torch.cat([torch.arange(1, num, 2, device=device), torch.arange(0, num, 2, device=device)])


def deform_conv2d_npu(x, offset, weight, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                      deform_groups=1, bias=None):
    """DCNv1 through ``torch_npu.npu_deformable_conv2d`` (offsets re-ordered, modulation mask of ones).

    Args:
        x: (B, C_in, H, W).
        offset: (B, 2 * deform_groups * kh * kw, H_out, W_out), interleaved (dy, dx) per tap.
        weight: (C_out, C_in / groups, kh, kw).
    Returns:
        (B, C_out, H_out, W_out).
    """
    try:
        import torch_npu  # lazy: torch_npu is optional and fails to import without the CANN toolkit
    except ImportError as error:
        raise RuntimeError(f'deformable conv on an NPU tensor needs torch_npu, which failed to import ({error}); '
                           'install torch_npu with the CANN toolkit or run on CPU/GPU') from error

    kernel_h, kernel_w = weight.shape[2:]
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    index = npu_offset_order(kernel_h, kernel_w, deform_groups, device=offset.device)
    offset_xy = offset.index_select(1, index)
    mask = offset.new_ones(offset.shape[0], offset.shape[1] // 2, offset.shape[2], offset.shape[3])
    output, _ = torch_npu.npu_deformable_conv2d(
        x, weight, torch.cat([offset_xy, mask], dim=1), bias,
        kernel_size=[kernel_h, kernel_w],
        stride=[1, 1, stride[0], stride[1]],
        padding=[padding[0], padding[0], padding[1], padding[1]],
        dilation=[1, 1, dilation[0], dilation[1]],
        groups=groups,
        deformable_groups=deform_groups,
        modulated=True)
    return output


def deform_conv2d_grid_sample(x, offset, weight, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                              deform_groups=1, bias=None):
    """DCNv1 written with ``grid_sample`` + grouped 1x1 conv: equals ``torchvision.ops.deform_conv2d``.

    Args:
        x: (B, C_in, H, W); offset: (B, 2 * deform_groups * kh * kw, oH, oW), interleaved (dy, dx) per tap;
        weight: (C_out, C_in / groups, kh, kw); bias: (C_out,) or None.
    Returns:
        (B, C_out, oH, oW).

    Tap k of output (i, j) samples x at (i * stride - pad + ky * dilation + dy, j * ... + dx) bilinearly,
    corners outside the image counting as 0 - exactly ``grid_sample(padding_mode='zeros')``. With
    align_corners=False pixel p maps to (2p + 1) / size - 1, which also works for size 1.
    """
    batch, channels, height, width = x.shape
    out_channels, _, kernel_h, kernel_w = weight.shape
    taps = kernel_h * kernel_w
    out_h, out_w = offset.shape[2:]
    dtype, device = x.dtype, x.device
    rows = torch.arange(out_h, dtype=dtype, device=device) * stride[0] - padding[0]
    cols = torch.arange(out_w, dtype=dtype, device=device) * stride[1] - padding[1]
    tap_y = (torch.arange(kernel_h, dtype=dtype, device=device) * dilation[0]).repeat_interleave(kernel_w)
    tap_x = (torch.arange(kernel_w, dtype=dtype, device=device) * dilation[1]).repeat(kernel_h)
    offset = offset.reshape(batch * deform_groups, taps, 2, out_h, out_w)
    sample_y = offset[:, :, 0] + (tap_y.view(taps, 1, 1) + rows.view(1, out_h, 1))
    sample_x = offset[:, :, 1] + (tap_x.view(taps, 1, 1) + cols.view(1, 1, out_w))
    grid = torch.stack(((2 * sample_x + 1) / width - 1, (2 * sample_y + 1) / height - 1), dim=-1)
    sampled = F.grid_sample(x.reshape(batch * deform_groups, channels // deform_groups, height, width),
                            grid.reshape(batch * deform_groups, taps * out_h, out_w, 2),
                            mode='bilinear', padding_mode='zeros', align_corners=False)
    # (B * dg, C / dg, taps * oH, oW) -> (B, C * taps, oH, oW): channel index c * taps + tap, which is the
    # flattening order of weight (C_out, C_in / groups, kh, kw) for a grouped 1x1 conv.
    columns = sampled.reshape(batch, channels * taps, out_h, out_w)
    return F.conv2d(columns, weight.reshape(out_channels, -1, 1, 1), bias, groups=groups)


def deform_conv2d(x, offset, weight, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                  deform_groups=1, bias=None, backend='auto'):
    """Deformable convolution through ``backend`` (one of ``BACKENDS``); 'auto' picks by the input's device:
    torch_npu on NPU, the grid_sample decomposition on CPU, torchvision elsewhere (CUDA).

    ``deform_groups`` is implied by the offset's channel count on the torchvision path; it is checked here so
    all backends agree.
    """
    if backend not in BACKENDS:
        raise ValueError(f'deform_conv2d: backend must be one of {BACKENDS}, got {backend!r}')
    kernel_h, kernel_w = weight.shape[2:]
    expected = 2 * deform_groups * kernel_h * kernel_w
    if offset.shape[1] != expected:
        raise ValueError(f'deform_conv2d: offset has {offset.shape[1]} channels, expected {expected} '
                         f'(= 2 * deform_groups {deform_groups} * {kernel_h} * {kernel_w})')
    if backend == 'auto':
        # branch_type: a forced 'cuda' (or 'npu') branch runs the torchvision kernel on CPU tensors too.
        backend = 'npu' if _is_npu(x) else 'grid_sample' if branch_type(x.device) == 'cpu' else 'torchvision'
    if backend == 'npu':
        return deform_conv2d_npu(x, offset, weight, stride, padding, dilation, groups, deform_groups, bias)
    # Neither torchvision's CPU kernel nor CPU grid_sample has an fp16 version (under CUDA autocast torchvision
    # itself upcasts): compute low-precision input in fp32 and return the input's dtype.
    out_dtype = x.dtype
    if out_dtype in (torch.float16, torch.bfloat16):
        x, offset, weight = x.float(), offset.float(), weight.float()
        bias = bias.float() if bias is not None else None
    if backend == 'grid_sample':
        out = deform_conv2d_grid_sample(x, offset, weight, _pair(stride), _pair(padding), _pair(dilation), groups,
                                        deform_groups, bias)
    else:  # weight groups are inferred from the channel counts
        out = tv_deform_conv2d(x, offset, weight, bias=bias, stride=_pair(stride), padding=_pair(padding),
                               dilation=_pair(dilation))
    return out.to(out_dtype)


class DeformConv2dPack(nn.Module):
    """Drop-in for mmcv ``DeformConv2dPack`` (registry name ``DCN``): a conv whose sampling grid is deformed by
    offsets predicted from its own input by ``conv_offset``.

    State-dict keys: ``weight`` (out, in / groups, k, k) [+ ``bias`` if bias=True], ``conv_offset.weight``
    (2 * dg * k * k, in, k, k), ``conv_offset.bias``. With the default bias=False this matches mmcv exactly
    (mmcv does not support a bias; we allow one for completeness).

    Input (B, C_in, H, W) -> output (B, C_out, H_out, W_out).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 deform_groups=1, bias=False):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f'DeformConv2dPack: in_channels {in_channels} and out_channels {out_channels} '
                             f'must both be divisible by groups {groups}')
        if in_channels % deform_groups:
            raise ValueError(f'DeformConv2dPack: in_channels {in_channels} must be divisible by '
                             f'deform_groups {deform_groups}')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.deform_groups = deform_groups
        self.backend = 'auto'  # see deform_conv2d; the ONNX export switches it temporarily
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter('bias', None)
        self.conv_offset = nn.Conv2d(in_channels, deform_groups * 2 * self.kernel_size[0] * self.kernel_size[1],
                                     kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                                     dilation=self.dilation, bias=True)
        self.reset_parameters()

    def reset_parameters(self):
        # mmcv 1.x DeformConv2d: Kaiming-uniform weight; DeformConv2dPack: zero offsets at start.
        nn.init.kaiming_uniform_(self.weight, nonlinearity='relu')
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x):
        offset = self.conv_offset(x)
        # Under autocast conv_offset may return fp16 while x / weight are fp32: compute in one dtype.
        weight = self.weight.to(offset.dtype)
        bias = self.bias.to(offset.dtype) if self.bias is not None else None
        return deform_conv2d(x.to(offset.dtype), offset, weight, self.stride, self.padding, self.dilation,
                             self.groups, self.deform_groups, bias, backend=self.backend)

    def extra_repr(self):
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, '
                f'padding={self.padding}, dilation={self.dilation}, groups={self.groups}, '
                f'deform_groups={self.deform_groups}, bias={self.bias is not None}')
