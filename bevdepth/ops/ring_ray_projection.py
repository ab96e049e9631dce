"""MatrixVT ring / ray projection kernels: the cells of the frustum points, the binary ring and ray
matrices (dense) or their non-zero structure (sparse), and the projection of prime features to BEV.
The nn.Modules that use them are in ``bevdepth.layers.backbones.matrixvt``.

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
import math
import warnings
from typing import NamedTuple, Optional

import numpy
import torch

from bevdepth.ops.device_branch import autocast_off, branch_type

__all__ = [
    'SparseProjection', 'PROJECTION_MODES', 'SPARSE_DTYPES', 'geometry_to_cells', 'frustum_row_features',
    'frustum_cells', 'fast_cells_supported', 'cells_to_flat_index', 'build_ring_ray', 'build_sparse_projection',
    'sparse_from_ring_ray', 'ring_ray_from_sparse', 'project_dense', 'project_sparse', 'resolve_projection',
]

PROJECTION_MODES = ('dense', 'sparse', 'auto')


# ----------------------------------------------------------------------------------------------------------
# Ring / ray construction (vectorised, on the input's device, no gradients).
# ----------------------------------------------------------------------------------------------------------

class SparseProjection(NamedTuple):
    """Non-zero structure of the MatrixVT projection for one batch.

    pair_row (K,): flat ray row b * R + r of each (ray, cell) pair with ray[b, r, c] = 1.
    pair_cell (K,): flat BEV cell b * L2 + c of that pair. Pairs are sorted by (cell, ray): the pairs are the
        non-zeros of the (B * L2, B * R) block-diagonal matrix P^T in CSR order.
    triple_pair (T,): index into the pairs, one entry per ring entry ring[b, d, c] = 1 of the pair's cell
        (grouped by pair, d ascending).
    triple_depth (T,): flat depth index (b * R + r) * D + d of that triple.
    cell_crow (B * L2 + 1,): CSR row pointers of the pairs over the cells (``None`` = recomputed when needed).
    Index dtype: int32 whenever every index fits (``_key_layout``; CSR products and gathers accept it), else int64.
    """
    pair_row: torch.Tensor
    pair_cell: torch.Tensor
    triple_pair: torch.Tensor
    triple_depth: torch.Tensor
    batch_size: int
    num_rays: int
    depth_channels: int
    bev_size: int
    cell_crow: Optional[torch.Tensor] = None


def geometry_to_cells(geom, voxel_coord, voxel_size):
    """Frustum geometry -> integer BEV cell of every (ray, depth bin), as upstream ``MatrixVT.get_proj_mat`` computes them.

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


def frustum_row_features(frustum, dtype=torch.float64):
    """Per (column, depth bin) statistics over image rows of the frustum points f = (u, v, d, 1), the input of
    ``frustum_cells``: (fW * D, 21) = [mean_h f f^T (16, row-major), mean_h f (4), 1], rows ordered (w, d).

    Depends only on the frustum buffer: compute once and reuse (``MatrixVT`` caches it).
    """
    num_depth, feat_h, feat_w, _ = frustum.shape
    points = frustum.to(dtype).permute(2, 0, 1, 3).reshape(feat_w * num_depth, feat_h, 4)  # (W * D, H, 4)
    second = torch.einsum('phi,phj->pij', points, points).reshape(-1, 16) / feat_h
    first = points.mean(1)
    return torch.cat([second, first, torch.ones_like(first[:, :1])], 1)


