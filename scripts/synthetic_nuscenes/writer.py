"""A small synthetic nuScenes dataroot that the unmodified nuscenes-devkit loads and evaluates.

``write_synthetic_nuscenes(root)`` writes ``root/v1.0-mini/*.json`` (the 13 tables with the full schema),
``root/maps/<token>.png``, camera JPEGs (1600x900, the real n015 rig) and LiDAR ``.pcd.bin`` files under
``samples/`` (key frames, 2 Hz) and ``sweeps/`` (a few LiDAR and camera sweeps between key frames), and a
``synthetic_nuscenes.json`` summary (marks the folder as a synthetic root; holds each instance's colour).

The world (a dataroot that nuscenes-devkit 1.2.0's ``NuScenes`` and ``DetectionEval`` load unmodified): a flat ground plane and boxes of the 10 detection classes
with their real mean sizes (+-10 %), cars about half of them, 5-45 m around an ego car driving an arc at
5-9 m/s near global (400, 1100). Objects are either static or move at a constant velocity along their heading,
so annotated velocities are exact and learnable. Every scene holds every class within its evaluation range,
so a split's GT copied as predictions scores mAP = NDS = 1 in ``DetectionEval``. Cameras and LiDAR are
rendered by ``synthetic_nuscenes.render``.

Scene names are those of ``nuscenes.utils.splits`` mini_train / mini_val, so ``eval_set='mini_val'`` works.
Everything derives from the seed: a scene's content from ``default_rng([seed, scene number])`` (so the first
scenes do not change with ``scenes_per_split``) and tokens from an md5 of (seed, kind, key).
"""
import concurrent.futures
import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import time

import cv2
import numpy as np

from bevdepth.datasets.depth_projection import record_to_matrix
from bevdepth.datasets.errors import DataError
from synthetic_nuscenes.render import CameraRenderer, LidarScanner

SUPPORTED_VERSION = 'v1.0-mini'
MARKER_FILE = 'synthetic_nuscenes.json'
# Identifies a synthetic root in its marker file; fixed so that roots already written stay recognised.
GENERATOR_NAME = 'bevdepth.datasets.synthetic_nuscenes'
TABLE_NAMES = ('category', 'attribute', 'visibility', 'instance', 'sensor', 'calibrated_sensor', 'ego_pose',
               'log', 'scene', 'sample', 'sample_data', 'sample_annotation', 'map')
MINI_TRAIN = ('scene-0061', 'scene-0553', 'scene-0655', 'scene-0757', 'scene-0796', 'scene-1077', 'scene-1094',
              'scene-1100')
MINI_VAL = ('scene-0103', 'scene-0916')
IMAGE_SIZE = (1600, 900)
JPEG_QUALITY = 90
BASE_TIMESTAMP_US = 1532402927647951  # scene-0061's first LiDAR key frame; scenes follow 60 s apart
KEYFRAME_INTERVAL_US = 500000  # 2 Hz
LIDAR_PERIOD_US = 50000  # 20 Hz
CAMERA_PERIOD_US = 83333  # 12 Hz

# The 23 real categories and 8 attributes with their real tokens (renderers index nusc.colormap by name).
CATEGORIES = (
    ('1fa93b757fc74fb197cdd60001ad8abf', 'human.pedestrian.adult'),
    ('b1c6de4c57f14a5383d9f963fbdcb5cb', 'human.pedestrian.child'),
    ('b2d7c6c701254928a9e4d6aac9446d79', 'human.pedestrian.wheelchair'),
    ('6a5888777ca14867a8aee3fe539b56c4', 'human.pedestrian.stroller'),
    ('403fede16c88426885dd73366f16c34a', 'human.pedestrian.personal_mobility'),
    ('bb867e2064014279863c71a29b1eb381', 'human.pedestrian.police_officer'),
    ('909f1237d34a49d6bdd27c2fe4581d79', 'human.pedestrian.construction_worker'),
    ('63a94dfa99bb47529567cd90d3b58384', 'animal'),
    ('fd69059b62a3469fbaef25340c0eab7f', 'vehicle.car'),
    ('dfd26f200ade4d24b540184e16050022', 'vehicle.motorcycle'),
    ('fc95c87b806f48f8a1faea2dcc2222a4', 'vehicle.bicycle'),
    ('003edbfb9ca849ee8a7496e9af3025d4', 'vehicle.bus.bendy'),
    ('fedb11688db84088883945752e480c2c', 'vehicle.bus.rigid'),
    ('6021b5187b924d64be64a702e5570edf', 'vehicle.truck'),
    ('5b3cd6f2bca64b83aa3d0008df87d0e4', 'vehicle.construction'),
    ('732cce86872640628788ff1bb81006d4', 'vehicle.emergency.ambulance'),
    ('7b2ff083a64e4d53809ae5d9be563504', 'vehicle.emergency.police'),
    ('90d0f6f8e7c749149b1b6c3a029841a8', 'vehicle.trailer'),
    ('653f7efbb9514ce7b81d44070d6208c1', 'movable_object.barrier'),
    ('85abebdccd4d46c7be428af5a6173947', 'movable_object.trafficcone'),
    ('d772e4bae20f493f98e15a76518b31d7', 'movable_object.pushable_pullable'),
    ('063c5e7f638343d3a7230bc3641caf97', 'movable_object.debris'),
    ('0a30519ee16a4619b4f4acfe2d78fb55', 'static_object.bicycle_rack'),
)
ATTRIBUTES = (
    ('cb5118da1ab342aa947717dc53544259', 'vehicle.moving'),
    ('c3246a1e22a14fcb878aa61e69ae3329', 'vehicle.stopped'),
    ('58aa28b1c2a54dc88e169808c07331e3', 'vehicle.parked'),
    ('a14936d865eb4216b396adae8cb3939c', 'cycle.with_rider'),
    ('5a655f9751944309a277276b8f473452', 'cycle.without_rider'),
    ('03aa62109bf043afafdea7d875dd4f43', 'pedestrian.sitting_lying_down'),
    ('4d8821270b4a47e3a8a300cbec48188e', 'pedestrian.standing'),
    ('ab83627ff28b465b85c427162dec722f', 'pedestrian.moving'),
)
VISIBILITY = (('1', 'v0-40'), ('2', 'v40-60'), ('3', 'v60-80'), ('4', 'v80-100'))

