"""Camera-aware depth / context network of BEVDepth (upstream
``bevdepth/layers/backbones/base_lss_fpn.py`` ``DepthNet``).

``DepthNet`` turns the image-neck features of each camera into a categorical depth distribution
(``depth_channels`` logits) and a context feature (``context_channels``), conditioned on the camera's
intrinsics, image augmentation, BEV augmentation and extrinsics through 27 "mlp_input" numbers.

Attribute names and registration order reproduce the reference state-dict keys
(``backbone.depth_net.*`` of the upstream ``MatrixVT_Det`` state dict).
"""
import torch
import torch.nn.functional as F
from torch import nn

from bevdepth.layers.backbones.resnet import BasicBlock
from bevdepth.ops.deform_conv import DeformConv2dPack

__all__ = ['Mlp', 'SELayer', 'ASPPModule', 'ASPP', 'DepthNet', 'get_mlp_input', 'MLP_INPUT_CHANNELS']

MLP_INPUT_CHANNELS = 27


class Mlp(nn.Module):
    """fc1 -> act -> dropout -> fc2 -> dropout. Input (..., in_features) -> (..., out_features)."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.ReLU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class SELayer(nn.Module):
    """Squeeze-excitation gate driven by an external vector: ``x * sigmoid(expand(relu(reduce(x_se))))``.

    x: (B, C, H, W); x_se: (B, C, 1, 1).
    """

    def __init__(self, channels, act_layer=nn.ReLU, gate_layer=nn.Sigmoid):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, channels, 1, bias=True)
        self.act1 = act_layer()
        self.conv_expand = nn.Conv2d(channels, channels, 1, bias=True)
        self.gate = gate_layer()

    def forward(self, x, x_se):
        x_se = self.conv_expand(self.act1(self.conv_reduce(x_se)))
        return x * self.gate(x_se)


class ASPPModule(nn.Module):
    """One atrous branch: conv (no bias) -> BN -> ReLU, Kaiming-normal init."""

    def __init__(self, inplanes, planes, kernel_size, padding, dilation, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.atrous_conv = nn.Conv2d(inplanes, planes, kernel_size=kernel_size, stride=1, padding=padding,
                                     dilation=dilation, bias=False)
        self.bn = norm_layer(planes)
        self.relu = nn.ReLU()
        _init_aspp_weights(self)

    def forward(self, x):
        return self.relu(self.bn(self.atrous_conv(x)))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1 + three 3x3 (dilation 6/12/18) + image pooling branches,
    concatenated (5 * mid), fused by 1x1 conv -> BN -> ReLU -> Dropout(0.5). (B, C, H, W) -> (B, mid, H, W).
    """

    def __init__(self, inplanes, mid_channels=256, norm_layer=nn.BatchNorm2d):
        super().__init__()
        dilations = [1, 6, 12, 18]
        self.aspp1 = ASPPModule(inplanes, mid_channels, 1, padding=0, dilation=dilations[0], norm_layer=norm_layer)
        self.aspp2 = ASPPModule(inplanes, mid_channels, 3, padding=dilations[1], dilation=dilations[1],
                                norm_layer=norm_layer)
        self.aspp3 = ASPPModule(inplanes, mid_channels, 3, padding=dilations[2], dilation=dilations[2],
                                norm_layer=norm_layer)
        self.aspp4 = ASPPModule(inplanes, mid_channels, 3, padding=dilations[3], dilation=dilations[3],
                                norm_layer=norm_layer)
        self.global_avg_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Conv2d(inplanes, mid_channels, 1, stride=1, bias=False),
            norm_layer(mid_channels),
            nn.ReLU(),
        )
        self.conv1 = nn.Conv2d(int(mid_channels * 5), mid_channels, 1, bias=False)
        self.bn1 = norm_layer(mid_channels)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.5)
        _init_aspp_weights(self)

    def forward(self, x):
        x1 = self.aspp1(x)
        x2 = self.aspp2(x)
        x3 = self.aspp3(x)
        x4 = self.aspp4(x)
        x5 = F.interpolate(self.global_avg_pool(x), size=x4.shape[2:], mode='bilinear', align_corners=True)
        x = torch.cat((x1, x2, x3, x4, x5), dim=1)
        return self.dropout(self.relu(self.bn1(self.conv1(x))))


