"""nuScenes multi-camera detection dataset and its collate function (upstream ``bevdepth/datasets/nusc_det_dataset.py``).

One item is the reference's list::

    [sweep_imgs (S, N, 3, fH, fW) float32, sensor2ego (S, N, 4, 4), intrin (S, N, 4, 4), ida (S, N, 4, 4),
     sensor2sensor (S, N, 4, 4), bda_mat (4, 4), timestamps (S, N) int64, img_metas dict,
     gt_boxes (n, 9) float32, gt_labels (n,) int64, (+ depth (1, N, fH, fW) float32 if return_depth)]

with S = len(key_idxes) * (1 + len(sweep_idxes)) frames (1 for MatrixVT) and N = 6 cameras.

Differences from the reference, all deliberate:

* Randomness comes from a ``numpy.random.Generator`` owned by each process / DataLoader worker and seeded
  from ``torch.initial_seed()`` there. PyTorch gives every worker ``base_seed + worker_id`` with a fresh
  base seed per epoch drawn from the (seeded) main-process RNG, and ``pl.seed_everything(workers=True)``
  mixes the global rank in, so augmentations are reproducible, differ between workers, ranks and epochs.
  The reference drew from numpy's global state, which forked workers share unless re-seeded.
* CBGS indices are drawn once at construction from ``numpy.random.default_rng(cbgs_seed)`` so every DDP
  rank builds the same resampled index list; classes without any sample are skipped (the reference
  divides by zero there).
* ``img_metas['box_type_3d']`` is the string ``'LiDAR'`` (no mmdet3d class).
* Eval items carry ``gt_boxes`` of shape (0, 9) float32 and ``gt_labels`` (0,) int64 (reference: (0, 7)
  and float), so collate and evaluation see one layout.
* GT boxes are computed for all annotations at once (same float32 values as the reference's per-box devkit
  ``Box`` path, ~50x faster).
* Matrices are composed in float64 and stored as float32 (the reference composed in float32, losing
  ~1e-4 m on global poses of ~1 km).
* Depth GT comes from the ``depth_gt/`` cache or is projected online from LiDAR (``depth_source``).
* Bad input raises ``DataError`` with one line naming the file and the fix.
"""
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from bevdepth.configs.nuscenes import IMG_CONF
from bevdepth.configs.settings import IMAGE_BACKENDS
from bevdepth.datasets.bev_aug import bev_transform, sample_bda_augmentation
from bevdepth.datasets.depth_aug import depth_transform
from bevdepth.datasets.depth_projection import rigid_inverse
from bevdepth.datasets.errors import DataError
from bevdepth.datasets.info_files import load_infos  # noqa: F401  (also this module's API)
from bevdepth.datasets.image_aug import (fast_image_pipeline, ida_matrix, reference_image_pipeline,
                                         sample_ida_augmentation)
from bevdepth.utils.geometry import (quaternion_inverse, quaternion_multiply, quaternion_yaw, rotation_matrices,
                                     rotation_matrix)

# nuScenes general category -> detection class (upstream ``map_name_from_general_to_detection``); 'ignore' is dropped.
CATEGORY_TO_DETECTION = {
    'human.pedestrian.adult': 'pedestrian',
    'human.pedestrian.child': 'pedestrian',
    'human.pedestrian.wheelchair': 'ignore',
    'human.pedestrian.stroller': 'ignore',
    'human.pedestrian.personal_mobility': 'ignore',
    'human.pedestrian.police_officer': 'pedestrian',
    'human.pedestrian.construction_worker': 'pedestrian',
    'animal': 'ignore',
    'vehicle.car': 'car',
    'vehicle.motorcycle': 'motorcycle',
    'vehicle.bicycle': 'bicycle',
    'vehicle.bus.bendy': 'bus',
    'vehicle.bus.rigid': 'bus',
    'vehicle.truck': 'truck',
    'vehicle.construction': 'construction_vehicle',
    'vehicle.emergency.ambulance': 'ignore',
    'vehicle.emergency.police': 'ignore',
    'vehicle.trailer': 'trailer',
    'movable_object.barrier': 'barrier',
    'movable_object.trafficcone': 'traffic_cone',
    'movable_object.pushable_pullable': 'ignore',
    'movable_object.debris': 'ignore',
    'static_object.bicycle_rack': 'ignore',
}

DEPTH_SOURCES = ('auto', 'cache', 'online')


