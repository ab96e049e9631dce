"""BEV augmentation (upstream ``bev_transform``): sampling, box transform, the 4x4 matrix and its inverse."""
import itertools
import math

import numpy as np
import pytest
import torch

from bevdepth.configs import nuscenes as cfg
from bevdepth.datasets.bev_aug import bev_transform, sample_bda_augmentation


def _boxes():
    return torch.tensor([[10.0, 0.0, 1.0, 4.0, 2.0, 1.5, 0.0, 1.0, 0.0],
                         [-5.0, 7.0, -0.5, 1.0, 0.6, 1.8, 0.7, 0.3, -0.2],
                         [20.0, -30.0, 0.2, 12.0, 2.9, 3.5, -2.5, -4.0, 2.0]])


def _bev_corners(boxes):
    """(n, 4, 2) BEV corners of [x, y, z, l, w, h, yaw, ...] boxes (l along the yaw direction)."""
    boxes = boxes.double()
    signs = torch.tensor([[1, 1], [1, -1], [-1, -1], [-1, 1]], dtype=torch.float64)
    local = signs[None] * boxes[:, None, 3:5] / 2
    cos, sin = torch.cos(boxes[:, 6]), torch.sin(boxes[:, 6])
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    return (rot[:, None] @ local[..., None]).squeeze(-1) + boxes[:, None, :2]


def test_eval_is_identity():
    assert sample_bda_augmentation(cfg.bda_aug_conf(), False, None) == (0.0, 1.0, False, False)
    boxes, bda_mat = bev_transform(_boxes(), 0.0, 1.0, False, False)
    torch.testing.assert_close(boxes, _boxes())
    torch.testing.assert_close(bda_mat, torch.eye(4))


def test_train_sampling_ranges():
    rng = np.random.default_rng(0)
    samples = [sample_bda_augmentation(cfg.bda_aug_conf(), True, rng) for _ in range(400)]
    rotations, scales, flips_dx, flips_dy = zip(*samples)
    assert all(-22.5 <= r <= 22.5 for r in rotations)
    assert all(0.95 <= s <= 1.05 for s in scales)
    assert 0.35 < np.mean(flips_dx) < 0.65 and 0.35 < np.mean(flips_dy) < 0.65


def test_rotation_by_hand():
    boxes, bda_mat = bev_transform(_boxes()[:1], 90.0, 1.0, False, False)
    torch.testing.assert_close(boxes[0, :3], torch.tensor([0.0, 10.0, 1.0]), atol=1e-5, rtol=0)
    assert boxes[0, 6].item() == pytest.approx(math.pi / 2, abs=1e-6)
    torch.testing.assert_close(boxes[0, 7:], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bda_mat[:2, :2], torch.tensor([[0.0, -1.0], [1.0, 0.0]]), atol=1e-6, rtol=0)


def test_flips_and_scale_by_hand():
    box = _boxes()[1:2]
    flipped, mat = bev_transform(box, 0.0, 1.0, True, False)
    torch.testing.assert_close(flipped[0, :3], torch.tensor([5.0, 7.0, -0.5]))
    assert flipped[0, 6].item() == pytest.approx(math.pi - 0.7, abs=1e-6)
    torch.testing.assert_close(flipped[0, 7:], torch.tensor([-0.3, -0.2]))
    flipped, mat = bev_transform(box, 0.0, 1.0, False, True)
    torch.testing.assert_close(flipped[0, :3], torch.tensor([-5.0, -7.0, -0.5]))
    assert flipped[0, 6].item() == pytest.approx(-0.7, abs=1e-6)
    scaled, mat = bev_transform(box, 0.0, 1.05, False, False)
    torch.testing.assert_close(scaled[0, :6], box[0, :6] * 1.05)
    torch.testing.assert_close(scaled[0, 7:], box[0, 7:] * 1.05)
    torch.testing.assert_close(mat[:3, :3], torch.eye(3) * 1.05)


@pytest.mark.parametrize('flip_dx,flip_dy', list(itertools.product([False, True], repeat=2)))
def test_matrix_moves_corners_like_the_boxes_and_inverts(flip_dx, flip_dy):
    """bda_mat applied to the original corners gives the augmented box's corners; its inverse returns the
    augmented centres to the originals."""
    original = _boxes()
    boxes, bda_mat = bev_transform(original, 17.3, 0.97, flip_dx, flip_dy)
    assert boxes.dtype == bda_mat.dtype == torch.float32 and bda_mat.shape == (4, 4)
    moved = _bev_corners(original) @ bda_mat[:2, :2].double().T
    expected = _bev_corners(boxes)
    for got, want in zip(moved, expected):  # same corner set (flips reverse the corner order)
        distance = torch.cdist(got, want)
        assert distance.min(dim=1).values.max() < 1e-3
    centres = torch.cat([boxes[:, :3], torch.ones(len(boxes), 1)], 1)
    restored = (torch.linalg.inv(bda_mat.double()) @ centres.double().T).T[:, :3]
    torch.testing.assert_close(restored.float(), original[:, :3], atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes[:, 3:6] / 0.97, original[:, 3:6])


def test_input_is_not_modified_and_empty_boxes_are_accepted():
    original = _boxes()
    copy = original.clone()
    bev_transform(original, 10.0, 1.02, True, True)
    torch.testing.assert_close(original, copy)
    boxes, bda_mat = bev_transform(np.zeros((0, 7), dtype=np.float32), 10.0, 1.0, True, False)
    assert boxes.shape == (0, 7)
    assert bda_mat[0, 0].item() == pytest.approx(-math.cos(math.radians(10)), abs=1e-6)
    with pytest.raises(ValueError, match=r'\(n, 9\)'):
        bev_transform(torch.zeros(2, 7), 0.0, 1.0, False, False)