def frustum_cells(row_features, num_depth, sensor2ego_mat, intrin_mat, ida_mat, bda_mat, voxel_coord, voxel_size,
                  out_dtype=torch.long):
    """Integer BEV cells of the row-averaged frustum points straight from the camera matrices (fast path of
    ``geometry_to_cells(frustum_to_ego(...))``, as in upstream ``MatrixVT.get_proj_mat``).

    Args:
        row_features: (fW * D, 21) from ``frustum_row_features`` (its dtype is the compute dtype).
        num_depth: D. sensor2ego_mat, intrin_mat, ida_mat: (B, N, 4, 4); bda_mat: (B, 4, 4) or None.
        voxel_coord, voxel_size: (3,) buffers of the model.
        out_dtype: integer dtype of the result (the sparse build reads int32: half the memory of long).
    Returns:
        (B, N * fW, D, 2) integer cells (x, y), truncated toward zero.

    Why it is exact: with p = ida^-1 f, q = (p0 p2, p1 p2, p2, p3) and xyz = M q (M = bda sensor2ego intrin^-1),
    the reference's mean over rows of the normalised points (M q - lower) / size equals
    (M mean_h(q) - lower) / size, and mean_h(q) is a fixed linear function of the row moments mean_h(f f^T),
    mean_h(f). So one (fW * D, 21) x (21, 2) product per camera gives the averaged cell coordinates, 16x less
    work than transforming every row. Computed in float64 it is closer to the exact value than the reference's
    float32 arithmetic; a point within float32 rounding (~1e-5 cells) of a cell border can therefore truncate
    differently from the reference formula (measured ~1 in 150k points; docs/view_transform.md). Given the same
    cells, every build below is bit-identical to the reference.
    """
    batch_size, num_cams = sensor2ego_mat.shape[:2]
    num_views = batch_size * num_cams
    dtype = row_features.dtype
    with autocast_off(row_features.device):
        inv_ida = torch.inverse(ida_mat.reshape(num_views, 4, 4).to(dtype))
        combine = sensor2ego_mat.reshape(num_views, 4, 4).to(dtype).matmul(
            torch.inverse(intrin_mat.reshape(num_views, 4, 4).to(dtype)))
        if bda_mat is not None:
            bda = bda_mat.to(dtype).view(batch_size, 1, 4, 4).expand(batch_size, num_cams, 4, 4)
            combine = bda.reshape(num_views, 4, 4).matmul(combine)
        scale = voxel_size[:2].to(dtype)
        lower = (voxel_coord - voxel_size / 2.0)[:2].to(dtype)
        rows = combine[:, :2] / scale[:, None]  # (V, 2, 4): output (x, y) per q component, in cell units
        # q0 = sum_jk A0j A2k m2_jk, q1 = sum_jk A1j A2k m2_jk, q2 = A2 . m1, q3 = A3 . m1 (A = ida^-1).
        quad = inv_ida[:, :2, :, None] * inv_ida[:, 2:3, None, :]  # (V, 2, 4, 4)
        coef_second = torch.einsum('via,vajk->vijk', rows[:, :, :2], quad).reshape(num_views, 2, 16)
        coef_first = torch.einsum('via,vak->vik', rows[:, :, 2:], inv_ida[:, 2:])  # (V, 2, 4)
        coef_const = (-lower / scale).expand(num_views, 2)[..., None]
        coef = torch.cat([coef_second, coef_first, coef_const], 2)  # (V, 2, 21)
        # One (2 * V, 21) x (21, W * D) GEMM for all views (V products with 2 output columns each run ~3x
        # slower on CPU); x and y come out as separate contiguous planes, which is what the builds read.
        cells = torch.matmul(coef.transpose(0, 1).reshape(2 * num_views, -1), row_features.t())
    feat_w = row_features.shape[0] // num_depth
    # (2, V, W * D) -> (B, N * W, D, 2) is a view: the integer conversion runs on contiguous memory.
    return cells.to(out_dtype).view(2, batch_size, num_cams * feat_w, num_depth).permute(1, 2, 3, 0)