def detection_name(category_name):
    """Detection class of a nuScenes category name ('ignore' for unmapped ones)."""
    return CATEGORY_TO_DETECTION.get(category_name, 'ignore')


def pose_matrix(pose):
    """4x4 float64 transform of a nuScenes record with 'rotation' [w, x, y, z] and 'translation' [3]."""
    mat = np.eye(4)
    mat[:3, :3] = rotation_matrix(pose['rotation'])
    mat[:3, 3] = pose['translation']
    return mat


def mean_ego_pose(cam_infos, cams):
    """Element-wise mean ego translation (3,) and quaternion (4,) of the cameras."""
    rotation = np.mean([cam_infos[cam]['ego_pose']['rotation'] for cam in cams], 0)
    translation = np.mean([cam_infos[cam]['ego_pose']['translation'] for cam in cams], 0)
    return translation, rotation


def gt_boxes_in_mean_ego(info, cams, classes):
    """GT boxes of one sample in the mean-camera ego frame (upstream ``NuscDetDataset.get_gt``).

    Keeps annotations whose detection class is in ``classes`` and with num_lidar_pts + num_radar_pts > 0.
    Vectorised form of the reference's per-box devkit ``Box.translate(-t).rotate(q_mean.inverse)``: centre and
    velocity are rotated by the normalised mean quaternion's inverse; the yaw is pyquaternion's
    ``yaw_pitch_roll[0]`` of ``q_mean.inverse * q_box`` (its formula, atan2(2 (w z - x y), 1 - 2 (y^2 + z^2)),
    kept as is). tests/datasets/test_nusc_det_dataset.py checks it against the devkit path.

    Returns:
        tuple: boxes (n, 9) float32 [cx, cy, cz, l, w, h, yaw, vx, vy], labels (n,) int64.
    """
    anns = [(ann, detection_name(ann['category_name'])) for ann in info.get('ann_infos', [])]
    anns = [(ann, name) for ann, name in anns
            if name in classes and ann['num_lidar_pts'] + ann['num_radar_pts'] > 0]
    if not anns:
        return torch.zeros((0, 9), dtype=torch.float32), torch.zeros((0,), dtype=torch.int64)
    translation, rotation = mean_ego_pose(info['cam_infos'], cams)
    # pyquaternion's inverse: conjugate / |q|^2 (the mean of unit quaternions is not a unit quaternion).
    inverse = quaternion_inverse(rotation)
    rot = rotation_matrices(inverse[None])[0]
    centres = np.array([ann['translation'] for ann, _ in anns], dtype=np.float64) - translation
    sizes = np.array([ann['size'] for ann, _ in anns], dtype=np.float64)  # [w, l, h]
    # NaN velocities (first/last frame of an instance) would poison the regression loss.
    velocities = np.nan_to_num(np.array([ann.get('velocity', (0.0, 0.0, 0.0)) for ann, _ in anns],
                                        dtype=np.float64))
    quats = np.array([ann['rotation'] for ann, _ in anns], dtype=np.float64)
    yaw = quaternion_yaw(quaternion_multiply(inverse, quats))  # yaw of inverse * q_box
    boxes = np.concatenate([centres @ rot.T, sizes[:, [1, 0, 2]], yaw[:, None], (velocities @ rot.T)[:, :2]], 1)
    labels = [classes.index(name) for _, name in anns]
    return torch.from_numpy(boxes.astype(np.float32)), torch.tensor(labels, dtype=torch.int64)


def cbgs_sample_indices(infos, classes, rng):
    """Class-balanced grouping and sampling (upstream ``NuscDetDataset._get_sample_indices``): each class contributes ~dup / len(classes) draws.

    class_sample_idxs[c] = samples with >= 1 annotation of class c (no point-count filter);
    dup = sum_c |idxs_c|; each class draws int(|idxs_c| * (1 / len(classes)) / (|idxs_c| / dup)) indices
    with replacement. Classes absent from the split are skipped (the reference divides by zero).
    """
    class_sample_idxs = {name: [] for name in classes}
    for idx, info in enumerate(infos):
        names = {detection_name(ann['category_name']) for ann in info.get('ann_infos', [])}
        for name in names:
            if name in class_sample_idxs:
                class_sample_idxs[name].append(idx)
    duplicated = sum(len(v) for v in class_sample_idxs.values())
    frac = 1.0 / len(classes)
    sample_indices = []
    for idxs in class_sample_idxs.values():
        if not idxs:
            continue
        ratio = frac / (len(idxs) / duplicated)
        sample_indices += rng.choice(idxs, int(len(idxs) * ratio)).tolist()
    return sample_indices


