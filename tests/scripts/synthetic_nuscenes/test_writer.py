"""The synthetic nuScenes writer: devkit contract (``NuScenes`` + ``DetectionEval`` load it), official eval on GT
copies, object and sensor semantics, rendering geometry, determinism and safe writing."""
import hashlib
import json
import os
import pathlib

import cv2
import numpy as np
import pytest

from bevdepth.datasets.depth_projection import load_lidar_points, quaternion_to_matrix
from bevdepth.datasets.errors import DataError
from synthetic_nuscenes import writer as synth

CAMERAS = synth.CAMERA_CHANNELS
DETECTION_CLASSES = synth.DETECTION_CLASSES


@pytest.fixture(scope='module')
def nusc(synthetic_dataroot):
    from nuscenes.nuscenes import NuScenes
    return NuScenes('v1.0-mini', str(synthetic_dataroot), verbose=False)


@pytest.fixture(scope='module')
def marker(synthetic_dataroot):
    return json.loads((synthetic_dataroot / synth.MARKER_FILE).read_text())


def _detection_name(category_name):
    from nuscenes.eval.detection.utils import category_to_detection_name
    return category_to_detection_name(category_name)


def _split_samples(nusc, scene_names):
    return [s for s in nusc.sample if nusc.get('scene', s['scene_token'])['name'] in scene_names]


# ------------------------------------------------------------------------------------------ devkit contract
def test_devkit_loads_dataroot_with_mini_scene_names(nusc, marker):
    from nuscenes.utils.splits import mini_train, mini_val

    names = [scene['name'] for scene in nusc.scene]
    assert names == marker['train_scenes'] + marker['val_scenes']
    assert set(marker['train_scenes']) <= set(mini_train) and set(marker['val_scenes']) <= set(mini_val)
    assert len(marker['train_scenes']) == 2 and len(marker['val_scenes']) == 2
    assert len(nusc.sample) == 4 * 6
    assert len(nusc.category) == 23 and len(nusc.attribute) == 8 and len(nusc.visibility) == 4
    assert len(nusc.ego_pose) == len(nusc.sample_data)  # one ego pose per sample_data
    for table in synth.TABLE_NAMES:
        for record in getattr(nusc, table):
            token = record['token']
            assert isinstance(token, str) and (len(token) == 32 or table == 'visibility')
    map_record = nusc.map[0]
    assert set(map_record['log_tokens']) == {log['token'] for log in nusc.log}
    assert (pathlib.Path(nusc.dataroot) / map_record['filename']).is_file()


def test_samples_scenes_and_files_follow_the_nuscenes_conventions(nusc):
    for scene in nusc.scene:
        tokens = []
        token = scene['first_sample_token']
        while token:
            tokens.append(token)
            token = nusc.get('sample', token)['next']
        assert len(tokens) == scene['nbr_samples'] and tokens[-1] == scene['last_sample_token']
        times = [nusc.get('sample', t)['timestamp'] for t in tokens]
        assert np.all(np.diff(times) == 500000)  # 2 Hz key frames
    for sample in nusc.sample:
        assert set(sample['data']) == set(CAMERAS) | {'LIDAR_TOP'}
        lidar = nusc.get('sample_data', sample['data']['LIDAR_TOP'])
        assert lidar['timestamp'] == sample['timestamp'] and lidar['filename'].startswith('samples/LIDAR_TOP/')
        for cam in CAMERAS:
            record = nusc.get('sample_data', sample['data'][cam])
            assert record['filename'].startswith(f'samples/{cam}/') and record['filename'].endswith('.jpg')
            assert (record['width'], record['height']) == (1600, 900)
            assert -50000 < record['timestamp'] - sample['timestamp'] < 0  # exposed as the LiDAR passes
    root = pathlib.Path(nusc.dataroot)
    for record in nusc.sample_data[::7]:
        path = root / record['filename']
        if record['fileformat'] == 'pcd':
            assert path.stat().st_size % 20 == 0 and path.stat().st_size > 0
        else:
            assert cv2.imread(str(path)).shape == (900, 1600, 3)


