"""Benchmark suite of the MatrixVT port: our implementations against reference-style baselines.

Every figure is the median of ``repeats`` timed runs after ``warmup`` untimed runs; a baseline and its
candidate run in the same process, interleaved run by run (so a load change on a shared machine hits both alike).

Sections (``run_benchmark(sections=...)``):

* ``ring_ray``: building the MatrixVT projection from the camera matrices (what the reference's
  ``get_proj_mat`` does). Baseline: the reference as written (7-dim broadcast geometry, the cells and the Python-loop build of upstream ``MatrixVT.get_proj_mat``, with
  the Python loops: ``reference_style_proj_mat``). Candidates: the model's production path
  (``get_geom_cells`` row-moment cells + ``build_sparse_projection``; ``build_ring_ray`` for the NPU / ONNX
  path). From the same cells both builds must be bit-identical to the loop's; the few points whose cell differs
  between the two geometries (float rounding at cell borders) are counted. Also timed: each part alone, and the
  number of dispatched ATen operators (``count_dispatched_ops``; on a GPU / NPU each is a kernel launch).
* ``view_transform``: forward + backward of the non-learned view transform (``VT_CASES``: geometry +
  projection structure + projection, from the prime tensors; LSS from the depth-net outputs) and of the whole
  module after the depth net (``MODULE_CASES``: learned DepthReducer + HoriConv included). Peak memory: one
  fresh subprocess per case (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``, minus
  ``VmRSS`` at the reset). Sparse, dense and reference-style outputs and gradients must agree within 1e-5
  relative given the same cells. docs/performance.md lists exactly what each case contains.
* ``train_step``: a whole MatrixVT_Det training step (forward, detection + depth losses, backward, AdamW),
  samples/s, and the share of the view transform (its standalone forward + backward time at the same
  shapes divided by the step time).
* ``dataset``: ``NuscDetDataset.__getitem__`` + collate throughput of the training pipeline (random ida / bda,
  depth GT) in one process (= per DataLoader worker) on a synthetic nuScenes dataroot with 1600x900 JPEGs.
  Ours: ``image_backend='opencv'`` with the depth cache. Baseline: the dataset's reference switch,
  ``image_backend='pillow'`` (Pillow resize / crop / flip / rotate on the full JPEG) with
  ``depth_source='online'`` (LiDAR read and projected per sample). Both draw the same augmentations.
* ``depth_gt``: ``write_depth_cache`` (scripts/gen_depth_gt.py) throughput, against a reference-style worker
  (decode each image only for its size, devkit point-cloud objects, ``tofile``).

Targets (``TARGETS``) are checked on every configuration and reported PASS / FAIL; they are meant for the full
configuration (the tiny one is a smoke run).
"""
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bevdepth.configs import nuscenes as nuscenes_configs
from bevdepth.configs import tiny as tiny_configs
from bevdepth.utils.io import atomic_json_dump

__all__ = [
    'CONFIG_MODULES', 'SECTIONS', 'TARGETS', 'MEMORY_METHOD', 'nuscenes_like_mats', 'reference_loop_ring_ray',
    'measure_interleaved', 'build_matrixvt', 'lss_view_transform', 'vt_forward_backward', 'relative_error',
    'peak_memory_mb', 'reference_style_depth_points', 'count_dispatched_ops', 'VT_CASES', 'MODULE_CASES',
    'reference_style_geometry', 'reference_style_proj_mat', 'bench_ring_ray',
    'bench_view_transform', 'bench_train_step', 'bench_dataset', 'run_benchmark', 'format_table',
]

CONFIG_MODULES = {'full': nuscenes_configs, 'tiny': tiny_configs}
SECTIONS = ('ring_ray', 'view_transform', 'train_step', 'dataset', 'depth_gt')
SCRIPTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(SCRIPTS_DIR)
MEMORY_METHOD = ('fresh subprocess per case; peak RSS increase over one forward+backward = VmHWM (reset via '
                 '/proc/self/clear_refs) - VmRSS at the reset, inputs and model already allocated')
EQUALITY_RTOL = 1e-5

# Calibration of the six cameras of a real nuScenes log (n015-2018-07-18-11-07-57+0800), in the config's
# camera order: camera->ego translation (m), rotation quaternion (w, x, y, z), fx = fy, cx, cy (1600x900 px).
NUSCENES_CAMERA_CALIB = {
    'CAM_FRONT_LEFT': ([1.5239, 0.4946, 1.5093], [0.675727, -0.673627, 0.21214, -0.211228], 1272.598, 826.615,
                       479.752),
    'CAM_FRONT': ([1.7008, 0.0159, 1.5110], [0.499802, -0.503032, 0.49978, -0.497371], 1266.417, 816.267,
                  491.507),
    'CAM_FRONT_RIGHT': ([1.5508, -0.4934, 1.4957], [0.206035, -0.202694, 0.682451, -0.671361], 1260.847,
                        807.968, 495.334),
    'CAM_BACK_LEFT': ([1.0357, 0.4848, 1.5910], [0.692419, -0.703162, -0.116483, 0.112033], 1256.741, 792.113,
                      492.776),
    'CAM_BACK': ([0.0283, 0.0035, 1.5791], [0.503787, -0.497402, -0.494185, 0.50455], 809.221, 829.220,
                 481.778),
    'CAM_BACK_RIGHT': ([1.0149, -0.4806, 1.5624], [0.12281, -0.132401, -0.700431, 0.690496], 1259.514, 807.253,
                       501.196),
}


def _target(name, section, key, threshold, higher_is_better=True):
    return dict(name=name, section=section, key=key, threshold=threshold, higher_is_better=higher_is_better)


# (name, where the value lives in a config's results, threshold). Equality checks are targets too.
TARGETS = [
    _target('ring/ray build (get_proj_mat, sparse) >= 100x faster than the reference loop at B=8', 'ring_ray',
            'speedup_at_b8', 100.0),
    _target('ring/ray build identical to the reference loop', 'ring_ray', 'identical', True),
    _target('MatrixVT VT fwd+bwd (sparse, non-learned part) >= 10x faster than dense reference style',
            'view_transform',
            'speedup_vs_reference', 10.0),
    _target('MatrixVT sparse == dense == reference style, same cells (outputs, grads) within 1e-5 rel',
            'view_transform',
            'equal', True),
    _target('MatrixVT VT fwd+bwd >= 5x faster than LSS', 'view_transform', 'speedup_vs_lss', 5.0),
    _target('MatrixVT VT peak memory >= 5x lower than LSS', 'view_transform', 'memory_ratio_vs_lss', 5.0),
    _target('dataset pipeline >= 2x the reference-style samples/s per worker', 'dataset', 'speedup', 2.0),
    _target('training step bf16 >= 1.8x faster than fp32 (CPU with AMX / AVX512-BF16)', 'train_step',
            'bf16_speedup', 1.8),
]


# ----------------------------------------------------------------------------------------------- helpers

def _config_parts(config):
    if config not in CONFIG_MODULES:
        raise ValueError(f"config must be one of {sorted(CONFIG_MODULES)}, got {config!r}")
    module = CONFIG_MODULES[config]
    backbone_conf = module.backbone_conf()
    backbone_conf['img_backbone_conf'] = dict(backbone_conf['img_backbone_conf'], pretrained=None)
    return module, backbone_conf


def measure_interleaved(fns, repeats, warmup=1, rewarm_below_s=1.0):
    """Time several callables run by run, interleaved, each timed run a warm one. fns: {name: callable()}.

    After ``warmup`` untimed rounds of all of them, every timed run of a callable whose last run took under
    ``rewarm_below_s`` directly follows an untimed run of the same callable. Interleaving keeps slow drifts
    of the machine out of the ratios; the re-warm run makes each short figure a warm one whatever ran before
    it: in our 2-core VM a ~20 ms build timed right after the 2-s reference loop (which faults in 1.3 GB) ran
    1.3-2.6x slower than the same build timed after itself (evicted caches, the kernel busy with the freed
    pages). Longer callables are their own warm-up (that cold start is a few % of them at most).

    Returns:
        {name: dict(median_s, min_s, runs_s)}; median over ``repeats`` timed runs.
    """
    if repeats < 1:
        raise ValueError(f'repeats must be >= 1, got {repeats}')
    last_s = {name: None for name in fns}
    for _ in range(warmup):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            last_s[name] = time.perf_counter() - start
    runs = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if last_s[name] is None or last_s[name] < rewarm_below_s:
                fn()
            start = time.perf_counter()
            fn()
            last_s[name] = time.perf_counter() - start
            runs[name].append(last_s[name])
    return {name: dict(median_s=statistics.median(times), min_s=min(times), runs_s=times)
            for name, times in runs.items()}


