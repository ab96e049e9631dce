"""DetNuscEvaluator: global-frame conversion, attribute rule, submission file, guards, official devkit run."""
import json
import math
import os
import pickle

import numpy as np
import pytest
from pyquaternion import Quaternion

from bevdepth.configs.nuscenes import CAMERAS, CLASSES
from bevdepth.evaluators.det_evaluators import DetNuscEvaluator, attribute_for, boxes_to_global_entries


def yaw_quaternion(yaw):
    return Quaternion(axis=[0, 0, 1], radians=yaw).elements


def test_known_box_goes_to_global_frame():
    # Ego at (100, 200, 0) facing +y (yaw 90 deg). A car 10 m ahead, heading along ego x, moving 1 m/s forward.
    meta = dict(token='t0', ego2global_translation=np.array([100.0, 200.0, 0.0]),
                ego2global_rotation=yaw_quaternion(math.pi / 2))
    box = np.array([[10.0, 0.0, 1.0, 4.0, 2.0, 1.5, 0.0, 1.0, 0.0]])
    (entry,) = boxes_to_global_entries(box, np.array([0.7]), np.array([0]), meta, CLASSES)
    assert entry['sample_token'] == 't0' and entry['detection_name'] == 'car'
    assert np.allclose(entry['translation'], [100.0, 210.0, 1.0])
    assert np.allclose(entry['size'], [2.0, 4.0, 1.5])  # wlh from (l, w, h)
    assert np.allclose(entry['rotation'], yaw_quaternion(math.pi / 2))
    assert np.allclose(entry['velocity'], [0.0, 1.0])  # the velocity is rotated too
    assert entry['detection_score'] == pytest.approx(0.7) and isinstance(entry['detection_score'], float)
    assert entry['attribute_name'] == 'vehicle.moving'
    json.dumps(entry)  # plain python floats only


def test_unnormalised_mean_quaternion_is_normalised_like_the_devkit():
    # img_metas carry the element-wise mean of 6 unit quaternions, whose norm is below 1.
    unit = yaw_quaternion(0.3)
    base = dict(token='t', ego2global_translation=np.zeros(3))
    box = np.array([[5.0, -2.0, 0.5, 4.0, 2.0, 1.5, 0.2, 0.0, 0.0]])
    reference = boxes_to_global_entries(box, [0.5], [0], dict(base, ego2global_rotation=unit), CLASSES)[0]
    scaled = boxes_to_global_entries(box, [0.5], [0], dict(base, ego2global_rotation=0.9 * unit), CLASSES)[0]
    for key in ('translation', 'size', 'rotation', 'velocity'):
        assert np.allclose(reference[key], scaled[key]), key


@pytest.mark.parametrize('name, speed, attribute', [
    ('car', 1.0, 'vehicle.moving'), ('car', 0.1, 'vehicle.parked'),
    ('truck', 0.3, 'vehicle.moving'), ('trailer', 0.0, 'vehicle.parked'),
    ('construction_vehicle', 0.5, 'vehicle.moving'), ('construction_vehicle', 0.0, 'vehicle.parked'),
    ('bus', 1.0, 'vehicle.moving'), ('bus', 0.2, 'vehicle.stopped'),
    ('bicycle', 1.0, 'cycle.with_rider'), ('motorcycle', 0.0, 'cycle.without_rider'),
    ('pedestrian', 1.0, 'pedestrian.moving'), ('pedestrian', 0.1, 'pedestrian.standing'),
    ('barrier', 1.0, ''), ('traffic_cone', 0.0, ''),
])
def test_attribute_rule(name, speed, attribute):
    assert attribute_for(name, speed) == attribute


def test_format_results_writes_submission_atomically(tmp_path):
    evaluator = DetNuscEvaluator(CLASSES, output_dir=tmp_path)
    metas = [dict(token=f't{i}', ego2global_translation=np.zeros(3), ego2global_rotation=yaw_quaternion(0))
             for i in range(3)]
    results = [[np.array([[1.0, 2.0, 0.5, 4.0, 2.0, 1.5, 0.0, 0.0, 0.0]]), np.array([0.9]), np.array([8])],
               [np.zeros((0, 9)), np.zeros(0), np.zeros(0, dtype=np.int32)],
               [np.zeros((0, 9), dtype=np.float32), np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)]]
    path = evaluator.format_results(results, metas)
    assert path == os.path.join(str(tmp_path), 'results_nusc.json')
    with open(path) as f:
        submission = json.load(f)
    assert submission['meta'] == dict(use_lidar=False, use_camera=True, use_radar=False, use_map=False,
                                      use_external=False)
    assert sorted(submission['results']) == ['t0', 't1', 't2']
    assert submission['results']['t1'] == [] and submission['results']['t2'] == []
    (entry,) = submission['results']['t0']
    assert entry['detection_name'] == 'pedestrian' and entry['attribute_name'] == 'pedestrian.standing'
    assert sorted(os.listdir(tmp_path)) == ['results_nusc.json']  # no temp file left behind
    with pytest.raises(ValueError, match='appears twice'):
        evaluator.format_results(results[:2], [metas[0], metas[0]])


