"""BEVDepth's Lift-Splat-Shoot image-to-BEV backbone (upstream ``BaseLSSFPN``); base class of MatrixVT.

Pipeline per sweep: images -> ResNet -> SECONDFPN (one stride-16 map per camera) -> DepthNet (depth bins +
context) -> lift every feature pixel to D frustum points weighted by its depth probabilities -> sum-pool the
points into BEV cells (``bevdepth.ops.voxel_pooling``).

Buffers (state-dict order): ``voxel_size``, ``voxel_coord``, ``voxel_num``, ``frustum``.
"""
import torch
from torch import nn

from bevdepth.layers.backbones.depth_net import DepthNet
from bevdepth.layers.backbones.resnet import ResNet
from bevdepth.layers.backbones.second_fpn import SECONDFPN
from bevdepth.ops.device_branch import autocast_off
from bevdepth.ops.voxel_pooling import voxel_pooling

__all__ = ['BaseLSSFPN', 'DepthAggregation', 'create_frustum', 'frustum_to_ego']


def create_frustum(final_dim, downsample_factor, d_bound):
    """(D, fH, fW, 4) grid of (u, v, d, 1): pixel centres of the stride-``downsample_factor`` feature map in
    input-image pixels (linspace over the full width / height) and the depth-bin values arange(*d_bound)."""
    image_h, image_w = final_dim
    feat_h, feat_w = image_h // downsample_factor, image_w // downsample_factor
    d_coords = torch.arange(*d_bound, dtype=torch.float).view(-1, 1, 1).expand(-1, feat_h, feat_w)
    num_depth = d_coords.shape[0]
    x_coords = torch.linspace(0, image_w - 1, feat_w, dtype=torch.float).view(1, 1, feat_w).expand(
        num_depth, feat_h, feat_w)
    y_coords = torch.linspace(0, image_h - 1, feat_h, dtype=torch.float).view(1, feat_h, 1).expand(
        num_depth, feat_h, feat_w)
    return torch.stack((x_coords, y_coords, d_coords, torch.ones_like(d_coords)), -1)


def frustum_to_ego(frustum, sensor2ego_mat, intrin_mat, ida_mat, bda_mat=None):
    """Ego-frame xyz of every frustum point (upstream ``BaseLSSFPN.get_geometry``).

    Args:
        frustum: (D, fH, fW, 4) from ``create_frustum``.
        sensor2ego_mat, intrin_mat, ida_mat: (B, N, 4, 4); bda_mat: (B, 4, 4) or None.
    Returns:
        (B, N, D, fH, fW, 3).

    Same matrices applied in the same order as the reference (undo ida, un-project with depth, camera->ego with
    sensor2ego @ inverse(intrin), then bda), but each step is one batched GEMM (B * N, P, 4) x (4, 4)^T over
    the P = D * fH * fW points instead of the reference's 7-dim broadcast of 4x4 @ 4x1 products (~4x faster
    on CPU, no tensor above 3 dims). The float summation order inside a 4-term dot product can differ from the
    broadcast kernel's, so a point within ~1e-5 cells of a cell border may truncate to the neighbouring cell
    (measured: 0 of 266k points on augmented nuScenes calibration; docs/performance.md).
    """
    batch_size, num_cams = sensor2ego_mat.shape[:2]
    num_depth, feat_h, feat_w, _ = frustum.shape
    num_views = batch_size * num_cams
    dtype = frustum.dtype
    # fp32 even under autocast: an fp16 matmul would move points across cell borders.
    with autocast_off(frustum.device):
        sensor2ego_mat, intrin_mat, ida_mat = (m.to(dtype).reshape(num_views, 4, 4)
                                               for m in (sensor2ego_mat, intrin_mat, ida_mat))
        points = frustum.reshape(1, -1, 4).expand(num_views, -1, 4)  # (B * N, P, 4), no copy
        points = torch.bmm(points, torch.inverse(ida_mat).transpose(1, 2))
        points = torch.cat((points[..., :2] * points[..., 2:3], points[..., 2:]), 2)
        combine = sensor2ego_mat.matmul(torch.inverse(intrin_mat))
        points = torch.bmm(points, combine.transpose(1, 2))
        if bda_mat is not None:
            bda_mat = bda_mat.to(dtype).view(batch_size, 1, 4, 4).expand(batch_size, num_cams, 4, 4)
            points = torch.bmm(points, bda_mat.reshape(num_views, 4, 4).transpose(1, 2))
    return points[..., :3].reshape(batch_size, num_cams, num_depth, feat_h, feat_w, 3)