def relative_error(actual, expected):
    """max |actual - expected| / max |expected| (0 when both are all zero)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return diff / scale if scale > 0 else diff


class _OpCounter(TorchDispatchMode):
    """Counts every ATen operator dispatched while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_dispatched_ops(fn):
    """Number of ATen operators ``fn()`` dispatches (a device-independent proxy for kernel launches)."""
    with _OpCounter() as counter:
        fn()
    return counter.count


def nuscenes_like_mats(config, batch_size, seed=0, device='cpu'):
    """Camera matrices of a real nuScenes rig with training augmentation (random ida per camera, random bda).

    Returns:
        dict: sensor2ego_mats, intrin_mats, ida_mats, sensor2sensor_mats (B, 1, N, 4, 4) float32,
        bda_mat (B, 4, 4) float32.
    """
    from pyquaternion import Quaternion

    from bevdepth.datasets.bev_aug import bev_transform, sample_bda_augmentation
    from bevdepth.datasets.image_aug import ida_matrix, sample_ida_augmentation

    module = CONFIG_MODULES[config]
    ida_conf, bda_conf = module.ida_aug_conf(), module.bda_aug_conf()
    cams = ida_conf['cams']
    rng = np.random.default_rng(seed)
    sensor2ego = np.zeros((batch_size, 1, len(cams), 4, 4))
    intrin = np.zeros((batch_size, 1, len(cams), 4, 4))
    ida = torch.zeros(batch_size, 1, len(cams), 4, 4)
    bda = torch.zeros(batch_size, 4, 4)
    for b in range(batch_size):
        for n, cam in enumerate(cams):
            translation, rotation, focal, cx, cy = NUSCENES_CAMERA_CALIB[cam]
            sensor2ego[b, 0, n, :3, :3] = Quaternion(rotation).rotation_matrix
            sensor2ego[b, 0, n, :3, 3] = translation
            sensor2ego[b, 0, n, 3, 3] = 1
            intrin[b, 0, n] = np.diag([focal, focal, 1.0, 1.0])
            intrin[b, 0, n, 0, 2], intrin[b, 0, n, 1, 2] = cx, cy
            resize, _, crop, flip, rotate = sample_ida_augmentation(ida_conf, True, rng)
            ida[b, 0, n] = ida_matrix(resize, crop, flip, rotate, ida_conf['final_dim'])
        bda[b] = bev_transform(torch.zeros(0, 9), *sample_bda_augmentation(bda_conf, True, rng))[1]
    eye = torch.eye(4).expand(batch_size, 1, len(cams), 4, 4).clone()
    mats = dict(sensor2ego_mats=torch.from_numpy(sensor2ego).float(), intrin_mats=torch.from_numpy(intrin).float(),
                ida_mats=ida, sensor2sensor_mats=eye, bda_mat=bda)
    return {key: value.to(device) for key, value in mats.items()}


# ----------------------------------------------------------------------------------------- ring / ray

def reference_cells(geom, voxel_coord, voxel_size):
    """The cells as upstream ``MatrixVT.get_proj_mat`` computes them: (B, N, D, H, W, 3) geometry -> (B, N * W, D, 2) long
    cells (normalise to cell units, mean over image rows, truncate with ``.long()``)."""
    geom = (geom - (voxel_coord - voxel_size / 2.0)) / voxel_size
    geom = geom.mean(3).permute(0, 1, 3, 2, 4).contiguous()  # (B, N, W, D, 3)
    batch_size, num_cams, feat_w, num_depth, _ = geom.shape
    return geom.long().view(batch_size, num_cams * feat_w, num_depth, -1)[..., :2]


def reference_loop_from_cells(cells, bev_size):
    """The ring / ray build of upstream ``MatrixVT.get_proj_mat``, Python loops included: (B, R, D, 2) long cells -> ring (B, D, L * L),
    ray (B, R, L * L) float32. ``cells`` is not modified."""
    cells = cells.clone()
    batch_size, num_rays, num_depth, _ = cells.shape
    invalid = (cells < 0).any(-1) | (cells > bev_size - 1).any(-1)
    cells[invalid] = int(bev_size / 2)
    idx = cells[..., 1] * bev_size + cells[..., 0]
    ring = torch.zeros(batch_size, num_depth, bev_size * bev_size)
    ray = torch.zeros(batch_size, num_rays, bev_size * bev_size)
    for b in range(batch_size):
        for r in range(num_rays):
            ray[b, r, idx[b, r]] += 1  # advanced-index +=: duplicates do not accumulate
        for d in range(num_depth):
            ring[b, d, idx[b, :, d]] += 1
    null_cell = int((bev_size / 2) * (bev_size + 1))
    ring[..., null_cell] = 0
    ray[..., null_cell] = 0
    ring /= ring.max(1)[0].clip(min=1)[:, None]
    ray /= ray.max(1)[0].clip(min=1)[:, None]
    return ring, ray


def reference_loop_ring_ray(geom, voxel_coord, voxel_size, bev_size):
    """The reference's ring / ray construction, Python loops included (upstream ``MatrixVT.get_proj_mat``): the baseline.

    Args:
        geom: (B, N, D, H, W, 3) ego-frame frustum points; voxel_coord, voxel_size: (3,); bev_size: L.
    Returns:
        ring (B, D, L * L), ray (B, N * W, L * L) float32.
    """
    return reference_loop_from_cells(reference_cells(geom, voxel_coord, voxel_size), bev_size)


def _geometry(model, mats):
    """Our frustum geometry (GEMM ``frustum_to_ego``), (B, N, D, fH, fW, 3): the input of LSS."""
    return model.get_geometry(mats['sensor2ego_mats'][:, 0], mats['intrin_mats'][:, 0], mats['ida_mats'][:, 0],
                              mats.get('bda_mat'))


def reference_style_geometry(frustum, sensor2ego, intrin, ida, bda):
    """The reference's ``get_geometry`` as written (upstream ``BaseLSSFPN.get_geometry``): 7-dim broadcast 4x4 @ 4x1 products.

    frustum (D, fH, fW, 4); sensor2ego, intrin, ida (B, N, 4, 4); bda (B, 4, 4) -> (B, N, D, fH, fW, 3).
    """
    batch_size, num_cams = sensor2ego.shape[:2]
    points = ida.view(batch_size, num_cams, 1, 1, 1, 4, 4).inverse().matmul(frustum.unsqueeze(-1))
    points = torch.cat((points[:, :, :, :, :, :2] * points[:, :, :, :, :, 2:3], points[:, :, :, :, :, 2:]), 5)
    combine = sensor2ego.matmul(torch.inverse(intrin))
    points = combine.view(batch_size, num_cams, 1, 1, 1, 4, 4).matmul(points)
    if bda is not None:
        bda = bda.unsqueeze(1).repeat(1, num_cams, 1, 1).view(batch_size, num_cams, 1, 1, 1, 4, 4)
        points = bda @ points
    return points.squeeze(-1)[..., :3]


def _reference_geometry(model, mats):
    return reference_style_geometry(model.frustum, mats['sensor2ego_mats'][:, 0], mats['intrin_mats'][:, 0],
                                    mats['ida_mats'][:, 0], mats.get('bda_mat'))


def reference_style_proj_mat(model, mats):
    """The reference's ``get_proj_mat`` as written: 7-dim geometry, cells, Python-loop build."""
    return reference_loop_ring_ray(_reference_geometry(model, mats), model.voxel_coord, model.voxel_size,
                                   model.bev_size)


def build_matrixvt(config):
    """A MatrixVT module of the configuration (random init, no pretrained download), eval-free (train mode)."""
    from bevdepth.layers.backbones.matrixvt import MatrixVT

    _, backbone_conf = _config_parts(config)
    model = MatrixVT(**backbone_conf)
    model.auto_cache = False  # training never sees the same matrices twice: rebuild every call
    return model