# The real n015 rig (the calibration of nuScenes car n015's logs): channel -> (sensor token, translation, rotation [w, x, y, z], K or None).
CAMERA_CHANNELS = ('CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_FRONT_LEFT', 'CAM_BACK', 'CAM_BACK_LEFT', 'CAM_BACK_RIGHT')
RIG = {
    'CAM_FRONT': ('725903f5b62f56118f4094b46a4470d8', [1.7007912397384644, 0.01594563201069832, 1.5109575986862183],
                  [0.49980155826420963, -0.5030316194596633, 0.49977980084422935, -0.4973708303153279],
                  (1266.417203046554, 816.2670197447984, 491.50706579294757)),
    'CAM_FRONT_RIGHT': ('2f7ad058f1ac5557bf321c7543758f43',
                        [1.5508477687835693, -0.4934048056602478, 1.4957480430603027],
                        [0.20603479097507807, -0.2026940547316558, 0.6824507885520733, -0.6713610848782864],
                        (1260.8474446004698, 807.968244525554, 495.3344268742088)),
    'CAM_FRONT_LEFT': ('ec4b5d41840a509984f7ec36419d4c09',
                       [1.5238779783248901, 0.4946313500404358, 1.5093282461166382],
                       [0.6757265048017743, -0.6736266525368336, 0.21214014507815268, -0.2112282711821928],
                       (1272.5979470598488, 826.6154927353808, 479.75165386361925)),
    'CAM_BACK': ('ce89d4f3050b5892b33b3d328c5e82a3', [0.02832603082060814, 0.0034513676073402166, 1.5791034698486328],
                 [0.5037872752381163, -0.49740249134958103, -0.49418502469560693, 0.5045496053650095],
                 (809.2209905677063, 829.2196003259838, 481.77842384512485)),
    'CAM_BACK_LEFT': ('a89643a5de885c6486df2232dc954da2',
                      [1.0356910228729248, 0.4847950339317322, 1.5909701585769653],
                      [0.6924185571100723, -0.7031619432078927, -0.11648343298070314, 0.11203317916910077],
                      (1256.7414812095406, 792.1125740759628, 492.7757465151356)),
    'CAM_BACK_RIGHT': ('ca7dba2ec9f95951bbe67246f7f2c3f7',
                       [1.0148781538009644, -0.4805682301521301, 1.562395453453064],
                       [0.12280980230506967, -0.1324008405017939, -0.7004305752717893, 0.6904960384510822],
                       (1259.5137405846733, 807.2529053838625, 501.19579884916527)),
    'LIDAR_TOP': ('dc8b396651c05aedbb9cdaae573bb567', [0.9437130093574524, 0.0, 1.8402299880981445],
                  [0.7077955191216103, -0.006492242234382663, 0.010646214453855012, -0.706307307069623], None),
}
# Camera exposure relative to the LiDAR key frame (the spinning LiDAR sweeps each camera's field of view).
CAMERA_OFFSETS_US = {'CAM_FRONT_LEFT': -44500, 'CAM_FRONT': -36900, 'CAM_FRONT_RIGHT': -29000,
                     'CAM_BACK_RIGHT': -21500, 'CAM_BACK': -11900, 'CAM_BACK_LEFT': -2000}

