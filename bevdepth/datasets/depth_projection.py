"""LiDAR -> camera projection for depth GT (upstream ``map_pointcloud_to_image`` in
``bevdepth/datasets/nusc_det_dataset.py``), vectorised numpy.

The chain is the devkit's ``map_pointcloud_to_image``: lidar -> ego (lidar calibrated_sensor) -> global (lidar
ego_pose) -> ego at the camera's timestamp (inverse camera ego_pose) -> camera (inverse camera
calibrated_sensor) -> ``view_points(K, normalize=True)``. The devkit applies five rotations/translations to a
float32 cloud one after the other; here the four rigid transforms are composed once into a float64 4x4 matrix
and applied to float64 points, so the result is the devkit's up to its float32 rounding (~1e-3 px).

``lidar_info`` / ``cam_info`` are the info dicts written by ``info_builder`` (each holds the full
``calibrated_sensor`` and ``ego_pose`` records, rotations as [w, x, y, z] quaternions).
"""
import os

import numpy as np

from bevdepth.datasets.errors import DataError

# A point must lie strictly inside the image with a one-pixel margin, as in the reference.
PIXEL_MARGIN = 1.0


def quaternion_to_matrix(quaternion):
    """[w, x, y, z] (any norm) -> (3, 3) float64 rotation matrix."""
    w, x, y, z = np.asarray(quaternion, dtype=np.float64) / np.linalg.norm(quaternion)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def record_to_matrix(record):
    """A calibrated_sensor or ego_pose record -> (4, 4) float64 child->parent transform."""
    mat = np.eye(4)
    mat[:3, :3] = quaternion_to_matrix(record['rotation'])
    mat[:3, 3] = np.asarray(record['translation'], dtype=np.float64)
    return mat


def rigid_inverse(mat):
    """Inverse of a (4, 4) rigid transform without a general matrix inverse."""
    inv = np.eye(4)
    inv[:3, :3] = mat[:3, :3].T
    inv[:3, 3] = -mat[:3, :3].T @ mat[:3, 3]
    return inv


def lidar_to_camera_matrix(lidar_info, cam_info):
    """(4, 4) float64 transform taking LiDAR-frame points to the camera frame (x right, y down, z forward)."""
    lidar_to_global = record_to_matrix(lidar_info['ego_pose']) @ record_to_matrix(lidar_info['calibrated_sensor'])
    global_to_cam = (rigid_inverse(record_to_matrix(cam_info['calibrated_sensor']))
                     @ rigid_inverse(record_to_matrix(cam_info['ego_pose'])))
    return global_to_cam @ lidar_to_global


def load_lidar_points(path):
    """Read a nuScenes ``.pcd.bin`` (float32 rows x, y, z, intensity, ring) -> float32 (N, 4) without the ring."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f'LiDAR file {path} does not exist: extract the nuScenes LiDAR blobs (samples/LIDAR_TOP) '
                        f'into the dataroot')
    size = os.path.getsize(path)
    if size % (5 * 4):
        raise DataError(f'LiDAR file {path} is corrupt: its size {size} bytes is not a multiple of 20 (5 float32 '
                        f'per point); re-extract it from the nuScenes archive')
    return np.fromfile(path, dtype=np.float32).reshape(-1, 5)[:, :4].copy()


def lidar_points_in_camera(points, lidar_info, cam_info):
    """All points in the camera, unfiltered: (N, 3) float64 [u, v, depth] (u, v = x/z, y/z after K).

    ``points``: (N, >=3) LiDAR-frame points. Points behind the camera get meaningless u, v; callers filter.
    """
    xyz = np.asarray(points)[:, :3].astype(np.float64)
    mat = lidar_to_camera_matrix(lidar_info, cam_info)
    cam = xyz @ mat[:3, :3].T + mat[:3, 3]
    intrinsic = np.asarray(cam_info['calibrated_sensor']['camera_intrinsic'], dtype=np.float64)
    pixels = cam @ intrinsic.T
    depth = cam[:, 2]
    with np.errstate(divide='ignore', invalid='ignore'):
        u = pixels[:, 0] / pixels[:, 2]
        v = pixels[:, 1] / pixels[:, 2]
    return np.stack([u, v, depth], axis=1)


def visible_mask(uvd, image_size):
    """Reference filter on (N, 3) [u, v, depth]: depth > 0 and 1 < u < W - 1 and 1 < v < H - 1."""
    width, height = image_size
    u, v, depth = uvd[:, 0], uvd[:, 1], uvd[:, 2]
    return ((depth > 0) & (u > PIXEL_MARGIN) & (u < width - PIXEL_MARGIN)
            & (v > PIXEL_MARGIN) & (v < height - PIXEL_MARGIN))


def project_lidar_to_image(points, lidar_info, cam_info, image_size):
    """LiDAR points visible in one camera: float32 (M, 3) rows [u, v, depth] in original pixels.

    ``points``: (N, >=3) LiDAR-frame points (``load_lidar_points``); ``image_size``: (W, H) of the image.
    """
    uvd = lidar_points_in_camera(points, lidar_info, cam_info)
    return uvd[visible_mask(uvd, image_size)].astype(np.float32)