def bench_ring_ray(config, batch_sizes=(1, 8), repeats=5, warmup=1, model=None):
    """Building the ring / ray matrices from the calibration matrices: reference ``get_proj_mat`` vs ours.

    Timed per batch size (medians, seconds):
    ``loop_s``: the reference as written -- 7-dim broadcast geometry, steps 1-3, Python-loop steps 4-9
    (``reference_style_proj_mat``), the baseline of the target;
    ``sparse_s`` / ``dense_s``: our production path ``MatrixVT.build_projection`` -- ``get_geom_cells``
    (row-moment cells) then ``build_sparse_projection`` (CPU / GPU) or ``build_ring_ray`` (NPU / ONNX);
    ``*_build_s``: steps 4-9 alone, every variant from the SAME cells (ours);
    ``reference_cells_s`` / ``cells_s``: geometry + steps 1-3 of the reference / ours;
    ``geometry_s``: our GEMM ``frustum_to_ego`` (what LSS uses; not needed by our MatrixVT path).
    Checks: from the same cells, dense and sparse builds are bit-identical to the loop's (``identical_*``);
    ``cells_differing`` counts the (ray, bin) points whose cell from our geometry differs from the reference
    formula's (float rounding at cell borders, documented). ``ops_*``: ATen operators dispatched end to end.
    """
    from bevdepth.layers.backbones.matrixvt import build_ring_ray, build_sparse_projection, ring_ray_from_sparse

    model = model or build_matrixvt(config)
    bev_size = model.bev_size
    rows = []
    with torch.no_grad():
        for batch_size in batch_sizes:
            mats = nuscenes_like_mats(config, batch_size, seed=batch_size)
            cells = model.get_geom_cells(mats)

            def loop():
                return reference_style_proj_mat(model, mats)

            def dense():
                return model.build_projection(mats, 'dense')

            def sparse():
                return model.build_projection(mats, 'sparse')

            times = measure_interleaved(dict(
                loop=loop, dense=dense, sparse=sparse,
                loop_build=lambda: reference_loop_from_cells(cells, bev_size),
                dense_build=lambda: build_ring_ray(cells, bev_size),
                sparse_build=lambda: build_sparse_projection(cells, bev_size),
                reference_cells=lambda: reference_cells(_reference_geometry(model, mats), model.voxel_coord,
                                                        model.voxel_size),
                cells=lambda: model.get_geom_cells(mats, dtype=torch.int32),
                geometry=lambda: _geometry(model, mats)), repeats, warmup,
                # the 2-s baseline re-warmed too: every figure of this table is a warm run
                rewarm_below_s=math.inf)
            ring_ref, ray_ref = reference_loop_from_cells(cells, bev_size)
            ring_dense, ray_dense = build_ring_ray(cells, bev_size)
            ring_sparse, ray_sparse = ring_ray_from_sparse(build_sparse_projection(cells, bev_size))
            cells_ref = reference_cells(_reference_geometry(model, mats), model.voxel_coord, model.voxel_size)
            row = {f'{name}_s': value['median_s'] for name, value in times.items()}
            row.update(ops_loop=count_dispatched_ops(loop), ops_dense=count_dispatched_ops(dense),
                       ops_sparse=count_dispatched_ops(sparse))
            row.update(
                batch_size=batch_size,
                speedup_dense=row['loop_s'] / row['dense_s'], speedup_sparse=row['loop_s'] / row['sparse_s'],
                speedup_build_dense=row['loop_build_s'] / row['dense_build_s'],
                speedup_build_sparse=row['loop_build_s'] / row['sparse_build_s'],
                speedup_cells=row['reference_cells_s'] / row['cells_s'],
                cells_differing=int((cells_ref != cells).any(-1).sum()), num_points=int(cells[..., 0].numel()),
                identical_dense=torch.equal(ring_ref, ring_dense) and torch.equal(ray_ref, ray_dense),
                identical_sparse=torch.equal(ring_ref, ring_sparse) and torch.equal(ray_ref, ray_sparse),
                ring_nnz_per_sample=int(ring_ref.count_nonzero()) / batch_size,
                ray_nnz_per_sample=int(ray_ref.count_nonzero()) / batch_size,
                binary=bool(set(torch.unique(ring_ref).tolist()) <= {0.0, 1.0}
                            and set(torch.unique(ray_ref).tolist()) <= {0.0, 1.0}),
                runs_s={name: value['runs_s'] for name, value in times.items()},
            )
            rows.append(row)
    at_b8 = [row for row in rows if row['batch_size'] == 8]
    return dict(
        shapes=dict(num_rays=int(model.frustum.shape[2]) * 6, depth_bins=model.depth_channels, bev_size=bev_size),
        rows=rows,
        identical=all(row['identical_dense'] and row['identical_sparse'] for row in rows),
        # The build the CPU / GPU forward uses is the sparse one; dense is the NPU / ONNX path.
        speedup_at_b8=at_b8[0]['speedup_sparse'] if at_b8 else None,
        speedup_dense_at_b8=at_b8[0]['speedup_dense'] if at_b8 else None,
        speedup_build_at_b8=at_b8[0]['speedup_build_sparse'] if at_b8 else None,
        ops_ratio_at_b8=at_b8[0]['ops_loop'] / at_b8[0]['ops_sparse'] if at_b8 else None,
    )


# ----------------------------------------------------------------------------------------- view transform

def lss_view_transform(model, context, depth, mats):
    """LSS lift-splat exactly as ``BaseLSSFPN._forward_single_sweep`` after the depth net.

    context (B * N, C, fH, fW), depth (B * N, D, fH, fW) -> (B, C, L, L).
    """
    from bevdepth.ops.voxel_pooling import voxel_pooling

    batch_size, _, num_cams = mats['intrin_mats'].shape[:3]
    geom = _geometry(model, mats)
    geom = ((geom - (model.voxel_coord - model.voxel_size / 2.0)) / model.voxel_size).int()
    lifted = depth.unsqueeze(1) * context.unsqueeze(2)  # (B * N, C, D, fH, fW)
    lifted = lifted.reshape(batch_size, num_cams, *lifted.shape[1:]).permute(0, 1, 3, 4, 5, 2)
    return voxel_pooling(geom, lifted, model.voxel_num)


def vt_inputs(model, config, batch_size, seed=0):
    """Depth-net-like inputs: dict(context (B * N, C, fH, fW), depth probabilities (B * N, D, fH, fW), mats,
    grad_out (B, C, L, L), and the prime tensors the non-learned MatrixVT part starts from: depth_prime
    (B, R, D), feat_prime (B, R, C), computed once by the model's DepthReducer / HoriConv)."""
    generator = torch.Generator().manual_seed(seed)
    num_cams = 6
    feat_h, feat_w = model.frustum.shape[1:3]
    context = torch.randn(batch_size * num_cams, model.output_channels, feat_h, feat_w, generator=generator)
    depth = torch.randn(batch_size * num_cams, model.depth_channels, feat_h, feat_w, generator=generator)
    depth = (depth * 2).softmax(1)
    grad_out = torch.randn(batch_size, model.output_channels, model.bev_size, model.bev_size, generator=generator)
    with torch.no_grad():
        depth_prime = model.depth_reducer(context, depth).permute(0, 2, 1).reshape(batch_size, -1,
                                                                                  model.depth_channels)
        feat_prime = model.horiconv(context).permute(0, 2, 1).reshape(batch_size, -1, model.output_channels)
    return dict(context=context, depth=depth, mats=nuscenes_like_mats(config, batch_size, seed=seed + 1),
                grad_out=grad_out, depth_prime=depth_prime.contiguous(), feat_prime=feat_prime.contiguous())


# Non-learned view transform (what differs between methods): geometry + projection structure + projection.
VT_CASES = ('sparse', 'dense', 'reference', 'lss')
# Whole MatrixVT module after the depth net: learned DepthReducer + HoriConv, then the view transform.
MODULE_CASES = ('module_sparse', 'module_dense', 'module_reference')