# Per detection class: general category, mean size [w, l, h] (nuScenes class means), probability of moving,
# speed range (m/s), colour hue (OpenCV 0..180; classes 15 apart, instances jitter +-5) and LiDAR intensity.
CLASS_SPECS = {
    'car': dict(category='vehicle.car', wlh=(1.95, 4.61, 1.72), p_move=0.5, speed=(3.0, 9.0), hue=0,
                intensity=60.0, eval_range=50.0),
    'truck': dict(category='vehicle.truck', wlh=(2.46, 6.74, 2.73), p_move=0.4, speed=(2.0, 7.0), hue=15,
                  intensity=70.0, eval_range=50.0),
    'bus': dict(category='vehicle.bus.rigid', wlh=(2.94, 11.19, 3.47), p_move=0.5, speed=(3.0, 8.0), hue=30,
                intensity=80.0, eval_range=50.0),
    'trailer': dict(category='vehicle.trailer', wlh=(2.87, 12.01, 3.82), p_move=0.3, speed=(2.0, 6.0), hue=45,
                    intensity=50.0, eval_range=50.0),
    'construction_vehicle': dict(category='vehicle.construction', wlh=(2.73, 6.38, 3.13), p_move=0.3,
                                 speed=(0.5, 3.0), hue=60, intensity=90.0, eval_range=50.0),
    'pedestrian': dict(category='human.pedestrian.adult', wlh=(0.66, 0.73, 1.76), p_move=0.6, speed=(0.6, 1.6),
                       hue=75, intensity=30.0, eval_range=40.0),
    'motorcycle': dict(category='vehicle.motorcycle', wlh=(0.76, 2.10, 1.44), p_move=0.5, speed=(3.0, 8.0),
                       hue=95, intensity=40.0, eval_range=40.0),
    'bicycle': dict(category='vehicle.bicycle', wlh=(0.60, 1.68, 1.27), p_move=0.5, speed=(2.0, 5.0), hue=110,
                    intensity=35.0, eval_range=40.0),
    'traffic_cone': dict(category='movable_object.trafficcone', wlh=(0.40, 0.40, 1.06), p_move=0.0,
                         speed=(0.0, 0.0), hue=135, intensity=120.0, eval_range=30.0),
    'barrier': dict(category='movable_object.barrier', wlh=(2.49, 0.49, 0.98), p_move=0.0, speed=(0.0, 0.0),
                    hue=155, intensity=100.0, eval_range=30.0),
}
DETECTION_CLASSES = tuple(CLASS_SPECS)
CAR_FRACTION_OF_EXTRAS = 0.75  # with one guaranteed object per class this makes cars about half of all objects
EGO_RADIUS = 3.0  # ego footprint circle (m) around the car centre, 1.4 m ahead of the rear axle
MIN_GAP = 0.6  # metres between object footprint circles
MOVING_SPEED = 0.2  # m/s; above this an object gets a "moving" attribute (as the reference formatter)


def make_token(seed, kind, *key):
    """Deterministic 32-hex token for (seed, kind, key)."""
    return hashlib.md5(':'.join(str(part) for part in (seed, kind) + key).encode()).hexdigest()


def attribute_name(detection_class, speed):
    """The attribute consistent with the class and speed ('' for barriers and cones)."""
    moving = speed > MOVING_SPEED
    if detection_class in ('car', 'truck', 'trailer', 'construction_vehicle'):
        return 'vehicle.moving' if moving else 'vehicle.parked'
    if detection_class == 'bus':
        return 'vehicle.moving' if moving else 'vehicle.stopped'
    if detection_class in ('bicycle', 'motorcycle'):
        return 'cycle.with_rider' if moving else 'cycle.without_rider'
    if detection_class == 'pedestrian':
        return 'pedestrian.moving' if moving else 'pedestrian.standing'
    return ''


def visibility_token(fraction):
    """nuScenes visibility bin ('1'..'4') of a visible fraction in [0, 1]."""
    return '1' if fraction < 0.4 else '2' if fraction < 0.6 else '3' if fraction < 0.8 else '4'


def yaw_quaternion(yaw):
    """[w, x, y, z] of a rotation about z."""
    return [float(np.cos(yaw / 2.0)), 0.0, 0.0, float(np.sin(yaw / 2.0))]


def split_scene_names(scenes_per_split):
    """(mini_train names, mini_val names) used for ``scenes_per_split`` scenes per split."""
    return list(MINI_TRAIN[:scenes_per_split]), list(MINI_VAL[:scenes_per_split])


class EgoPath:
    """Constant speed ``speed`` (m/s) and yaw rate ``yaw_rate`` (rad/s) from (x0, y0, yaw0) at t = 0 s."""

    def __init__(self, x0, y0, yaw0, speed, yaw_rate):
        self.x0, self.y0, self.yaw0, self.speed, self.yaw_rate = x0, y0, yaw0, speed, yaw_rate

    def pose(self, t):
        """(x, y, yaw) at time ``t`` seconds (scalar or array)."""
        t = np.asarray(t, dtype=np.float64)
        yaw = self.yaw0 + self.yaw_rate * t
        if abs(self.yaw_rate) < 1e-9:
            return self.x0 + self.speed * t * np.cos(self.yaw0), self.y0 + self.speed * t * np.sin(self.yaw0), yaw
        radius = self.speed / self.yaw_rate
        return (self.x0 + radius * (np.sin(yaw) - np.sin(self.yaw0)),
                self.y0 - radius * (np.cos(yaw) - np.cos(self.yaw0)), yaw)

    def center(self, t):
        """(T, 2) centre of the ego footprint (1.4 m ahead of the rear-axle origin)."""
        x, y, yaw = self.pose(t)
        return np.stack([x + 1.4 * np.cos(yaw), y + 1.4 * np.sin(yaw)], axis=-1)