def test_sample_data_chains_and_sweeps(nusc):
    by_channel = {}
    for record in nusc.sample_data:
        by_channel.setdefault((record['channel'], nusc.get('sample', record['sample_token'])['scene_token']),
                              []).append(record)
    sweeps_per_key = {'LIDAR_TOP': 2, **{cam: 1 for cam in CAMERAS}}
    for (channel, _), records in by_channel.items():
        records.sort(key=lambda r: r['timestamp'])
        for i, record in enumerate(records):  # prev/next chain all sample_data of the channel by time
            assert record['prev'] == (records[i - 1]['token'] if i else '')
            assert record['next'] == (records[i + 1]['token'] if i + 1 < len(records) else '')
        assert records[0]['is_key_frame']  # the first key frame of a scene has no sweeps
        key_indices = [i for i, r in enumerate(records) if r['is_key_frame']]
        assert np.all(np.diff(key_indices) == sweeps_per_key[channel] + 1)
        for i, record in enumerate(records):
            if not record['is_key_frame']:
                following_key = records[min(k for k in key_indices if k > i)]
                assert record['sample_token'] == following_key['sample_token']
                assert record['filename'].startswith(f'sweeps/{channel}/')
        poses = [tuple(nusc.get('ego_pose', r['ego_pose_token'])['translation']) for r in records]
        assert len(set(poses)) == len(poses)  # every sample_data has its own ego pose


# ------------------------------------------------------------------------------------------ official eval
def gt_copy_results(nusc, scene_names, shift=0.0):
    """Results dict built from the split's GT (boxes with points, velocity from box_velocity)."""
    attributes = {a['token']: a['name'] for a in nusc.attribute}
    results = {}
    for sample in _split_samples(nusc, scene_names):
        boxes = []
        for ann_token in sample['anns']:
            ann = nusc.get('sample_annotation', ann_token)
            name = _detection_name(ann['category_name'])
            if name is None or ann['num_lidar_pts'] + ann['num_radar_pts'] == 0:
                continue
            translation = list(ann['translation'])
            translation[0] += shift
            boxes.append(dict(sample_token=sample['token'], translation=translation, size=ann['size'],
                              rotation=ann['rotation'],
                              velocity=[float(v) for v in nusc.box_velocity(ann_token)[:2]],
                              detection_name=name, detection_score=1.0,
                              attribute_name=attributes[ann['attribute_tokens'][0]] if ann['attribute_tokens'] else ''))
        results[sample['token']] = boxes
    return results


def run_detection_eval(nusc, results, tmp_path):
    from nuscenes.eval.detection.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval

    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / 'results.json'
    meta = dict(use_camera=True, use_lidar=False, use_radar=False, use_map=False, use_external=False)
    path.write_text(json.dumps(dict(meta=meta, results=results)))
    evaluator = DetectionEval(nusc, config_factory('detection_cvpr_2019'), str(path), 'mini_val',
                              str(tmp_path / 'eval'), verbose=False)
    return evaluator.main(plot_examples=0, render_curves=False)


def test_val_split_holds_every_class_in_range_with_points(nusc, marker):
    from nuscenes.eval.detection.config import config_factory

    class_range = config_factory('detection_cvpr_2019').class_range
    found = set()
    for sample in _split_samples(nusc, marker['val_scenes']):
        ego = nusc.get('ego_pose', nusc.get('sample_data', sample['data']['LIDAR_TOP'])['ego_pose_token'])
        for ann_token in sample['anns']:
            ann = nusc.get('sample_annotation', ann_token)
            name = _detection_name(ann['category_name'])
            distance = np.hypot(*(np.array(ann['translation'][:2]) - ego['translation'][:2]))
            if ann['num_lidar_pts'] > 0 and distance < class_range[name]:
                found.add(name)
    assert found == set(DETECTION_CLASSES)
    # The writer guarantees it per scene (so a split of any size qualifies) and records it in its summary.
    assert marker['classes_with_points'] == {name: list(DETECTION_CLASSES)
                                             for name in marker['train_scenes'] + marker['val_scenes']}


def test_gt_copy_scores_perfect_map_and_nds_in_official_eval(nusc, marker, tmp_path, capsys):
    metrics = run_detection_eval(nusc, gt_copy_results(nusc, marker['val_scenes']), tmp_path)
    assert metrics['mean_ap'] > 0.99 and metrics['nd_score'] > 0.9
    # The eval can fail: boxes moved 3 m along x lose every match at 0.5/1/2 m.
    shifted = run_detection_eval(nusc, gt_copy_results(nusc, marker['val_scenes'], shift=3.0), tmp_path / 'shift')
    assert shifted['mean_ap'] < 0.5