def vt_forward_backward(model, case, inputs, same_cells=False):
    """One forward + backward of a case of ``VT_CASES`` or ``MODULE_CASES``.

    VT_CASES start from the prime tensors (MatrixVT) or the depth-net outputs (LSS) and include the geometry:
    'sparse' = ``get_geom_cells`` + ``build_sparse_projection`` + ``project_sparse`` (production CPU / GPU);
    'dense' = ``get_geom_cells`` + ``build_ring_ray`` + ``project_dense`` (NPU / ONNX path);
    'reference' = ``reference_style_proj_mat`` (7-dim geometry, loops) + the reference's matrix products;
    'lss' = ``lss_view_transform`` (GEMM geometry, lift, voxel pooling).
    MODULE_CASES run ``reduce_and_project`` from (context, depth) in that projection mode; 'module_reference'
    hands the reference-built matrices over through ``static_mat``.
    same_cells: the reference cases build from our cells instead of the reference geometry (equality checks).
    Returns (bev, (input grads...)); module parameter grads are left in ``.grad``.
    """
    from bevdepth.layers.backbones.matrixvt import (build_ring_ray, build_sparse_projection, project_dense,
                                                    project_sparse)

    grad_out, mats = inputs['grad_out'], inputs['mats']

    def reference_mats():
        with torch.no_grad():
            if same_cells:
                return reference_loop_from_cells(model.get_geom_cells(mats), model.bev_size)
            return reference_style_proj_mat(model, mats)

    if case in MODULE_CASES:
        context = inputs['context'].detach().requires_grad_()
        depth = inputs['depth'].detach().requires_grad_()
        model.zero_grad(set_to_none=True)
        saved = model.static_mat, model.projection
        try:
            if case == 'module_reference':
                model.projection, model.static_mat = 'dense', reference_mats()
            else:
                model.projection = case[len('module_'):]
            bev = model.reduce_and_project(context, depth, mats)
        finally:
            model.static_mat, model.projection = saved
        bev.backward(grad_out)
        return bev, (context.grad, depth.grad)
    if case == 'lss':
        context = inputs['context'].detach().requires_grad_()
        depth = inputs['depth'].detach().requires_grad_()
        bev = lss_view_transform(model, context, depth, mats)
        bev.backward(grad_out)
        return bev, (context.grad, depth.grad)
    if case not in VT_CASES:
        raise ValueError(f'view-transform case must be one of {VT_CASES + MODULE_CASES}, got {case!r}')
    feat_prime = inputs['feat_prime'].detach().requires_grad_()
    depth_prime = inputs['depth_prime'].detach().requires_grad_()
    if case == 'sparse':
        with torch.no_grad():
            proj = model.build_projection(mats, 'sparse')
        bev = project_sparse(feat_prime, depth_prime, proj)
    else:
        if case == 'dense':
            with torch.no_grad():
                ring, ray = build_ring_ray(model.get_geom_cells(mats), model.bev_size)
        else:
            ring, ray = reference_mats()
        bev = project_dense(feat_prime, depth_prime, ring, ray)
    bev.backward(grad_out)
    return bev, (feat_prime.grad, depth_prime.grad)


def _read_proc_status_kb(field):
    with open('/proc/self/status') as status:
        for line in status:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'/proc/self/status has no {field} line (peak memory needs Linux)')


def _memory_case(config, case, batch_size):
    """Run in a fresh subprocess: peak RSS increase (MB) of one forward + backward of ``case``."""
    torch.manual_seed(0)
    model = build_matrixvt(config)
    inputs = vt_inputs(model, config, batch_size)
    if case in ('sparse', 'module_sparse'):
        model.get_geom_cells(inputs['mats'])  # the cached frustum row features belong to the model, not the run
    gc.collect()
    with open('/proc/self/clear_refs', 'w') as refs:
        refs.write('5')  # reset VmHWM to the current RSS
    before_kb = _read_proc_status_kb('VmRSS')
    vt_forward_backward(model, case, inputs)
    peak_kb = _read_proc_status_kb('VmHWM')
    return (peak_kb - before_kb) / 1024.0


def peak_memory_mb(config, case, batch_size, timeout=600):
    """Peak RSS increase (MB) of one forward + backward of a view-transform case, in a fresh subprocess
    (see ``MEMORY_METHOD``). Returns None where /proc/self/clear_refs is unavailable (non-Linux)."""
    if not os.path.exists('/proc/self/clear_refs'):
        return None
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, SCRIPTS_DIR, os.environ.get('PYTHONPATH', '')]),
               TORCH_DEVICE_BACKEND_AUTOLOAD='0')
    cmd = [sys.executable, '-m', 'benchmarking.suite', '--memory-case', config, case, str(batch_size)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f'peak-memory subprocess for {config}/{case} failed: {proc.stderr.strip()[-800:]}')
    return float(json.loads(proc.stdout.strip().splitlines()[-1])['peak_mb'])


def vt_breakdown(model, inputs, repeats=5, warmup=1):
    """Where the time goes (medians, seconds):

    cells_s: our row-moment cells (``get_geom_cells``); reference_cells_s: 7-dim geometry + steps 1-3;
    prime_s: DepthReducer + HoriConv forward + backward (the learned part, identical in every MatrixVT case);
    build_sparse_s / build_dense_s / build_loop_s: projection structure from the same cells;
    project_sparse_s / project_dense_s: projection forward + backward with a prebuilt structure.
    """
    from bevdepth.layers.backbones.matrixvt import (build_ring_ray, build_sparse_projection, project_dense,
                                                    project_sparse)

    mats, grad_out = inputs['mats'], inputs['grad_out']
    depth_prime, feat_prime = inputs['depth_prime'], inputs['feat_prime']
    bev_size = model.bev_size
    with torch.no_grad():
        cells = model.get_geom_cells(mats)
        ring, ray = build_ring_ray(cells, bev_size)
        sparse = build_sparse_projection(cells, bev_size)
    generator = torch.Generator().manual_seed(3)
    grad_depth_prime = torch.randn(depth_prime.shape, generator=generator)
    grad_feat_prime = torch.randn(feat_prime.shape, generator=generator)

    def prime():
        model.zero_grad(set_to_none=True)
        ctx = inputs['context'].detach().requires_grad_()
        dep = inputs['depth'].detach().requires_grad_()
        d_prime = model.depth_reducer(ctx, dep).permute(0, 2, 1).reshape(depth_prime.shape)
        f_prime = model.horiconv(ctx).permute(0, 2, 1).reshape(feat_prime.shape)
        torch.autograd.backward([d_prime, f_prime], [grad_depth_prime, grad_feat_prime])

    def build(mode):
        with torch.no_grad():
            if mode == 'loop':
                return reference_loop_from_cells(cells, bev_size)
            return build_ring_ray(cells, bev_size) if mode == 'dense' else build_sparse_projection(cells, bev_size)

    def project(mode):
        d_prime = depth_prime.detach().requires_grad_()
        f_prime = feat_prime.detach().requires_grad_()
        bev = project_dense(f_prime, d_prime, ring, ray) if mode == 'dense' else project_sparse(f_prime, d_prime,
                                                                                                sparse)
        bev.backward(grad_out)

    def reference_cells_run():
        with torch.no_grad():
            reference_cells(_reference_geometry(model, mats), model.voxel_coord, model.voxel_size)

    def cells_run():
        with torch.no_grad():
            model.get_geom_cells(mats, dtype=torch.int32)

    times = measure_interleaved(dict(
        cells=cells_run, reference_cells=reference_cells_run, prime=prime, build_sparse=lambda: build('sparse'),
        build_dense=lambda: build('dense'), build_loop=lambda: build('loop'),
        project_sparse=lambda: project('sparse'), project_dense=lambda: project('dense')), repeats, warmup)
    out = {f'{name}_s': value['median_s'] for name, value in times.items()}
    out['projection_speedup_prebuilt'] = out['project_dense_s'] / out['project_sparse_s']
    return out


def _compare(ours, other, ours_params=None, other_params=None):
    """Max relative errors of (bev, input grads) [and parameter grads] of two runs, and the verdict."""
    check = dict(output_rel=relative_error(ours[0], other[0]),
                 grad_inputs_rel=max(relative_error(a, b) for a, b in zip(ours[1], other[1])))
    if ours_params is not None:
        # Parameter gradients are compared as one vector: biases in front of a BatchNorm or of the softmax over
        # H have an exactly-zero true gradient, so their per-tensor relative error is rounding noise over noise.
        names = sorted(ours_params)
        check['same_param_grads'] = set(ours_params) == set(other_params) and len(names) > 0
        check['grad_params_rel'] = relative_error(torch.cat([ours_params[n].reshape(-1) for n in names]),
                                                  torch.cat([other_params[n].reshape(-1) for n in names]))
    check['max_rel'] = max(value for key, value in check.items() if key.endswith('_rel'))
    check['equal'] = bool(check['max_rel'] <= EQUALITY_RTOL and check.get('same_param_grads', True))
    return check


