"""LSS "splat": sum-pool frustum point features into a BEV grid, in plain PyTorch (upstream BEVDepth
``bevdepth/ops/voxel_pooling_train``, used by ``BaseLSSFPN._forward_single_sweep``).

Replaces the reference's CUDA ``voxel_pooling_train`` / ``voxel_pooling_inference`` extensions. Semantics
match the CUDA kernel: a point with integer voxel coordinates (x, y, z) is kept only if 0 <= x < X,
0 <= y < Y and 0 <= z < Z; kept points are summed into cell (y, x) of their batch sample (z is only used
for the range check, the grid is flattened over z). The gradient w.r.t. each kept point's feature is the
output gradient of its cell; dropped points get zero; the coordinates get no gradient.
"""
import torch

__all__ = ['voxel_pooling']


def voxel_pooling(geom_xyz, feats, voxel_num):
    """Sum-pool point features into BEV cells.

    Args:
        geom_xyz: (B, N, D, H, W, 3) integer voxel coordinates (x, y, z) per point (any int dtype;
            float input is truncated toward zero like ``.int()``).
        feats: (B, N, D, H, W, C) point features (any float dtype, autograd-friendly).
        voxel_num: (3,) tensor or sequence with the grid size (X, Y, Z).

    Returns:
        (B, C, Y, X) BEV features, same dtype and device as ``feats``.
    """
    if geom_xyz.shape[-1] != 3 or geom_xyz.shape[:-1] != feats.shape[:-1]:
        raise ValueError(f'voxel_pooling: geom_xyz {tuple(geom_xyz.shape)} must be feats {tuple(feats.shape)} '
                         'with the channel axis replaced by 3 coordinates')
    num_x, num_y, num_z = (int(v) for v in voxel_num)
    batch_size, num_channels = feats.shape[0], feats.shape[-1]

    coords = geom_xyz.reshape(batch_size, -1, 3).long()
    x, y, z = coords.unbind(-1)
    kept = (x >= 0) & (x < num_x) & (y >= 0) & (y < num_y) & (z >= 0) & (z < num_z)
    batch_idx = torch.arange(batch_size, device=coords.device).view(batch_size, 1).expand_as(x)
    # One flat cell index per point over (B, Y, X). Dropped points go to an extra trash row that is cut off
    # afterwards (so their gradient is zero) -- this avoids copying the kept subset of a huge feature tensor.
    num_cells = batch_size * num_y * num_x
    cell = torch.where(kept, (batch_idx * num_y + y) * num_x + x, torch.full_like(x, num_cells))

    pooled = feats.new_zeros(num_cells + 1, num_channels)
    pooled = pooled.index_add(0, cell.reshape(-1), feats.reshape(-1, num_channels))
    pooled = pooled[:num_cells]
    return pooled.view(batch_size, num_y, num_x, num_channels).permute(0, 3, 1, 2).contiguous()
