"""Depth GT under image augmentation (upstream ``depth_transform``)."""
import numpy as np
import pytest

from bevdepth.configs import nuscenes as cfg
from bevdepth.datasets.depth_aug import depth_transform
from bevdepth.datasets.image_aug import ida_matrix, sample_ida_augmentation

FINAL_DIM = (256, 704)


def _reference_depth_map(points, resize, crop, flip, rotate, final_dim):
    """The reference's steps written out independently (float32 coordinates, in-place, numpy scatter)."""
    fH, fW = final_dim
    pts = points.astype(np.float32).copy()
    pts[:, :2] = pts[:, :2] * resize
    pts[:, 0] -= crop[0]
    pts[:, 1] -= crop[1]
    if flip:
        pts[:, 0] = fW - pts[:, 0]
    pts[:, 0] -= fW / 2.0
    pts[:, 1] -= fH / 2.0
    h = rotate / 180 * np.pi
    pts[:, :2] = np.matmul([[np.cos(h), np.sin(h)], [-np.sin(h), np.cos(h)]], pts[:, :2].T).T
    pts[:, 0] += fW / 2.0
    pts[:, 1] += fH / 2.0
    uv = pts[:, :2].astype(np.int16)
    out = np.zeros(final_dim)
    keep = (uv[:, 1] < fH) & (uv[:, 0] < fW) & (uv[:, 1] >= 0) & (uv[:, 0] >= 0)
    out[uv[keep, 1], uv[keep, 0]] = pts[keep, 2]
    return out.astype(np.float32)


def _random_points(rng, count=4000):
    u = rng.uniform(1, 1599, count)
    v = rng.uniform(1, 899, count)
    d = rng.uniform(1, 60, count)
    return np.stack([u, v, d], 1).astype(np.float32)


@pytest.mark.parametrize('seed', range(6))
def test_matches_the_reference_arithmetic(seed):
    rng = np.random.default_rng(seed)
    points = _random_points(rng)
    is_train = seed > 0
    resize, resize_dims, crop, flip, rotate = sample_ida_augmentation(cfg.ida_aug_conf(), is_train, rng)
    if seed == 1:
        flip = True
    ours = depth_transform(points, resize, resize_dims, crop, flip, rotate, FINAL_DIM)
    assert ours.shape == FINAL_DIM and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, _reference_depth_map(points, resize, crop, flip, rotate, FINAL_DIM))
    assert (ours > 0).sum() > 100


def test_points_land_where_the_ida_matrix_maps_them():
    rng = np.random.default_rng(3)
    resize, resize_dims, crop, flip, rotate = sample_ida_augmentation(cfg.ida_aug_conf(), True, rng)
    ida = ida_matrix(resize, crop, flip, rotate, FINAL_DIM).double().numpy()
    points = _random_points(rng, 50)
    for u, v, d in points:
        mapped = ida[:2, :2] @ np.array([u, v]) + ida[:2, 3]
        if not (0.01 < mapped[0] < 703.99 and 0.01 < mapped[1] < 255.99):
            continue
        depth = depth_transform(np.array([[u, v, d]]), resize, resize_dims, crop, flip, rotate, FINAL_DIM)
        ys, xs = np.nonzero(depth)
        assert (xs[0], ys[0]) == (int(mapped[0]), int(mapped[1]))
        assert depth[ys[0], xs[0]] == pytest.approx(d)


def test_last_write_wins_and_truncation_towards_zero():
    points = np.array([[100.0, 400.0, 5.0], [100.4, 400.4, 7.0], [-0.5 / 0.44, 150.0 / 0.44, 9.0]])
    eval_params = sample_ida_augmentation(cfg.ida_aug_conf(), False, None)
    depth = depth_transform(points, *eval_params, FINAL_DIM)
    assert depth[400 * 44 // 100 - 140, 44] == pytest.approx(7.0)  # both hit (44, 36): the later wins
    # u = -0.5 after scaling truncates to column 0 (int16 cast), as in the reference.
    assert depth[10, 0] == pytest.approx(9.0)
    assert np.count_nonzero(depth) == 2


def test_input_is_not_modified_and_bad_shapes_raise():
    points = _random_points(np.random.default_rng(0), 10)
    copy = points.copy()
    depth_transform(points, 0.5, (800, 450), (10, 194, 714, 450), True, 3.0, FINAL_DIM)
    np.testing.assert_array_equal(points, copy)
    empty = depth_transform(np.zeros((0, 3), np.float32), 0.5, (800, 450), (10, 194, 714, 450), True, 3.0, FINAL_DIM)
    assert empty.shape == FINAL_DIM and not empty.any()
    with pytest.raises(ValueError, match=r'\(M, 3\)'):
        depth_transform(np.zeros((5, 4)), 0.5, (800, 450), (10, 194, 714, 450), False, 0.0, FINAL_DIM)
