"""MatrixVT view transformer: BEVDepth's image side, but the LSS splat is replaced by
"prime extraction" (collapse image height) and a projection through two binary matrices.

The modules are here; the ring / ray construction and the dense / sparse projection kernels (and the notation
they share) are in ``bevdepth.ops.ring_ray_projection``, whose public names are re-exported from this module.
"""
import torch
from torch import nn

from bevdepth.layers.backbones.base_lss_fpn import BaseLSSFPN
from bevdepth.ops.device_branch import autocast_off
from bevdepth.ops.ring_ray_projection import (PROJECTION_MODES, SparseProjection, build_ring_ray,  # noqa: F401
                                              build_sparse_projection, cells_to_flat_index, fast_cells_supported,
                                              frustum_cells, frustum_row_features, geometry_to_cells,
                                              project_dense, project_sparse, resolve_projection,
                                              ring_ray_from_sparse, sparse_from_ring_ray)

__all__ = [
    'HoriConv', 'DepthReducer', 'MatrixVT', 'SparseProjection', 'PROJECTION_MODES', 'geometry_to_cells',
    'frustum_row_features', 'frustum_cells', 'fast_cells_supported',
    'cells_to_flat_index', 'build_ring_ray', 'build_sparse_projection', 'sparse_from_ring_ray',
    'ring_ray_from_sparse', 'project_dense', 'project_sparse', 'resolve_projection',
]


