"""MatrixVT: ring / ray matrices against a loop implementation of the reference algorithm on realistic
calibration with random image / BEV augmentation, sparse vs dense projection, caches, module forward, keys."""
import math
import pathlib
import pickle

import numpy as np
import pytest
import torch
from pyquaternion import Quaternion

from bevdepth.configs import nuscenes as nus_conf
from bevdepth.configs import tiny as tiny_conf
from bevdepth.layers.backbones.base_lss_fpn import create_frustum, frustum_to_ego
from bevdepth.layers.backbones.matrixvt import (MatrixVT, SparseProjection, build_ring_ray, build_sparse_projection,
                                                fast_cells_supported, frustum_cells, frustum_row_features,
                                                cells_to_flat_index, geometry_to_cells, project_dense,
                                                project_sparse, resolve_projection, ring_ray_from_sparse,
                                                sparse_from_ring_ray)
# The reference algorithm (upstream ``MatrixVT.get_proj_mat``) written independently of the code under test: its
# 7-dim geometry and cell indices, then the Python loops that fill the ring / ray matrices, as the benchmark's
# baseline runs them.
from benchmarking.suite import (reference_cells, reference_loop_from_cells,
                                reference_style_geometry as reference_geometry)

SPEC_STATE_DICT = pathlib.Path(__file__).resolve().parents[2] / 'fixtures' / 'matrixvt_state_dict.txt'  # the 912 reference keys


# ------------------------------------------------------------------------------------------------------------
# Calibration rigs and augmentation (upstream ``img_transform`` / ``bev_transform`` formulas), all float32 like the
# dataset's tensors.
# ------------------------------------------------------------------------------------------------------------

def real_rig(fixture_dir):
    infos = pickle.load(open(fixture_dir / 'infos.pkl', 'rb'))
    sensor2ego, intrin = [], []
    for cam in nus_conf.CAMERAS:
        calib = infos[0]['cam_infos'][cam]['calibrated_sensor']
        mat = np.eye(4)
        mat[:3, :3] = Quaternion(calib['rotation']).rotation_matrix
        mat[:3, 3] = calib['translation']
        sensor2ego.append(mat)
        k = np.eye(4)
        k[:3, :3] = np.array(calib['camera_intrinsic'])
        intrin.append(k)
    return torch.tensor(np.stack(sensor2ego), dtype=torch.float32), torch.tensor(np.stack(intrin),
                                                                                 dtype=torch.float32)


def synthetic_rig():
    """Six nuScenes-like cameras around the ego (yaws of FRONT_LEFT, FRONT, FRONT_RIGHT, BACK_LEFT, BACK,
    BACK_RIGHT), 1266 px focal length on 1600x900 images."""
    sensor2ego, intrin = [], []
    for yaw_deg, fx in zip([55, 0, -55, 110, 180, -110], [1257.0, 1266.4, 1260.5, 1256.7, 809.2, 1259.5]):
        yaw = math.radians(yaw_deg)
        forward = np.array([math.cos(yaw), math.sin(yaw), 0.0])
        right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
        down = np.array([0.0, 0.0, -1.0])
        mat = np.eye(4)
        mat[:3, :3] = np.stack([right, down, forward], 1)  # columns: camera x, y, z in ego
        mat[:3, 3] = [1.0 + 0.6 * math.cos(yaw), 0.5 * math.sin(yaw), 1.55]
        sensor2ego.append(mat)
        k = np.eye(4)
        k[0, 0] = k[1, 1] = fx
        k[0, 2], k[1, 2] = 816.3, 491.5
        intrin.append(k)
    return torch.tensor(np.stack(sensor2ego), dtype=torch.float32), torch.tensor(np.stack(intrin),
                                                                                 dtype=torch.float32)


def random_ida(rng, ida_conf, augment=True):
    """ida_mat of the reference's image augmentation (resize, crop, flip, rotate) for one camera."""
    final_h, final_w = ida_conf['final_dim']
    raw_h, raw_w = ida_conf['H'], ida_conf['W']
    if augment:
        resize = rng.uniform(*ida_conf['resize_lim'])
        new_w, new_h = int(raw_w * resize), int(raw_h * resize)
        crop_h = int((1 - rng.uniform(*ida_conf['bot_pct_lim'])) * new_h) - final_h
        crop_w = int(rng.uniform(0, max(0, new_w - final_w)))
        flip = bool(rng.integers(0, 2))
        angle = rng.uniform(*ida_conf['rot_lim'])
    else:
        resize = max(final_h / raw_h, final_w / raw_w)
        new_w, new_h = int(raw_w * resize), int(raw_h * resize)
        crop_h, crop_w = new_h - final_h, int(max(0, new_w - final_w) / 2)
        flip, angle = False, 0.0
    rot = np.eye(2) * resize
    tran = -np.array([crop_w, crop_h], dtype=np.float64)
    if flip:
        flip_mat = np.array([[-1.0, 0.0], [0.0, 1.0]])
        rot = flip_mat @ rot
        tran = flip_mat @ tran + np.array([final_w, 0.0])
    theta = angle / 180 * np.pi
    rot_mat = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    centre = np.array([final_w, final_h]) / 2
    rot = rot_mat @ rot
    tran = rot_mat @ tran + centre - rot_mat @ centre
    ida = np.eye(4)
    ida[:2, :2] = rot
    ida[:2, 3] = tran
    return ida


