"""LiDAR -> camera projection (upstream ``map_pointcloud_to_image``) against the devkit's own map_pointcloud_to_image
and a direct pyquaternion re-derivation, on real and synthetic data."""
import pickle

import numpy as np
import pytest
from pyquaternion import Quaternion

from bevdepth.datasets.depth_projection import (lidar_points_in_camera, load_lidar_points, project_lidar_to_image,
                                                quaternion_to_matrix, record_to_matrix, rigid_inverse, visible_mask)
from bevdepth.datasets.errors import DataError
from bevdepth.datasets.info_builder import build_infos

CAMERAS = ('CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_BACK_RIGHT', 'CAM_BACK', 'CAM_BACK_LEFT', 'CAM_FRONT_LEFT')


def pyquaternion_chain(points, lidar_info, cam_info):
    """The devkit's step-by-step chain with pyquaternion rotation matrices (float64): (N, 3) [u, v, depth]."""
    xyz = points[:, :3].T.astype(np.float64)
    for record, inverse in ((lidar_info['calibrated_sensor'], False), (lidar_info['ego_pose'], False),
                            (cam_info['ego_pose'], True), (cam_info['calibrated_sensor'], True)):
        rotation = Quaternion(record['rotation']).rotation_matrix
        translation = np.array(record['translation'])[:, None]
        xyz = rotation.T @ (xyz - translation) if inverse else rotation @ xyz + translation
    intrinsic = np.array(cam_info['calibrated_sensor']['camera_intrinsic'])
    pixels = intrinsic @ xyz
    return np.stack([pixels[0] / pixels[2], pixels[1] / pixels[2], xyz[2]], axis=1)


def compare_with_devkit(nusc, sample, points_path):
    from nuscenes.nuscenes import NuScenesExplorer

    (info,) = [i for i in build_infos(nusc, [nusc.get('scene', sample['scene_token'])['name']])
               if i['sample_token'] == sample['token']]
    points = load_lidar_points(points_path)
    explorer = NuScenesExplorer(nusc)
    total = 0
    for cam in CAMERAS:
        cam_info = info['cam_infos'][cam]
        ours = project_lidar_to_image(points, info['lidar_infos']['LIDAR_TOP'], cam_info,
                                      (cam_info['width'], cam_info['height']))
        assert ours.dtype == np.float32 and ours.shape[1] == 3
        # The devkit itself (float32 cloud, one transform at a time, min_dist 0 = the reference's depth > 0).
        devkit_uv, devkit_depth, _ = explorer.map_pointcloud_to_image(sample['data']['LIDAR_TOP'],
                                                                      sample['data'][cam], min_dist=0.0)
        # Its float32 global coordinates (~1000 m, ulp 6e-5..1.2e-4 m) cost it up to ~2e-4 m of position, i.e.
        # f * 2e-4 / depth pixels (1 px for the real ego-body returns a few cm in front of a camera).
        assert len(ours) == devkit_uv.shape[1]
        tolerance = 0.01 + 1300 * 2.5e-4 / devkit_depth
        assert np.all(np.abs(ours[:, 0] - devkit_uv[0]) < tolerance)
        assert np.all(np.abs(ours[:, 1] - devkit_uv[1]) < tolerance)
        np.testing.assert_allclose(ours[:, 2], devkit_depth, atol=2e-4)
        # A float64 pyquaternion re-derivation agrees far more tightly (same maths, no float32 steps).
        everything = lidar_points_in_camera(points, info['lidar_infos']['LIDAR_TOP'], cam_info)
        direct = pyquaternion_chain(points, info['lidar_infos']['LIDAR_TOP'], cam_info)
        in_front = direct[:, 2] > 0.5
        np.testing.assert_allclose(everything[in_front], direct[in_front], rtol=1e-9, atol=1e-6)
        total += len(ours)
    return total


def test_matches_devkit_on_real_lidar(real_mini_dataroot):
    from nuscenes.nuscenes import NuScenes

    nusc = NuScenes('v1.0-mini', str(real_mini_dataroot), verbose=False)
    sample = nusc.sample[0]
    path = real_mini_dataroot / nusc.get('sample_data', sample['data']['LIDAR_TOP'])['filename']
    total = compare_with_devkit(nusc, sample, path)
    assert total > 5000  # the real 34,688-point sweep covers every camera