def fast_cells_supported(device):
    """``frustum_cells`` runs in float64: used in eager mode on CPU / CUDA; NPU and tracing / ONNX export use the
    reference-order float32 geometry instead. Follows ``device_branch.branch_type`` (forcible on CPU)."""
    device_type = branch_type(device)
    exporting = torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_exporting()
    return device_type in ('cpu', 'cuda') and not exporting


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
        cells: (B, R, D, 2) long cells from ``geometry_to_cells`` / ``frustum_cells``.
        bev_size: L.

    The reference's max-normalisation per column is skipped: ``scatter_`` of the scalar 1 (a write, not an
    add) leaves exactly 0 or 1 everywhere, so every column max is 0 or 1, clipped to 1, and the division is the
    identity -- it would only cost two passes over the matrices.
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
    return ring, ray


def _masked(values, mask):
    """1-D tensor of ``values[mask]`` (row-major order). On CPU through NumPy's compaction (~1.5x faster than
    ``masked_select`` on one thread); elsewhere ``masked_select`` (``device_branch.branch_type``, forcible on CPU)."""
    if branch_type(values.device) == 'cpu':
        return torch.from_numpy(values.numpy()[mask.numpy()])
    return torch.masked_select(values, mask)


def _fill_dropped_(values, keep, fill):
    """values[~keep] = fill, in place, for an integer tensor: as bit masks (keep -> 0 / -1 words), ~8x faster than
    ``masked_fill_`` / ``torch.where`` with a bool mask on CPU (measured 0.12 vs 1.0 ms for 236k int32)."""
    drop_bits = keep.to(values.dtype).sub_(1)  # 0 where kept, all bits set where dropped
    values.bitwise_and_(drop_bits.bitwise_not())
    values.bitwise_or_(drop_bits.bitwise_and_(fill))
    return values


def _sorted_unique_kept(keys, keep):
    """Sorted distinct values of ``keys[keep]`` (1-D). ``keys``: a contiguous buffer the caller owns, overwritten
    (the result may be a view of it).

    On CPU the dropped entries are set to the dtype's maximum (above every packed key) and the whole buffer is
    sorted in place by NumPy's SIMD quicksort, so the kept keys come first: cheaper than compacting first
    (NumPy's boolean compaction costs as much as the sort it saves). Elsewhere masked_select + ``torch.sort``.
    Values only (no permutation): the keys encode everything the caller needs.
    """
    if branch_type(keys.device) == 'cpu':  # forcible on CPU: device_branch
        num_kept = int(numpy.count_nonzero(keep.numpy()))
        _fill_dropped_(keys, keep, torch.iinfo(keys.dtype).max)
        keys = keys.view(-1)
        keys.numpy().sort()
        keys = keys[:num_kept]
    else:
        keys = torch.sort(torch.masked_select(keys, keep)).values
    if keys.numel() < 2:
        return keys
    distinct = torch.ne(keys[1:], keys[:-1])
    if bool(distinct.all()):  # the common case for the ray pairs (a ray never returns to a cell it left)
        return keys
    return _masked(keys, torch.cat([distinct.new_ones(1), distinct]))


def _csr_rows(index, num_rows, dtype=torch.long):
    """CSR row pointers (num_rows + 1,) of a sorted row index (int32 or int64), in ``dtype``."""
    crow = torch.zeros(num_rows + 1, dtype=dtype, device=index.device)
    torch.cumsum(torch.bincount(index, minlength=num_rows), 0, dtype=dtype, out=crow[1:])
    return crow


def _floor_div(values, divisor):
    """values // divisor for non-negative integers: a shift when the divisor is a power of two (integer division
    is ~15x slower than a shift on CPU)."""
    if divisor & (divisor - 1) == 0:
        return values >> (divisor.bit_length() - 1)
    return torch.div(values, divisor, rounding_mode='floor')


class _KeyLayout(NamedTuple):
    """Packed sort keys (b * L2 + c) << shift | low, low = ray r (pairs) or depth bin d (ring): sorting them orders
    the entries cell-major, and unpacking is a shift and a mask instead of integer divisions. ``dtype`` is int32
    when the keys and every flat index of the result ((b * R + r) * D + d among them) fit, else int64."""
    dtype: torch.dtype
    ray_shift: int
    depth_shift: int


