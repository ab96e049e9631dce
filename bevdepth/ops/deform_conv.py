"""Deformable convolution (DCNv1) with mmcv's ``DeformConv2dPack`` parameter layout, no compiled mmcv ops.

The reference builds ``DepthNet.depth_conv[4]`` as mmcv ``DCN`` = ``DeformConv2dPack`` (spec C.3, D):
a ``weight`` of shape (out, in / groups, k, k), no bias, and a ``conv_offset`` Conv2d (with bias,
zero-initialised) predicting 2 * deform_groups * k * k offset channels laid out per deform group and
kernel tap as interleaved (dy, dx) -- the same layout as ``torchvision.ops.deform_conv2d``.

Backends, chosen by the input tensor's device:
- CPU / CUDA / anything else: ``torchvision.ops.deform_conv2d`` (autograd included).
- Ascend NPU (``x.device.type == 'npu'``): ``torch_npu.npu_deformable_conv2d``, imported lazily. That kernel
  is the modulated (v2) one: it wants the offsets re-ordered as all dx first, then all dy (the
  ``sort_index_fp`` permutation of mmcv's NPU path), followed by a modulation mask that we fill with ones
  (DCNv1 == DCNv2 with mask 1). Weight is passed as the usual (out, in / groups, kh, kw) tensor; stride and
  dilation are 4-lists in NCHW order and padding is (top, bottom, left, right). torch_npu registers its own
  autograd for this op, so gradients flow without a hand-written backward.
"""
import math

import torch
from torch import nn
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d as tv_deform_conv2d

__all__ = ['DeformConv2dPack', 'deform_conv2d', 'deform_conv2d_npu', 'npu_offset_order']


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


def deform_conv2d(x, offset, weight, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                  deform_groups=1, bias=None):
    """Deformable convolution dispatched on the input's device (torchvision, or torch_npu on NPU).

    ``deform_groups`` is implied by the offset's channel count on the torchvision path; it is checked here so
    both backends agree.
    """
    kernel_h, kernel_w = weight.shape[2:]
    expected = 2 * deform_groups * kernel_h * kernel_w
    if offset.shape[1] != expected:
        raise ValueError(f'deform_conv2d: offset has {offset.shape[1]} channels, expected {expected} '
                         f'(= 2 * deform_groups {deform_groups} * {kernel_h} * {kernel_w})')
    if _is_npu(x):
        return deform_conv2d_npu(x, offset, weight, stride, padding, dilation, groups, deform_groups, bias)
    # torchvision's CPU kernel has no fp16 / bf16 version (under CUDA autocast torchvision itself upcasts):
    # compute in fp32 and return the input's dtype. Weight groups are inferred from the channel counts.
    out_dtype = x.dtype
    if out_dtype in (torch.float16, torch.bfloat16):
        x, offset, weight = x.float(), offset.float(), weight.float()
        bias = bias.float() if bias is not None else None
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
                             self.groups, self.deform_groups, bias)

    def extra_repr(self):
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, '
                f'padding={self.padding}, dilation={self.dilation}, groups={self.groups}, '
                f'deform_groups={self.deform_groups}, bias={self.bias is not None}')
