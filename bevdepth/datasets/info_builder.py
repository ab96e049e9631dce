"""nuScenes tables -> BEVDepth info files (``nuscenes_infos_{train,val,test}.pkl``, upstream
``scripts/gen_info.py``).

One info dict per key-frame sample, scene by scene in ``nusc.scene`` order and in time order within a scene,
with exactly the reference keys: ``sample_token``, ``timestamp``, ``scene_token``, ``cam_infos``,
``lidar_infos``, ``cam_sweeps``, ``lidar_sweeps`` and (not for v1.0-test) ``ann_infos``.

Deliberate difference from the reference gen_info (sweeps only): the reference gives every camera sweep the
key camera's ego_pose and calibrated_sensor, and every LiDAR sweep the last camera's calibrated_sensor
(BEVDepth issues #143 / #176). Here each sweep carries its *own* ego_pose and calibrated_sensor. Key-frame
entries are identical to the reference, and the MatrixVT experiment uses no sweeps, so its results do not
change.
"""
import os

import numpy as np

from bevdepth.datasets.errors import DataError
from bevdepth.utils.io import atomic_pickle_dump

# The reference's camera order (dict insertion order of cam_infos).
CAMERA_NAMES = ('CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_BACK_RIGHT', 'CAM_BACK', 'CAM_BACK_LEFT', 'CAM_FRONT_LEFT')
LIDAR_NAME = 'LIDAR_TOP'
MAX_CAM_SWEEPS = 6
MAX_LIDAR_SWEEPS = 10
VERSIONS = ('v1.0-trainval', 'v1.0-mini', 'v1.0-test')


def split_scene_names(version):
    """{output split name: scene names} for a nuScenes version (devkit splits)."""
    from nuscenes.utils import splits

    if version == 'v1.0-trainval':
        return {'train': splits.train, 'val': splits.val}
    if version == 'v1.0-mini':
        return {'train': splits.mini_train, 'val': splits.mini_val}
    if version == 'v1.0-test':
        return {'test': splits.test}
    raise DataError(f'unknown nuScenes version {version!r}: use one of {", ".join(VERSIONS)}')


def _camera_entry(nusc, sample_data):
    """Info dict of one camera sample_data record, with its own ego pose and calibration."""
    return dict(sample_token=sample_data['sample_token'],
                ego_pose=nusc.get('ego_pose', sample_data['ego_pose_token']),
                timestamp=sample_data['timestamp'], is_key_frame=sample_data['is_key_frame'],
                height=sample_data['height'], width=sample_data['width'], filename=sample_data['filename'],
                calibrated_sensor=nusc.get('calibrated_sensor', sample_data['calibrated_sensor_token']))


def _lidar_entry(nusc, sample_data, with_key_flag):
    """Info dict of one LiDAR sample_data record (the key frame has no is_key_frame, as the reference)."""
    entry = dict(sample_token=sample_data['sample_token'],
                 ego_pose=nusc.get('ego_pose', sample_data['ego_pose_token']),
                 timestamp=sample_data['timestamp'])
    if with_key_flag:
        entry['is_key_frame'] = sample_data['is_key_frame']
    entry['filename'] = sample_data['filename']
    entry['calibrated_sensor'] = nusc.get('calibrated_sensor', sample_data['calibrated_sensor_token'])
    return entry


def _previous_same_sample(nusc, sample_data):
    """The previous sample_data of the channel if it still belongs to the same sample (a sweep), else None."""
    if not sample_data['prev']:
        return None
    prev = nusc.get('sample_data', sample_data['prev'])
    return prev if prev['sample_token'] == sample_data['sample_token'] else None