def _key_layout(batch_size, num_cells, num_rays, num_depth):
    ray_shift, depth_shift = (num_rays - 1).bit_length(), (num_depth - 1).bit_length()
    fits_int32 = max((batch_size * num_cells) << max(ray_shift, depth_shift), batch_size * num_rays * num_depth,
                     batch_size * num_cells + 1) < 2 ** 31
    return _KeyLayout(torch.int32 if fits_int32 else torch.int64, ray_shift, depth_shift)


def _join_pairs(pair_key, ring_key, layout, batch_size, num_rays, num_depth, bev_size):
    """Sparse structure from sorted distinct packed keys (``_KeyLayout``, consumed: updated in place): the ray
    map's non-zeros (cell, r) and the ring map's non-zeros (cell, d), both cell-major.

    Written for CPU memory traffic: every index in ``layout.dtype`` (int32 whenever it fits: half the bytes of
    int64), index_select gathers (several times faster than advanced indexing), in-place updates and cumulative
    sums instead of fresh temporaries (every fresh multi-MB buffer costs page faults, which dominated this
    function).
    """
    num_cells = bev_size * bev_size
    device = pair_key.device
    index_dtype = layout.dtype
    pair_cell = pair_key >> layout.ray_shift  # b * L2 + c
    pair_row = _floor_div(pair_cell, num_cells).mul_(num_rays)
    pair_row += pair_key.bitwise_and_((1 << layout.ray_shift) - 1)  # b * R + r
    ring_cell = ring_key >> layout.depth_shift
    ring_d = ring_key.bitwise_and_((1 << layout.depth_shift) - 1)

    # Ring entries are sorted by cell: each cell's entries are one run [start, start + count) of the list. Every
    # pair's cell holds at least the pair's own (ray, bin) point, so count >= 1.
    ring_crow = _csr_rows(ring_cell, batch_size * num_cells, index_dtype)
    start = ring_crow.index_select(0, pair_cell)
    count = ring_crow[1:].index_select(0, pair_cell).sub_(start)
    first_triple = torch.cumsum(count, 0, dtype=torch.long)  # int64: the total may not fit int32
    num_triples = int(first_triple[-1]) if count.numel() else 0
    triple_dtype = index_dtype if num_triples < 2 ** 31 else torch.long
    first_triple -= count  # int64: scatter_ takes int64 indices only
    # Triples of pair p are first_triple[p] + j, j < count[p], with ring entries start[p] + j: both indices are
    # cumulative sums of steps that are 1 except where a new pair begins.
    triple_pair = torch.zeros(num_triples, dtype=triple_dtype, device=device)
    # scatter_ of a source tensor: ~2x faster than index_fill_ / index_copy_ on CPU (the indices are distinct)
    triple_pair.scatter_(0, first_triple[1:], torch.ones_like(count[1:], dtype=triple_dtype))
    torch.cumsum(triple_pair, 0, out=triple_pair)
    triple_ring = torch.ones(num_triples, dtype=triple_dtype, device=device)
    if num_triples:
        # from the previous pair's last ring entry to this pair's first: start[p] - start[p-1] - count[p-1] + 1
        jumps = start.clone()
        jumps[1:] -= start[:-1]
        jumps[1:] -= count[:-1]
        jumps[1:] += 1
        triple_ring.scatter_(0, first_triple, jumps.to(triple_dtype))
        torch.cumsum(triple_ring, 0, out=triple_ring)
    triple_depth = (pair_row * num_depth).to(triple_dtype).index_select(0, triple_pair)
    triple_depth += ring_d.index_select(0, triple_ring)
    return SparseProjection(pair_row, pair_cell, triple_pair, triple_depth, batch_size, num_rays, num_depth,
                            bev_size, _csr_rows(pair_cell, batch_size * num_cells, index_dtype))