def random_bda(rng, augment=True):
    if not augment:
        return np.eye(4)
    conf = nus_conf.bda_aug_conf()
    angle = np.radians(rng.uniform(*conf['rot_lim']))
    scale = rng.uniform(*conf['scale_lim'])
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]) * scale
    if rng.uniform() < conf['flip_dx_ratio']:
        rot = np.diag([-1.0, 1.0, 1.0]) @ rot
    if rng.uniform() < conf['flip_dy_ratio']:
        rot = np.diag([1.0, -1.0, 1.0]) @ rot
    bda = np.eye(4)
    bda[:3, :3] = rot
    return bda


def make_mats(rig, ida_conf, batch_size=2, seed=0, augment=True):
    sensor2ego, intrin = rig
    rng = np.random.default_rng(seed)
    num_cams = sensor2ego.shape[0]
    ida = np.stack([[random_ida(rng, ida_conf, augment) for _ in range(num_cams)] for _ in range(batch_size)])
    bda = np.stack([random_bda(rng, augment) for _ in range(batch_size)])
    return dict(
        sensor2ego_mats=sensor2ego.expand(batch_size, 1, num_cams, 4, 4).clone(),
        intrin_mats=intrin.expand(batch_size, 1, num_cams, 4, 4).clone(),
        ida_mats=torch.tensor(ida, dtype=torch.float32).unsqueeze(1),
        sensor2sensor_mats=torch.eye(4).expand(batch_size, 1, num_cams, 4, 4).clone(),
        bda_mat=torch.tensor(bda, dtype=torch.float32),
    )


@pytest.fixture(params=['real', 'synthetic'])
def rig(request):
    if request.param == 'real':
        return real_rig(request.getfixturevalue('bevdepth_fixture_dir'))
    return synthetic_rig()


SETTINGS = {
    'full': dict(conf=nus_conf.backbone_conf(), ida=nus_conf.ida_aug_conf()),
    'tiny': dict(conf=tiny_conf.backbone_conf(), ida=tiny_conf.ida_aug_conf()),
}


def setting_geometry(name):
    conf = SETTINGS[name]['conf']
    bounds = [conf['x_bound'], conf['y_bound'], conf['z_bound']]
    voxel_size = torch.tensor([b[2] for b in bounds], dtype=torch.float32)
    voxel_coord = torch.tensor([b[0] + b[2] / 2.0 for b in bounds], dtype=torch.float32)
    bev_size = int(round((conf['x_bound'][1] - conf['x_bound'][0]) / conf['x_bound'][2]))
    frustum = create_frustum(conf['final_dim'], conf['downsample_factor'], conf['d_bound'])
    return frustum, voxel_coord, voxel_size, bev_size


def cells_for(name, rig, seed, batch_size=2, augment=True):
    frustum, voxel_coord, voxel_size, bev_size = setting_geometry(name)
    mats = make_mats(rig, SETTINGS[name]['ida'], batch_size=batch_size, seed=seed, augment=augment)
    geom = frustum_to_ego(frustum, mats['sensor2ego_mats'][:, 0], mats['intrin_mats'][:, 0], mats['ida_mats'][:, 0],
                          mats['bda_mat'])
    return geom, mats, geometry_to_cells(geom, voxel_coord, voxel_size), bev_size


# ------------------------------------------------------------------------------------------------------------
# Ring / ray
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['full', 'tiny'])
def test_geometry_and_cells_match_reference_formula(name, rig):
    frustum, voxel_coord, voxel_size, _ = setting_geometry(name)
    geom, mats, cells, _ = cells_for(name, rig, seed=11)
    expected_geom = reference_geometry(frustum, mats['sensor2ego_mats'][:, 0], mats['intrin_mats'][:, 0],
                                       mats['ida_mats'][:, 0], mats['bda_mat'])
    torch.testing.assert_close(geom, expected_geom, rtol=1e-5, atol=1e-4)
    expected_cells = reference_cells(expected_geom, voxel_coord, voxel_size)
    # Same float operations in the same order: the truncated cells agree (allow a handful of borderline
    # ulp flips between broadcast and batched matmul kernels).
    mismatch = (cells != expected_cells).any(-1).sum().item()
    assert mismatch <= 2, f'{mismatch} cells differ from the reference geometry'