# ------------------------------------------------------------------------------------------ objects
def test_objects_sizes_motion_attributes_and_ground_contact(nusc):
    attributes = {a['token']: a['name'] for a in nusc.attribute}
    car_count = total = 0
    for instance in nusc.instance:
        anns = []
        token = instance['first_annotation_token']
        while token:
            anns.append(nusc.get('sample_annotation', token))
            token = anns[-1]['next']
        assert len(anns) == instance['nbr_annotations'] == 6 and anns[-1]['token'] == instance['last_annotation_token']
        name = _detection_name(anns[0]['category_name'])
        spec = synth.CLASS_SPECS[name]
        total += 1
        car_count += name == 'car'
        size = np.array(anns[0]['size'])
        assert np.all(np.abs(size / spec['wlh'] - 1) <= 0.1 + 1e-9)
        velocities = np.array([nusc.box_velocity(a['token'])[:2] for a in anns])
        assert np.allclose(velocities, velocities[0], atol=1e-6)  # constant velocity, learnable
        speed = float(np.linalg.norm(velocities[0]))
        assert speed <= spec['speed'][1] + 1e-6
        if speed > 0:  # moving objects drive along their heading
            yaw = np.arctan2(*quaternion_to_matrix(anns[0]['rotation'])[[1, 0], 0])
            assert np.allclose(velocities[0] / speed, [np.cos(yaw), np.sin(yaw)], atol=1e-6)
        names = [attributes[t] for t in anns[0]['attribute_tokens']]
        assert names == ([synth.attribute_name(name, speed)] if synth.attribute_name(name, speed) else [])
        for ann in anns:
            assert ann['translation'][2] == pytest.approx(ann['size'][2] / 2)  # standing on the ground
            assert ann['visibility_token'] in {'1', '2', '3', '4'} and ann['num_radar_pts'] == 0
    assert 0.35 < car_count / total < 0.65


def test_boxes_do_not_overlap_and_stay_around_the_ego(nusc):
    from pyquaternion import Quaternion
    from shapely.geometry import Polygon
    from nuscenes.utils.data_classes import Box

    for sample in nusc.sample:
        ego = nusc.get('ego_pose', nusc.get('sample_data', sample['data']['LIDAR_TOP'])['ego_pose_token'])
        polygons = []
        for ann_token in sample['anns']:
            ann = nusc.get('sample_annotation', ann_token)
            box = Box(ann['translation'], ann['size'], Quaternion(ann['rotation']))
            polygons.append(Polygon(box.bottom_corners()[:2].T))
            distance = np.hypot(*(np.array(ann['translation'][:2]) - ego['translation'][:2]))
            assert 3.0 < distance < 80.0
        for i in range(len(polygons)):
            for j in range(i + 1, len(polygons)):
                assert polygons[i].intersection(polygons[j]).area < 1e-9


def test_num_lidar_pts_counts_points_inside_each_box(nusc):
    from nuscenes.utils.geometry_utils import points_in_box

    checked = 0
    for sample in nusc.sample[:6]:
        lidar_token = sample['data']['LIDAR_TOP']
        path, boxes, _ = nusc.get_sample_data(lidar_token)  # boxes in the LiDAR frame
        points = load_lidar_points(path)
        assert 5000 < len(points) < 40000
        ring = np.fromfile(path, dtype=np.float32).reshape(-1, 5)[:, 4]
        assert set(np.unique(ring)) <= set(range(32))
        lidar_record = nusc.get('sample_data', lidar_token)
        calib = nusc.get('calibrated_sensor', lidar_record['calibrated_sensor_token'])
        height = points[:, :3] @ quaternion_to_matrix(calib['rotation'])[2] + calib['translation'][2]
        above_ground = points[height > 1e-4, :3].T  # hits lie on box surfaces: enlarge 2 %, drop the ground
        for box in boxes:
            ann = nusc.get('sample_annotation', box.token)
            inside = int(points_in_box(box, above_ground, wlh_factor=1.02).sum())
            assert inside == ann['num_lidar_pts'], ann
            checked += ann['num_lidar_pts'] > 0
    assert checked > 20