class NuscDetDataset(Dataset):
    """nuScenes camera dataset with the reference's augmentation and item layout (upstream ``NuscDetDataset``).

    Args:
        ida_aug_conf (dict): image augmentation (bevdepth.configs.nuscenes.ida_aug_conf()).
        bda_aug_conf (dict): BEV augmentation (bevdepth.configs.nuscenes.bda_aug_conf()).
        classes (list[str]): detection classes; label = index.
        data_root (str | Path): nuScenes dataroot (holds samples/, sweeps/, depth_gt/).
        info_paths (str | Path | list): info pickle(s) written by scripts/gen_info.py.
        is_train (bool): random augmentation and GT when True.
        use_cbgs (bool): class-balanced resampling of the sample list.
        num_sweeps (int): kept for config compatibility; frames come from sweep_idxes / key_idxes.
        img_conf (dict): img_mean, img_std, to_rgb (True keeps the reference's BGR input quirk).
        return_depth (bool): also return the key frame's LiDAR depth maps (1, N, fH, fW).
        sweep_idxes (sequence[int]): camera sweep levels (>= 0) added after each key frame.
        key_idxes (sequence[int]): previous key frames (< 0) added after the current one.
        use_fusion (bool): the reference's LiDAR-fusion switch; only False is supported.
        depth_source (str): 'cache' reads data_root/depth_gt/<image>.bin (scripts/gen_depth_gt.py),
            'online' projects the LiDAR sweep, 'auto' uses the cache file when it exists.
        cbgs_seed (int): seed of the one-off CBGS draw (identical on every rank).
        image_backend (str): 'opencv' (fast, default) or 'pillow' (the reference pipeline, for timing
            and fidelity checks).
    """

    def __init__(self, ida_aug_conf, bda_aug_conf, classes, data_root, info_paths, is_train, use_cbgs=False,
                 num_sweeps=1, img_conf=IMG_CONF, return_depth=False, sweep_idxes=(), key_idxes=(),
                 use_fusion=False, depth_source='auto', cbgs_seed=0, image_backend='opencv'):
        super().__init__()
        if use_fusion:
            raise ValueError('use_fusion=True (LiDAR-camera fusion inputs) is not supported by this port: the '
                             'camera-only MatrixVT / BEVDepth experiments use use_fusion=False')
        if depth_source not in DEPTH_SOURCES:
            raise ValueError(f'depth_source must be one of {DEPTH_SOURCES}, got {depth_source!r}')
        if image_backend not in IMAGE_BACKENDS:
            raise ValueError(f'image_backend must be one of {IMAGE_BACKENDS}, got {image_backend!r}')
        if any(s < 0 for s in sweep_idxes):
            raise ValueError(f'all sweep_idxes must be >= 0, got {list(sweep_idxes)}')
        if any(k >= 0 for k in key_idxes):
            raise ValueError(f'all key_idxes must be < 0, got {list(key_idxes)}')
        self.data_root = os.fspath(data_root)
        if not os.path.isdir(self.data_root):
            raise DataError(f'data_root {self.data_root} does not exist: put (or symlink) the nuScenes '
                            f'dataroot there or pass the right data_root')
        loaded = load_infos(info_paths)
        self.info_paths = [path for path, _ in loaded]
        self.infos = [info for _, content in loaded for info in content]
        if not self.infos:
            raise DataError(f'info file(s) {", ".join(self.info_paths)} hold zero samples: the split is '
                            f'empty; regenerate them with python scripts/gen_info.py for a version with '
                            f'scenes in this split')
        self.ida_aug_conf = ida_aug_conf
        self.bda_aug_conf = bda_aug_conf
        self.classes = list(classes)
        self.is_train = is_train
        self.use_cbgs = use_cbgs
        self.num_sweeps = num_sweeps
        self.img_conf = dict(img_conf)
        self.return_depth = return_depth
        self.sweep_idxes = list(sweep_idxes)
        self.key_idxes = [0] + list(key_idxes)
        self.depth_source = depth_source
        self.image_backend = image_backend
        for path, content in loaded:
            if content:
                self._check_first_sample(path, content[0])
        if self.use_cbgs:
            self.sample_indices = cbgs_sample_indices(self.infos, self.classes, np.random.default_rng(cbgs_seed))
            if not self.sample_indices:
                annotated = sum(1 for info in self.infos if any(
                    detection_name(ann['category_name']) in self.classes for ann in info.get('ann_infos', [])))
                if annotated:  # the reference's formula rounds each class's share down to zero
                    raise DataError(f'the training split ({len(self.infos)} samples, {annotated} annotated) is too '
                                    f'small for class-balanced resampling (CBGS): every class gets int(share) = 0 '
                                    f'draws; train with --no-cbgs or on a larger split')
                raise DataError(f'CBGS found no sample with an annotation of {self.classes} in '
                                f'{", ".join(self.info_paths)}: train with --no-cbgs or on a split with annotations')
        self._rng = None
        self._rng_owner = None

    # ----------------------------------------------------------------------------------------- checks
    def _check_first_sample(self, info_path, info):
        """Fail at construction when an info file does not belong to data_root (docs/troubleshooting.md)."""
        cams = self.ida_aug_conf['cams']
        missing_cams = [cam for cam in cams if cam not in info['cam_infos']]
        if missing_cams:
            raise DataError(f'info file {info_path} has no {missing_cams[0]} camera in its first sample: '
                            f'regenerate it with python scripts/gen_info.py')
        files = [info['cam_infos'][cam]['filename'] for cam in cams]
        if not any(os.path.isfile(os.path.join(self.data_root, name)) for name in files):
            raise DataError(f'info file {info_path} was generated for another dataroot or version: none of '
                            f'its first sample\'s images (e.g. {files[0]}) exist under data_root '
                            f'{self.data_root}; regenerate it with python scripts/gen_info.py or fix data_root')
        if not self.return_depth:
            return
        if self.depth_source == 'cache':
            self._depth_cache_file(files[0], required=True)
        elif self.depth_source == 'online':
            self._lidar_file(info, required=True)

    def _depth_cache_file(self, cam_filename, required):
        from bevdepth.datasets.depth_cache import depth_cache_path

        path = os.fspath(depth_cache_path(self.data_root, cam_filename))
        if os.path.isfile(path):
            return path
        if required:
            raise DataError(f'depth cache {path} is missing: run python scripts/gen_depth_gt.py, or use '
                            f'depth_source=\'online\' to project the LiDAR on the fly')
        return None

    def _lidar_file(self, info, required):
        filename = info['lidar_infos']['LIDAR_TOP']['filename']
        path = os.path.join(self.data_root, filename)
        if not os.path.isfile(path) and required:
            raise DataError(f'LiDAR file {path} does not exist: extract the nuScenes LiDAR blobs (samples/'
                            f'LIDAR_TOP) or, for depth GT, run python scripts/gen_depth_gt.py where they exist')
        return path

    # --------------------------------------------------------------------------------------- randomness
    @property
    def rng(self):
        """This process's / worker's numpy Generator, seeded from ``torch.initial_seed()`` on first use."""
        worker = torch.utils.data.get_worker_info()
        owner = (os.getpid(), worker.id if worker is not None else None)
        if self._rng is None or self._rng_owner != owner:
            self._rng = np.random.default_rng(torch.initial_seed())
            self._rng_owner = owner
        return self._rng

    def reseed(self, seed):
        """Replace this process's Generator by ``default_rng(seed)`` (tests, benchmarks)."""
        worker = torch.utils.data.get_worker_info()
        self._rng = np.random.default_rng(seed)
        self._rng_owner = (os.getpid(), worker.id if worker is not None else None)

    # -------------------------------------------------------------------------------------- frames
    def choose_cams(self, rng):
        """All cameras in config order; a random subset in training when Ncams < len(cams)."""
        cams = list(self.ida_aug_conf['cams'])
        if self.is_train and self.ida_aug_conf['Ncams'] < len(cams):
            return [str(c) for c in rng.choice(cams, self.ida_aug_conf['Ncams'], replace=False)]
        return cams

    def frame_cam_infos(self, idx, cams):
        """cam_infos dicts of the frames used for sample ``idx`` (as upstream ``NuscDetDataset.__getitem__``): key frames, each followed by
        its sweeps. A key frame outside the scene falls back to ``idx``; a sweep level without all cameras
        falls back to the closest lower level, then to the key frame itself (the reference appended
        nothing there, which changed S)."""
        frames = []
        for key_idx in self.key_idxes:
            cur_idx = idx + key_idx
            if cur_idx < 0 or self.infos[cur_idx]['scene_token'] != self.infos[idx]['scene_token']:
                cur_idx = idx
            info = self.infos[cur_idx]
            frames.append(info['cam_infos'])
            cam_sweeps = info.get('cam_sweeps', [])
            for sweep_idx in self.sweep_idxes:
                chosen = info['cam_infos']
                for level in range(min(len(cam_sweeps) - 1, sweep_idx), -1, -1):
                    if all(cam in cam_sweeps[level] for cam in cams):
                        chosen = cam_sweeps[level]
                        break
                frames.append(chosen)
        return frames

    # --------------------------------------------------------------------------------------- depth
    def key_frame_depth_points(self, info, cam_info, lidar_points):
        """(M, 3) [u, v, depth] LiDAR points of one camera in original-image pixels (cache or online)."""
        from bevdepth.datasets.depth_cache import depth_cache_path, read_depth_cache
        from bevdepth.datasets.depth_projection import project_lidar_to_image

        if self.depth_source != 'online':
            cache_path = self._depth_cache_file(cam_info['filename'], required=self.depth_source == 'cache')
            if cache_path is not None:
                return read_depth_cache(cache_path)
            lidar_path = self._lidar_file(info, required=False)
            if not os.path.isfile(lidar_path):
                cache_path = os.fspath(depth_cache_path(self.data_root, cam_info['filename']))
                raise DataError(f'no depth GT for {cam_info["filename"]}: neither the depth cache {cache_path} '
                                f'nor the LiDAR file {lidar_path} exists; run python scripts/gen_depth_gt.py '
                                f'where the LiDAR exists, or extract the nuScenes LiDAR blobs')
        image_size = (cam_info.get('width', self.ida_aug_conf['W']),
                      cam_info.get('height', self.ida_aug_conf['H']))
        return project_lidar_to_image(lidar_points(), info['lidar_infos']['LIDAR_TOP'], cam_info, image_size)

    def _lazy_lidar(self, info):
        """A callable loading the key frame's LiDAR points once, on first use."""
        cache = {}

        def points():
            if 'points' not in cache:
                from bevdepth.datasets.depth_projection import load_lidar_points
                cache['points'] = load_lidar_points(self._lidar_file(info, required=True))
            return cache['points']
        return points

    # ------------------------------------------------------------------------------------------ item
    def get_image_data(self, idx, cams, rng):
        """Images, matrices, timestamps (and key-frame depth) of sample ``idx``; see the module docstring."""
        frames = self.frame_cam_infos(idx, cams)
        fH, fW = self.ida_aug_conf['final_dim']
        num_frames, num_cams = len(frames), len(cams)
        imgs = np.empty((num_frames, num_cams, 3, fH, fW), dtype=np.float32)
        sensor2ego = np.empty((num_frames, num_cams, 4, 4))
        sensor2sensor = np.empty((num_frames, num_cams, 4, 4))
        intrins = np.zeros((num_frames, num_cams, 4, 4))
        ida_mats = torch.empty((num_frames, num_cams, 4, 4))
        timestamps = np.empty((num_frames, num_cams), dtype=np.int64)
        depth = np.zeros((1, num_cams, fH, fW), dtype=np.float32) if self.return_depth else None
        key_info = self.infos[idx]
        lidar_points = self._lazy_lidar(key_info)
        pipeline = fast_image_pipeline if self.image_backend == 'opencv' else reference_image_pipeline
        for cam_id, cam in enumerate(cams):
            resize, resize_dims, crop, flip, rotate = sample_ida_augmentation(self.ida_aug_conf, self.is_train, rng)
            ida = ida_matrix(resize, crop, flip, rotate, (fH, fW))
            key_cam = frames[0][cam]
            global2keyego = rigid_inverse(pose_matrix(key_cam['ego_pose']))
            keyego2keysensor = rigid_inverse(pose_matrix(key_cam['calibrated_sensor']))
            for frame_id, cam_infos in enumerate(frames):
                cam_info = cam_infos[cam]
                path = os.path.join(self.data_root, cam_info['filename'])
                size = (cam_info.get('width', self.ida_aug_conf['W']), cam_info.get('height', self.ida_aug_conf['H']))
                if pipeline is fast_image_pipeline:
                    fast_image_pipeline(path, resize, resize_dims, crop, flip, rotate, self.img_conf,
                                        image_size=size, out=imgs[frame_id, cam_id])
                else:
                    imgs[frame_id, cam_id] = reference_image_pipeline(path, resize, resize_dims, crop, flip,
                                                                      rotate, self.img_conf, image_size=size)
                sweepsensor2keyego = (global2keyego @ pose_matrix(cam_info['ego_pose'])
                                      @ pose_matrix(cam_info['calibrated_sensor']))
                sensor2ego[frame_id, cam_id] = sweepsensor2keyego
                sensor2sensor[frame_id, cam_id] = rigid_inverse(keyego2keysensor @ sweepsensor2keyego)
                intrins[frame_id, cam_id, :3, :3] = cam_info['calibrated_sensor']['camera_intrinsic']
                intrins[frame_id, cam_id, 3, 3] = 1
                ida_mats[frame_id, cam_id] = ida
                timestamps[frame_id, cam_id] = cam_info['timestamp']
                if self.return_depth and frame_id == 0:
                    points = self.key_frame_depth_points(key_info, cam_info, lidar_points)
                    depth[0, cam_id] = depth_transform(points, resize, resize_dims, crop, flip, rotate, (fH, fW))
        translation, rotation = mean_ego_pose(frames[0], cams)
        img_metas = dict(box_type_3d='LiDAR', ego2global_translation=translation,
                         ego2global_rotation=rotation, token=key_info['sample_token'])
        return dict(imgs=torch.from_numpy(imgs), sensor2ego=torch.from_numpy(sensor2ego).float(),
                    intrins=torch.from_numpy(intrins).float(), ida_mats=ida_mats,
                    sensor2sensor=torch.from_numpy(sensor2sensor).float(), timestamps=torch.from_numpy(timestamps),
                    img_metas=img_metas, depth=None if depth is None else torch.from_numpy(depth))

    def __getitem__(self, idx):
        if self.use_cbgs:
            idx = self.sample_indices[idx]
        rng = self.rng
        cams = self.choose_cams(rng)
        data = self.get_image_data(idx, cams, rng)
        if self.is_train:
            gt_boxes, gt_labels = gt_boxes_in_mean_ego(self.infos[idx], cams, self.classes)
        else:
            gt_boxes, gt_labels = torch.zeros((0, 9), dtype=torch.float32), torch.zeros((0,), dtype=torch.int64)
        rotate_bda, scale_bda, flip_dx, flip_dy = sample_bda_augmentation(self.bda_aug_conf, self.is_train, rng)
        gt_boxes, bda_mat = bev_transform(gt_boxes, rotate_bda, scale_bda, flip_dx, flip_dy)
        item = [data['imgs'], data['sensor2ego'], data['intrins'], data['ida_mats'], data['sensor2sensor'],
                bda_mat, data['timestamps'], data['img_metas'], gt_boxes, gt_labels]
        if self.return_depth:
            item.append(data['depth'])
        return item

    def __len__(self):
        return len(self.sample_indices) if self.use_cbgs else len(self.infos)

    def __repr__(self):
        return (f'NuscDetDataset({len(self)} samples, {"train" if self.is_train else "eval"}, '
                f'data_root={self.data_root}, infos={self.info_paths}, cbgs={self.use_cbgs}, '
                f'return_depth={self.return_depth}, depth_source={self.depth_source})')