@pytest.mark.parametrize('name', ['full', 'tiny'])
@pytest.mark.parametrize('augment', [True, False])
def test_ring_ray_identical_to_loop_reference(name, augment, rig):
    _, _, cells, bev_size = cells_for(name, rig, seed=3 if augment else 0, augment=augment)
    ref_ring, ref_ray = reference_loop_from_cells(cells, bev_size)
    assert set(ref_ring.unique().tolist()) == {0.0, 1.0} and set(ref_ray.unique().tolist()) == {0.0, 1.0}
    assert ref_ray.sum() > 1000  # realistic, non-trivial coverage
    ring, ray = build_ring_ray(cells, bev_size)
    assert torch.equal(ring, ref_ring) and torch.equal(ray, ref_ray)
    # Sparse structure from the same index computation encodes exactly the same matrices.
    sparse = build_sparse_projection(cells, bev_size)
    sparse_ring, sparse_ray = ring_ray_from_sparse(sparse)
    assert torch.equal(sparse_ring, ref_ring) and torch.equal(sparse_ray, ref_ray)


def test_reference_semantics_on_hand_made_cells():
    bev_size = 4  # null cell (2, 2) -> index 10
    cells = torch.tensor([[[[0, 0], [0, 0], [-1, 3], [2, 2]],      # duplicate, invalid x, valid-in-null-cell
                           [[3, 3], [4, 0], [1, 0], [0, 0]]]])     # out of range (x = 4), then valid
    ring, ray = build_ring_ray(cells, bev_size)
    assert ray[0, 0].nonzero().view(-1).tolist() == [0]  # duplicates collapse, invalid and null dropped
    assert ray[0, 0, 0] == 1.0
    assert ray[0, 1].nonzero().view(-1).tolist() == [0, 1, 15]
    assert ring[0, 0].nonzero().view(-1).tolist() == [0, 15]
    assert ring[0, 1].nonzero().view(-1).tolist() == [0]
    assert ring[0, 2].nonzero().view(-1).tolist() == [1]
    assert ring[0, 3].nonzero().view(-1).tolist() == [0]
    assert ring[..., 10].sum() == 0 and ray[..., 10].sum() == 0
    flat, valid = cells_to_flat_index(cells, bev_size)
    assert flat[0, 0].tolist() == [0, 0, 10, 10] and valid[0, 0].tolist() == [True, True, False, False]


def test_sparse_build_ignores_invalid_neighbours_with_the_same_flat_index():
    """An invalid point's row-major index can equal a valid neighbour's ((x, y) = (-1, 2) -> 2L - 1, the index
    of (L - 1, 1)); the sparse build must not take the valid point for a duplicate of it, along a ray (depth
    bins) nor across rays (one depth bin)."""
    bev_size = 4
    cells = torch.tensor([[[[-1, 2], [3, 1], [3, 1]],     # ray 0: invalid, then valid (3, 1) twice
                           [[0, 0], [-1, 2], [0, 3]],     # ray 1: bin 1 invalid
                           [[1, 0], [3, 1], [0, 3]]]])    # ray 2: bin 1 valid with ray 1's bin-1 index
    ring, ray = build_ring_ray(cells, bev_size)
    assert ray[0, 0, 7] == 1 and ring[0, 1, 7] == 1 and ring[0, 2, 7] == 1
    sparse_ring, sparse_ray = ring_ray_from_sparse(build_sparse_projection(cells, bev_size))
    assert torch.equal(sparse_ring, ring) and torch.equal(sparse_ray, ray)


def test_truncation_toward_zero_not_floor():
    # Normalised coordinates -0.5 truncate to cell 0 (kept), -1.2 to -1 (invalid).
    voxel_size = torch.tensor([1.0, 1.0, 8.0])
    voxel_coord = torch.tensor([0.5, 0.5, -1.0])  # cell edges at 0
    geom = torch.tensor([-0.5, 2.3, 0.0, -1.2, 1.0, 0.0]).view(1, 1, 2, 1, 1, 3)  # (B, N, D, H, W, 3)
    cells = geometry_to_cells(geom, voxel_coord, voxel_size)
    assert cells.tolist() == [[[[0, 2], [-1, 1]]]]


