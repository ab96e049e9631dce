"""NumPy quaternion helpers against pyquaternion (installed for the tests; training does not need it)."""
import numpy as np
import pytest
from pyquaternion import Quaternion

from bevdepth.utils.geometry import (quaternion_inverse, quaternion_multiply, quaternion_yaw, rotation_matrices,
                                     rotation_matrix)


@pytest.fixture
def quaternions():
    rng = np.random.default_rng(0)
    quats = rng.normal(size=(50, 4))
    quats[:10] /= np.linalg.norm(quats[:10], axis=1, keepdims=True)  # unit ones as in the tables
    quats[10:20] *= 0.5  # and non-unit ones, like the mean of the cameras' ego rotations
    return quats


def test_rotation_matrices_equal_pyquaternion(quaternions):
    expected = np.stack([Quaternion(q).rotation_matrix for q in quaternions])
    np.testing.assert_allclose(rotation_matrices(quaternions), expected, atol=1e-12)
    np.testing.assert_allclose(rotation_matrix(list(quaternions[3])), expected[3], atol=1e-12)


def test_inverse_product_and_yaw_equal_pyquaternion(quaternions):
    left = quaternions[15]
    np.testing.assert_allclose(quaternion_inverse(left), Quaternion(left).inverse.elements, atol=1e-12)
    products = quaternion_multiply(left, quaternions)
    expected = np.stack([(Quaternion(left) * Quaternion(q)).elements for q in quaternions])
    np.testing.assert_allclose(products, expected, atol=1e-12)
    yaws = np.array([Quaternion(q).yaw_pitch_roll[0] for q in products])
    np.testing.assert_allclose(quaternion_yaw(products), yaws, atol=1e-12)