# ------------------------------------------------------------------------- devkit on the synthetic dataroot
def val_samples(dataroot):
    with open(os.path.join(dataroot, 'nuscenes_infos_val.pkl'), 'rb') as f:
        return pickle.load(f)


def gt_copy_predictions(infos):
    """Predictions equal to the GT (what a perfect model outputs), in the mean-camera ego frame."""
    from bevdepth.datasets.nusc_det_dataset import gt_boxes_in_mean_ego, mean_ego_pose
    results, metas = [], []
    for info in infos:
        boxes, labels = gt_boxes_in_mean_ego(info, CAMERAS, CLASSES)
        translation, rotation = mean_ego_pose(info['cam_infos'], CAMERAS)
        results.append([boxes.numpy(), np.ones(len(boxes), dtype=np.float32), labels.numpy()])
        metas.append(dict(token=info['sample_token'], ego2global_translation=translation,
                          ego2global_rotation=rotation))
    return results, metas


def test_gt_copy_scores_perfect_ap_with_the_official_devkit(synthetic_dataroot, tmp_path, capsys):
    infos = val_samples(synthetic_dataroot)
    results, metas = gt_copy_predictions(infos)
    evaluator = DetNuscEvaluator(CLASSES, data_root=synthetic_dataroot, version='v1.0-mini', output_dir=tmp_path)
    metrics = evaluator.evaluate(results, metas)
    printed = capsys.readouterr().out
    assert 'mAP: ' in printed and 'NDS: ' in printed and 'Per-class results:' in printed
    with open(tmp_path / 'metrics_summary.json') as f:
        summary = json.load(f)
    assert summary['mean_ap'] == pytest.approx(metrics['mAP'])
    assert (tmp_path / 'metrics_details.json').is_file()
    assert not [name for name in os.listdir(tmp_path) if name.startswith('.')]  # scratch folder removed
    perfect = [name for name, aps in metrics['label_aps'].items() if min(aps.values()) > 0.999]
    assert perfect, metrics['label_aps']
    for name, aps in metrics['label_aps'].items():  # a class is either absent from GT (0) or perfect (1)
        assert name in perfect or max(aps.values()) == 0.0, (name, aps)
    assert metrics['mAP'] == pytest.approx(len(perfect) / 10, abs=1e-6)
    for name in perfect:
        assert metrics['label_tp_errors'][name]['trans_err'] < 1e-3
        assert metrics['label_tp_errors'][name]['scale_err'] < 1e-3


def test_token_mismatch_is_one_clear_error(synthetic_dataroot, tmp_path):
    results, metas = gt_copy_predictions(val_samples(synthetic_dataroot))
    evaluator = DetNuscEvaluator(CLASSES, data_root=synthetic_dataroot, version='v1.0-mini', output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"do not match split 'mini_val'.*1 missing.*0 extra"):
        evaluator.evaluate(results[1:], metas[1:])
    extra_meta = dict(metas[0], token='not_a_val_token')
    with pytest.raises(ValueError, match=r'0 missing.*1 extra .*not_a_val_token'):
        evaluator.evaluate(results + [results[0]], metas + [extra_meta])
    assert not (tmp_path / 'results_nusc.json').exists()  # nothing written for a bad submission


def test_no_predicted_box_is_one_clear_error(synthetic_dataroot, tmp_path):
    infos = val_samples(synthetic_dataroot)
    _, metas = gt_copy_predictions(infos)
    empty = [[np.zeros((0, 9)), np.zeros(0), np.zeros(0, dtype=np.int64)] for _ in infos]
    evaluator = DetNuscEvaluator(CLASSES, data_root=synthetic_dataroot, version='v1.0-mini', output_dir=tmp_path)
    with pytest.raises(RuntimeError, match='no box was predicted'):
        evaluator.evaluate(empty, metas)


def test_unknown_version_and_dataroot_errors(tmp_path):
    with pytest.raises(ValueError, match='only'):
        DetNuscEvaluator(CLASSES, version='v1.0-test').eval_set
    evaluator = DetNuscEvaluator(CLASSES, data_root=tmp_path / 'missing', version='v1.0-mini', output_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match='--data_root'):
        evaluator.evaluate([], [])