def test_sparse_ring_entries_come_from_all_rays():
    """P[r, c] sums the probabilities of every bin whose ring contains c, also bins where ray r is elsewhere."""
    bev_size = 4
    # ray 0: bin 0 -> cell 5, bin 1 -> cell 6; ray 1: bin 0 -> cell 0, bin 1 -> cell 5.
    cells = torch.tensor([[[[1, 1], [2, 1]], [[0, 0], [1, 1]]]])
    depth = torch.tensor([[[0.3, 0.7], [0.4, 0.6]]])
    feat = torch.tensor([[[1.0], [10.0]]])
    ring, ray = build_ring_ray(cells, bev_size)
    dense = project_dense(feat, depth, ring, ray).view(-1)
    sparse = project_sparse(feat, depth, build_sparse_projection(cells, bev_size)).view(-1)
    # cell 5: ray 0 gets p(0,0) + p(0,1) (bin 1 hits cell 5 through ray 1), ray 1 gets p(1,0) + p(1,1).
    assert dense[5].item() == pytest.approx(1.0 * (0.3 + 0.7) + 10.0 * (0.4 + 0.6))
    assert dense[6].item() == pytest.approx(1.0 * 0.7)
    assert dense[0].item() == pytest.approx(10.0 * 0.4)
    torch.testing.assert_close(sparse, dense)


def test_no_valid_point_gives_zero_bev_in_both_modes():
    cells = torch.full((2, 5, 3, 2), -3, dtype=torch.long)
    feat = torch.randn(2, 5, 4, requires_grad=True)
    depth = torch.rand(2, 5, 3)
    sparse = build_sparse_projection(cells, 8)
    assert sparse.pair_row.numel() == 0 and sparse.triple_pair.numel() == 0
    out = project_sparse(feat, depth, sparse)
    out.sum().backward()
    assert out.shape == (2, 4, 8, 8) and torch.count_nonzero(out) == 0 and torch.count_nonzero(feat.grad) == 0
    assert torch.count_nonzero(project_dense(feat, depth, *build_ring_ray(cells, 8))) == 0


def test_dense_sparse_conversions_round_trip(rig):
    _, _, cells, bev_size = cells_for('tiny', rig, seed=5)
    ring, ray = build_ring_ray(cells, bev_size)
    sparse = build_sparse_projection(cells, bev_size)
    converted = sparse_from_ring_ray(ring, ray)
    for name in ('pair_row', 'pair_cell', 'triple_pair', 'triple_depth'):
        assert torch.equal(getattr(converted, name), getattr(sparse, name)), name
    back_ring, back_ray = ring_ray_from_sparse(converted)
    assert torch.equal(back_ring, ring) and torch.equal(back_ray, ray)


# ------------------------------------------------------------------------------------------------------------
# Projection: sparse vs dense
# ------------------------------------------------------------------------------------------------------------

def _rel_close(actual, expected, rel=1e-5):
    scale = expected.abs().max().clamp(min=1e-12)
    assert ((actual - expected).abs().max() / scale).item() <= rel


@pytest.mark.parametrize('name', ['tiny', 'full'])
def test_sparse_equals_dense_values_and_gradients(name, rig):
    _, _, cells, bev_size = cells_for(name, rig, seed=7)
    batch_size, num_rays, num_depth, _ = cells.shape
    gen = torch.Generator().manual_seed(0)
    channels = 8
    feat = torch.randn(batch_size, num_rays, channels, generator=gen)
    depth = torch.randn(batch_size, num_rays, num_depth, generator=gen).softmax(-1)
    grad_out = torch.randn(batch_size, channels, bev_size, bev_size, generator=gen)

    results = {}
    for mode in ('dense', 'sparse'):
        f = feat.clone().requires_grad_(True)
        d = depth.clone().requires_grad_(True)
        if mode == 'dense':
            out = project_dense(f, d, *build_ring_ray(cells, bev_size))
        else:
            out = project_sparse(f, d, build_sparse_projection(cells, bev_size))
        (out * grad_out).sum().backward()
        results[mode] = (out.detach(), f.grad, d.grad)
    assert results['dense'][0].shape == (batch_size, channels, bev_size, bev_size)
    assert results['dense'][0].abs().sum() > 0
    for dense_t, sparse_t in zip(results['dense'], results['sparse']):
        _rel_close(sparse_t, dense_t)


def test_sparse_projection_under_bf16_autocast(rig):
    """--precision bf16: bf16 inputs and a bf16 consumer of the BEV map (the CSR products are float32 only);
    backward runs inside the autocast block as Lightning does. Same result as float32 within bf16 rounding."""
    _, _, cells, bev_size = cells_for('tiny', rig, seed=7)
    batch_size, num_rays, num_depth, _ = cells.shape
    gen = torch.Generator().manual_seed(0)
    feat = torch.randn(batch_size, num_rays, 8, generator=gen)
    depth = torch.randn(batch_size, num_rays, num_depth, generator=gen).softmax(-1)
    conv = torch.nn.Conv2d(8, 4, 1)
    sparse = build_sparse_projection(cells, bev_size)

    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        f = feat.to(dtype, copy=True).requires_grad_(True)
        d = depth.to(dtype, copy=True).requires_grad_(True)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = conv(project_sparse(f, d, sparse))
            out.float().square().sum().backward()
        assert f.grad.dtype == dtype and d.grad.dtype == dtype
        results[dtype] = (out.detach().float(), f.grad.float(), d.grad.float())
    for low, high in zip(results[torch.bfloat16], results[torch.float32]):
        _rel_close(low, high, rel=3e-2)