def _init_aspp_weights(module):
    # Reference ASPP init: Kaiming-normal convs, BN weight 1 / bias 0 (the rest of DepthNet keeps defaults).
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def get_mlp_input(mats_dict):
    """The 27 camera-awareness numbers per key-frame camera (upstream ``DepthNet.forward``), shape (B * N, 27).

    Order: fx, fy, cx, cy; ida (0,0) (0,1) (0,3) (1,0) (1,1) (1,3); bda (0,0) (0,1) (1,0) (1,1) (2,2);
    sensor2ego[:3, :] row-major. ``bda_mat`` (B, 4, 4) defaults to identity when absent.
    """
    intrin = mats_dict['intrin_mats'][:, 0]  # (B, N, 4, 4)
    ida = mats_dict['ida_mats'][:, 0]
    sensor2ego = mats_dict['sensor2ego_mats'][:, 0, :, :3, :]
    batch_size, num_cams = intrin.shape[:2]
    bda = mats_dict.get('bda_mat')
    if bda is None:
        bda = torch.eye(4, dtype=intrin.dtype, device=intrin.device).expand(batch_size, 4, 4)
    bda = bda.view(batch_size, 1, 4, 4).expand(batch_size, num_cams, 4, 4)
    features = torch.stack([
        intrin[..., 0, 0], intrin[..., 1, 1], intrin[..., 0, 2], intrin[..., 1, 2],
        ida[..., 0, 0], ida[..., 0, 1], ida[..., 0, 3], ida[..., 1, 0], ida[..., 1, 1], ida[..., 1, 3],
        bda[..., 0, 0], bda[..., 0, 1], bda[..., 1, 0], bda[..., 1, 1], bda[..., 2, 2],
    ], dim=-1)
    mlp_input = torch.cat([features, sensor2ego.reshape(batch_size, num_cams, 12)], dim=-1)
    return mlp_input.reshape(batch_size * num_cams, MLP_INPUT_CHANNELS)


class DepthNet(nn.Module):
    """Depth + context head on the image-neck features.

    Args:
        in_channels: neck channels (512 in the reference).
        mid_channels: internal width (512).
        context_channels: context / BEV channels (80).
        depth_channels: number of depth bins (112).

    forward(x (B * N, in_channels, h, w), mats_dict) -> (B * N, depth_channels + context_channels, h, w):
    depth logits first, then context.
    """

    def __init__(self, in_channels, mid_channels, context_channels, depth_channels):
        super().__init__()
        self.reduce_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
        )
        self.context_conv = nn.Conv2d(mid_channels, context_channels, kernel_size=1, stride=1, padding=0)
        self.bn = nn.BatchNorm1d(MLP_INPUT_CHANNELS)
        self.depth_mlp = Mlp(MLP_INPUT_CHANNELS, mid_channels, mid_channels)
        self.depth_se = SELayer(mid_channels)
        self.context_mlp = Mlp(MLP_INPUT_CHANNELS, mid_channels, mid_channels)
        self.context_se = SELayer(mid_channels)
        self.depth_conv = nn.Sequential(
            BasicBlock(mid_channels, mid_channels),
            BasicBlock(mid_channels, mid_channels),
            BasicBlock(mid_channels, mid_channels),
            ASPP(mid_channels, mid_channels),
            # mmcv DCN(groups=4); its im2col_step=128 is a CUDA memory knob with no meaning here.
            DeformConv2dPack(mid_channels, mid_channels, kernel_size=3, padding=1, groups=4),
            nn.Conv2d(mid_channels, depth_channels, kernel_size=1, stride=1, padding=0),
        )

    def forward(self, x, mats_dict):
        # Matrices may arrive in float64 from numpy; the BN / MLP run in the parameters' dtype.
        mlp_input = self.bn(get_mlp_input(mats_dict).to(self.bn.weight.dtype))
        x = self.reduce_conv(x)
        context = self.context_conv(self.context_se(x, self.context_mlp(mlp_input)[..., None, None]))
        depth = self.depth_conv(self.depth_se(x, self.depth_mlp(mlp_input)[..., None, None]))
        return torch.cat([depth, context], dim=1)
