"""gen_info: info format of upstream ``scripts/gen_info.py`` for every sample, sweep fixes, splits and errors."""
import json
import pathlib
import pickle
import shutil

import numpy as np
import pytest

from bevdepth.datasets.errors import DataError
from bevdepth.datasets.info_builder import CAMERA_NAMES, build_infos, write_infos

INFO_KEYS = ['sample_token', 'timestamp', 'scene_token', 'cam_infos', 'lidar_infos', 'cam_sweeps', 'lidar_sweeps',
             'ann_infos']
CAM_KEYS = ['sample_token', 'ego_pose', 'timestamp', 'is_key_frame', 'height', 'width', 'filename',
            'calibrated_sensor']
LIDAR_KEY_KEYS = ['sample_token', 'ego_pose', 'timestamp', 'filename', 'calibrated_sensor']
LIDAR_SWEEP_KEYS = ['sample_token', 'ego_pose', 'timestamp', 'is_key_frame', 'filename', 'calibrated_sensor']
ANN_KEYS = {'token', 'sample_token', 'instance_token', 'visibility_token', 'attribute_tokens', 'translation', 'size',
            'rotation', 'prev', 'next', 'num_lidar_pts', 'num_radar_pts', 'category_name', 'velocity'}
LIDAR_SENSOR_TOKEN = 'dc8b396651c05aedbb9cdaae573bb567'


@pytest.fixture(scope='module')
def nusc(synthetic_dataroot):
    from nuscenes.nuscenes import NuScenes
    return NuScenes('v1.0-mini', str(synthetic_dataroot), verbose=False)


@pytest.fixture(scope='module')
def infos(synthetic_dataroot):
    with open(synthetic_dataroot / 'nuscenes_infos_train.pkl', 'rb') as f:
        train = pickle.load(f)
    with open(synthetic_dataroot / 'nuscenes_infos_val.pkl', 'rb') as f:
        val = pickle.load(f)
    return dict(train=train, val=val)


def test_every_sample_has_exactly_the_reference_keys(infos, nusc):
    from nuscenes.utils.splits import mini_train, mini_val

    marker = json.loads((pathlib.Path(nusc.dataroot) / 'synthetic_nuscenes.json').read_text())
    for split, names, scenes in (('train', mini_train, marker['train_scenes']),
                                 ('val', mini_val, marker['val_scenes'])):
        split_infos = infos[split]
        expected = [s['token'] for s in nusc.sample if nusc.get('scene', s['scene_token'])['name'] in names]
        assert [info['sample_token'] for info in split_infos] == expected
        assert len(split_infos) == 6 * len(scenes)
        for info in split_infos:
            assert list(info) == INFO_KEYS
            assert list(info['cam_infos']) == list(CAMERA_NAMES)
            for cam_info in info['cam_infos'].values():
                assert list(cam_info) == CAM_KEYS and cam_info['is_key_frame']
                assert (cam_info['width'], cam_info['height']) == (1600, 900)
                assert len(cam_info['calibrated_sensor']['camera_intrinsic']) == 3
                assert set(cam_info['ego_pose']) == {'token', 'timestamp', 'rotation', 'translation'}
            lidar = info['lidar_infos']['LIDAR_TOP']
            assert list(info['lidar_infos']) == ['LIDAR_TOP'] and list(lidar) == LIDAR_KEY_KEYS
            assert lidar['calibrated_sensor']['camera_intrinsic'] == []
            assert lidar['timestamp'] == info['timestamp']
            sample = nusc.get('sample', info['sample_token'])
            assert [ann['token'] for ann in info['ann_infos']] == sample['anns']
            for ann in info['ann_infos']:
                assert set(ann) == ANN_KEYS and ann['velocity'].shape == (3,)
                assert np.allclose(ann['velocity'], nusc.box_velocity(ann['token']))


def test_samples_are_in_scene_then_time_order(infos):
    for split_infos in infos.values():
        for prev, cur in zip(split_infos, split_infos[1:]):
            if prev['scene_token'] == cur['scene_token']:
                assert cur['timestamp'] - prev['timestamp'] == 500000