def test_resolve_projection():
    assert resolve_projection('auto', 'cpu') == 'sparse'
    assert resolve_projection('auto', 'npu') == 'dense'
    assert resolve_projection('dense', 'cpu') == 'dense'
    with pytest.raises(ValueError, match='projection must be one of'):
        resolve_projection('fast', 'cpu')


# ------------------------------------------------------------------------------------------------------------
# MatrixVT module (tiny config, 64x192 images)
# ------------------------------------------------------------------------------------------------------------

def tiny_model_conf():
    conf = tiny_conf.backbone_conf()
    conf['final_dim'] = (64, 192)
    return conf


def tiny_ida_conf():
    conf = tiny_conf.ida_aug_conf()
    conf.update(final_dim=(64, 192), resize_lim=(0.0965, 0.1375))
    return conf


@pytest.fixture(scope='module')
def tiny_model():
    torch.manual_seed(0)
    return MatrixVT(**tiny_model_conf())


def test_non_square_grid_raises():
    conf = tiny_model_conf()
    conf['y_bound'] = [-51.2, 51.2, 0.8]
    with pytest.raises(ValueError, match='square BEV grid'):
        MatrixVT(**conf)


def test_projection_kwarg_adds_no_state(tiny_model):
    torch.manual_seed(0)
    dense_model = MatrixVT(**tiny_model_conf(), projection='dense')
    assert list(dense_model.state_dict()) == list(tiny_model.state_dict())
    with pytest.raises(ValueError):
        dense_model.projection = 'fastest'


def test_forward_tiny_shapes_and_modes(tiny_model):
    model = tiny_model
    model.train()
    torch.manual_seed(1)
    batch_size, num_cams = 2, 6
    mats = make_mats(synthetic_rig(), tiny_ida_conf(), batch_size=batch_size, seed=2)
    imgs = torch.randn(batch_size, 1, num_cams, 3, 64, 192)
    model.projection = 'sparse'
    bev, depth = model(imgs, mats, is_return_depth=True)
    assert bev.shape == (batch_size, 32, 64, 64)
    assert depth.shape == (batch_size * num_cams, 56, 4, 12) and depth.dtype == torch.float32
    torch.testing.assert_close(depth.sum(1), torch.ones(batch_size * num_cams, 4, 12))
    bev.sum().backward()
    assert model.depth_net.depth_conv[4].weight.grad is not None
    assert model.horiconv.reduce_conv[0].weight.grad is not None

    # Sparse and dense module outputs agree (eval mode: deterministic BN / dropout).
    model.eval()
    with torch.no_grad():
        feats = torch.randn(batch_size * num_cams, 32, 4, 12)
        probs = torch.randn(batch_size * num_cams, 56, 4, 12).softmax(1)
        model.projection = 'dense'
        dense = model.reduce_and_project(feats, probs, mats)
        model.projection = 'sparse'
        sparse = model.reduce_and_project(feats, probs, mats)
        assert dense.shape == (batch_size, 32, 64, 64)
        _rel_close(sparse, dense)
        model.projection = 'auto'
        assert model(imgs, mats).shape == (batch_size, 32, 64, 64)


def test_multi_sweep_concatenates_channels(tiny_model):
    model = tiny_model.eval()
    mats = make_mats(synthetic_rig(), tiny_ida_conf(), batch_size=1, seed=4)
    mats = {k: (torch.cat([v, v], 1) if k != 'bda_mat' else v) for k, v in mats.items()}
    with torch.no_grad():
        bev = model(torch.randn(1, 2, 6, 3, 64, 192), mats)
    assert bev.shape == (1, 64, 64, 64)


