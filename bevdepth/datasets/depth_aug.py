"""Depth-map ground truth under the image augmentation (upstream ``depth_transform`` in
``bevdepth/datasets/nusc_det_dataset.py``)."""
import numpy as np

# The reference casts pixel coordinates to int16; a value beyond this would wrap around into the image.
_INT16_SAFE = 32767


def depth_transform(points, resize, resize_dims, crop, flip, rotate, final_dim):
    """Scatter projected LiDAR points into the augmented image's (fH, fW) depth map.

    Same arithmetic and order as the reference (float32 coordinates): scale by ``resize``, subtract the
    crop origin, flip u -> fW - u, rotate about (fW / 2, fH / 2) with [[cos, sin], [-sin, cos]], truncate
    to int16 (towards zero, so -1 < u < 0 still lands in column 0), keep 0 <= u < fW and 0 <= v < fH, write
    the depth; when several points hit one pixel the last one in input order wins.

    Args:
        points (numpy.ndarray): (M, 3) [u, v, depth] in original-image pixels (not modified).
        resize (float), crop (x1, y1, x2, y2), flip (bool), rotate (degrees): the camera's ida sample.
        resize_dims (newW, newH): the resized image size; not needed by the maths (the reference passed
            final_dim in this position), accepted so the call mirrors the image pipeline's.
        final_dim (fH, fW): network input size.

    Returns:
        numpy.ndarray: (fH, fW) float32 depth map, 0 where no point landed.
    """
    fH, fW = final_dim
    depth_map = np.zeros((fH, fW), dtype=np.float32)
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f'depth points must be an (M, 3) [u, v, depth] array, got shape {points.shape}')
    if len(points) == 0:
        return depth_map
    coords = points[:, :2].astype(np.float32) * np.float32(resize)
    coords[:, 0] -= crop[0]
    coords[:, 1] -= crop[1]
    if flip:
        coords[:, 0] = fW - coords[:, 0]
    coords[:, 0] -= fW / 2.0
    coords[:, 1] -= fH / 2.0
    angle = rotate / 180 * np.pi
    rot_matrix = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    # float64 product written back into float32, as the reference's in-place assignment does.
    coords[:, :] = np.matmul(rot_matrix, coords.T).T
    coords[:, 0] += fW / 2.0
    coords[:, 1] += fH / 2.0
    # Drop far-off points before the int16 cast (the reference would wrap them around; never happens for
    # points projected inside the image).
    in_int16 = (np.abs(coords) < _INT16_SAFE).all(axis=1)
    coords, depths = coords[in_int16], points[in_int16, 2].astype(np.float32)
    pixel = coords.astype(np.int16).astype(np.int64)
    valid = (pixel[:, 1] < fH) & (pixel[:, 0] < fW) & (pixel[:, 1] >= 0) & (pixel[:, 0] >= 0)
    pixel, depths = pixel[valid], depths[valid]
    flat = pixel[:, 1] * fW + pixel[:, 0]
    # Last write wins, made explicit: the first occurrence in the reversed order is the last one.
    _, first_in_reversed = np.unique(flat[::-1], return_index=True)
    last = len(flat) - 1 - first_in_reversed
    depth_map.reshape(-1)[flat[last]] = depths[last]
    return depth_map