class DepthAggregation(nn.Module):
    """Optional ``use_da`` refinement of the lifted point features, run on (n * h, C, w, D) slices."""

    def __init__(self, in_channels, mid_channels, out_channels):
        super().__init__()
        self.reduce_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
        )
        self.conv = nn.Sequential(
            nn.Conv2d(mid_channels, mid_channels, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, mid_channels, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
        )
        self.out_conv = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=True),
        )

    def forward(self, x):
        with autocast_off(x.device):
            x = self.reduce_conv(x.float())
            x = self.conv(x) + x
            return self.out_conv(x)


class BaseLSSFPN(nn.Module):
    """Image backbone + neck + depth net + LSS splat.

    Args:
        x_bound, y_bound, z_bound: [min, max, step] of the BEV grid in metres.
        d_bound: [min, max, step] of the depth bins in metres.
        final_dim: (H, W) of the network input images.
        downsample_factor: image stride of the feature map fed to the depth net (16).
        output_channels: context / BEV channels.
        img_backbone_conf: kwargs of ``ResNet``; img_neck_conf: kwargs of ``SECONDFPN``;
        depth_net_conf: dict(in_channels, mid_channels) of ``DepthNet``.
        use_da: add the DepthAggregation net on the lifted features.
    """

    def __init__(self, x_bound, y_bound, z_bound, d_bound, final_dim, downsample_factor, output_channels,
                 img_backbone_conf, img_neck_conf, depth_net_conf, use_da=False):
        super().__init__()
        self.downsample_factor = downsample_factor
        self.d_bound = d_bound
        self.final_dim = final_dim
        self.output_channels = output_channels

        bounds = [x_bound, y_bound, z_bound]
        self.register_buffer('voxel_size', torch.tensor([row[2] for row in bounds], dtype=torch.float32))
        self.register_buffer('voxel_coord', torch.tensor([row[0] + row[2] / 2.0 for row in bounds],
                                                         dtype=torch.float32))
        # round(): (max - min) / step is 127.99999... for some float bounds; the reference relies on it being exact.
        self.register_buffer('voxel_num', torch.tensor([int(round((row[1] - row[0]) / row[2])) for row in bounds],
                                                       dtype=torch.long))
        self.register_buffer('frustum', self.create_frustum())
        self.depth_channels = self.frustum.shape[0]

        self.img_backbone = ResNet(**img_backbone_conf)
        self.img_neck = SECONDFPN(**img_neck_conf)
        self.depth_net = self._configure_depth_net(depth_net_conf)
        for module in (self.img_neck, self.img_backbone):
            if hasattr(module, 'init_weights'):
                module.init_weights()
        self.use_da = use_da
        if self.use_da:
            self.depth_aggregation_net = DepthAggregation(output_channels, output_channels, output_channels)

    def _configure_depth_net(self, depth_net_conf):
        return DepthNet(depth_net_conf['in_channels'], depth_net_conf['mid_channels'], self.output_channels,
                        self.depth_channels)

    def create_frustum(self):
        """(D, fH, fW, 4) frustum of this model's input size and depth bins (see ``create_frustum``)."""
        return create_frustum(self.final_dim, self.downsample_factor, self.d_bound)

    def get_geometry(self, sensor2ego_mat, intrin_mat, ida_mat, bda_mat):
        """Ego-frame xyz of every frustum point, (B, N, D, fH, fW, 3) (see ``frustum_to_ego``)."""
        return frustum_to_ego(self.frustum, sensor2ego_mat, intrin_mat, ida_mat, bda_mat)

    def get_cam_feats(self, imgs):
        """(B, S, N, 3, H, W) images -> (B, S, N, C, fH, fW) neck features."""
        batch_size, num_sweeps, num_cams, num_channels, image_h, image_w = imgs.shape
        imgs = imgs.reshape(batch_size * num_sweeps * num_cams, num_channels, image_h, image_w)
        img_feats = self.img_neck(self.img_backbone(imgs))[0]
        return img_feats.reshape(batch_size, num_sweeps, num_cams, *img_feats.shape[1:])

    def _forward_depth_net(self, feat, mats_dict):
        return self.depth_net(feat, mats_dict)

    def _forward_voxel_net(self, img_feat_with_depth):
        """Optional DepthAggregation on (B * N, C, D, fH, fW) lifted features."""
        if not self.use_da:
            return img_feat_with_depth
        # (n, c, d, h, w) -> (n * h, c, w, d) slices -> back.
        img_feat_with_depth = img_feat_with_depth.permute(0, 3, 1, 4, 2).contiguous()
        n, h, c, w, d = img_feat_with_depth.shape
        out = self.depth_aggregation_net(img_feat_with_depth.view(-1, c, w, d))
        return out.view(n, h, c, w, d).permute(0, 2, 4, 1, 3).contiguous()

    def _forward_single_sweep(self, sweep_index, sweep_imgs, mats_dict, is_return_depth=False):
        """One sweep: sweep_imgs (B, 1, N, 3, H, W) -> BEV (B, C, Y, X) [, depth (B * N, D, fH, fW) fp32]."""
        batch_size, _, num_cams = sweep_imgs.shape[:3]
        img_feats = self.get_cam_feats(sweep_imgs)[:, 0]
        depth_feature = self._forward_depth_net(img_feats.reshape(batch_size * num_cams, *img_feats.shape[2:]),
                                                mats_dict)
        depth = depth_feature[:, :self.depth_channels].softmax(dim=1, dtype=depth_feature.dtype)
        context = depth_feature[:, self.depth_channels:self.depth_channels + self.output_channels]
        geom_xyz = self.get_geometry(
            mats_dict['sensor2ego_mats'][:, sweep_index],
            mats_dict['intrin_mats'][:, sweep_index],
            mats_dict['ida_mats'][:, sweep_index],
            mats_dict.get('bda_mat', None),
        )
        # .int() truncates toward zero like the reference (points in (-1, 0) land in cell 0).
        geom_xyz = ((geom_xyz - (self.voxel_coord - self.voxel_size / 2.0)) / self.voxel_size).int()

        # (B * N, C, D, fH, fW) -> (B, N, D, fH, fW, C). The reference's separate inference kernel computes the
        # same depth x context product inside the op, so one path serves training and inference.
        img_feat_with_depth = depth.unsqueeze(1) * context.unsqueeze(2)
        img_feat_with_depth = self._forward_voxel_net(img_feat_with_depth)
        img_feat_with_depth = img_feat_with_depth.reshape(batch_size, num_cams, *img_feat_with_depth.shape[1:])
        img_feat_with_depth = img_feat_with_depth.permute(0, 1, 3, 4, 5, 2)
        feature_map = voxel_pooling(geom_xyz, img_feat_with_depth, self.voxel_num)
        if is_return_depth:
            # fp32 depth for the depth loss (the reference notes it collapses in fp16).
            return feature_map.contiguous(), depth_feature[:, :self.depth_channels].float().softmax(dim=1)
        return feature_map.contiguous()

    def forward(self, sweep_imgs, mats_dict, timestamps=None, is_return_depth=False):
        """Images of all sweeps -> BEV features.

        Args:
            sweep_imgs: (B, S, N, 3, H, W).
            mats_dict: sensor2ego_mats, intrin_mats, ida_mats, sensor2sensor_mats (B, S, N, 4, 4) and
                bda_mat (B, 4, 4).
            timestamps: (B, S, N), unused (kept for the reference's call signature).
            is_return_depth: also return the key frame's depth probabilities.

        Returns:
            BEV (B, S * C, Y, X) -- sweeps concatenated on channels, key frame first; only the key frame is
            computed with gradients -- and, if is_return_depth, depth (B * N, D, fH, fW) of the key frame.
        """
        if sweep_imgs.dim() != 6:
            raise ValueError(f'sweep_imgs must be (B, S, N, 3, H, W), got shape {tuple(sweep_imgs.shape)}')
        num_sweeps = sweep_imgs.shape[1]
        key_frame_res = self._forward_single_sweep(0, sweep_imgs[:, 0:1], mats_dict,
                                                   is_return_depth=is_return_depth)
        if num_sweeps == 1:
            return key_frame_res

        key_frame_feature = key_frame_res[0] if is_return_depth else key_frame_res
        ret_feature_list = [key_frame_feature]
        for sweep_index in range(1, num_sweeps):
            with torch.no_grad():
                ret_feature_list.append(self._forward_single_sweep(
                    sweep_index, sweep_imgs[:, sweep_index:sweep_index + 1], mats_dict, is_return_depth=False))
        if is_return_depth:
            return torch.cat(ret_feature_list, 1), key_frame_res[1]
        return torch.cat(ret_feature_list, 1)