def _instance_color(rng, hue):
    """BGR colour (3 floats) of one instance: class hue +-5, varied saturation and brightness."""
    h = (hue + rng.integers(-5, 6)) % 180
    hsv = np.array([[[h, rng.integers(150, 241), rng.integers(160, 246)]]], dtype=np.uint8)
    return [float(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]]


def _place_objects(rng, path, key_times, check_times, num_objects):
    """Objects of one scene: list of dicts (class, size_lwh, yaw, velocity (2,), anchor position (2,) at
    ``key_times[mid]``, colour, intensity). One object per class is kept within its evaluation range at every
    key frame; all objects keep clear of each other and of the ego at every ``check_times`` instant."""
    classes = list(DETECTION_CLASSES)
    others = [c for c in DETECTION_CLASSES if c != 'car']
    for _ in range(max(0, num_objects - len(classes))):
        classes.append('car' if rng.random() < CAR_FRACTION_OF_EXTRAS else others[rng.integers(len(others))])
    mid = len(key_times) // 2
    t_mid = key_times[mid]
    ego_key = path.center(key_times)  # (K, 2)
    ego_check = path.center(check_times)  # (T, 2)
    mid_x, mid_y, _ = path.pose(t_mid)
    placed = []
    for index, detection_class in enumerate(classes):
        spec = CLASS_SPECS[detection_class]
        guaranteed = index < len(DETECTION_CLASSES)
        wlh = np.asarray(spec['wlh']) * rng.uniform(0.9, 1.1, size=3)
        radius = 0.5 * float(np.hypot(wlh[0], wlh[1]))
        max_distance = spec['eval_range'] - 5.0 if guaranteed else 45.0
        moving = rng.random() < spec['p_move']
        speed = float(rng.uniform(*spec['speed'])) if moving else 0.0
        color = _instance_color(rng, spec['hue'])
        for attempt in range(400):
            # After 200 failures relax the every-key-frame range constraint to the middle key frame only.
            strict = guaranteed and attempt < 200
            yaw = float(rng.uniform(-np.pi, np.pi))
            distance = float(rng.uniform(EGO_RADIUS + radius + 1.5, max_distance))
            bearing = float(rng.uniform(-np.pi, np.pi))
            anchor = np.array([mid_x + distance * np.cos(bearing), mid_y + distance * np.sin(bearing)])
            velocity = speed * np.array([np.cos(yaw), np.sin(yaw)])
            at_check = anchor + (check_times - t_mid)[:, None] * velocity
            if np.min(np.linalg.norm(at_check - ego_check, axis=1)) < EGO_RADIUS + radius + 1.0:
                continue
            at_key = anchor + (key_times - t_mid)[:, None] * velocity
            key_dist = np.linalg.norm(at_key - ego_key, axis=1)
            if strict and key_dist.max() > max_distance:
                continue
            if any(np.min(np.linalg.norm(at_check - other['at_check'], axis=1)) < radius + other['radius'] + MIN_GAP
                   for other in placed):
                continue
            placed.append(dict(detection_class=detection_class, size_lwh=[wlh[1], wlh[0], wlh[2]],
                               size_wlh=[float(v) for v in wlh], yaw=yaw, velocity=velocity, anchor=anchor,
                               t_anchor=t_mid, color=color, intensity=spec['intensity'], radius=radius,
                               at_check=at_check, speed=speed))
            break
    return placed


def _classes_with_points(objects, path, key_times, scanner):
    """Detection classes with > 0 LiDAR points within their evaluation range at some key frame."""
    seen = set()
    for t in key_times:
        ego_x, ego_y, ego_yaw = (float(v) for v in path.pose(t))
        boxes = _boxes_at(objects, t)
        _, hit_box, _ = scanner.scan((ego_x, ego_y, ego_yaw), boxes, np.random.default_rng(0))
        points = np.bincount(hit_box[hit_box >= 0], minlength=len(objects))
        for obj, box, count in zip(objects, boxes, points):
            distance = float(np.hypot(box['center'][0] - ego_x, box['center'][1] - ego_y))
            if count > 0 and distance < CLASS_SPECS[obj['detection_class']]['eval_range']:
                seen.add(obj['detection_class'])
    return seen


def _boxes_at(objects, t):
    """Render/scan box dicts of all objects at time ``t`` seconds (global centre with z = h / 2)."""
    boxes = []
    for obj in objects:
        xy = obj['anchor'] + (t - obj['t_anchor']) * obj['velocity']
        boxes.append(dict(center=np.array([xy[0], xy[1], obj['size_lwh'][2] / 2.0]), size_lwh=obj['size_lwh'],
                          yaw=obj['yaw'], color=obj['color'], intensity=obj['intensity']))
    return boxes