def bench_view_transform(config, batch_size=1, repeats=5, warmup=1, model=None, measure_memory=True,
                         memory_cases=VT_CASES + ('module_sparse',)):
    """MatrixVT sparse / dense / reference style and LSS, fwd+bwd: time of the non-learned view transform
    (``VT_CASES``) and of the whole module after the depth net (``MODULE_CASES``), peak memory (of
    ``memory_cases``), equality of the MatrixVT cases given the same cells (outputs, input and parameter grads)
    and the number of points whose cell differs between our geometry and the reference formula."""
    torch.manual_seed(0)
    model = model or build_matrixvt(config)
    model.train()
    inputs = vt_inputs(model, config, batch_size)
    all_cases = VT_CASES + MODULE_CASES
    times = measure_interleaved({case: (lambda case=case: vt_forward_backward(model, case, inputs))
                                 for case in all_cases}, repeats, warmup)

    runs = {case: vt_forward_backward(model, case, inputs, same_cells=True) for case in VT_CASES[:3]}
    module_runs, params = {}, {}
    for case in MODULE_CASES:
        module_runs[case] = vt_forward_backward(model, case, inputs, same_cells=True)
        params[case] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    checks = dict(dense=_compare(runs['sparse'], runs['dense']), reference=_compare(runs['sparse'],
                                                                                    runs['reference']))
    for case in ('module_dense', 'module_reference'):
        checks[case] = _compare(module_runs['module_sparse'], module_runs[case], params['module_sparse'],
                                params[case])
    checks['num_param_grads'] = len(params['module_sparse'])
    with torch.no_grad():
        cells_ref = reference_cells(_reference_geometry(model, inputs['mats']), model.voxel_coord, model.voxel_size)
        cells_differing = int((cells_ref != model.get_geom_cells(inputs['mats'])).any(-1).sum())
    lss_bev = vt_forward_backward(model, 'lss', inputs)[0]
    breakdown = vt_breakdown(model, inputs, repeats, warmup)
    del runs, module_runs, params

    memory = {case: (peak_memory_mb(config, case, batch_size) if measure_memory and case in memory_cases else None)
              for case in all_cases}
    time_s = {case: times[case]['median_s'] for case in all_cases}
    out = dict(
        batch_size=batch_size,
        shapes=dict(context=list(inputs['context'].shape), depth=list(inputs['depth'].shape),
                    depth_prime=list(inputs['depth_prime'].shape), feat_prime=list(inputs['feat_prime'].shape),
                    bev=list(lss_bev.shape)),
        cases={case: dict(time_s=time_s[case], runs_s=times[case]['runs_s'], peak_mb=memory[case])
               for case in all_cases},
        check=checks,
        equal=bool(all(checks[name]['equal'] for name in ('dense', 'reference', 'module_dense', 'module_reference'))
                   and checks['num_param_grads'] > 0),
        cells_differing=cells_differing, num_points=int(cells_ref[..., 0].numel()),
        breakdown=breakdown,
        speedup_vs_reference=time_s['reference'] / time_s['sparse'],
        speedup_vs_dense=time_s['dense'] / time_s['sparse'],
        speedup_vs_lss=time_s['lss'] / time_s['sparse'],
        module_speedup_vs_reference=time_s['module_reference'] / time_s['module_sparse'],
        module_speedup_vs_lss=time_s['lss'] / time_s['module_sparse'],
        memory_method=MEMORY_METHOD,
    )
    for case in ('reference', 'dense', 'lss'):
        ratio = module_ratio = None
        if memory['sparse'] is not None and memory[case] is not None:
            ratio = memory[case] / max(memory['sparse'], 1e-3)
        if memory['module_sparse'] is not None and memory[case] is not None:
            module_ratio = memory[case] / max(memory['module_sparse'], 1e-3)
        out[f'memory_ratio_vs_{case}'] = ratio
        out[f'module_memory_ratio_vs_{case}'] = module_ratio
    return out


# ---------------------------------------------------------------------------------------------- training

def _train_batch(config, batch_size, seed=0):
    """Random images, nuScenes-like matrices, a few GT boxes per sample and sparse LiDAR-like depth labels."""
    module, backbone_conf = _config_parts(config)
    final_h, final_w = backbone_conf['final_dim']
    generator = torch.Generator().manual_seed(seed)
    imgs = torch.randn(batch_size, 1, 6, 3, final_h, final_w, generator=generator)
    mats = nuscenes_like_mats(config, batch_size, seed=seed)
    gt_boxes, gt_labels = [], []
    num_classes = len(nuscenes_configs.CLASSES)
    for _ in range(batch_size):
        count = 12
        xy = (torch.rand(count, 2, generator=generator) - 0.5) * 80
        z = torch.rand(count, 1, generator=generator) - 1.0
        lwh = torch.rand(count, 3, generator=generator) * 3 + 0.5
        yaw = (torch.rand(count, 1, generator=generator) - 0.5) * 2 * np.pi
        vel = torch.randn(count, 2, generator=generator)
        gt_boxes.append(torch.cat([xy, z, lwh, yaw, vel], 1))
        gt_labels.append(torch.randint(0, num_classes, (count,), generator=generator))
    depth = torch.rand(batch_size, 6, final_h, final_w, generator=generator) * (backbone_conf['d_bound'][1] - 2.5)
    depth = depth + backbone_conf['d_bound'][0]
    depth[torch.rand(depth.shape, generator=generator) > 0.05] = 0  # ~5 % of pixels hold a LiDAR return
    return imgs, mats, gt_boxes, gt_labels, depth


TRAIN_PRECISIONS = ('32-true', 'bf16-mixed')


def _experiment(config):
    """The experiment LightningModule of a benchmark configuration (random init: no ImageNet download)."""
    sys.path.insert(0, REPO_ROOT)
    if config == 'tiny':
        from exps.nuscenes.tiny.matrixvt_tiny_synthetic import MatrixVTTinyExp
        return MatrixVTTinyExp(data_root='unused', num_workers=0)
    from exps.nuscenes.MatrixVT.matrixvt_bev_depth_lss_r50_256x704_128x128_24e_ema import MatrixVT_Exp
    return MatrixVT_Exp(data_root='unused', num_workers=0)


class _StepTimer:
    """Callback factory: wall time of every training batch, from batch start to the end of the EMA update."""

    @staticmethod
    def create():
        from pytorch_lightning.callbacks import Callback

        class StepTimer(Callback):
            def __init__(self):
                self.times, self._start = [], None

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                self._start = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self.times.append(time.perf_counter() - self._start)

        return StepTimer()


def _experiment_train_batch(config, batch_size, seed=0):
    """One batch in the layout of the experiment's training_step (its input size is the configuration's)."""
    imgs, mats, gt_boxes, gt_labels, depth = _train_batch(config, batch_size, seed)
    return [imgs, mats, None, [{}] * batch_size, gt_boxes, gt_labels, depth]


def _fit_steps(config, precision, batch, steps):
    """Per-step times of ``steps`` steps of the experiment's own training step through pl.Trainer (gradient clip,
    AMP / GradScaler plugin, EMA update), and the losses."""
    import pytorch_lightning as pl

    from bevdepth.callbacks.ema import EMACallback

    torch.manual_seed(0)
    module = _experiment(config)
    losses = []
    original_step = module.training_step

    def training_step(*args, **kwargs):  # the module's own step; the loss is only recorded
        loss = original_step(*args, **kwargs)
        losses.append(float(loss.detach()))
        return loss

    module.training_step = training_step
    timer = _StepTimer.create()
    trainer = pl.Trainer(accelerator='cpu', devices=1, precision=precision, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=module.config['gradient_clip_val'], num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[EMACallback(), timer])  # EMA first: its update is timed
    loader = torch.utils.data.DataLoader([batch] * steps, batch_size=None, collate_fn=lambda item: item)
    trainer.fit(module, train_dataloaders=loader)
    return timer.times, losses, module