# ------------------------------------------------------------------------------------------ rendering
def shade_residual(pixel, color):
    """Largest BGR difference between ``pixel`` and the best shade (brightness scale) of ``color``."""
    scale = float(np.dot(pixel, color) / np.dot(color, color))
    return float(np.abs(pixel - scale * color).max())


def test_gt_box_corners_land_on_the_box_colour_in_the_jpeg(nusc, marker):
    """Project GT boxes (moved to the camera's timestamp) into their camera; pixels just inside each projected
    corner of an unoccluded box have the instance's chromaticity, pixels just outside do not."""
    from pyquaternion import Quaternion
    from nuscenes.utils.data_classes import Box

    colors = marker['instance_colors_bgr']
    checked = 0
    for sample in nusc.sample[::3]:
        for cam in CAMERAS:
            record = nusc.get('sample_data', sample['data'][cam])
            calib = nusc.get('calibrated_sensor', record['calibrated_sensor_token'])
            pose = nusc.get('ego_pose', record['ego_pose_token'])
            intrinsic = np.array(calib['camera_intrinsic'])
            dt = (record['timestamp'] - sample['timestamp']) / 1e6
            hulls = []
            for ann_token in sample['anns']:
                ann = nusc.get('sample_annotation', ann_token)
                center = np.array(ann['translation']) + dt * nusc.box_velocity(ann_token)
                box = Box(center, ann['size'], Quaternion(ann['rotation']))
                box.translate(-np.array(pose['translation']))
                box.rotate(Quaternion(pose['rotation']).inverse)
                box.translate(-np.array(calib['translation']))
                box.rotate(Quaternion(calib['rotation']).inverse)
                corners = box.corners()
                if corners[2].min() < 1.0:
                    continue
                uv = (intrinsic @ corners)[:2] / corners[2]
                hull = cv2.convexHull(uv.T.astype(np.float32))[:, 0]
                hulls.append((float(np.linalg.norm(box.center)), ann['instance_token'], hull))
            image = cv2.imread(os.path.join(nusc.dataroot, record['filename'])).astype(np.float64)
            for distance, instance, hull in hulls:
                inside_image = (hull.min(0) > 10).all() and hull[:, 0].max() < 1590 and hull[:, 1].max() < 890
                area = cv2.contourArea(hull)
                occluded = any(d < distance + 3.0 and cv2.intersectConvexConvex(hull, h)[0] > 0
                               for d, i, h in hulls if i != instance)
                if not inside_image or occluded or area < 2000:
                    continue
                color = np.array(colors[instance])
                centroid = hull.mean(axis=0)
                outside_differs = []
                for corner in hull:
                    direction = (centroid - corner) / np.linalg.norm(centroid - corner)
                    # 6 px inside: JPEG 4:2:0 chroma subsampling blurs saturated colours over ~4 px.
                    u, v = np.round(corner + 6.0 * direction).astype(int)
                    pixel = image[v - 1:v + 2, u - 1:u + 2].reshape(-1, 3).mean(axis=0)
                    assert shade_residual(pixel, color) < 15, (cam, instance, pixel, color)
                    u, v = np.round(corner - 6.0 * direction).astype(int)
                    outside_differs.append(shade_residual(image[v, u], color) > 20)
                assert np.mean(outside_differs) > 0.5, (cam, instance)  # the colour stops at the box outline
                checked += 1
    assert checked >= 10


def test_images_show_ground_texture_and_sky(synthetic_dataroot, nusc):
    plain = 0
    for cam in CAMERAS:
        record = nusc.get('sample_data', nusc.sample[0]['data'][cam])
        image = cv2.imread(str(synthetic_dataroot / record['filename'])).astype(np.float64)
        sky, ground = image[50], image[880]
        assert (sky[:, 0] > sky[:, 2]).mean() > 0.9  # pale blue sky on top (boxes never reach it)
        # Grey, textured ground below (a close box may cover the bottom row of some cameras).
        plain += bool(np.abs(ground[:, 0] - ground[:, 2]).mean() < 6 and 40 < ground.mean() < 200
                      and ground.std() > 3)
    assert plain >= 4


# ------------------------------------------------------------------------------------------ determinism
def _tree_digest(root):
    digest = {}
    for path in sorted(pathlib.Path(root).rglob('*')):
        if path.is_file():
            digest[str(path.relative_to(root))] = hashlib.md5(path.read_bytes()).hexdigest()
    return digest


