"""Quaternion algebra in NumPy for the training path (nuScenes stores rotations as [w, x, y, z] quaternions).

Same results as pyquaternion's ``rotation_matrix`` / ``inverse`` / ``*`` / ``yaw_pitch_roll[0]`` (checked in
tests/utils/test_geometry.py), so training needs neither pyquaternion nor the nuScenes devkit.
"""
import numpy as np

__all__ = ['quaternion_inverse', 'quaternion_multiply', 'quaternion_yaw', 'rotation_matrices', 'rotation_matrix']


def rotation_matrices(quaternions):
    """(n, 4) [w, x, y, z] quaternions (any non-zero norm) -> (n, 3, 3) rotation matrices of the normalised ones."""
    quaternions = np.asarray(quaternions, dtype=np.float64)
    w, x, y, z = (quaternions / np.linalg.norm(quaternions, axis=1, keepdims=True)).T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def rotation_matrix(quaternion):
    """(4,) [w, x, y, z] quaternion (any non-zero norm) -> (3, 3) rotation matrix of the normalised one."""
    return rotation_matrices(np.asarray(quaternion, dtype=np.float64)[None])[0]


def quaternion_inverse(quaternion):
    """(4,) -> (4,): conjugate / |q|^2 (a non-unit quaternion keeps its scale inverted, like pyquaternion)."""
    quaternion = np.asarray(quaternion, dtype=np.float64)
    return quaternion * np.array([1.0, -1.0, -1.0, -1.0]) / np.dot(quaternion, quaternion)


def quaternion_multiply(left, right):
    """Hamilton product ``left * right``: left (4,), right (4,) or (n, 4) -> the same shape as ``right``."""
    w0, x0, y0, z0 = np.asarray(left, dtype=np.float64)
    matrix = np.array([[w0, -x0, -y0, -z0], [x0, w0, -z0, y0], [y0, z0, w0, -x0], [z0, -y0, x0, w0]])
    return np.asarray(right, dtype=np.float64) @ matrix.T


def quaternion_yaw(quaternions):
    """(n, 4) -> (n,) yaw in radians, pyquaternion's ``yaw_pitch_roll[0]`` of the normalised quaternions."""
    quaternions = np.asarray(quaternions, dtype=np.float64)
    w, x, y, z = (quaternions / np.linalg.norm(quaternions, axis=1, keepdims=True)).T
    return np.arctan2(2 * (w * z - x * y), 1 - 2 * (y * y + z * z))