def _backbone_floor(module, batch, precision, repeats):
    """Forward + backward of the image ResNet alone at the step's input: the floor of a training step."""
    backbone = module.model.backbone.img_backbone
    imgs = batch[0].flatten(0, 2)
    if module.config['channels_last']:
        imgs = imgs.contiguous(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if precision.startswith('bf16') else None

    def step():
        with torch.autocast('cpu', dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = sum(out.float().mean() for out in backbone(imgs))
        loss.backward()
        backbone.zero_grad(set_to_none=True)

    return measure_interleaved(dict(floor=step), repeats, warmup=1)['floor']['median_s']


def bench_train_step(config, batch_size=1, repeats=3, warmup=2, vt_time_s=None, lss_time_s=None,
                     precisions=TRAIN_PRECISIONS):
    """The experiment's own training step (``training_step`` + backward + gradient clip + AdamW + EMA update, through
    ``pl.Trainer`` with its precision plugin) of the tiny or the full configuration, fp32 and bf16 side by side in
    one process, and the image backbone's own forward + backward at the same input (the floor of a step).

    Per precision: ``step_s`` (median over ``repeats`` rounds of the per-step median after ``warmup`` steps; the
    precisions alternate round by round), ``floor_s`` and ``overhead_pct`` = step / floor - 1. ``bf16_speedup`` =
    fp32 step / bf16 step. vt_time_s / lss_time_s: standalone view-transform fwd+bwd times at the same shapes
    (measured here when None); ``vt_share`` = vt_time_s / the fp32 step, ``lss_share`` what LSS would take of it.
    """
    per_precision = {precision: dict(step_runs_s=[], losses=[]) for precision in precisions}
    batch = _experiment_train_batch(config, batch_size)
    for _ in range(repeats):
        for precision in precisions:
            times, losses, module = _fit_steps(config, precision, batch, warmup + 3)
            per_precision[precision]['step_runs_s'].append(float(np.median(times[warmup:])))
            per_precision[precision]['losses'] += losses
    for precision, figures in per_precision.items():
        figures['step_s'] = float(np.median(figures['step_runs_s']))
        figures['samples_per_s'] = batch_size / figures['step_s']
        figures['floor_s'] = _backbone_floor(module, batch, precision, repeats)
        figures['overhead_pct'] = 100.0 * (figures['step_s'] / figures['floor_s'] - 1.0)
        figures['losses_finite'] = bool(np.all(np.isfinite(figures.pop('losses'))))
    fp32 = per_precision.get('32-true')
    results = dict(batch_size=batch_size, precisions=per_precision,
                   num_parameters=sum(p.numel() for p in module.model.parameters()),
                   losses_finite=all(figures['losses_finite'] for figures in per_precision.values()))
    if fp32 is not None:
        results.update(step_s=fp32['step_s'], samples_per_s=fp32['samples_per_s'])
        if 'bf16-mixed' in per_precision:
            results['bf16_speedup'] = fp32['step_s'] / per_precision['bf16-mixed']['step_s']
        if vt_time_s is None or lss_time_s is None:
            vt = bench_view_transform(config, batch_size, repeats=repeats, warmup=1, measure_memory=False)
            vt_time_s, lss_time_s = vt['cases']['module_sparse']['time_s'], vt['cases']['lss']['time_s']
        results.update(vt_time_s=vt_time_s, vt_share=vt_time_s / fp32['step_s'], lss_time_s=lss_time_s,
                       lss_share=lss_time_s / (fp32['step_s'] - vt_time_s + lss_time_s))
    return results


# ----------------------------------------------------------------------------------------------- dataset

def reference_style_depth_points(lidar_points, lidar_info, cam_info, image_size):
    """The reference's ``map_pointcloud_to_image`` with devkit objects (upstream ``bevdepth/datasets/nusc_det_dataset.py``).

    lidar_points: (M, 4) float32; returns (K, 3) float32 [u, v, depth] inside the 1-px image margin.
    """
    from nuscenes.utils.data_classes import LidarPointCloud
    from nuscenes.utils.geometry_utils import view_points
    from pyquaternion import Quaternion

    pc = LidarPointCloud(lidar_points.T.copy())
    pc.rotate(Quaternion(lidar_info['calibrated_sensor']['rotation']).rotation_matrix)
    pc.translate(np.array(lidar_info['calibrated_sensor']['translation']))
    pc.rotate(Quaternion(lidar_info['ego_pose']['rotation']).rotation_matrix)
    pc.translate(np.array(lidar_info['ego_pose']['translation']))
    pc.translate(-np.array(cam_info['ego_pose']['translation']))
    pc.rotate(Quaternion(cam_info['ego_pose']['rotation']).rotation_matrix.T)
    pc.translate(-np.array(cam_info['calibrated_sensor']['translation']))
    pc.rotate(Quaternion(cam_info['calibrated_sensor']['rotation']).rotation_matrix.T)
    depths = pc.points[2, :]
    points = view_points(pc.points[:3, :], np.array(cam_info['calibrated_sensor']['camera_intrinsic']),
                         normalize=True)
    width, height = image_size
    mask = ((depths > 0) & (points[0] > 1) & (points[0] < width - 1) & (points[1] > 1)
            & (points[1] < height - 1))
    return np.concatenate([points[:2, mask], depths[None, mask]], 0).T.astype(np.float32)


def _write_synthetic_dataroot(root, config, samples_per_scene):
    """A one-scene synthetic v1.0-mini dataroot (1600x900 JPEGs, LiDAR) with its info files; returns the train
    info path. Sweeps are not written: the single-frame training pipeline never reads them."""
    from bevdepth.datasets.info_builder import write_infos
    from synthetic_nuscenes.writer import write_synthetic_nuscenes

    write_synthetic_nuscenes(root, version='v1.0-mini', seed=0, scenes_per_split=1,
                             samples_per_scene=samples_per_scene, with_sweeps=False, overwrite=True)
    write_infos(root, version='v1.0-mini', out_dir=root, progress=False)
    return [os.path.join(root, 'nuscenes_infos_train.pkl')]


def _reference_style_depth_gt(data_root, infos, out_dir):
    """The reference gen_depth_gt worker per sample: read the LiDAR, decode every image for its size,
    project with devkit objects, write <image>.bin with tofile (no atomic write) into ``out_dir``."""
    import cv2

    for info in infos:
        lidar_info = info['lidar_infos']['LIDAR_TOP']
        points = np.fromfile(os.path.join(data_root, lidar_info['filename']), dtype=np.float32).reshape(-1, 5)[:, :4]
        for cam_info in info['cam_infos'].values():
            img = cv2.imread(os.path.join(data_root, cam_info['filename']))
            projected = reference_style_depth_points(points, lidar_info, cam_info, (img.shape[1], img.shape[0]))
            projected.astype(np.float32).flatten().tofile(
                os.path.join(out_dir, os.path.basename(cam_info['filename']) + '.bin'))


def bench_dataset(config, repeats=3, warmup=1, samples_per_scene=4, data_root=None,
                  sections=('dataset', 'depth_gt')):
    """Dataset and depth-cache throughput on a synthetic dataroot (written to a temporary folder and removed
    afterwards unless ``data_root`` holding nuscenes_infos_train.pkl is given; the depth cache of a given
    dataroot is rewritten)."""
    import pickle

    from bevdepth.datasets.depth_cache import write_depth_cache
    from bevdepth.datasets.nusc_det_dataset import NuscDetDataset, collate_fn

    module = CONFIG_MODULES[config]
    tmp_dir = None
    try:
        if data_root is None:
            tmp_dir = tempfile.mkdtemp(prefix='bevdepth_bench_')
            data_root = tmp_dir
            write_start = time.perf_counter()
            info_paths = _write_synthetic_dataroot(data_root, config, samples_per_scene)
            synth_s = time.perf_counter() - write_start
        else:
            info_paths = [os.path.join(data_root, 'nuscenes_infos_train.pkl')]
            synth_s = None
        out = dict(data_root='temporary synthetic v1.0-mini' if tmp_dir else os.fspath(data_root),
                   synthetic_write_s=synth_s)

        # The depth cache is (re)written here in any case: the dataset section reads it.
        with open(info_paths[0], 'rb') as f:
            cache_infos = pickle.load(f)
        reference_out = tempfile.mkdtemp(prefix='bevdepth_bench_depth_')
        try:
            times = measure_interleaved(
                dict(ours=lambda: write_depth_cache(data_root, info_paths=info_paths, workers=1, overwrite=True,
                                                    progress=False),
                     reference_style=lambda: _reference_style_depth_gt(data_root, cache_infos, reference_out)),
                repeats if 'depth_gt' in sections else 1, warmup=0)
        finally:
            shutil.rmtree(reference_out, ignore_errors=True)
        if 'depth_gt' in sections:
            num = len(cache_infos)
            out['depth_gt'] = dict(
                num_samples=num, workers=1,
                ours_samples_per_s=num / times['ours']['median_s'],
                reference_style_samples_per_s=num / times['reference_style']['median_s'],
                speedup=times['reference_style']['median_s'] / times['ours']['median_s'],
                runs_s={name: value['runs_s'] for name, value in times.items()})

        if 'dataset' in sections:
            def make(image_backend, depth_source):
                return NuscDetDataset(module.ida_aug_conf(), module.bda_aug_conf(), nuscenes_configs.CLASSES,
                                      data_root, info_paths, is_train=True, return_depth=True,
                                      depth_source=depth_source, image_backend=image_backend)

            ours_ds = make('opencv', 'cache')
            reference_ds = make('pillow', 'online')  # the dataset's reference-style switch
            indices = list(range(len(ours_ds)))

            def run(dataset):
                dataset.reseed(0)  # both pipelines draw the same augmentations
                collate_fn([dataset[i] for i in indices], is_return_depth=True)

            times = measure_interleaved(dict(ours=lambda: run(ours_ds), reference_style=lambda: run(reference_ds)),
                                        repeats, warmup)
            ours_ds.reseed(5)
            reference_ds.reseed(5)
            item_ours, item_ref = ours_ds[0], reference_ds[0]
            num = len(indices)
            out['dataset'] = dict(
                num_samples=num, final_dim=list(module.ida_aug_conf()['final_dim']),
                ours='opencv images + depth cache', reference_style='Pillow images + LiDAR projected online',
                ours_samples_per_s=num / times['ours']['median_s'],
                reference_style_samples_per_s=num / times['reference_style']['median_s'],
                speedup=times['reference_style']['median_s'] / times['ours']['median_s'],
                check=dict(ida_equal=bool(torch.equal(item_ours[3], item_ref[3])),
                           bda_equal=bool(torch.equal(item_ours[5], item_ref[5])),
                           sensor2ego_max_abs=float((item_ours[1] - item_ref[1]).abs().max()),
                           depth_equal_fraction=float((item_ours[10] == item_ref[10]).float().mean()),
                           image_mean_abs_diff=float((item_ours[0] - item_ref[0]).abs().mean())),
                runs_s={name: value['runs_s'] for name, value in times.items()})
        return out
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ driver

def _lookup(results, section, key):
    section_results = results.get(section)
    if not isinstance(section_results, dict):
        return None
    if section == 'dataset':
        section_results = section_results.get('dataset') or {}
    return section_results.get(key)


def evaluate_targets(config_results):
    """[dict(name, value, threshold, passed)] for every target whose section was run (passed None if the
    value is missing)."""
    rows = []
    for target in TARGETS:
        if target['section'] not in config_results and not (target['section'] == 'dataset'
                                                             and 'dataset' in config_results.get('dataset', {})):
            continue
        value = _lookup(config_results, target['section'], target['key'])
        if value is None:
            passed = None
        elif isinstance(target['threshold'], bool):
            passed = bool(value) == target['threshold']
        elif target['higher_is_better']:
            passed = value >= target['threshold']
        else:
            passed = value <= target['threshold']
        rows.append(dict(name=target['name'], section=target['section'], key=target['key'], value=value,
                         threshold=target['threshold'], passed=passed))
    return rows


# The --contended competitor: another busy torch process on the same cores, as a user's second job or DataLoader
# workers would be. Fixed on purpose (not tunable), so contended figures compare across runs.
COMPETITOR_CODE = """
import torch
torch.set_num_threads(2)
a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
while True:
    a @ b
"""


@contextlib.contextmanager
def competitor():
    """Run the competitor (1024x1024 float32 matrix products, 2 torch threads, default OpenMP settings) in a separate
    process for the duration of the block; it is stopped even when the block fails."""
    env = {key: value for key, value in os.environ.items()
           if key not in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT', 'KMP_BLOCKTIME', 'OMP_NUM_THREADS')}
    process = subprocess.Popen([sys.executable, '-c', COMPETITOR_CODE], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        time.sleep(2.0)  # let it import torch and reach its loop
        yield process
    finally:
        process.kill()
        process.wait()


def run_benchmark(configs=('tiny', 'full'), repeats=5, quick=False, sections=SECTIONS, out=None, log=print,
                  ring_ray_batches=(1, 8), vt_batch=1, train_batch=1, samples_per_scene=None, data_root=None,
                  measure_memory=True, contended=False):
    """Run the selected sections for each configuration; returns (and optionally writes) the results dict.

    contended: run beside the fixed competitor process (``competitor()``), started and stopped here.

    ring_ray_batches / vt_batch / train_batch: batch sizes of those sections; samples_per_scene: key frames of
    the synthetic dataroot (one scene) of the data sections (default 4, 2 with quick); data_root: use this
    synthetic / nuScenes dataroot (with nuscenes_infos_train.pkl) instead of a temporary one.
    quick: no dataset warm-up, fewer samples, at most 2 repeats (1 training step), peak memory of sparse and LSS
    only -- a smoke run (tests/scripts/test_benchmark.py), not a measurement.
    """
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f'unknown benchmark sections {unknown}; choose from {list(SECTIONS)}')
    if quick:
        repeats = min(repeats, 2)
    if samples_per_scene is None:
        samples_per_scene = 2 if quick else 4
    results = dict(meta=dict(
        date=datetime.datetime.now().isoformat(timespec='seconds'), torch=torch.__version__,
        python=platform.python_version(), machine=platform.machine(), cpu_count=os.cpu_count(),
        load_average=list(os.getloadavg()) if hasattr(os, 'getloadavg') else None,
        torch_threads=torch.get_num_threads(), repeats=repeats, warmup=1, quick=quick, sections=list(sections),
        contended=bool(contended),
        ring_ray_batches=list(ring_ray_batches), vt_batch=vt_batch, train_batch=train_batch,
        statistic='median of repeats after warm-up', memory_method=MEMORY_METHOD), configs={})
    with competitor() if contended else contextlib.nullcontext():
        for config in configs:
            _config_parts(config)  # validates the name
            config_results = {}
            results['configs'][config] = config_results
            model = build_matrixvt(config) if ('ring_ray' in sections or 'view_transform' in sections) else None
            if 'ring_ray' in sections:
                log(f'[{config}] ring / ray build ...')
                config_results['ring_ray'] = bench_ring_ray(config, tuple(ring_ray_batches), repeats, model=model)
            if 'view_transform' in sections:
                log(f'[{config}] view transform fwd+bwd ...')
                config_results['view_transform'] = bench_view_transform(
                    config, vt_batch, repeats, model=model, measure_memory=measure_memory,
                    memory_cases=('sparse', 'lss') if quick else VT_CASES + ('module_sparse',))
            del model
            gc.collect()
            if 'train_step' in sections:
                log(f'[{config}] training step ...')
                vt = config_results.get('view_transform')
                same_batch = vt is not None and vt['batch_size'] == train_batch
                config_results['train_step'] = bench_train_step(
                    config, train_batch, repeats=1 if quick else min(repeats, 3),
                    vt_time_s=vt['cases']['module_sparse']['time_s'] if same_batch else None,
                    lss_time_s=vt['cases']['lss']['time_s'] if same_batch else None)
            data_sections = [s for s in ('dataset', 'depth_gt') if s in sections]
            if data_sections:
                log(f'[{config}] dataset / depth GT ...')
                config_results['dataset'] = bench_dataset(config, repeats, warmup=0 if quick else 1,
                                                          samples_per_scene=samples_per_scene, data_root=data_root,
                                                          sections=data_sections)
            config_results['targets'] = evaluate_targets(config_results)
            gc.collect()
    if out is not None:
        atomic_json_dump(results, out, indent=1, default=_json_default)
    return results


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f'not JSON serialisable: {type(value).__name__}')


def _fmt(value, unit=''):
    if value is None:
        return 'n/a'
    if isinstance(value, bool):
        return 'yes' if value else 'NO'
    if unit == 'ms':
        return f'{value * 1e3:.2f} ms'
    if unit == 'x':
        return f'{value:.1f}x'
    if unit == 'MB':
        return f'{value:.1f} MB'
    if unit == '/s':
        return f'{value:.2f}/s'
    if unit == '%':
        return f'{value * 100:.1f} %'
    return f'{value:.3g}' if isinstance(value, float) else str(value)


def _ring_ray_rows(rr):
    rows = []
    for row in rr['rows']:
        b = row['batch_size']
        rows.append(('ring/ray build', f'reference get_proj_mat (7-dim geometry + loops), B={b}',
                     _fmt(row['loop_s'], 'ms'), f"steps 4-9 alone {_fmt(row['loop_build_s'], 'ms')}; "
                     f"{row['ops_loop']} ATen ops"))
        for name in ('sparse', 'dense'):
            rows.append(('ring/ray build', f'ours {name} (row-moment cells + build), B={b}',
                         _fmt(row[f'{name}_s'], 'ms'),
                         f"{_fmt(row[f'speedup_{name}'], 'x')} vs reference; steps 4-9 from the same cells "
                         f"{_fmt(row[f'{name}_build_s'], 'ms')} ({_fmt(row[f'speedup_build_{name}'], 'x')} vs loop), "
                         f"identical {_fmt(row[f'identical_{name}'])}; {row[f'ops_{name}']} ATen ops"))
        rows.append(('ring/ray build', f'cells (geometry + steps 1-3): reference / ours, B={b}',
                     f"{_fmt(row['reference_cells_s'], 'ms')} / {_fmt(row['cells_s'], 'ms')}",
                     f"{row['cells_differing']} of {row['num_points']} points in a different cell (float rounding)"))
        rows.append(('ring/ray build', f'our GEMM get_geometry (LSS input), B={b}', _fmt(row['geometry_s'], 'ms'),
                     f"ring nnz {row['ring_nnz_per_sample']:.0f}, ray nnz {row['ray_nnz_per_sample']:.0f} per sample"))
    return rows


def _view_transform_rows(vt):
    rows = []
    labels = dict(sparse='MatrixVT sparse (ours, CPU/GPU)', dense='MatrixVT dense (ours, NPU/ONNX)',
                  reference='MatrixVT reference style (7-dim geometry, loops, matmul)',
                  lss='LSS lift-splat (GEMM geometry, torch pooling)',
                  module_sparse='whole module: prime extraction + sparse', module_dense='whole module: dense',
                  module_reference='whole module: reference style')
    for case in VT_CASES + MODULE_CASES:
        c = vt['cases'][case]
        ours = 'module_sparse' if case.startswith('module_') else 'sparse'
        note = f"peak {_fmt(c['peak_mb'], 'MB')}"
        if case != ours:
            speedup = vt['cases'][case]['time_s'] / vt['cases'][ours]['time_s']
            note += f"; {ours} is {_fmt(speedup, 'x')} faster"
        if case == 'lss':
            note += (f", {_fmt(vt['memory_ratio_vs_lss'], 'x')} less memory; whole module is "
                     f"{_fmt(vt['module_speedup_vs_lss'], 'x')} faster, {_fmt(vt['module_memory_ratio_vs_lss'], 'x')} "
                     'less memory')
        group = 'module fwd+bwd' if case.startswith('module_') else 'VT fwd+bwd'
        rows.append((group, f"{labels[case]}, B={vt['batch_size']}", _fmt(c['time_s'], 'ms'), note))
    bd = vt['breakdown']
    rows.append(('VT breakdown', 'cells: reference / ours',
                 f"{_fmt(bd['reference_cells_s'], 'ms')} / {_fmt(bd['cells_s'], 'ms')}",
                 f"{vt['cells_differing']} of {vt['num_points']} points in a different cell"))
    rows.append(('VT breakdown', 'DepthReducer + HoriConv fwd+bwd', _fmt(bd['prime_s'], 'ms'),
                 'learned prime extraction, identical in every MatrixVT case (module rows only)'))
    rows.append(('VT breakdown', 'build: loop / dense / sparse',
                 f"{_fmt(bd['build_loop_s'], 'ms')} / {_fmt(bd['build_dense_s'], 'ms')} / "
                 f"{_fmt(bd['build_sparse_s'], 'ms')}", 'from the same cells'))
    rows.append(('VT breakdown', 'project fwd+bwd: dense / sparse',
                 f"{_fmt(bd['project_dense_s'], 'ms')} / {_fmt(bd['project_sparse_s'], 'ms')}",
                 f"{_fmt(bd['projection_speedup_prebuilt'], 'x')} with prebuilt structures"))
    for other in ('dense', 'reference', 'module_dense', 'module_reference'):
        ch = vt['check'][other]
        rows.append(('VT check', f'sparse vs {other} (same cells): max rel err', f"{ch['max_rel']:.2e}",
                     f"out {ch['output_rel']:.1e}, input grads {ch['grad_inputs_rel']:.1e}"
                     + (f", param grads {ch['grad_params_rel']:.1e}" if 'grad_params_rel' in ch else '')
                     + f"; equal {_fmt(ch['equal'])}"))
    return rows


def format_table(results):
    """Plain-text table of the results (what scripts/benchmark.py prints)."""
    lines = []
    meta = results['meta']
    load = meta.get('load_average')
    lines.append(f"torch {meta['torch']}, {meta['torch_threads']} threads, {meta['cpu_count']} CPUs"
                 f"{f', load average {load[0]:.1f}' if load else ''}"
                 f"{', beside the competitor process (--contended)' if meta.get('contended') else ''}, {meta['statistic']} "
                 f"(repeats={meta['repeats']}{', quick' if meta['quick'] else ''})")
    for config, res in results['configs'].items():
        rows = []
        if 'ring_ray' in res:
            rows += _ring_ray_rows(res['ring_ray'])
        if 'view_transform' in res:
            rows += _view_transform_rows(res['view_transform'])
        if 'train_step' in res:
            ts = res['train_step']
            for precision, figures in ts['precisions'].items():
                rows.append(('train step', f"experiment's own step, {precision}, B={ts['batch_size']}",
                             _fmt(figures['step_s'], 'ms'),
                             f"{_fmt(figures['samples_per_s'], '/s')} samples; backbone floor "
                             f"{_fmt(figures['floor_s'], 'ms')}, overhead {figures['overhead_pct']:.0f} %"))
            if 'bf16_speedup' in ts:
                rows.append(('train step', 'bf16 vs fp32', _fmt(ts['bf16_speedup'], 'x'),
                             f"VT share {_fmt(ts['vt_share'], '%')} of the fp32 step (LSS would take "
                             f"{_fmt(ts['lss_share'], '%')})"))
        data = res.get('dataset', {})
        if 'dataset' in data:
            ds = data['dataset']
            rows.append(('dataset', f"reference style (Pillow, online LiDAR), {ds['num_samples']} samples "
                         f"{ds['final_dim'][0]}x{ds['final_dim'][1]}", _fmt(ds['reference_style_samples_per_s'], '/s'),
                         'per worker'))
            rows.append(('dataset', 'ours (OpenCV, depth cache)', _fmt(ds['ours_samples_per_s'], '/s'),
                         f"{_fmt(ds['speedup'], 'x')} vs reference style, per worker; same ida/bda "
                         f"{_fmt(ds['check']['ida_equal'] and ds['check']['bda_equal'])}, same depth "
                         f"{ds['check']['depth_equal_fraction'] * 100:.2f} %"))
        if 'depth_gt' in data:
            dg = data['depth_gt']
            rows.append(('gen_depth_gt', f"reference style, {dg['num_samples']} samples",
                         _fmt(dg['reference_style_samples_per_s'], '/s'), '1 worker'))
            rows.append(('gen_depth_gt', 'ours (write_depth_cache)', _fmt(dg['ours_samples_per_s'], '/s'),
                         f"{_fmt(dg['speedup'], 'x')} vs reference style, 1 worker"))
        lines.append('')
        lines.append(f'== config: {config} ==')
        widths = [max(len(r[i]) for r in rows) if rows else 0 for i in range(3)]
        for row in rows:
            lines.append(f'{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}')
        if res.get('targets'):
            lines.append('targets:')
            for t in res['targets']:
                verdict = 'n/a ' if t['passed'] is None else ('PASS' if t['passed'] else 'FAIL')
                value = t['value']
                shown = _fmt(value) if isinstance(value, bool) or value is None else f'{value:.2f}'
                lines.append(f"  [{verdict}] {t['name']} (measured {shown})")
    return '\n'.join(lines)


def _memory_main(argv):
    config, case, batch_size = argv
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(json.dumps(dict(peak_mb=_memory_case(config, case, int(batch_size)))))


if __name__ == '__main__':
    if len(sys.argv) == 5 and sys.argv[1] == '--memory-case':
        _memory_main(sys.argv[2:])
    else:
        sys.exit('usage: python -m benchmarking.suite --memory-case <config> <case> <batch>; '
                 'the benchmark itself is scripts/benchmark.py')