class _Tables:
    """Accumulates the 13 tables."""

    def __init__(self):
        self.rows = {name: [] for name in TABLE_NAMES}

    def add(self, table, **record):
        self.rows[table].append(record)
        return record


def _check_root(root, overwrite):
    """Refuse a non-empty folder that is not a previous synthetic root (unless ``overwrite``)."""
    if root.exists() and not root.is_dir():
        raise DataError(f'dataroot {root} exists and is not a folder: pass another --dataroot')
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        marker = root / MARKER_FILE
        is_synthetic = False
        if marker.is_file():
            try:
                is_synthetic = json.loads(marker.read_text()).get('generator') == GENERATOR_NAME
            except (OSError, ValueError):
                is_synthetic = False
        if not is_synthetic:
            raise DataError(f'dataroot {root} is not empty and is not a synthetic nuScenes root: choose an empty '
                            f'or new folder, or pass --overwrite (overwrite=True) to replace its content')


def write_synthetic_nuscenes(root, version='v1.0-mini', seed=0, scenes_per_split=2, samples_per_scene=6,
                             objects_per_scene=24, lidar_sweeps=2, camera_sweeps=1, with_sweeps=True,
                             lidar_azimuth_steps=600, overwrite=False, progress=False, workers=1):
    """Write a synthetic v1.0-mini dataroot at ``root`` and return a summary dict.

    ``scenes_per_split``: number of mini_train scenes (<= 8) and of mini_val scenes (<= 2, the devkit's
    mini_val has 2); ``samples_per_scene``: key frames per scene (>= 2 so velocities exist);
    ``lidar_sweeps`` (<= 9) / ``camera_sweeps`` (<= 5): sweeps before each key frame after the first
    (``with_sweeps=False`` writes none); ``lidar_azimuth_steps``: LiDAR columns per revolution (32 rings each).
    The root is written to a temporary sibling folder and renamed, so an interrupted run leaves no partial
    dataroot under ``root``. A non-empty ``root`` is replaced only if it is a previous synthetic root or
    ``overwrite`` is set. ``workers`` > 1 renders that many scenes at a time in separate processes; every scene
    draws from its own seeded generator, so the bytes do not depend on ``workers``.
    """
    start_time = time.perf_counter()
    if version != SUPPORTED_VERSION:
        raise DataError(f'synthetic nuScenes supports only version {SUPPORTED_VERSION}, not {version!r}: '
                        f'pass version={SUPPORTED_VERSION!r}')
    if not 1 <= int(scenes_per_split) <= len(MINI_TRAIN):
        raise DataError(f'scenes_per_split must be 1..{len(MINI_TRAIN)} (mini_train has {len(MINI_TRAIN)} scenes), '
                        f'got {scenes_per_split}')
    if int(samples_per_scene) < 2:
        raise DataError(f'samples_per_scene must be >= 2 so every object has a velocity, got {samples_per_scene}')
    if not 0 <= lidar_sweeps <= 9 or not 0 <= camera_sweeps <= 5:
        raise DataError(f'lidar_sweeps must be 0..9 and camera_sweeps 0..5 (they must fit between 2 Hz key '
                        f'frames), got {lidar_sweeps} and {camera_sweeps}')
    if int(workers) < 1:
        raise DataError(f'workers must be >= 1, got {workers}')
    if not with_sweeps:
        lidar_sweeps = camera_sweeps = 0
    root = pathlib.Path(root).absolute()
    _check_root(root, overwrite)
    train_names, val_names = split_scene_names(int(scenes_per_split))
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = root.parent / f'.{root.name}.partial-{os.getpid()}'
    if tmp_root.exists():
        shutil.rmtree(tmp_root)
    try:
        summary = _write_dataroot(tmp_root, seed, train_names + val_names, int(samples_per_scene),
                                  int(objects_per_scene), int(lidar_sweeps), int(camera_sweeps),
                                  int(lidar_azimuth_steps), progress, int(workers))
        summary.update(version=version, seed=seed, train_scenes=train_names, val_scenes=val_names,
                       generator=GENERATOR_NAME)
        summary['seconds'] = round(time.perf_counter() - start_time, 3)
        with open(tmp_root / MARKER_FILE, 'w') as f:
            # The timing is kept out of the marker so the same seed gives the same bytes.
            json.dump({k: v for k, v in summary.items() if k != 'seconds'}, f, indent=1, sort_keys=True)
        _replace_folder(tmp_root, root)
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
    summary['root'] = str(root)
    return summary