def test_static_mat_and_auto_cache(tiny_model):
    model = tiny_model.eval()
    mats_a = make_mats(synthetic_rig(), tiny_ida_conf(), batch_size=2, seed=8)
    mats_b = make_mats(synthetic_rig(), tiny_ida_conf(), batch_size=2, seed=9)
    feats = torch.randn(12, 32, 4, 12)
    probs = torch.randn(12, 56, 4, 12).softmax(1)
    with torch.no_grad():
        for mode in ('dense', 'sparse'):
            model.projection = mode
            model.static_mat = None
            # Automatic cache: identical matrices -> the very same projection object, new matrices -> rebuild.
            first = model.get_proj_mat(mats_a)
            assert model.get_proj_mat({k: v.clone() for k, v in mats_a.items()}) is first
            other = model.get_proj_mat(mats_b)
            assert other is not first
            model.auto_cache = False
            assert model.get_proj_mat(mats_a) is not model.get_proj_mat(mats_a)
            model.auto_cache = True

            out_a = model.reduce_and_project(feats, probs, mats_a)
            out_b = model.reduce_and_project(feats, probs, mats_b)
            assert not torch.allclose(out_a, out_b)
            # static_mat wins over the batch's matrices, whichever representation it was cached in.
            for static_mode in ('dense', 'sparse'):
                model.static_mat = None
                model.static_mat = model.get_proj_mat(mats_a, projection=static_mode)
                assert isinstance(model.static_mat, SparseProjection) == (static_mode == 'sparse')
                _rel_close(model.reduce_and_project(feats, probs, mats_b), out_a)
                assert model.get_proj_mat(None) is model.get_proj_mat(mats_b)
    model.static_mat = None
    model.projection = 'auto'


def test_static_mat_with_wrong_batch_size_raises(tiny_model):
    model = tiny_model.eval()
    model.projection = 'dense'
    model.static_mat = model.get_proj_mat(make_mats(synthetic_rig(), tiny_ida_conf(), batch_size=2, seed=1))
    try:
        with pytest.raises(ValueError, match='rebuild static_mat'):
            model.reduce_and_project(torch.randn(6, 32, 4, 12), torch.rand(6, 56, 4, 12),
                                     make_mats(synthetic_rig(), tiny_ida_conf(), batch_size=1, seed=1))
    finally:
        model.static_mat = None
        model.projection = 'auto'


# ------------------------------------------------------------------------------------------------------------
# Full R50 configuration: state-dict keys / shapes match the reference backbone.
# ------------------------------------------------------------------------------------------------------------

def test_full_config_state_dict_matches_reference():
    if not SPEC_STATE_DICT.is_file():
        pytest.skip('tests/fixtures/matrixvt_state_dict.txt not present')
    expected = []
    for line in SPEC_STATE_DICT.read_text().splitlines():
        if line.startswith('backbone.'):
            key, shape = line.split(' ', 1)
            expected.append((key[len('backbone.'):], () if shape == 'scalar' else
                             tuple(int(v) for v in shape.strip('()').split(',') if v.strip())))
    model = MatrixVT(**nus_conf.backbone_conf())
    actual = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert actual == expected
    torch.testing.assert_close(model.bev_anchors[:, 0, 0], torch.linspace(-51.2, 50.4, 128) + 0.4)
    assert model.voxel_num.tolist() == [128, 128, 1]
    torch.testing.assert_close(model.voxel_coord, torch.tensor([-50.8, -50.8, -1.0]))


