"""MatrixVT view transformer (spec C.4): BEVDepth's image side, but the LSS splat is replaced by
"prime extraction" (collapse image height) and a projection through two binary matrices.

Notation: B batch, N cameras, W feature columns per camera, R = N * W rays (camera-major, then column),
D depth bins, L BEV cells per side (square grid), L2 = L * L cells (index y * L + x), C channels.

* Geometry: every (ray r, depth bin d) frustum point, averaged over image rows, is normalised to cell units and
  truncated toward zero (``.long()``) -> cell (x, y). Points with a coordinate < 0 or > L - 1 are invalid; the
  reference sends them to the centre cell (L // 2, L // 2) and then zeroes that "null" column, so nothing
  (not even a valid point that truly falls in it) lands in the centre cell.
* Ring matrix ring (B, D, L2): ring[d, c] = 1 if ANY ray's d-th point falls in cell c.
* Ray matrix ray (B, R, L2): ray[r, c] = 1 if ANY depth bin of ray r falls in cell c.
  Both are binary: duplicates do not accumulate (the reference writes them with non-accumulating indexed
  ``+=``); the reference then divides each column by its max (clip min 1), which is a no-op on binary maps.
* Projection: P = (depth_prime @ ring) * ray, i.e. P[r, c] = ray[r, c] * sum_d p(r, d) * ring[d, c] -- for a
  cell c on ray r this sums the probabilities of EVERY bin d whose ring contains c, not only the bins where
  ray r itself hits c. BEV[c] = sum_r P[r, c] * feat_prime[r].

Two equivalent implementations of the projection (``projection`` = 'dense' | 'sparse' | 'auto'):
* dense: the reference's two batched matrix products on (B, D, L2) / (B, R, L2) matrices. Kept for Ascend
  cube units and ONNX export.
* sparse: only the non-zero entries. Pairs (r, c) with ray[r, c] = 1 and triples (r, d, c) joining each pair with
  every ring entry of its cell; P = scatter-sum of gathered depth probabilities over triples, BEV = scatter-sum
  of P-weighted ray features over pairs. Same values and gradients (up to float summation order), orders of
  magnitude fewer operations on CPU.
* auto: dense on NPU and while exporting ONNX, sparse otherwise.
"""
from typing import NamedTuple

import torch
from torch import nn

from bevdepth.layers.backbones.base_lss_fpn import BaseLSSFPN

__all__ = [
    'HoriConv', 'DepthReducer', 'MatrixVT', 'SparseProjection', 'PROJECTION_MODES', 'geometry_to_cells',
    'cells_to_flat_index', 'build_ring_ray', 'build_sparse_projection', 'sparse_from_ring_ray',
    'ring_ray_from_sparse', 'project_dense', 'project_sparse', 'resolve_projection',
]

PROJECTION_MODES = ('dense', 'sparse', 'auto')


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
        with torch.autocast(device_type=x.device.type, enabled=False):
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
        with torch.autocast(device_type=feat.device.type, enabled=False):
            vert_weight = self.vertical_weighter(feat.float()).softmax(2)  # (B * N, 1, H, W)
            return (depth.float() * vert_weight).sum(2)


# ----------------------------------------------------------------------------------------------------------
# Ring / ray construction (vectorised, on the input's device, no gradients).
# ----------------------------------------------------------------------------------------------------------

class SparseProjection(NamedTuple):
    """Non-zero structure of the MatrixVT projection for one batch.

    pair_row (K,): flat ray row b * R + r of each (ray, cell) pair with ray[b, r, c] = 1.
    pair_cell (K,): flat BEV cell b * L2 + c of that pair.
    triple_pair (T,): index into the pairs, one entry per ring entry ring[b, d, c] = 1 of the pair's cell.
    triple_depth (T,): flat depth index (b * R + r) * D + d of that triple.
    """
    pair_row: torch.Tensor
    pair_cell: torch.Tensor
    triple_pair: torch.Tensor
    triple_depth: torch.Tensor
    batch_size: int
    num_rays: int
    depth_channels: int
    bev_size: int