def _replace_folder(new, final):
    """Rename ``new`` to ``final``; an existing ``final`` is moved aside first and deleted afterwards."""
    if final.exists():
        trash = final.parent / f'.{final.name}.old-{os.getpid()}'
        os.replace(final, trash)
        os.replace(new, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(new, final)


def _write_dataroot(root, seed, scene_names, samples_per_scene, objects_per_scene, lidar_sweeps, camera_sweeps,
                    lidar_azimuth_steps, progress, workers=1):
    tables = _Tables()
    for token, name in CATEGORIES:
        tables.add('category', token=token, name=name, description=f'{name} (synthetic)')
    for token, name in ATTRIBUTES:
        tables.add('attribute', token=token, name=name, description=f'{name} (synthetic)')
    for token, level in VISIBILITY:
        tables.add('visibility', token=token, level=level, description=f'visibility of whole object is {level}')
    for channel in CAMERA_CHANNELS + ('LIDAR_TOP',):
        tables.add('sensor', token=RIG[channel][0], channel=channel,
                   modality='lidar' if channel == 'LIDAR_TOP' else 'camera')
    for folder in ('samples', 'sweeps'):
        for channel in CAMERA_CHANNELS + ('LIDAR_TOP',):
            (root / folder / channel).mkdir(parents=True, exist_ok=True)
    (root / 'maps').mkdir(parents=True, exist_ok=True)
    (root / SUPPORTED_VERSION).mkdir(parents=True, exist_ok=True)

    map_token = make_token(seed, 'map')
    jobs = [(root, seed, scene_index, scene_name, samples_per_scene, objects_per_scene, lidar_sweeps, camera_sweeps,
             lidar_azimuth_steps) for scene_index, scene_name in enumerate(scene_names)]
    instance_colors = {}
    counts = dict(class_counts={c: 0 for c in DETECTION_CLASSES}, classes_with_points={})
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(jobs) > 1:
            # spawn, not fork: the caller may have started torch / OpenMP threads, which fork does not survive.
            pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
                max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context('spawn')))
            scene_results = pool.map(_write_scene_job, jobs)
        else:
            scene_results = map(_write_scene_job, jobs)
        if progress:
            from tqdm import tqdm
            scene_results = tqdm(scene_results, total=len(jobs), desc='synthetic scenes', unit='scene')
        # Merged in scene order, so the tables are the same whatever the number of workers.
        for scene_name, scene_rows, scene_colors, scene_class_counts, scene_classes in scene_results:
            for name, rows in scene_rows.items():
                tables.rows[name].extend(rows)
            instance_colors.update(scene_colors)
            for detection_class, count in scene_class_counts.items():
                counts['class_counts'][detection_class] += count
            counts['classes_with_points'][scene_name] = scene_classes
    log_tokens = [log['token'] for log in tables.rows['log']]
    tables.add('map', token=map_token, log_tokens=log_tokens, category='semantic_prior',
               filename=f'maps/{map_token}.png')
    _write_map_mask(root / 'maps' / f'{map_token}.png')
    for name in TABLE_NAMES:
        with open(root / SUPPORTED_VERSION / f'{name}.json', 'w') as f:
            json.dump(tables.rows[name], f, indent=0)
    return dict(scenes=list(scene_names), num_samples=len(tables.rows['sample']),
                num_sample_data=len(tables.rows['sample_data']),
                num_annotations=len(tables.rows['sample_annotation']), num_instances=len(tables.rows['instance']),
                class_counts=counts['class_counts'], classes_with_points=counts['classes_with_points'],
                instance_colors_bgr=instance_colors)


def _sensor_calibration():
    """calibrated_sensor fields (translation, rotation, camera_intrinsic) of every channel of the rig."""
    calib = {}
    for channel in CAMERA_CHANNELS + ('LIDAR_TOP',):
        _, translation, rotation, intrinsic = RIG[channel]
        k = [] if intrinsic is None else [[intrinsic[0], 0.0, intrinsic[1]], [0.0, intrinsic[0], intrinsic[2]],
                                          [0.0, 0.0, 1.0]]
        calib[channel] = dict(translation=translation, rotation=rotation, camera_intrinsic=k)
    return calib


def _write_scene_job(job):
    """Write one scene's files; return (scene name, its table rows, instance colours, class counts, classes the
    eval keeps). Runs in a worker process when ``workers`` > 1."""
    root, seed, scene_index, scene_name, samples_per_scene, objects_per_scene, lidar_sweeps, camera_sweeps, \
        lidar_azimuth_steps = job
    calib = _sensor_calibration()
    scanner = LidarScanner(record_to_matrix(calib['LIDAR_TOP']), num_azimuth=lidar_azimuth_steps)
    tables = _Tables()
    instance_colors = {}
    counts = dict(class_counts={c: 0 for c in DETECTION_CLASSES}, classes_with_points={})
    _write_scene(root, tables, seed, scene_index, scene_name, samples_per_scene, objects_per_scene, lidar_sweeps,
                 camera_sweeps, calib, _camera_renderers(), scanner, instance_colors, counts)
    return scene_name, tables.rows, instance_colors, counts['class_counts'], counts['classes_with_points'][scene_name]