# ------------------------------------------------------------------------------------------------------------
# Fast row-moment cells and trace safety
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['full', 'tiny'])
def test_frustum_cells_match_reference_formula(name, rig):
    """Row-moment cells = reference 7-dim geometry + normalise + mean + truncate, up to float32 border flips."""
    frustum, voxel_coord, voxel_size, _ = setting_geometry(name)
    mats = make_mats(rig, SETTINGS[name]['ida'], batch_size=2, seed=13)
    args = (mats['sensor2ego_mats'][:, 0], mats['intrin_mats'][:, 0], mats['ida_mats'][:, 0], mats['bda_mat'])
    expected = reference_cells(reference_geometry(frustum, *args), voxel_coord, voxel_size)
    cells = frustum_cells(frustum_row_features(frustum), frustum.shape[0], *args, voxel_coord, voxel_size)
    assert cells.shape == expected.shape and cells.dtype == torch.long
    mismatch = (cells != expected).any(-1).sum().item()
    assert mismatch <= max(2, expected[..., 0].numel() // 20000), f'{mismatch} cells differ'
    # Without bda: same as the identity bda.
    no_bda = frustum_cells(frustum_row_features(frustum), frustum.shape[0], *args[:3], None, voxel_coord, voxel_size)
    eye = frustum_cells(frustum_row_features(frustum), frustum.shape[0], *args[:3], torch.eye(4).expand(2, 4, 4),
                        voxel_coord, voxel_size)
    assert torch.equal(no_bda, eye)


def test_model_cells_fast_path_and_cache(tiny_model):
    mats = make_mats(synthetic_rig(), tiny_ida_conf(), batch_size=2, seed=21)
    cells = tiny_model.get_geom_cells(mats)
    geom = tiny_model.get_geometry(mats['sensor2ego_mats'][:, 0], mats['intrin_mats'][:, 0], mats['ida_mats'][:, 0],
                                   mats['bda_mat'])
    slow = geometry_to_cells(geom, tiny_model.voxel_coord, tiny_model.voxel_size)
    assert (cells != slow).any(-1).sum().item() <= 2
    features = tiny_model._frustum_row_features()
    assert tiny_model._frustum_row_features() is features  # cached
    tiny_model.frustum.add_(0)  # in-place change of the buffer (as load_state_dict does) -> recomputed
    assert tiny_model._frustum_row_features() is not features


def test_project_dense_is_trace_safe():
    cells = torch.tensor([[[[1, 1], [2, 1]], [[0, 0], [1, 1]]]])
    ring, ray = build_ring_ray(cells, 4)
    feat, depth = torch.rand(1, 2, 3), torch.rand(1, 2, 2)
    traced = torch.jit.trace(project_dense, (feat, depth, ring, ray), check_trace=False)
    torch.testing.assert_close(traced(feat, depth, ring, ray), project_dense(feat, depth, ring, ray))


def test_sparse_pairs_are_cell_major_and_csr_consistent(rig):
    _, _, cells, bev_size = cells_for('tiny', rig, seed=6)
    sparse = build_sparse_projection(cells, bev_size)
    key = sparse.pair_cell * sparse.num_rays + sparse.pair_row % sparse.num_rays
    assert bool((key[1:] > key[:-1]).all())  # strictly increasing: sorted and without duplicates
    counts = torch.bincount(sparse.pair_cell, minlength=sparse.batch_size * bev_size * bev_size)
    assert torch.equal(sparse.cell_crow[1:] - sparse.cell_crow[:-1], counts)


def test_sparse_build_int64_indices_equal_int32(rig, monkeypatch):
    # Batches too large for int32 keys take int64 indices; force that layout on a small batch and compare.
    import bevdepth.ops.ring_ray_projection as kernels
    _, _, cells, bev_size = cells_for('tiny', rig, seed=7)
    narrow = build_sparse_projection(cells, bev_size)
    assert narrow.pair_row.dtype == torch.int32 and narrow.triple_depth.dtype == torch.int32
    real_layout = kernels._key_layout
    monkeypatch.setattr(kernels, '_key_layout',
                        lambda *args: real_layout(*args)._replace(dtype=torch.int64))
    wide = build_sparse_projection(cells, bev_size)
    assert wide.pair_row.dtype == torch.int64 and wide.triple_depth.dtype == torch.int64
    for name in ('pair_row', 'pair_cell', 'triple_pair', 'triple_depth', 'cell_crow'):
        assert torch.equal(getattr(wide, name), getattr(narrow, name).long()), name
    feat, depth = torch.randn(2, cells.shape[1], 5), torch.rand(2, cells.shape[1], cells.shape[2])
    torch.testing.assert_close(project_sparse(feat, depth, wide), project_sparse(feat, depth, narrow))


def test_sparse_build_leaves_cells_alone_unless_writable(rig):
    _, _, cells, bev_size = cells_for('tiny', rig, seed=8)
    cells32 = cells.to(torch.int32)
    before = cells32.clone()
    expected = build_sparse_projection(cells32, bev_size)
    assert torch.equal(cells32, before)
    planes = cells32.permute(3, 0, 1, 2).contiguous()  # x / y planes, the layout get_geom_cells returns
    writable = build_sparse_projection(planes.permute(1, 2, 3, 0), bev_size, cells_writable=True)
    assert not torch.equal(planes.permute(1, 2, 3, 0), before)  # overwritten, as allowed
    for name in ('pair_row', 'pair_cell', 'triple_pair', 'triple_depth', 'cell_crow'):
        assert torch.equal(getattr(writable, name), getattr(expected, name)), name


# ------------------------------------------------------------------------------------------------------------
# Device-only branches forced on CPU (bevdepth.ops.device_branch): each equals the CPU path.
# ------------------------------------------------------------------------------------------------------------

SPARSE_FIELDS = ('pair_row', 'pair_cell', 'triple_pair', 'triple_depth', 'cell_crow')


@pytest.mark.parametrize('name', ['full', 'tiny'])
@pytest.mark.parametrize('branch', ['cuda', 'npu'])
def test_sparse_build_torch_branch_equals_numpy_branch(name, branch, rig, device_branch):
    # masked_select + torch.sort (GPU / NPU) vs NumPy compaction and in-place sort (CPU): identical structure.
    _, _, cells, bev_size = cells_for(name, rig, seed=9)
    expected = build_sparse_projection(cells, bev_size)
    with device_branch(branch):
        forced = build_sparse_projection(cells, bev_size)
    for field in SPARSE_FIELDS:
        assert getattr(forced, field).dtype == getattr(expected, field).dtype, field
        assert torch.equal(getattr(forced, field), getattr(expected, field)), field
    feat, depth = torch.randn(2, cells.shape[1], 3), torch.rand(2, cells.shape[1], cells.shape[2])
    with device_branch(branch):
        torch.testing.assert_close(project_sparse(feat, depth, forced), project_sparse(feat, depth, expected))


def test_compaction_helpers_torch_branch_equal_numpy_branch(device_branch):
    from bevdepth.ops import ring_ray_projection as kernels
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.int32, torch.int64):
        keys = torch.randint(0, 500, (3, 40, 7), generator=gen).to(dtype)  # many duplicates
        keep = torch.rand(3, 40, 7, generator=gen) > 0.3
        expected = kernels._sorted_unique_kept(keys.clone(), keep.clone())
        masked = kernels._masked(keys, keep)
        with device_branch('cuda'):
            assert torch.equal(kernels._sorted_unique_kept(keys.clone(), keep.clone()), expected)
            assert torch.equal(kernels._masked(keys, keep), masked)
        assert torch.equal(expected, torch.unique(keys[keep]).to(dtype))
        assert torch.equal(masked, keys[keep])
    distinct = torch.randperm(1000, generator=gen)[:300].to(torch.int32)  # the all-distinct early return
    keep = torch.rand(300, generator=gen) > 0.5
    with device_branch('npu'):
        assert torch.equal(kernels._sorted_unique_kept(distinct.clone(), keep), torch.sort(distinct[keep]).values)