def test_sweeps_carry_their_own_ego_pose_and_calibration(infos, nusc):
    for info in infos['train'] + infos['val']:
        sample = nusc.get('sample', info['sample_token'])
        first = not sample['prev']
        assert len(info['lidar_sweeps']) == (0 if first else 2)
        assert len(info['cam_sweeps']) == (0 if first else 1)
        for level, sweep in enumerate(info['lidar_sweeps']):
            entry = sweep['LIDAR_TOP']
            assert list(entry) == LIDAR_SWEEP_KEYS and not entry['is_key_frame']
            assert entry['filename'].startswith('sweeps/LIDAR_TOP/')
            assert entry['timestamp'] == info['timestamp'] - 50000 * (level + 1)  # newest first
            # The reference took the last camera's calibrated_sensor here.
            assert entry['calibrated_sensor']['sensor_token'] == LIDAR_SENSOR_TOKEN
            assert entry['ego_pose']['timestamp'] == entry['timestamp']
        for sweep in info['cam_sweeps']:
            assert list(sweep) == list(CAMERA_NAMES)
            for cam, entry in sweep.items():
                key = info['cam_infos'][cam]
                assert list(entry) == CAM_KEYS and not entry['is_key_frame']
                assert entry['sample_token'] == info['sample_token'] and entry['timestamp'] < key['timestamp']
                # Own pose (the reference reused the key camera's ego pose) and own calibration record.
                assert entry['ego_pose']['timestamp'] == entry['timestamp']
                assert entry['ego_pose']['token'] != key['ego_pose']['token']
                assert entry['ego_pose']['translation'] != key['ego_pose']['translation']
                assert entry['calibrated_sensor']['sensor_token'] == key['calibrated_sensor']['sensor_token']
                record = nusc.get('sample_data', nusc.get('sample', info['sample_token'])['data'][cam])
                sweep_record = nusc.get('sample_data', record['prev'])
                assert entry['ego_pose']['token'] == sweep_record['ego_pose_token']
                assert entry['calibrated_sensor']['token'] == sweep_record['calibrated_sensor_token']


def test_write_infos_is_atomic_and_returns_paths(synthetic_dataroot, nusc, tmp_path):
    paths = write_infos(synthetic_dataroot, version='v1.0-mini', out_dir=tmp_path, nusc=nusc, progress=False)
    assert paths == [str(tmp_path / 'nuscenes_infos_train.pkl'), str(tmp_path / 'nuscenes_infos_val.pkl')]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['nuscenes_infos_train.pkl', 'nuscenes_infos_val.pkl']
    with open(paths[1], 'rb') as f, open(synthetic_dataroot / 'nuscenes_infos_val.pkl', 'rb') as g:
        assert pickle.load(f)[0]['sample_token'] == pickle.load(g)[0]['sample_token']


def test_test_version_infos_have_no_annotations(synthetic_dataroot, tmp_path):
    """A v1.0-test dataroot (here the synthetic tables under v1.0-test) gives infos without ann_infos."""
    from nuscenes.nuscenes import NuScenes

    shutil.copytree(synthetic_dataroot / 'v1.0-mini', tmp_path / 'v1.0-test')
    (tmp_path / 'maps').symlink_to(synthetic_dataroot / 'maps')
    nusc = NuScenes('v1.0-test', str(tmp_path), verbose=False)
    test_infos = build_infos(nusc, ['scene-0103'])
    assert len(test_infos) == 6 and all('ann_infos' not in info for info in test_infos)
    assert list(test_infos[0]) == INFO_KEYS[:-1]
    # scene-0103 is not a test-split scene, so the test pkl is written and empty.
    paths = write_infos(tmp_path, version='v1.0-test', nusc=nusc, progress=False)
    assert paths == [str(tmp_path / 'nuscenes_infos_test.pkl')]
    with open(paths[0], 'rb') as f:
        assert pickle.load(f) == []


@pytest.mark.parametrize('case, message', [
    ('missing_root', r'dataroot .*missing.* does not exist: pass --dataroot'),
    ('missing_version', r'has no v1.0-trainval/ folder of tables'),
    ('bad_version', r"unknown nuScenes version 'v2.0'"),
])
def test_bad_dataroot_or_version_is_a_clear_error(tmp_path, case, message):
    root, version = tmp_path, 'v1.0-trainval'
    if case == 'missing_root':
        root = tmp_path / 'missing'
    elif case == 'bad_version':
        version = 'v2.0'
    with pytest.raises(DataError, match=message):
        write_infos(root, version=version)


def test_real_dataroot_matches_the_reference_info_layout(real_mini_dataroot, bevdepth_fixture_dir, tmp_path):
    """Real scene-0061 key frame -> same key layout as the reference's own infos.pkl; NaN velocity -> zeros."""
    paths = write_infos(real_mini_dataroot, version='v1.0-mini', out_dir=tmp_path, progress=False)
    with open(paths[0], 'rb') as f:
        (info,) = pickle.load(f)
    with open(bevdepth_fixture_dir / 'infos.pkl', 'rb') as f:
        reference = pickle.load(f)[0]
    assert list(info) == list(reference)
    assert list(info['cam_infos']) == list(reference['cam_infos'])
    for cam in CAMERA_NAMES:
        assert list(info['cam_infos'][cam]) == list(reference['cam_infos'][cam])
    assert list(info['lidar_infos']['LIDAR_TOP']) == list(reference['lidar_infos']['LIDAR_TOP'])
    assert set(info['ann_infos'][0]) == set(reference['ann_infos'][0])
    assert info['cam_sweeps'] == [] and info['lidar_sweeps'] == []
    assert len(info['ann_infos']) == 68
    assert all(np.array_equal(ann['velocity'], np.zeros(3)) for ann in info['ann_infos'])  # single annotations