def test_matches_devkit_on_synthetic_data(synthetic_dataroot):
    from nuscenes.nuscenes import NuScenes

    nusc = NuScenes('v1.0-mini', str(synthetic_dataroot), verbose=False)
    for sample in (nusc.sample[1], nusc.sample[-1]):
        path = synthetic_dataroot / nusc.get('sample_data', sample['data']['LIDAR_TOP'])['filename']
        assert compare_with_devkit(nusc, sample, path) > 1000


def test_quaternion_to_matrix_equals_pyquaternion():
    rng = np.random.default_rng(0)
    for q in rng.normal(size=(20, 4)):
        np.testing.assert_allclose(quaternion_to_matrix(q), Quaternion(q / np.linalg.norm(q)).rotation_matrix,
                                   atol=1e-12)


def identity_infos(intrinsic):
    identity = dict(rotation=[1.0, 0.0, 0.0, 0.0], translation=[0.0, 0.0, 0.0])
    lidar = dict(calibrated_sensor=identity, ego_pose=identity)
    cam = dict(calibrated_sensor=dict(identity, camera_intrinsic=intrinsic), ego_pose=identity)
    return lidar, cam


def test_filter_is_strict_one_pixel_margin_and_positive_depth():
    lidar, cam = identity_infos([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # With identity K and camera = LiDAR frame, (x, y, z) projects to (x/z, y/z) at depth z.
    points = np.array([[1.0, 2.5, 1.0, 0], [1.001, 2.5, 1.0, 0], [8.999, 2.5, 1.0, 0], [9.0, 2.5, 1.0, 0],
                       [5.0, 1.0, 1.0, 0], [5.0, 1.001, 1.0, 0], [5.0, 3.999, 1.0, 0], [5.0, 4.0, 1.0, 0],
                       [-5.0, -2.5, -1.0, 0], [10.0, 5.0, 2.0, 0]], dtype=np.float32)
    out = project_lidar_to_image(points, lidar, cam, image_size=(10, 5))  # keeps 1 < u < 9, 1 < v < 4, z > 0
    np.testing.assert_allclose(out, [[1.001, 2.5, 1.0], [8.999, 2.5, 1.0], [5.0, 1.001, 1.0], [5.0, 3.999, 1.0],
                                     [5.0, 2.5, 2.0]], rtol=1e-6)
    assert visible_mask(np.array([[5.0, 2.0, 0.0]]), (10, 5)).tolist() == [False]  # depth 0 is dropped


def test_load_lidar_points_shapes_and_errors(tmp_path):
    cloud = np.arange(20 * 5, dtype=np.float32).reshape(20, 5)
    path = tmp_path / 'x.pcd.bin'
    cloud.tofile(path)
    points = load_lidar_points(path)
    assert points.dtype == np.float32 and points.shape == (20, 4)
    np.testing.assert_array_equal(points, cloud[:, :4])
    with pytest.raises(DataError, match=r'LiDAR file .*missing\.pcd\.bin does not exist'):
        load_lidar_points(tmp_path / 'missing.pcd.bin')
    (tmp_path / 'cut.pcd.bin').write_bytes(cloud.tobytes()[:-8])
    with pytest.raises(DataError, match=r'cut\.pcd\.bin is corrupt: its size 392 bytes is not a multiple of 20'):
        load_lidar_points(tmp_path / 'cut.pcd.bin')


def test_bevdepth_fixture_boxes_project_into_real_cameras(bevdepth_fixture_dir):
    """Real calibration from the reference infos: a real annotation centre (global) projects inside its image,
    through the same matrices (the LiDAR info supplies the global frame)."""
    with open(bevdepth_fixture_dir / 'infos.pkl', 'rb') as f:
        info = pickle.load(f)[0]
    lidar_info = info['lidar_infos']['LIDAR_TOP']
    global_to_lidar = rigid_inverse(record_to_matrix(lidar_info['ego_pose'])
                                    @ record_to_matrix(lidar_info['calibrated_sensor']))
    centers = np.array([ann['translation'] for ann in info['ann_infos']])
    in_lidar = centers @ global_to_lidar[:3, :3].T + global_to_lidar[:3, 3]
    seen = 0
    for cam in CAMERAS:
        cam_info = info['cam_infos'][cam]
        seen += len(project_lidar_to_image(in_lidar, lidar_info, cam_info, (1600, 900)))
    assert seen >= len(centers) // 2