def collate_fn(data, is_return_depth=False):
    """Batch dataset items (upstream ``collate_fn``).

    Returns:
        list: [imgs (B, S, N, 3, fH, fW), mats_dict {sensor2ego_mats (B, S, N, 4, 4), intrin_mats,
        ida_mats, sensor2sensor_mats, bda_mat (B, 4, 4)}, timestamps (B, S, N), img_metas list,
        gt_boxes list of (n_i, 9), gt_labels list of (n_i,), (+ depth_labels (B, 1, N, fH, fW))].
    """
    columns = list(zip(*[item[:10] for item in data]))
    imgs, sensor2ego, intrins, ida_mats, sensor2sensor, bda_mats, timestamps, img_metas, gt_boxes, gt_labels = columns
    mats_dict = dict(sensor2ego_mats=torch.stack(sensor2ego), intrin_mats=torch.stack(intrins),
                     ida_mats=torch.stack(ida_mats), sensor2sensor_mats=torch.stack(sensor2sensor),
                     bda_mat=torch.stack(bda_mats))
    batch = [torch.stack(imgs), mats_dict, torch.stack(timestamps), list(img_metas), list(gt_boxes),
             list(gt_labels)]
    if is_return_depth:
        batch.append(torch.stack([item[10] for item in data]))
    return batch
