"""nuScenes detection evaluator: model outputs -> ``results_nusc.json`` -> official ``DetectionEval``.

Mirrors the reference ``DetNuscEvaluator`` (upstream ``bevdepth/evaluators/det_evaluators.py``): boxes are turned into
devkit ``Box`` objects in the (mean-camera) ego frame, rotated and translated to the global frame, given an attribute
by the reference's speed rule, and written as the nuScenes submission format. ``evaluate`` then runs the unmodified
devkit ``DetectionEval`` with ``config_factory('detection_cvpr_2019')``.

Differences from the reference, all about robustness (results are unchanged):
- the JSON and the metric files are written atomically (temp file + rename);
- before calling the devkit we check that the prediction tokens equal the split's tokens and that at least one box was
  predicted, and stop with one clear line instead of the devkit's bare ``AssertionError`` /
  ``Exception: Error: Invalid box type: None`` (nuscenes-devkit ``DetectionEval.__init__`` and
  ``EvalBoxes.deserialize``).
"""
import os
import shutil
import tempfile

import numpy as np

from bevdepth.utils.io import atomic_json_dump

# The reference's default attribute per class (used when the speed rule does not decide).
DEFAULT_ATTRIBUTE = {
    'car': 'vehicle.parked',
    'pedestrian': 'pedestrian.moving',
    'trailer': 'vehicle.parked',
    'truck': 'vehicle.parked',
    'bus': 'vehicle.moving',
    'motorcycle': 'cycle.without_rider',
    'construction_vehicle': 'vehicle.parked',
    'bicycle': 'cycle.without_rider',
    'barrier': '',
    'traffic_cone': '',
}

ERROR_NAME_MAPPING = {
    'trans_err': 'mATE',
    'scale_err': 'mASE',
    'orient_err': 'mAOE',
    'vel_err': 'mAVE',
    'attr_err': 'mAAE',
}

# Speed (m/s, global frame) above which an object counts as moving (reference value).
MOVING_SPEED = 0.2

# The devkit's split for each dataset version (the reference's hard mapping).
EVAL_SET_OF_VERSION = {'v1.0-trainval': 'val', 'v1.0-mini': 'mini_val'}


class SubmissionMismatchError(ValueError):
    """The predicted samples are not the split's samples (the devkit would assert)."""


class EmptySubmissionError(RuntimeError):
    """Not a single box was predicted (the devkit would crash with 'Invalid box type: None')."""


DEFAULT_MODALITY = dict(use_lidar=False, use_camera=True, use_radar=False, use_map=False, use_external=False)


def attribute_for(name, speed):
    """The reference attribute rule (upstream ``DetNuscEvaluator._format_bbox``).

    ``speed``: speed in m/s of the box in the global frame.
    """
    if speed > MOVING_SPEED:
        if name in ('car', 'construction_vehicle', 'bus', 'truck', 'trailer'):
            return 'vehicle.moving'
        if name in ('bicycle', 'motorcycle'):
            return 'cycle.with_rider'
        return DEFAULT_ATTRIBUTE[name]
    if name == 'pedestrian':
        return 'pedestrian.standing'
    if name == 'bus':
        return 'vehicle.stopped'
    return DEFAULT_ATTRIBUTE[name]


