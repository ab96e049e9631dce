"""CenterPoint heatmap targets: CornerNet Gaussian radius and Gaussian splatting (mmdet3d ``gaussian_radius``
and ``draw_heatmap_gaussian`` semantics).

``gaussian_radius`` and ``draw_heatmap_gaussian`` reproduce mmdet3d's functions (including its ``/ 2`` instead of
``/ (2a)`` in the three quadratic roots). ``draw_heatmap_gaussians`` draws many objects at once with a
scatter-max; since every object is merged with an element-wise max, the result is independent of drawing order
and identical to drawing them one by one.
"""
import functools

import numpy as np
import torch


def gaussian_radius(det_size, min_overlap=0.5):
    """CornerNet radius for a box of ``det_size = (height, width)`` in cells (floats or same-shape tensors).

    Returns the minimum of the three case radii (a tensor when the inputs are tensors).
    """
    height, width = det_size
    height = torch.as_tensor(height)
    width = torch.as_tensor(width, dtype=height.dtype, device=height.device)
    # The expressions keep mmdet3d's evaluation order so float32 results match bit for bit.
    a1 = 1
    b1 = (height + width)
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1**2 - 4 * a1 * c1)) / 2

    a2 = 4
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + torch.sqrt(b2**2 - 4 * a2 * c2)) / 2

    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + torch.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


@functools.lru_cache(maxsize=256)
def _gaussian_kernel_np(radius):
    """(2r+1, 2r+1) float32 Gaussian with sigma = (2r+1)/6, computed in float64 like mmdet3d's gaussian_2d."""
    diameter = 2 * radius + 1
    sigma = diameter / 6
    m = (diameter - 1.) / 2.
    y, x = np.ogrid[-m:m + 1, -m:m + 1]
    kernel = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    kernel[kernel < np.finfo(kernel.dtype).eps * kernel.max()] = 0
    return kernel.astype(np.float32)


def gaussian_kernel(radius, device=None):
    """(2r+1, 2r+1) float32 Gaussian kernel of integer ``radius`` on ``device``."""
    return torch.from_numpy(_gaussian_kernel_np(int(radius))).to(device)


def draw_heatmap_gaussian(heatmap, center, radius, k=1):
    """Max-merge one Gaussian of ``radius`` centred at integer ``center = (x, y)`` into ``heatmap (H, W)``.

    Clipped at the borders; modifies ``heatmap`` in place and returns it.
    """
    radius = int(radius)
    x, y = int(center[0]), int(center[1])
    height, width = heatmap.shape[0:2]
    left, right = min(x, radius), min(width - x, radius + 1)
    top, bottom = min(y, radius), min(height - y, radius + 1)
    masked_heatmap = heatmap[y - top:y + bottom, x - left:x + right]
    kernel = gaussian_kernel(radius, heatmap.device)
    masked_gaussian = kernel[radius - top:radius + bottom, radius - left:radius + right]
    if min(masked_gaussian.shape) > 0 and min(masked_heatmap.shape) > 0:
        torch.max(masked_heatmap, masked_gaussian.to(heatmap.dtype) * k, out=masked_heatmap)
    return heatmap


def draw_heatmap_gaussians(heatmap, class_ids, centers_int, radii):
    """Max-merge many Gaussians into ``heatmap (C, H, W)`` at once (in place; returns it).

    Args:
        class_ids: (n,) integer channel of each object.
        centers_int: (n, 2) integer (x, y) cell of each object, inside the map (callers filter first, as the
            reference does); the Gaussians are clipped at the borders like ``draw_heatmap_gaussian``.
        radii: (n,) integer radii.
    """
    if class_ids.numel() == 0:
        return heatmap
    num_classes, height, width = heatmap.shape
    device = heatmap.device
    radii_list = [int(r) for r in radii.tolist()]
    max_radius = max(radii_list)
    size = 2 * max_radius + 1
    # One zero-padded kernel per distinct radius, all centred in a (size, size) window.
    unique_radii = sorted(set(radii_list))
    kernels = torch.zeros(len(unique_radii), size, size, dtype=torch.float32)
    for slot, radius in enumerate(unique_radii):
        offset = max_radius - radius
        kernels[slot, offset:offset + 2 * radius + 1, offset:offset + 2 * radius + 1] = torch.from_numpy(
            _gaussian_kernel_np(radius))
    slot_of_radius = {radius: slot for slot, radius in enumerate(unique_radii)}
    kernel_slots = torch.tensor([slot_of_radius[r] for r in radii_list], device=device)
    values = kernels.to(device)[kernel_slots].to(heatmap.dtype)  # (n, size, size)

    offsets = torch.arange(-max_radius, max_radius + 1, device=device)
    centers_int = centers_int.to(device=device, dtype=torch.long)
    xs = centers_int[:, 0, None, None] + offsets[None, None, :]  # (n, 1, size)
    ys = centers_int[:, 1, None, None] + offsets[None, :, None]  # (n, size, 1)
    inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)  # (n, size, size)
    flat_index = (class_ids.to(device=device, dtype=torch.long)[:, None, None] * height + ys) * width + xs
    flat_heatmap = heatmap.view(-1)
    flat_heatmap.scatter_reduce_(0, flat_index[inside], values[inside], reduce='amax', include_self=True)
    return heatmap