TINY = dict(scenes_per_split=1, samples_per_scene=2, objects_per_scene=12, with_sweeps=False)


def test_same_seed_gives_the_same_bytes_and_another_seed_differs(tmp_path):
    first = synth.write_synthetic_nuscenes(tmp_path / 'a', seed=3, **TINY)
    synth.write_synthetic_nuscenes(tmp_path / 'b', seed=3, **TINY)
    synth.write_synthetic_nuscenes(tmp_path / 'c', seed=4, **TINY)
    a, b, c = (_tree_digest(tmp_path / name) for name in 'abc')
    assert a == b
    assert a != c
    assert first['num_samples'] == 4 and first['scenes'] == ['scene-0061', 'scene-0103']
    print(f'tiny synthetic root (2 scenes x 2 samples) written in {first["seconds"]:.2f} s')


def test_scenes_written_in_worker_processes_give_the_same_bytes(tmp_path):
    # Two scenes on two spawned workers (sweeps on, so every table and folder is exercised) against one process.
    settings = dict(scenes_per_split=1, samples_per_scene=2, objects_per_scene=12, seed=5)
    serial = synth.write_synthetic_nuscenes(tmp_path / 'serial', workers=1, **settings)
    parallel = synth.write_synthetic_nuscenes(tmp_path / 'parallel', workers=2, **settings)
    assert _tree_digest(tmp_path / 'serial') == _tree_digest(tmp_path / 'parallel')
    assert {k: v for k, v in serial.items() if k not in ('seconds', 'root')} == \
        {k: v for k, v in parallel.items() if k not in ('seconds', 'root')}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['parallel', 'serial']  # no temp folders left


# ------------------------------------------------------------------------------------------ safe writing
def test_refuses_foreign_non_empty_folder_and_replaces_previous_synthetic_root(tmp_path):
    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / 'keep.txt').write_text('precious')
    with pytest.raises(DataError, match='not empty and is not a synthetic nuScenes root.*--overwrite'):
        synth.write_synthetic_nuscenes(foreign, **TINY)
    assert (foreign / 'keep.txt').read_text() == 'precious'

    root = tmp_path / 'synthetic'
    synth.write_synthetic_nuscenes(root, seed=1, **TINY)
    (root / 'stale.txt').write_text('from an older run')
    synth.write_synthetic_nuscenes(root, seed=2, **TINY)  # a previous synthetic root is replaced
    assert not (root / 'stale.txt').exists()
    assert json.loads((root / synth.MARKER_FILE).read_text())['seed'] == 2
    synth.write_synthetic_nuscenes(foreign, overwrite=True, **TINY)
    assert not (foreign / 'keep.txt').exists() and (foreign / 'v1.0-mini' / 'scene.json').is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['foreign', 'synthetic']  # no temp folders left


def test_interrupted_write_leaves_no_partial_dataroot(tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, '_write_map_mask', explode)
    with pytest.raises(KeyboardInterrupt):
        synth.write_synthetic_nuscenes(tmp_path / 'root', **TINY)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('kwargs, message', [
    (dict(version='v1.0-trainval'), 'supports only version v1.0-mini'),
    (dict(scenes_per_split=9), 'scenes_per_split must be 1..8'),
    (dict(samples_per_scene=1), 'samples_per_scene must be >= 2'),
    (dict(lidar_sweeps=10), 'lidar_sweeps must be 0..9'),
    (dict(workers=0), 'workers must be >= 1'),
])
def test_bad_arguments_are_clear_errors(tmp_path, kwargs, message):
    with pytest.raises(DataError, match=message):
        synth.write_synthetic_nuscenes(tmp_path / 'root', **{**TINY, **kwargs})
    assert not (tmp_path / 'root').exists()


def test_without_sweeps_only_key_frames_are_written(tmp_path):
    synth.write_synthetic_nuscenes(tmp_path / 'root', **TINY)
    records = json.loads((tmp_path / 'root' / 'v1.0-mini' / 'sample_data.json').read_text())
    assert all(r['is_key_frame'] for r in records) and len(records) == 4 * 7
    assert not any((tmp_path / 'root' / 'sweeps').rglob('*.*'))