def build_sample_info(nusc, sample, with_annotations=True):
    """The info dict of one sample record."""
    info = dict(sample_token=sample['token'], timestamp=sample['timestamp'], scene_token=sample['scene_token'])
    cam_infos, cam_sweeps = {}, []
    for cam in CAMERA_NAMES:
        key = nusc.get('sample_data', sample['data'][cam])
        cam_infos[cam] = _camera_entry(nusc, key)
        # Walk back through this camera's sweeps; level i of cam_sweeps holds each camera's i-th sweep.
        sweep, level = _previous_same_sample(nusc, key), 0
        while sweep is not None and level < MAX_CAM_SWEEPS:
            if level == len(cam_sweeps):
                cam_sweeps.append({})
            cam_sweeps[level][cam] = _camera_entry(nusc, sweep)
            sweep, level = _previous_same_sample(nusc, sweep), level + 1
    lidar_key = nusc.get('sample_data', sample['data'][LIDAR_NAME])
    lidar_sweeps = []
    sweep = _previous_same_sample(nusc, lidar_key)
    while sweep is not None and len(lidar_sweeps) < MAX_LIDAR_SWEEPS:
        lidar_sweeps.append({LIDAR_NAME: _lidar_entry(nusc, sweep, with_key_flag=True)})
        sweep = _previous_same_sample(nusc, sweep)
    info['cam_infos'] = cam_infos
    info['lidar_infos'] = {LIDAR_NAME: _lidar_entry(nusc, lidar_key, with_key_flag=False)}
    info['cam_sweeps'] = cam_sweeps
    info['lidar_sweeps'] = lidar_sweeps
    if with_annotations:
        ann_infos = []
        for ann_token in sample['anns']:
            ann = dict(nusc.get('sample_annotation', ann_token))
            velocity = nusc.box_velocity(ann_token)
            ann['velocity'] = np.zeros(3) if np.any(np.isnan(velocity)) else velocity
            ann_infos.append(ann)
        info['ann_infos'] = ann_infos
    return info


def build_infos(nusc, scene_names, with_annotations=None, progress=False):
    """Info dicts of every sample of the scenes of ``nusc`` whose name is in ``scene_names``.

    ``with_annotations`` defaults to "not a test version" (v1.0-test infos have no ``ann_infos``).
    """
    if with_annotations is None:
        with_annotations = not nusc.version.endswith('test')
    wanted = set(scene_names)
    scenes = [scene for scene in nusc.scene if scene['name'] in wanted]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(scene['nbr_samples'] for scene in scenes), desc='gen_info', unit='sample')
    infos = []
    for scene in scenes:
        token = scene['first_sample_token']
        while token:
            sample = nusc.get('sample', token)
            infos.append(build_sample_info(nusc, sample, with_annotations))
            if bar is not None:
                bar.update(1)
            token = sample['next']
    if bar is not None:
        bar.close()
    return infos


def check_dataroot(dataroot, version):
    """Clear errors for a missing dataroot, an unknown version or a missing version folder."""
    if version not in VERSIONS:
        raise DataError(f'unknown nuScenes version {version!r}: use one of {", ".join(VERSIONS)}')
    if not os.path.isdir(dataroot):
        raise DataError(f'nuScenes dataroot {dataroot} does not exist: pass --dataroot of the extracted dataset '
                        f'(the folder holding samples/, sweeps/, maps/ and {version}/)')
    if not os.path.isdir(os.path.join(dataroot, version)):
        raise DataError(f'nuScenes dataroot {dataroot} has no {version}/ folder of tables: extract the {version} '
                        f'metadata there or pass the --version you have')


def write_infos(dataroot, version='v1.0-mini', out_dir=None, nusc=None, progress=True):
    """Write the info pickles of ``version`` into ``out_dir`` (default: ``dataroot``) atomically.

    v1.0-trainval -> nuscenes_infos_train.pkl / _val.pkl, v1.0-mini -> the same names from mini_train /
    mini_val, v1.0-test -> nuscenes_infos_test.pkl. Returns the list of written paths.
    """
    dataroot = os.fspath(dataroot)
    check_dataroot(dataroot, version)
    if nusc is None:
        from nuscenes.nuscenes import NuScenes
        nusc = NuScenes(version=version, dataroot=dataroot, verbose=False)
    out_dir = dataroot if out_dir is None else os.fspath(out_dir)
    written = []
    for split, scene_names in split_scene_names(version).items():
        infos = build_infos(nusc, scene_names, progress=progress)
        path = os.path.join(out_dir, f'nuscenes_infos_{split}.pkl')
        atomic_pickle_dump(infos, path)
        written.append(path)
    return written