class HoriConv(nn.Module):
    """Collapse the image height of a feature map and refine it along the width ("prime feature").

    (B * N, C_in, H, W) [+ positional embedding (B * N, cat_dim, H, W)] -> (B * N, C_out, W). Runs in fp32.
    """

    def __init__(self, in_channels, mid_channels, out_channels, cat_dim=0):
        super().__init__()
        self.merger = nn.Sequential(
            nn.Conv2d(in_channels + cat_dim, in_channels, kernel_size=1, bias=True),
            nn.Sigmoid(),
            nn.Conv2d(in_channels, in_channels, kernel_size=1, bias=True),
        )
        self.reduce_conv = nn.Sequential(
            nn.Conv1d(in_channels, mid_channels, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm1d(mid_channels),
            nn.ReLU(inplace=True),
        )
        self.conv1 = _residual_conv1d(mid_channels)
        self.conv2 = _residual_conv1d(mid_channels)
        self.out_conv = nn.Sequential(
            nn.Conv1d(mid_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=True),
            nn.BatchNorm1d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x, pe=None):
        with autocast_off(x.device):
            x = x.float()
            x = self.merger(x if pe is None else torch.cat([x, pe.float()], 1))
            x = x.max(2)[0]
            x = self.reduce_conv(x)
            x = self.conv1(x) + x
            x = self.conv2(x) + x
            return self.out_conv(x)


def _residual_conv1d(channels):
    return nn.Sequential(
        nn.Conv1d(channels, channels, kernel_size=3, stride=1, padding=1, bias=False),
        nn.BatchNorm1d(channels),
        nn.ReLU(inplace=True),
        nn.Conv1d(channels, channels, kernel_size=3, stride=1, padding=1, bias=False),
        nn.BatchNorm1d(channels),
        nn.ReLU(inplace=True),
    )


class DepthReducer(nn.Module):
    """Collapse the image height of the depth distribution with learned per-column weights ("prime depth").

    feat (B * N, C, H, W), depth (B * N, D, H, W) -> (B * N, D, W): sum over H of depth * softmax_H(w(feat)).
    """

    def __init__(self, img_channels, mid_channels):
        super().__init__()
        self.vertical_weighter = nn.Sequential(
            nn.Conv2d(img_channels, mid_channels, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, 1, kernel_size=3, stride=1, padding=1),
        )

    def forward(self, feat, depth):
        with autocast_off(feat.device):
            vert_weight = self.vertical_weighter(feat.float()).softmax(2)  # (B * N, 1, H, W)
            return (depth.float() * vert_weight).sum(2)


class MatrixVT(BaseLSSFPN):
    """BaseLSSFPN with the MatrixVT view transform. Same constructor arguments as BaseLSSFPN plus:

    Args:
        projection: 'dense' | 'sparse' | 'auto' (default) -- see the module docstring; settable later through
            the ``projection`` attribute. Adds no state-dict entries.

    Attributes:
        static_mat: None, or a precomputed projection (the (ring, ray) tuple of ``get_proj_mat(..., 'dense')``
            or a ``SparseProjection``) used for every batch instead of the calibration; for deployment with fixed
            calibration (reference behaviour). Converted to the other representation once if needed.
        auto_cache: when True (default), the last projection is kept together with the key-frame matrices it was
            built from; a batch with bit-identical matrices reuses it.

    Buffer ``bev_anchors`` (L, L, 2) holds the cell centres (kept for state-dict compatibility).
    """

    def __init__(self, x_bound, y_bound, z_bound, d_bound, final_dim, downsample_factor, output_channels,
                 img_backbone_conf, img_neck_conf, depth_net_conf, use_da=False, projection='auto'):
        num_x = int(round((x_bound[1] - x_bound[0]) / x_bound[2]))
        num_y = int(round((y_bound[1] - y_bound[0]) / y_bound[2]))
        if num_x != num_y:
            raise ValueError(f'MatrixVT needs a square BEV grid, got {num_x} x {num_y} cells from x_bound {x_bound} '
                             f'and y_bound {y_bound}; use the same extent / step for x and y')
        super().__init__(x_bound, y_bound, z_bound, d_bound, final_dim, downsample_factor, output_channels,
                         img_backbone_conf, img_neck_conf, depth_net_conf, use_da=use_da)
        self._bev_size = num_x
        self.register_buffer('bev_anchors', self.create_bev_anchors(x_bound, y_bound))
        self.horiconv = HoriConv(self.output_channels, 512, self.output_channels)
        self.depth_reducer = DepthReducer(self.output_channels, self.output_channels)
        self.projection = projection
        self.static_mat = None
        self.auto_cache = True
        self._proj_cache = None  # (key matrices, mode, projection)
        self._static_converted = None  # (static_mat object, mode, converted projection)
        self._row_features = None  # (frustum key, frustum_row_features) -- see get_geom_cells

    @property
    def projection(self):
        return self._projection

    @projection.setter
    def projection(self, value):
        resolve_projection(value, 'cpu')  # validates
        self._projection = value

    @property
    def bev_size(self):
        return self._bev_size

    def create_bev_anchors(self, x_bound, y_bound, ds_rate=1):
        """(X, Y, 2) BEV cell centres: [i, j] = (x_i, y_j)."""
        num_x, num_y = int(self.voxel_num[0]) // ds_rate, int(self.voxel_num[1]) // ds_rate
        x_coords = (torch.linspace(x_bound[0], x_bound[1] - x_bound[2] * ds_rate, num_x, dtype=torch.float)
                    + x_bound[2] * ds_rate / 2).view(num_x, 1).expand(num_x, num_y)
        y_coords = (torch.linspace(y_bound[0], y_bound[1] - y_bound[2] * ds_rate, num_y, dtype=torch.float)
                    + y_bound[2] * ds_rate / 2).view(1, num_y).expand(num_x, num_y)
        return torch.stack([x_coords, y_coords]).permute(1, 2, 0)

    # -- projection matrices -------------------------------------------------------------------------------

    def get_geom_cells(self, mats_dict, sweep_index=0, dtype=torch.long):
        """(B, N * W, D, 2) integer (``dtype``) BEV cells of the row-averaged frustum points of one sweep.

        Eager CPU / CUDA: ``frustum_cells`` (float64 row moments, no full geometry). NPU and tracing / ONNX
        export: the float32 geometry of ``get_geometry`` followed by ``geometry_to_cells`` (reference order).
        """
        mats = (mats_dict['sensor2ego_mats'][:, sweep_index], mats_dict['intrin_mats'][:, sweep_index],
                mats_dict['ida_mats'][:, sweep_index], mats_dict.get('bda_mat', None))
        if fast_cells_supported(self.frustum.device):
            return frustum_cells(self._frustum_row_features(), self.depth_channels, *mats, self.voxel_coord,
                                 self.voxel_size, out_dtype=dtype)
        return geometry_to_cells(self.get_geometry(*mats), self.voxel_coord, self.voxel_size).to(dtype)

    def _frustum_row_features(self):
        """``frustum_row_features`` of the frustum buffer, recomputed only when the buffer changes (device,
        storage or in-place version, e.g. after load_state_dict)."""
        frustum = self.frustum
        key = (frustum.device, frustum.data_ptr(), frustum._version, tuple(frustum.shape))
        if self._row_features is None or self._row_features[0] != key:
            self._row_features = (key, frustum_row_features(frustum))
        return self._row_features[1]

    def _cache_key(self, mats_dict, sweep_index):
        mats = [mats_dict['sensor2ego_mats'][:, sweep_index], mats_dict['intrin_mats'][:, sweep_index],
                mats_dict['ida_mats'][:, sweep_index]]
        batch_size = mats[0].shape[0]
        bda = mats_dict.get('bda_mat', None)
        if bda is None:  # no bda == identity bda for the geometry
            bda = torch.eye(4, device=mats[0].device).expand(batch_size, 4, 4)
        parts = [m.reshape(batch_size, -1).float() for m in mats + [bda]]
        return torch.cat(parts, 1).detach()

    def get_proj_mat(self, mats_dict=None, projection=None, sweep_index=0):
        """The projection for this batch: (ring (B, D, L2), ray (B, R, L2)) for 'dense', ``SparseProjection`` for
        'sparse'. ``projection`` defaults to the module's mode resolved for the input device.

        Order of sources: ``static_mat`` if set; the automatic cache if the matrices are bit-identical to the
        last call's; otherwise a fresh vectorised build on the matrices' device.
        """
        device = self.frustum.device
        mode = resolve_projection(projection or self.projection, device)
        if self.static_mat is not None:
            return self._static_for_mode(mode)
        if mats_dict is None:
            raise ValueError('get_proj_mat needs mats_dict when static_mat is not set')
        with torch.no_grad():
            key = self._cache_key(mats_dict, sweep_index) if self.auto_cache else None
            cached = self._proj_cache
            if (key is not None and cached is not None and cached[1] == mode and cached[0].shape == key.shape
                    and cached[0].device == key.device and torch.equal(cached[0], key)):
                return cached[2]
            proj = self.build_projection(mats_dict, mode, sweep_index)
            self._proj_cache = (key, mode, proj) if key is not None else None
        return proj

    def build_projection(self, mats_dict, mode, sweep_index=0):
        """A fresh (uncached) projection of one sweep from the camera matrices: ``build_ring_ray`` of the long
        cells ('dense') or ``build_sparse_projection`` of int32 cells ('sparse')."""
        if mode == 'dense':
            return build_ring_ray(self.get_geom_cells(mats_dict, sweep_index), self.bev_size)
        return build_sparse_projection(self.get_geom_cells(mats_dict, sweep_index, torch.int32), self.bev_size,
                                       cells_writable=True)

    def _static_for_mode(self, mode):
        static = self.static_mat
        is_sparse = isinstance(static, SparseProjection)
        if (mode == 'sparse') == is_sparse:
            return static
        converted = self._static_converted
        if converted is not None and converted[0] is static and converted[1] == mode:
            return converted[2]
        with torch.no_grad():
            proj = ring_ray_from_sparse(static) if is_sparse else sparse_from_ring_ray(*static)
        self._static_converted = (static, mode, proj)
        return proj

    # -- forward -------------------------------------------------------------------------------------------

    def reduce_and_project(self, feature, depth, mats_dict, sweep_index=0):
        """Prime extraction + projection, in fp32.

        Args:
            feature: (B * N, C, H, W) context features; depth: (B * N, D, H, W) depth probabilities.
            mats_dict: the batch's matrices (used unless ``static_mat`` / the cache provide the projection).
        Returns:
            (B, C, L, L) BEV features.
        """
        with autocast_off(feature.device):
            depth_prime = self.depth_reducer(feature, depth)  # (B * N, D, W)
            feat_prime = self.horiconv(feature)  # (B * N, C, W)
            batch_size = mats_dict['intrin_mats'].shape[0]
            depth_prime = depth_prime.permute(0, 2, 1).reshape(batch_size, -1, self.depth_channels)
            feat_prime = feat_prime.permute(0, 2, 1).reshape(batch_size, -1, self.output_channels)
            mode = resolve_projection(self.projection, feature.device)
            proj = self.get_proj_mat(mats_dict, projection=mode, sweep_index=sweep_index)
            if mode == 'dense':
                ring, ray = proj
                if ring.shape[0] != batch_size or ray.shape[1] != feat_prime.shape[1]:
                    raise ValueError(f'projection matrices are for batch {ring.shape[0]} x {ray.shape[1]} rays, '
                                     f'input is {batch_size} x {feat_prime.shape[1]}; rebuild static_mat for this '
                                     'batch size')
                return project_dense(feat_prime, depth_prime, ring, ray)
            return project_sparse(feat_prime, depth_prime, proj)

    def _forward_single_sweep(self, sweep_index, sweep_imgs, mats_dict, is_return_depth=False):
        """One sweep: (B, 1, N, 3, H, W) -> BEV (B, C, L, L) [, depth (B * N, D, fH, fW) fp32].

        The reference always builds the projection from sweep 0's matrices; we use the sweep's own
        (identical for the single-key-frame MatrixVT config).
        """
        batch_size, _, num_cams = sweep_imgs.shape[:3]
        img_feats = self.get_cam_feats(sweep_imgs)[:, 0]
        depth_feature = self._forward_depth_net(img_feats.reshape(batch_size * num_cams, *img_feats.shape[2:]),
                                                mats_dict)
        with autocast_off(depth_feature.device):
            feature = depth_feature[:, self.depth_channels:self.depth_channels + self.output_channels].float()
            depth = depth_feature[:, :self.depth_channels].float().softmax(1)
            bev = self.reduce_and_project(feature, depth, mats_dict, sweep_index=sweep_index).contiguous()
        if is_return_depth:
            return bev, depth
        return bev
