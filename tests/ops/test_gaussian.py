"""Gaussian radius and heatmap splatting against straight numpy transcriptions of the mmdet3d functions."""
import math

import numpy as np
import pytest
import torch

from bevdepth.ops.gaussian import (draw_heatmap_gaussian, draw_heatmap_gaussians, gaussian_kernel,
                                   gaussian_radius)


def _numpy_radius(height, width, min_overlap):
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1**2 - 4 * c1)) / 2
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2**2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def _numpy_draw(heatmap, center, radius):
    diameter = 2 * radius + 1
    sigma = diameter / 6
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    gaussian = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    cx, cy = center
    height, width = heatmap.shape
    left, right = min(cx, radius), min(width - cx, radius + 1)
    top, bottom = min(cy, radius), min(height - cy, radius + 1)
    window = heatmap[cy - top:cy + bottom, cx - left:cx + right]
    patch = gaussian[radius - top:radius + bottom, radius - left:radius + right].astype(np.float32)
    np.maximum(window, patch, out=window)
    return heatmap


@pytest.mark.parametrize('size', [(5.6, 2.4), (1.0, 1.0), (25.0, 3.1), (0.3, 0.2)])
def test_gaussian_radius_matches_formula(size):
    expected = _numpy_radius(size[0], size[1], 0.1)
    got = gaussian_radius((torch.tensor(size[0]), torch.tensor(size[1])), min_overlap=0.1)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # Vectorised over many boxes gives the same as one by one.
    many = gaussian_radius((torch.tensor([size[0], 2.0]), torch.tensor([size[1], 3.0])), min_overlap=0.1)
    assert many[0].item() == got.item()


def test_radius_of_typical_car_on_reference_grid():
    # A 4.6 m x 1.9 m car on 0.8 m cells: 5.75 x 2.375 cells -> int radius 1, raised to min_radius 2 by the head.
    radius = gaussian_radius((torch.tensor(1.9 / 0.8), torch.tensor(4.6 / 0.8)), min_overlap=0.1)
    assert int(radius) == 1


def test_kernel_values():
    kernel = gaussian_kernel(2)
    assert kernel.shape == (5, 5) and kernel.dtype == torch.float32
    assert kernel[2, 2] == 1.0
    sigma = 5 / 6
    assert kernel[2, 4].item() == pytest.approx(math.exp(-4 / (2 * sigma * sigma)), rel=1e-6)
    torch.testing.assert_close(kernel, kernel.T)


@pytest.mark.parametrize('center,radius', [((10, 7), 3), ((0, 0), 2), ((19, 14), 4), ((1, 13), 5)])
def test_draw_single_matches_reference_with_border_clipping(center, radius):
    heatmap = torch.zeros(15, 20)
    heatmap[5, 5] = 0.9
    expected = _numpy_draw(heatmap.numpy().copy(), center, radius)
    draw_heatmap_gaussian(heatmap, torch.tensor(center, dtype=torch.int32), radius)
    assert torch.equal(heatmap, torch.from_numpy(expected))
    assert heatmap[center[1], center[0]] == 1.0


def test_vectorised_drawing_equals_sequential_drawing():
    torch.manual_seed(0)
    num = 40
    class_ids = torch.randint(0, 3, (num,))
    centers = torch.stack([torch.randint(0, 32, (num,)), torch.randint(0, 24, (num,))], dim=1)
    radii = torch.randint(0, 7, (num,))
    sequential = torch.zeros(3, 24, 32)
    for cls, center, radius in zip(class_ids, centers, radii):
        draw_heatmap_gaussian(sequential[cls], center, int(radius))
    vectorised = draw_heatmap_gaussians(torch.zeros(3, 24, 32), class_ids, centers, radii)
    assert torch.equal(vectorised, sequential)
    # Empty input leaves the map unchanged.
    empty = torch.zeros(1, 4, 4)
    draw_heatmap_gaussians(empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, 2), torch.zeros(0))
    assert torch.count_nonzero(empty) == 0