@functools.lru_cache(maxsize=1)
def _camera_renderers():
    """The six cameras' renderers (their ground precomputation is the same for every root: cached)."""
    renderers = {}
    for channel in CAMERA_CHANNELS:
        _, translation, rotation, (focal, cx, cy) = RIG[channel]
        intrinsic = [[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]]
        renderers[channel] = CameraRenderer(intrinsic, record_to_matrix(dict(translation=translation,
                                                                               rotation=rotation)), IMAGE_SIZE)
    return renderers


# Map mask: 0.1 m/px 'L' PNG whose bottom pixel row is global y = 0 (devkit MapMask convention), so it must
# span global x 0..520 m and y 0..1220 m to cover the ego paths near (400, 1100).
MAP_RESOLUTION = 0.1
MAP_SIZE_M = (520.0, 1220.0)
DRIVABLE_AREA_M = ((250.0, 520.0), (950.0, 1220.0))  # x range, y range around every scene's path


@functools.lru_cache(maxsize=1)
def _map_mask_png():
    """PNG bytes of the drivable-area mask (the same for every root, so encoded once per process)."""
    import io
    from PIL import Image

    width, height = int(MAP_SIZE_M[0] / MAP_RESOLUTION), int(MAP_SIZE_M[1] / MAP_RESOLUTION)
    mask = np.zeros((height, width), dtype=np.uint8)
    (x0, x1), (y0, y1) = DRIVABLE_AREA_M
    mask[int(height - y1 / MAP_RESOLUTION):int(height - y0 / MAP_RESOLUTION),
         int(x0 / MAP_RESOLUTION):int(x1 / MAP_RESOLUTION)] = 255
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, 'PNG', compress_level=6)
    return buffer.getvalue()


def _write_map_mask(path):
    pathlib.Path(path).write_bytes(_map_mask_png())