def build_sparse_projection(cells, bev_size, cells_writable=False):
    """Sparse projection structure straight from (B, R, D, 2) integer cells (never builds the dense matrices).

    Same validity / null-cell rules as ``cells_to_flat_index``. Keys are packed int32 whenever they fit (half the
    memory traffic of int64, faster sorts). Neighbouring points usually share a cell (consecutive depth bins of
    a ray, neighbouring rays at one depth bin), so exact neighbour duplicates are dropped (~35 % of the points)
    before the global sort + dedup: same result, and the dedup has little or nothing left to compact. (A ray's
    row-averaged points lie on a straight line, so its cells never repeat after this step and the pair dedup
    finds nothing to drop.)

    ``cells_writable=True``: the x / y planes of ``cells`` may be overwritten (``MatrixVT.build_projection`` passes
    its fresh int32 cells: two fewer copies).
    """
    batch_size, num_rays, num_depth, _ = cells.shape
    num_cells = bev_size * bev_size
    device = cells.device
    layout = _key_layout(batch_size, num_cells, num_rays, num_depth)
    index_dtype = layout.dtype
    x, y = cells[..., 0], cells[..., 1]
    if not (cells_writable and x.dtype == index_dtype and x.is_contiguous() and y.is_contiguous()):
        x, y = x.to(index_dtype, copy=True), y.to(index_dtype, copy=True)  # updated in place below
    if bev_size & (bev_size - 1) == 0:  # 0 <= x, y < L  <=>  no bit of x | y at or above L (sign bit included)
        valid = torch.bitwise_or(x, y).bitwise_and_(~(bev_size - 1)) == 0
    else:
        valid = (torch.minimum(x, y) >= 0) & (torch.maximum(x, y) <= bev_size - 1)
    batch_cell = y.mul_(bev_size).add_(x)  # flat cell y * L + x
    null_cell = (bev_size // 2) * bev_size + bev_size // 2
    valid &= batch_cell != null_cell
    # b * L2 + c for valid points, -1 for invalid ones: an invalid point's flat index may equal a valid
    # neighbour's (x = -1 wraps to the previous row), and must not make the neighbour look like a duplicate.
    batch_cell += torch.arange(0, batch_size * num_cells, num_cells, device=device,
                               dtype=index_dtype).view(batch_size, 1, 1)
    _fill_dropped_(batch_cell, valid, -1)

    # Ray map: (cell, ray) keys; skip a point equal to the previous depth bin's of the same ray.
    keep = valid.clone()
    keep[:, :, 1:] &= batch_cell[:, :, 1:] != batch_cell[:, :, :-1]
    key = torch.bitwise_left_shift(batch_cell, layout.ray_shift, out=x)
    key |= torch.arange(num_rays, device=device, dtype=index_dtype).view(1, -1, 1)
    pair_key = _sorted_unique_kept(key, keep)  # a view of x

    # Ring map: (cell, depth bin) keys; skip a point equal to the previous ray's at the same depth bin.
    keep = valid
    keep[:, 1:, :] &= batch_cell[:, 1:, :] != batch_cell[:, :-1, :]
    key = batch_cell.bitwise_left_shift_(layout.depth_shift)  # in y: x holds the pair keys
    key |= torch.arange(num_depth, device=device, dtype=index_dtype)
    ring_key = _sorted_unique_kept(key, keep)
    return _join_pairs(pair_key, ring_key, layout, batch_size, num_rays, num_depth, bev_size)


def sparse_from_ring_ray(ring, ray):
    """Convert dense (ring (B, D, L2), ray (B, R, L2)) matrices to a ``SparseProjection``.

    Only the 0/1 pattern is used (the maps are binary by construction).
    """
    batch_size, num_depth, num_cells = ring.shape
    num_rays = ray.shape[1]
    bev_size = math.isqrt(int(num_cells))
    layout = _key_layout(batch_size, num_cells, num_rays, num_depth)
    # nonzero of (B, L2, R) / (B, L2, D) views lists the entries cell-major, as the keys require.
    pair_index = torch.nonzero(ray.transpose(1, 2).reshape(-1)).view(-1)  # (b * L2 + c) * R + r
    ring_index = torch.nonzero(ring.transpose(1, 2).reshape(-1)).view(-1)  # (b * L2 + c) * D + d
    pair_key = ((pair_index // num_rays) << layout.ray_shift) | (pair_index % num_rays)
    ring_key = ((ring_index // num_depth) << layout.depth_shift) | (ring_index % num_depth)
    return _join_pairs(pair_key.to(layout.dtype), ring_key.to(layout.dtype), layout, batch_size, num_rays,
                       num_depth, bev_size)


def ring_ray_from_sparse(sparse):
    """Convert a ``SparseProjection`` back to dense float32 (ring (B, D, L2), ray (B, R, L2)) matrices."""
    batch_size, num_rays, num_depth = sparse.batch_size, sparse.num_rays, sparse.depth_channels
    num_cells = sparse.bev_size * sparse.bev_size
    device = sparse.pair_row.device
    ray = torch.zeros(batch_size * num_rays * num_cells, device=device)
    pair_row, pair_cell = sparse.pair_row.long(), sparse.pair_cell.long()  # flat dense indices need int64
    ray[pair_row * num_cells + pair_cell % num_cells] = 1.0
    ring = torch.zeros(batch_size * num_depth * num_cells, device=device)
    triple_cell = pair_cell[sparse.triple_pair]
    triple_b = triple_cell // num_cells
    triple_d = sparse.triple_depth.long() % num_depth
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
        (B, C, L, L) BEV features ([B, C, y, x]; a channels-last view).
    """
    batch_size, _, num_channels = feat_prime.shape
    # isqrt(int(...)): under torch.jit.trace sizes are 0-dim tensors and round() of one fails.
    bev_size = math.isqrt(int(ring.shape[-1]))
    proj_mat = depth_prime.matmul(ring) * ray  # (B, R, L2)
    bev = proj_mat.transpose(1, 2).matmul(feat_prime)  # (B, L2, C)
    return bev.transpose(1, 2).reshape(batch_size, num_channels, bev_size, bev_size)


def _csr(crow, col, values, size):
    """CSR matrix from indices we built ourselves (valid by construction: no invariant check)."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='Sparse CSR tensor support is in beta')
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


SPARSE_DTYPES = (torch.float32, torch.float64)  # dtypes of the CSR sparse-dense products


def _no_autocast(tensor):
    """Context without autocast on ``tensor``'s device: the CSR products must run in the inputs' own dtype
    (autocast is still on during backward when ``loss.backward()`` is called inside the autocast block)."""
    return autocast_off(tensor.device)


class _CellProjection(torch.autograd.Function):
    """bev (B * L2, C) = W @ feat (B * R, C) for the sparse (B * L2, B * R) matrix W whose non-zeros are the
    pairs (CSR over cells) with values ``pair_weight``; one sparse-dense product forward, and backward
    feat grad = W^T @ grad (CSR over rays) and pair-weight grad = grad . feat sampled at the pairs."""

    @staticmethod
    def forward(ctx, feat, pair_weight, sparse):
        num_cells = sparse.batch_size * sparse.bev_size * sparse.bev_size
        crow = (sparse.cell_crow if sparse.cell_crow is not None
                else _csr_rows(sparse.pair_cell, num_cells, sparse.pair_row.dtype))
        matrix = _csr(crow, sparse.pair_row, pair_weight, (num_cells, feat.shape[0]))
        ctx.save_for_backward(feat, pair_weight)
        ctx.sparse, ctx.crow = sparse, crow
        with _no_autocast(feat):
            return torch.sparse.mm(matrix, feat)

    @staticmethod
    def backward(ctx, grad_bev):
        feat, pair_weight = ctx.saved_tensors
        # Under autocast the BEV map's consumer may run in bf16 / fp16; the gradient must match our inputs' dtype.
        grad_bev = grad_bev.to(feat.dtype).contiguous()
        sparse, crow = ctx.sparse, ctx.crow
        grad_feat = grad_weight = None
        num_cells, num_rows = grad_bev.shape[0], feat.shape[0]
        with _no_autocast(feat):
            if ctx.needs_input_grad[0]:
                # W^T in CSR over rays: the pairs re-ordered by ray (stable, so cells stay ascending per ray).
                order = torch.argsort(sparse.pair_row, stable=True)
                row_crow = _csr_rows(sparse.pair_row[order], num_rows, sparse.pair_cell.dtype)
                transposed = _csr(row_crow, sparse.pair_cell[order], pair_weight[order], (num_rows, num_cells))
                grad_feat = torch.sparse.mm(transposed, grad_bev)
            if ctx.needs_input_grad[1]:
                pattern = _csr(crow, sparse.pair_row, pair_weight.detach(), (num_cells, num_rows))
                grad_weight = torch.sparse.sampled_addmm(pattern, grad_bev, feat.t(), beta=0.0).values()
        return grad_feat, grad_weight, None


def project_sparse(feat_prime, depth_prime, sparse):
    """Same result as ``project_dense`` from the non-zero structure only (autograd-friendly).

    Args:
        feat_prime: (B, R, C); depth_prime: (B, R, D); sparse: ``SparseProjection`` for this batch.
    Returns:
        (B, C, L, L) BEV features (a channels-last view, like ``project_dense``).

    P at the pairs = scatter-sum of the gathered depth probabilities over the triples; BEV = (sparse P^T) @
    feat_prime as one CSR sparse-dense product (CPU: MKL; CUDA: cuSPARSE).
    """
    batch_size, num_rays, num_channels = feat_prime.shape
    bev_size = sparse.bev_size
    if (batch_size, num_rays, depth_prime.shape[2]) != (sparse.batch_size, sparse.num_rays, sparse.depth_channels):
        raise ValueError(f'project_sparse: inputs are (B, R, D) = {(batch_size, num_rays, depth_prime.shape[2])} '
                         f'but the projection was built for '
                         f'{(sparse.batch_size, sparse.num_rays, sparse.depth_channels)}')
    if feat_prime.dtype not in SPARSE_DTYPES or depth_prime.dtype not in SPARSE_DTYPES:
        # Under bf16 / fp16 autocast: MKL / cuSPARSE CSR products are float32 / float64 only; splat in float32
        # (the BEV map stays float32; autocast casts it again for the convolutions that follow).
        feat_prime, depth_prime = feat_prime.float(), depth_prime.float()
    depth_vals = depth_prime.reshape(-1).index_select(0, sparse.triple_depth)
    pair_weight = depth_prime.new_zeros(sparse.pair_row.numel()).index_add(0, sparse.triple_pair, depth_vals)
    bev = _CellProjection.apply(feat_prime.reshape(-1, num_channels), pair_weight, sparse)  # (B * L2, C)
    return bev.view(batch_size, bev_size, bev_size, num_channels).permute(0, 3, 1, 2)


def resolve_projection(projection, device):
    """'auto' -> 'dense' on NPU or while tracing / exporting (matrix products: cube units, fixed-shape exportable
    graph), 'sparse' elsewhere (CPU / GPU). The device type is ``device_branch.branch_type`` (forcible on CPU)."""
    if projection not in PROJECTION_MODES:
        raise ValueError(f"projection must be one of {PROJECTION_MODES}, got {projection!r}")
    if projection != 'auto':
        return projection
    exporting = torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_exporting()
    if branch_type(device) == 'npu' or exporting:
        return 'dense'
    return 'sparse'
