"""SECOND FPN neck (mmdet3d ``SECONDFPN`` with the same keys ``deblocks.i.{0,1}``).

Each input level is brought to a common stride by one up/down-sampling layer + BN(eps 1e-3, momentum 0.01) + ReLU,
and the levels are concatenated on channels.
"""
import torch
from torch import nn


class SECONDFPN(nn.Module):
    """Resample every level to one stride and concatenate.

    Args:
        in_channels: channels of each input level, e.g. [256, 512, 1024, 2048].
        out_channels: channels after each level's deblock, e.g. [128, 128, 128, 128].
        upsample_strides: per level; s >= 1 -> ConvTranspose2d(kernel = stride = s), s < 1 -> Conv2d(kernel =
            stride = round(1 / s)). Both without bias.

    forward: list of (B, in_channels[i], H_i, W_i) -> [(B, sum(out_channels), H, W)] (a one-element list, like
    the reference).
    """

    def __init__(self, in_channels, out_channels, upsample_strides):
        super().__init__()
        if not len(in_channels) == len(out_channels) == len(upsample_strides):
            raise ValueError(f'SECONDFPN needs one entry per level: in_channels {in_channels}, '
                             f'out_channels {out_channels}, upsample_strides {upsample_strides}')
        self.in_channels = list(in_channels)
        self.out_channels = list(out_channels)
        self.upsample_strides = list(upsample_strides)
        deblocks = []
        for in_ch, out_ch, stride in zip(in_channels, out_channels, upsample_strides):
            if stride <= 0:
                raise ValueError(f'upsample_strides must be positive, got {upsample_strides}')
            if stride >= 1:
                if stride != int(stride):
                    raise ValueError(f'upsample stride {stride} >= 1 must be an integer')
                stride = int(stride)
                resample = nn.ConvTranspose2d(in_ch, out_ch, kernel_size=stride, stride=stride, bias=False)
            else:
                stride = round(1 / stride)
                resample = nn.Conv2d(in_ch, out_ch, kernel_size=stride, stride=stride, bias=False)
            deblocks.append(nn.Sequential(resample, nn.BatchNorm2d(out_ch, eps=1e-3, momentum=0.01),
                                          nn.ReLU(inplace=True)))
        self.deblocks = nn.ModuleList(deblocks)

    def init_weights(self):
        """mmdet3d init: Kaiming (fan_out, relu) for the ConvTranspose2d layers only; Conv2d keeps PyTorch's."""
        for module in self.modules():
            if isinstance(module, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(module.weight, a=0, mode='fan_out', nonlinearity='relu')

    def forward(self, inputs):
        """inputs: list/tuple of (B, C_i, H_i, W_i) -> [(B, sum(out_channels), H, W)]."""
        if len(inputs) != len(self.deblocks):
            raise ValueError(f'SECONDFPN got {len(inputs)} levels, expected {len(self.deblocks)}')
        ups = [deblock(feat) for deblock, feat in zip(self.deblocks, inputs)]
        out = torch.cat(ups, dim=1) if len(ups) > 1 else ups[0]
        return [out]