def geometry_to_cells(geom, voxel_coord, voxel_size):
    """Frustum geometry -> integer BEV cell of every (ray, depth bin), reference semantics (spec C.4 steps 1-3).

    Args:
        geom: (B, N, D, H, W, 3) ego xyz (``get_geometry``).
        voxel_coord, voxel_size: (3,) buffers of the model (cell centre of the first cell, cell size).
    Returns:
        (B, N * W, D, 2) long cell (x, y): normalised to cell units, averaged over image rows, truncated toward
        zero.
    """
    batch_size, num_cams, num_depth, _, feat_w, _ = geom.shape
    cells = (geom - (voxel_coord - voxel_size / 2.0)) / voxel_size
    cells = cells.mean(3).permute(0, 1, 3, 2, 4)  # (B, N, W, D, 3)
    return cells.long().reshape(batch_size, num_cams * feat_w, num_depth, 3)[..., :2]


def cells_to_flat_index(cells, bev_size):
    """(B, R, D, 2) long cells -> (flat (B, R, D) long cell index y * L + x, valid (B, R, D) bool).

    Invalid points (a coordinate < 0 or > L - 1) get the null cell (L // 2) * L + L // 2; ``valid`` is False for
    everything in the null cell, whose column the reference zeroes. (The reference computes the zeroed column as
    int(L / 2 * (L + 1)), equal to the null cell for the even L of every config; for odd L it would zero the
    wrong column -- we zero the null cell.)
    """
    x, y = cells[..., 0], cells[..., 1]
    inside = (x >= 0) & (y >= 0) & (x <= bev_size - 1) & (y <= bev_size - 1)
    null_cell = (bev_size // 2) * bev_size + bev_size // 2
    flat = torch.where(inside, y * bev_size + x, torch.full_like(x, null_cell))
    return flat, flat != null_cell


def build_ring_ray(cells, bev_size):
    """Dense ring (B, D, L2) and ray (B, R, L2) matrices, float32 0/1, built with two scatters.

    Args:
        cells: (B, R, D, 2) long cells from ``geometry_to_cells``.
        bev_size: L.
    """
    flat, _ = cells_to_flat_index(cells, bev_size)
    batch_size, num_rays, num_depth = flat.shape
    num_cells = bev_size * bev_size
    null_cell = (bev_size // 2) * bev_size + bev_size // 2
    # scatter_ with a scalar writes (does not add): duplicates collapse to 1 like the reference's indexed +=.
    ray = torch.zeros(batch_size, num_rays, num_cells, device=cells.device).scatter_(2, flat, 1.0)
    ring = torch.zeros(batch_size, num_depth, num_cells, device=cells.device).scatter_(2, flat.transpose(1, 2), 1.0)
    ring[..., null_cell] = 0
    ray[..., null_cell] = 0
    # Reference max-normalisation per column (clip min 1): a no-op on binary maps, kept for exactness.
    ring /= ring.amax(1, keepdim=True).clamp(min=1)
    ray /= ray.amax(1, keepdim=True).clamp(min=1)
    return ring, ray


def _join_pairs(ray_key, ring_key, batch_size, num_rays, num_depth, num_cells, bev_size):
    """Sparse structure from sorted unique keys: ray_key = (b * R + r) * L2 + c, ring_key = (b * D + d) * L2 + c."""
    pair_row = ray_key // num_cells
    pair_cell = (pair_row // num_rays) * num_cells + ray_key % num_cells  # b * L2 + c

    ring_bd = ring_key // num_cells
    ring_cell = (ring_bd // num_depth) * num_cells + ring_key % num_cells  # b * L2 + c
    ring_d = ring_bd % num_depth
    order = torch.argsort(ring_cell * num_depth + ring_d)
    ring_cell, ring_d = ring_cell[order], ring_d[order]

    # For every pair, the run of ring entries with the same (b, c): [start, end) in the sorted ring list.
    start = torch.searchsorted(ring_cell, pair_cell, right=False)
    count = torch.searchsorted(ring_cell, pair_cell, right=True) - start
    triple_pair = torch.repeat_interleave(torch.arange(pair_row.numel(), device=ray_key.device), count)
    first_triple = torch.cumsum(count, 0) - count
    rank_in_run = torch.arange(triple_pair.numel(), device=ray_key.device) - first_triple[triple_pair]
    triple_d = ring_d[start[triple_pair] + rank_in_run]
    triple_depth = pair_row[triple_pair] * num_depth + triple_d
    return SparseProjection(pair_row, pair_cell, triple_pair, triple_depth, batch_size, num_rays, num_depth,
                            bev_size)


def build_sparse_projection(cells, bev_size):
    """Sparse projection structure straight from (B, R, D, 2) long cells (never builds the dense matrices)."""
    flat, valid = cells_to_flat_index(cells, bev_size)
    batch_size, num_rays, num_depth = flat.shape
    num_cells = bev_size * bev_size
    device = flat.device
    ray_base = torch.arange(batch_size * num_rays, device=device).view(batch_size, num_rays, 1) * num_cells
    ring_base = (torch.arange(batch_size, device=device).view(batch_size, 1, 1) * num_depth
                 + torch.arange(num_depth, device=device).view(1, 1, num_depth)) * num_cells
    ray_key = torch.unique((ray_base + flat)[valid])
    ring_key = torch.unique((ring_base + flat)[valid])
    return _join_pairs(ray_key, ring_key, batch_size, num_rays, num_depth, num_cells, bev_size)


def sparse_from_ring_ray(ring, ray):
    """Convert dense (ring (B, D, L2), ray (B, R, L2)) matrices to a ``SparseProjection``.

    Only the 0/1 pattern is used (the maps are binary by construction).
    """
    batch_size, num_depth, num_cells = ring.shape
    num_rays = ray.shape[1]
    bev_size = int(round(num_cells ** 0.5))
    ray_key = torch.nonzero(ray.reshape(-1)).view(-1)  # already (b * R + r) * L2 + c, sorted
    ring_key = torch.nonzero(ring.reshape(-1)).view(-1)
    return _join_pairs(ray_key, ring_key, batch_size, num_rays, num_depth, num_cells, bev_size)


def ring_ray_from_sparse(sparse):
    """Convert a ``SparseProjection`` back to dense float32 (ring (B, D, L2), ray (B, R, L2)) matrices."""
    batch_size, num_rays, num_depth = sparse.batch_size, sparse.num_rays, sparse.depth_channels
    num_cells = sparse.bev_size * sparse.bev_size
    device = sparse.pair_row.device
    ray = torch.zeros(batch_size * num_rays * num_cells, device=device)
    ray[sparse.pair_row * num_cells + sparse.pair_cell % num_cells] = 1.0
    ring = torch.zeros(batch_size * num_depth * num_cells, device=device)
    triple_cell = sparse.pair_cell[sparse.triple_pair]
    triple_b = triple_cell // num_cells
    triple_d = sparse.triple_depth % num_depth
    ring[(triple_b * num_depth + triple_d) * num_cells + triple_cell % num_cells] = 1.0
    return ring.view(batch_size, num_depth, num_cells), ray.view(batch_size, num_rays, num_cells)


# ----------------------------------------------------------------------------------------------------------
# Projection of prime features / depths to BEV.
# ----------------------------------------------------------------------------------------------------------

def project_dense(feat_prime, depth_prime, ring, ray):
    """Reference projection with matrix products.

    Args:
        feat_prime: (B, R, C); depth_prime: (B, R, D); ring: (B, D, L2); ray: (B, R, L2).
    Returns:
        (B, C, L, L) BEV features ([B, C, y, x]).
    """
    batch_size, _, num_channels = feat_prime.shape
    bev_size = int(round(ring.shape[-1] ** 0.5))
    proj_mat = depth_prime.matmul(ring) * ray  # (B, R, L2)
    bev = proj_mat.transpose(1, 2).matmul(feat_prime)  # (B, L2, C)
    return bev.transpose(1, 2).reshape(batch_size, num_channels, bev_size, bev_size)


def project_sparse(feat_prime, depth_prime, sparse):
    """Same result as ``project_dense`` from the non-zero structure only (gather / index_add, autograd-friendly).

    Args:
        feat_prime: (B, R, C); depth_prime: (B, R, D); sparse: ``SparseProjection`` for this batch.
    Returns:
        (B, C, L, L) BEV features.
    """
    batch_size, num_rays, num_channels = feat_prime.shape
    bev_size = sparse.bev_size
    if (batch_size, num_rays, depth_prime.shape[2]) != (sparse.batch_size, sparse.num_rays, sparse.depth_channels):
        raise ValueError(f'project_sparse: inputs are (B, R, D) = {(batch_size, num_rays, depth_prime.shape[2])} '
                         f'but the projection was built for '
                         f'{(sparse.batch_size, sparse.num_rays, sparse.depth_channels)}')
    depth_vals = depth_prime.reshape(-1).index_select(0, sparse.triple_depth)
    pair_weight = depth_prime.new_zeros(sparse.pair_row.numel()).index_add(0, sparse.triple_pair, depth_vals)
    weighted = feat_prime.reshape(-1, num_channels).index_select(0, sparse.pair_row) * pair_weight[:, None]
    bev = feat_prime.new_zeros(batch_size * bev_size * bev_size, num_channels).index_add(0, sparse.pair_cell,
                                                                                       weighted)
    return bev.view(batch_size, bev_size, bev_size, num_channels).permute(0, 3, 1, 2).contiguous()


def resolve_projection(projection, device):
    """'auto' -> 'dense' on NPU or while tracing / exporting (matrix products: cube units, fixed-shape exportable
    graph), 'sparse' elsewhere (CPU / GPU)."""
    if projection not in PROJECTION_MODES:
        raise ValueError(f"projection must be one of {PROJECTION_MODES}, got {projection!r}")
    if projection != 'auto':
        return projection
    # str parsing: torch.device('npu') only parses once torch_npu is imported.
    device_type = device.type if isinstance(device, torch.device) else str(device).split(':')[0]
    exporting = torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_exporting()
    if device_type == 'npu' or exporting:
        return 'dense'
    return 'sparse'


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

    def get_geom_cells(self, mats_dict, sweep_index=0):
        """(B, N * W, D, 2) long BEV cells of the frustum points of one sweep."""
        geom = self.get_geometry(
            mats_dict['sensor2ego_mats'][:, sweep_index],
            mats_dict['intrin_mats'][:, sweep_index],
            mats_dict['ida_mats'][:, sweep_index],
            mats_dict.get('bda_mat', None),
        )
        return geometry_to_cells(geom, self.voxel_coord, self.voxel_size)

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
            cells = self.get_geom_cells(mats_dict, sweep_index)
            if mode == 'dense':
                proj = build_ring_ray(cells, self.bev_size)
            else:
                proj = build_sparse_projection(cells, self.bev_size)
            self._proj_cache = (key, mode, proj) if key is not None else None
        return proj

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
        with torch.autocast(device_type=feature.device.type, enabled=False):
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
        with torch.autocast(device_type=depth_feature.device.type, enabled=False):
            feature = depth_feature[:, self.depth_channels:self.depth_channels + self.output_channels].float()
            depth = depth_feature[:, :self.depth_channels].float().softmax(1)
            bev = self.reduce_and_project(feature, depth, mats_dict, sweep_index=sweep_index).contiguous()
        if is_return_depth:
            return bev, depth
        return bev