def boxes_to_global_entries(boxes, scores, labels, img_meta, class_names):
    """Convert one sample's predictions to nuScenes result entries in the global frame.

    Args:
        boxes: (n, >=9) array [x, y, z (box centre), l, w, h, yaw, vx, vy] in the sample's ego frame
            (the mean pose of the 6 cameras).
        scores: (n,) array.
        labels: (n,) int array, index into ``class_names``.
        img_meta: dict with 'token', 'ego2global_translation' (3,), 'ego2global_rotation' (4, w x y z; the
            element-wise mean of the cameras' quaternions, not normalised - the devkit's Quaternion maths
            normalises it exactly as in the reference).
        class_names: list of class names (label order).

    Returns:
        list of result dicts (devkit submission format).
    """
    # Evaluation only (not on the training path): the devkit and pyquaternion are imported here.
    from nuscenes.utils.data_classes import Box
    from pyquaternion import Quaternion

    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 9)
    scores = np.asarray(scores).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if not (len(boxes) == len(scores) == len(labels)):
        raise ValueError(f'sample {img_meta["token"]}: {len(boxes)} boxes but {len(scores)} scores and '
                         f'{len(labels)} labels; eval_step must return matching arrays')
    ego_rotation = Quaternion(np.asarray(img_meta['ego2global_rotation'], dtype=np.float64))
    ego_translation = np.asarray(img_meta['ego2global_translation'], dtype=np.float64)
    entries = []
    for box_array, score, label in zip(boxes, scores, labels):
        name = class_names[int(label)]
        box = Box(box_array[:3], box_array[[4, 3, 5]],  # wlh from (l, w, h)
                  Quaternion(axis=[0, 0, 1], radians=float(box_array[6])),
                  velocity=(float(box_array[7]), float(box_array[8]), 0.0))
        box.rotate(ego_rotation)  # rotates the velocity as well
        box.translate(ego_translation)
        speed = float(np.sqrt(box.velocity[0] ** 2 + box.velocity[1] ** 2))
        entries.append(dict(
            sample_token=img_meta['token'],
            translation=[float(v) for v in box.center],
            size=[float(v) for v in box.wlh],
            rotation=[float(v) for v in box.orientation.elements],
            velocity=[float(v) for v in box.velocity[:2]],
            detection_name=name,
            detection_score=float(score),
            attribute_name=attribute_for(name, speed),
        ))
    return entries


def split_sample_tokens(nusc, eval_set):
    """Sample tokens of a predefined devkit split present in this dataroot (membership by scene name)."""
    from nuscenes.utils.splits import create_splits_scenes
    scene_names = set(create_splits_scenes()[eval_set])
    scene_tokens = {scene['token'] for scene in nusc.scene if scene['name'] in scene_names}
    return {sample['token'] for sample in nusc.sample if sample['scene_token'] in scene_tokens}


def check_tokens_match(predicted_tokens, split_tokens, eval_set):
    """Raise a one-line ValueError unless the predicted token set equals the split's (devkit assertion)."""
    predicted = set(predicted_tokens)
    if len(predicted) != len(predicted_tokens):
        raise SubmissionMismatchError(
            f'predictions hold {len(predicted_tokens)} samples but only {len(predicted)} distinct tokens: duplicated '
            f'samples (distributed gathering must drop the sampler padding)')
    missing = sorted(split_tokens - predicted)
    extra = sorted(predicted - split_tokens)
    if missing or extra:
        raise SubmissionMismatchError(
            f"prediction tokens do not match split '{eval_set}': {len(predicted)} predicted, {len(split_tokens)} in "
            f'the split, {len(missing)} missing (e.g. {missing[:3]}), {len(extra)} extra (e.g. {extra[:3]}); '
            f'evaluate the info file of this split (nuscenes_infos_val.pkl) against the same dataroot/version')