def _write_scene(root, tables, seed, scene_index, scene_name, samples_per_scene, objects_per_scene, lidar_sweeps,
                 camera_sweeps, calib, renderers, scanner, instance_colors, counts):
    scene_number = int(scene_name.split('-')[1])
    rng = np.random.default_rng([seed, scene_number])
    scene_token = make_token(seed, 'scene', scene_name)
    log_token = make_token(seed, 'log', scene_name)
    date = f'2018-07-{10 + scene_index:02d}'
    logfile = f'n015-{date}-11-22-45+0800'
    tables.add('log', token=log_token, logfile=logfile, vehicle='n015', date_captured=date,
               location='singapore-onenorth')
    calib_tokens = {}
    for channel in CAMERA_CHANNELS + ('LIDAR_TOP',):
        calib_tokens[channel] = make_token(seed, 'calibrated_sensor', scene_name, channel)
        tables.add('calibrated_sensor', token=calib_tokens[channel], sensor_token=RIG[channel][0], **calib[channel])

    # Times in microseconds (tables) and seconds since the scene start (motion).
    t0_us = BASE_TIMESTAMP_US + scene_index * 60_000_000
    key_us = [t0_us + k * KEYFRAME_INTERVAL_US for k in range(samples_per_scene)]
    key_s = np.array([(t - t0_us) / 1e6 for t in key_us])
    check_s = np.arange(-0.1, key_s[-1] + 0.05, 0.05)
    path = EgoPath(400.0 + rng.uniform(-40, 40), 1100.0 + rng.uniform(-40, 40), rng.uniform(-np.pi, np.pi),
                   rng.uniform(5.0, 9.0), rng.uniform(-0.08, 0.08))
    # Re-draw the objects (rarely needed) until every class is seen by the official eval in this scene:
    # > 0 LiDAR points within its class range at some key frame (a box may be occluded by others).
    for _ in range(20):
        objects = _place_objects(rng, path, key_s, check_s, objects_per_scene)
        if len(_classes_with_points(objects, path, key_s, scanner)) == len(DETECTION_CLASSES):
            break

    sample_tokens = [make_token(seed, 'sample', scene_name, k) for k in range(samples_per_scene)]
    instance_tokens = [make_token(seed, 'instance', scene_name, i) for i in range(len(objects))]
    for k, token in enumerate(sample_tokens):
        tables.add('sample', token=token, timestamp=key_us[k], prev=sample_tokens[k - 1] if k else '',
                   next=sample_tokens[k + 1] if k + 1 < samples_per_scene else '', scene_token=scene_token)
    tables.add('scene', token=scene_token, log_token=log_token, nbr_samples=samples_per_scene,
               first_sample_token=sample_tokens[0], last_sample_token=sample_tokens[-1], name=scene_name,
               description=f'Synthetic {scene_name}: ego arc at {path.speed:.1f} m/s, {len(objects)} objects')

    # Frames per channel in time order: (timestamp_us, is_key_frame, sample index).
    frames = {}
    lidar_frames = []
    for k in range(samples_per_scene):
        if k:
            lidar_frames += [(key_us[k] - j * LIDAR_PERIOD_US, False, k) for j in range(lidar_sweeps, 0, -1)]
        lidar_frames.append((key_us[k], True, k))
    frames['LIDAR_TOP'] = lidar_frames
    for channel in CAMERA_CHANNELS:
        cam_frames = []
        for k in range(samples_per_scene):
            key_cam = key_us[k] + CAMERA_OFFSETS_US[channel]
            if k:
                cam_frames += [(key_cam - j * CAMERA_PERIOD_US, False, k) for j in range(camera_sweeps, 0, -1)]
            cam_frames.append((key_cam, True, k))
        frames[channel] = cam_frames

    annotation_points = np.zeros((len(objects), samples_per_scene), dtype=np.int64)
    lidar_key_pose = {}
    annotation_visibility = np.ones((len(objects), samples_per_scene))
    for channel, channel_frames in frames.items():
        tokens = [make_token(seed, 'sample_data', scene_name, channel, ts) for ts, _, _ in channel_frames]
        for i, (ts, is_key, k) in enumerate(channel_frames):
            t = (ts - t0_us) / 1e6
            ego_x, ego_y, ego_yaw = (float(v) for v in path.pose(t))
            pose_token = make_token(seed, 'ego_pose', scene_name, channel, ts)
            tables.add('ego_pose', token=pose_token, timestamp=ts, rotation=yaw_quaternion(ego_yaw),
                       translation=[ego_x, ego_y, 0.0])
            folder = 'samples' if is_key else 'sweeps'
            is_lidar = channel == 'LIDAR_TOP'
            suffix = 'pcd.bin' if is_lidar else 'jpg'
            filename = f'{folder}/{channel}/{logfile}__{channel}__{ts}.{suffix}'
            boxes = _boxes_at(objects, t)
            if is_lidar:
                points, hit_box, rays_through = scanner.scan((ego_x, ego_y, ego_yaw), boxes, rng)
                points.tofile(root / filename)
                if is_key:
                    lidar_key_pose[k] = (ego_x, ego_y)
                    annotation_points[:, k] = np.bincount(hit_box[hit_box >= 0], minlength=len(objects))
                    with np.errstate(divide='ignore', invalid='ignore'):
                        annotation_visibility[:, k] = np.where(
                            rays_through > 0, annotation_points[:, k] / np.maximum(rays_through, 1), 0.0)
            else:
                image = renderers[channel].render((ego_x, ego_y, ego_yaw), boxes)
                ok, encoded = cv2.imencode('.jpg', image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
                (root / filename).write_bytes(encoded.tobytes())
            tables.add('sample_data', token=tokens[i], sample_token=sample_tokens[k], ego_pose_token=pose_token,
                       calibrated_sensor_token=calib_tokens[channel], timestamp=ts,
                       fileformat='pcd' if is_lidar else 'jpg', is_key_frame=is_key,
                       height=0 if is_lidar else IMAGE_SIZE[1], width=0 if is_lidar else IMAGE_SIZE[0],
                       filename=filename, prev=tokens[i - 1] if i else '',
                       next=tokens[i + 1] if i + 1 < len(tokens) else '')

    category_tokens = {name: token for token, name in CATEGORIES}
    attribute_tokens = {name: token for token, name in ATTRIBUTES}
    for i, obj in enumerate(objects):
        spec = CLASS_SPECS[obj['detection_class']]
        ann_tokens = [make_token(seed, 'sample_annotation', scene_name, i, k) for k in range(samples_per_scene)]
        attribute = attribute_name(obj['detection_class'], obj['speed'])
        for k, token in enumerate(ann_tokens):
            center = _boxes_at([obj], key_s[k])[0]['center']
            tables.add('sample_annotation', token=token, sample_token=sample_tokens[k],
                       instance_token=instance_tokens[i],
                       visibility_token=visibility_token(annotation_visibility[i, k]),
                       attribute_tokens=[attribute_tokens[attribute]] if attribute else [],
                       translation=[float(v) for v in center], size=obj['size_wlh'],
                       rotation=yaw_quaternion(obj['yaw']), prev=ann_tokens[k - 1] if k else '',
                       next=ann_tokens[k + 1] if k + 1 < samples_per_scene else '',
                       num_lidar_pts=int(annotation_points[i, k]), num_radar_pts=0)
        tables.add('instance', token=instance_tokens[i], category_token=category_tokens[spec['category']],
                   nbr_annotations=samples_per_scene, first_annotation_token=ann_tokens[0],
                   last_annotation_token=ann_tokens[-1])
        instance_colors[instance_tokens[i]] = obj['color']
        counts['class_counts'][obj['detection_class']] += 1
    # Classes the official eval keeps in this scene: > 0 points and within the class range at some key frame.
    seen = set()
    for i, obj in enumerate(objects):
        for k in range(samples_per_scene):
            center = _boxes_at([obj], key_s[k])[0]['center']
            distance = float(np.hypot(center[0] - lidar_key_pose[k][0], center[1] - lidar_key_pose[k][1]))
            if annotation_points[i, k] > 0 and distance < CLASS_SPECS[obj['detection_class']]['eval_range']:
                seen.add(obj['detection_class'])
    counts['classes_with_points'][scene_name] = [c for c in DETECTION_CLASSES if c in seen]