def test_npu_branch_picks_dense_projection_and_reference_cells(tiny_model, device_branch):
    model = tiny_model.eval()
    mats = make_mats(synthetic_rig(), tiny_ida_conf(), batch_size=2, seed=11)
    imgs = torch.randn(2, 1, 6, 3, 64, 192, generator=torch.Generator().manual_seed(3))
    model.projection = 'auto'
    with torch.no_grad():
        expected_bev, expected_depth = model(imgs, mats, is_return_depth=True)
        assert model._proj_cache[1] == 'sparse'
        fast_cells = model.get_geom_cells(mats)
        with device_branch('npu'):
            assert resolve_projection('auto', 'cpu') == 'dense' and not fast_cells_supported('cpu')
            slow_cells = model.get_geom_cells(mats)
            bev, depth = model(imgs, mats, is_return_depth=True)
            assert model._proj_cache[1] == 'dense'
    geom = model.get_geometry(mats['sensor2ego_mats'][:, 0], mats['intrin_mats'][:, 0], mats['ida_mats'][:, 0],
                              mats['bda_mat'])
    assert torch.equal(slow_cells, geometry_to_cells(geom, model.voxel_coord, model.voxel_size))
    # float64 row moments vs the float32 reference order: a point within rounding of a border may flip.
    assert (slow_cells != fast_cells).float().mean() < 1e-4
    torch.testing.assert_close(depth, expected_depth)
    _rel_close(bev, expected_bev)
    model._proj_cache = None


def test_cuda_branch_fp32_islands_turn_cuda_autocast_off(tiny_model, device_branch, monkeypatch):
    # CUDA autocast state can be switched on without a GPU: each fp32 island must switch off autocast for the
    # device type the model runs on ('cuda' here), not for the tensors' 'cpu'. Each island is entered on its own
    # (nested islands would hide a broken inner one).
    model = tiny_model.eval()
    seen = {}

    def record(name):
        def hook(*_args):  # the first call only: the island entered on its own
            seen.setdefault(name, torch.is_autocast_enabled('cuda'))
        return hook

    mats = make_mats(synthetic_rig(), tiny_ida_conf(), batch_size=1, seed=12)
    feats, probs = torch.randn(6, 32, 4, 12), torch.randn(6, 56, 4, 12).softmax(1)
    real_reduce_and_project = model.reduce_and_project

    def reduce_and_project(*args, **kwargs):
        record('forward_single_sweep')()
        return real_reduce_and_project(*args, **kwargs)

    hooks = [model.horiconv.merger.register_forward_pre_hook(record('horiconv')),
             model.depth_reducer.vertical_weighter.register_forward_pre_hook(record('depth_reducer'))]
    try:
        torch.set_autocast_enabled('cuda', True)
        with torch.no_grad(), device_branch('cuda'):
            model.horiconv(feats)
            model.depth_reducer(feats, probs)
            hooks.append(model.depth_reducer.register_forward_pre_hook(record('reduce_and_project')))
            model.reduce_and_project(feats, probs, mats)
            monkeypatch.setattr(model, 'reduce_and_project', reduce_and_project)
            model(torch.randn(1, 1, 6, 3, 64, 192), mats)
        assert torch.is_autocast_enabled('cuda')  # restored after each island
    finally:
        torch.set_autocast_enabled('cuda', False)
        for hook in hooks:
            hook.remove()
    assert seen == dict.fromkeys(['horiconv', 'depth_reducer', 'reduce_and_project', 'forward_single_sweep'], False)