class DetNuscEvaluator:
    """Formats predictions as a nuScenes submission and evaluates them with the official devkit.

    Args:
        class_names: class names in label order (bevdepth.configs.nuscenes.CLASSES).
        eval_version: devkit detection config name.
        data_root: nuScenes dataroot (holds ``<version>/`` tables).
        version: 'v1.0-trainval' (evaluates split 'val') or 'v1.0-mini' (split 'mini_val').
        modality: the submission's ``meta`` dict.
        output_dir: folder for results_nusc.json, metrics_summary.json and metrics_details.json.
    """

    def __init__(self, class_names, eval_version='detection_cvpr_2019', data_root='data/nuScenes',
                 version='v1.0-trainval', modality=None, output_dir=None):
        self.class_names = list(class_names)
        unknown = [name for name in self.class_names if name not in DEFAULT_ATTRIBUTE]
        if unknown:
            raise ValueError(f'unknown class names {unknown}; nuScenes detection classes are '
                             f'{sorted(DEFAULT_ATTRIBUTE)}')
        self.eval_version = eval_version
        self.data_root = str(data_root)
        self.version = version
        self.modality = dict(DEFAULT_MODALITY if modality is None else modality)
        self.output_dir = str(output_dir) if output_dir is not None else os.getcwd()

    @property
    def eval_set(self):
        if self.version not in EVAL_SET_OF_VERSION:
            raise ValueError(f"cannot evaluate nuScenes version '{self.version}': only "
                             f'{sorted(EVAL_SET_OF_VERSION)} have annotated evaluation splits')
        return EVAL_SET_OF_VERSION[self.version]

    def format_results(self, results, img_metas, output_dir=None):
        """Write ``<output_dir>/results_nusc.json`` (atomically) and return its path.

        Args:
            results: list (one per sample) of [boxes (n, 9), scores (n,), labels (n,)] numpy arrays.
            img_metas: list of per-sample dicts (token, ego2global_translation, ego2global_rotation).
            output_dir: overrides the constructor's output_dir.
        """
        if len(results) != len(img_metas):
            raise ValueError(f'{len(results)} results but {len(img_metas)} img_metas; they must pair up')
        output_dir = str(output_dir) if output_dir is not None else self.output_dir
        print('Formating bboxes of img_bbox')
        print('Start to convert detection format...')
        nusc_annos = {}
        for (boxes, scores, labels), img_meta in zip(results, img_metas):
            token = img_meta['token']
            if token in nusc_annos:
                raise ValueError(f'sample {token} appears twice in the predictions (distributed padding not removed?)')
            nusc_annos[token] = boxes_to_global_entries(boxes, scores, labels, img_meta, self.class_names)
        result_path = os.path.join(output_dir, 'results_nusc.json')
        atomic_json_dump({'meta': self.modality, 'results': nusc_annos}, result_path)
        print('Results writes to', result_path)
        return result_path

    def evaluate(self, results, img_metas, output_dir=None):
        """Format, check and run the official ``DetectionEval``; return the headline and per-class metrics.

        Prints the devkit's summary (mAP, mATE ... NDS, per-class table) and writes metrics_summary.json and
        metrics_details.json into ``output_dir``.

        Returns:
            dict with 'mAP', 'NDS', 'mATE', 'mASE', 'mAOE', 'mAVE', 'mAAE', 'label_aps' {class: {dist: AP}},
            'label_tp_errors' {class: {err: value}}, 'result_path' and 'summary_path'.
        """
        from nuscenes import NuScenes
        from nuscenes.eval.common.config import config_factory
        from nuscenes.eval.detection.evaluate import DetectionEval

        output_dir = str(output_dir) if output_dir is not None else self.output_dir
        eval_set = self.eval_set
        if not os.path.isdir(os.path.join(self.data_root, self.version)):
            raise FileNotFoundError(f"nuScenes tables '{self.version}' not found under {self.data_root}: pass "
                                    f'--data_root <dataroot> and the matching --version')
        nusc = NuScenes(version=self.version, dataroot=self.data_root, verbose=False)
        check_tokens_match([meta['token'] for meta in img_metas], split_sample_tokens(nusc, eval_set), eval_set)
        num_boxes = sum(len(result[1]) for result in results)
        if num_boxes == 0:
            raise EmptySubmissionError(
                f"no box was predicted in any of the {len(results)} samples of split '{eval_set}' (all scores under "
                f'the score threshold): the model is untrained or diverged, and the nuScenes devkit cannot evaluate '
                f'an empty submission')
        result_path = self.format_results(results, img_metas, output_dir)

        print('Evaluating bboxes of img_bbox')
        # The devkit writes its files non-atomically (and a plots/ folder); run it in a scratch folder and
        # move the finished files into place.
        scratch = tempfile.mkdtemp(prefix='.nusc_eval.', dir=output_dir)
        try:
            nusc_eval = DetectionEval(nusc, config=config_factory(self.eval_version), result_path=result_path,
                                      eval_set=eval_set, output_dir=scratch, verbose=False)
            summary = nusc_eval.main(plot_examples=0, render_curves=False)
            for name in ('metrics_summary.json', 'metrics_details.json'):
                os.replace(os.path.join(scratch, name), os.path.join(output_dir, name))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

        metrics = {
            'mAP': float(summary['mean_ap']),
            'NDS': float(summary['nd_score']),
            'label_aps': summary['label_aps'],
            'label_tp_errors': summary['label_tp_errors'],
            'result_path': result_path,
            'summary_path': os.path.join(output_dir, 'metrics_summary.json'),
        }
        for err_name, short_name in ERROR_NAME_MAPPING.items():
            metrics[short_name] = float(summary['tp_errors'][err_name])
        return metrics
