"""bevdepth.evaluators.visualize and scripts/visualize_nusc.py: boxes are projected with the box translation as the
CENTRE (the reference visualizer lifted predictions by half their height), clipped, and land on the objects
of the synthetic images."""
import json
import os
import pathlib
import pickle
import subprocess
import sys

import cv2
import numpy as np
import pytest
from pyquaternion import Quaternion

from bevdepth.evaluators.visualize import (CAMERA_GRID, GT_COLOUR, load_results, project_box_edges,
                                           render_bev, render_sample, sample_boxes, select_info, write_png)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
FOCAL, CX, CY, WIDTH, HEIGHT = 1000.0, 800.0, 450.0, 1600, 900


def _front_camera():
    """A camera at the ego origin looking along ego +x (camera z), image x = -ego y, image y = -ego z."""
    cam_to_ego = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], dtype=float)
    return dict(ego_pose=dict(translation=[0.0, 0.0, 0.0], rotation=[1.0, 0.0, 0.0, 0.0]),
                calibrated_sensor=dict(translation=[0.0, 0.0, 0.0],
                                       rotation=list(Quaternion(matrix=cam_to_ego).elements),
                                       camera_intrinsic=[[FOCAL, 0, CX], [0, FOCAL, CY], [0, 0, 1]]),
                width=WIDTH, height=HEIGHT)


def _box(center, wlh=(2.0, 4.0, 1.5), yaw=0.0):
    from nuscenes.utils.data_classes import Box
    return Box(list(center), list(wlh), Quaternion(axis=[0, 0, 1], angle=yaw), name='car')


def test_box_centre_projects_symmetrically_about_its_centre():
    # Centre 20 m ahead at camera height: the drawn box must be vertically symmetric about the principal point
    # (the reference's +h/2 shift would put it ~h/2 higher: its bottom edge at v = CY).
    segments = project_box_edges(_box((20.0, 0.0, 0.0)), _front_camera(), (WIDTH, HEIGHT))
    assert len(segments) == 12
    ys = np.array([p[1] for seg in segments for p in seg], dtype=float)
    xs = np.array([p[0] for seg in segments for p in seg], dtype=float)
    assert abs((ys.min() + ys.max()) / 2 - CY) <= 1.0
    assert abs((xs.min() + xs.max()) / 2 - CX) <= 1.0
    # Nearest face 18 m away: h = 1.5 m spans FOCAL * 1.5 / 18 pixels.
    assert abs((ys.max() - ys.min()) - FOCAL * 1.5 / 18.0) <= 2.0


def test_boxes_behind_are_dropped_and_straddling_boxes_clipped():
    assert project_box_edges(_box((-10.0, 0.0, 0.0)), _front_camera(), (WIDTH, HEIGHT)) == []
    segments = project_box_edges(_box((0.5, 3.0, 0.0), wlh=(2.0, 8.0, 1.5)), _front_camera(), (WIDTH, HEIGHT))
    assert segments, 'a box reaching in front of the camera keeps its visible edges'
    for seg in segments:
        for x, y in seg:
            assert 0 <= x <= WIDTH and 0 <= y <= HEIGHT


def test_results_loading_and_selection(tmp_path):
    info = dict(sample_token='tok', ann_infos=[
        dict(translation=[10.0, 0.0, 0.5], size=[2.0, 4.0, 1.5], rotation=[1.0, 0, 0, 0], category_name='vehicle.car',
             velocity=np.array([np.nan, np.nan, np.nan])),
        dict(translation=[5.0, 1.0, 0.5], size=[0.5, 0.5, 1.0], rotation=[1.0, 0, 0, 0], category_name='animal',
             velocity=np.zeros(3))])
    path = tmp_path / 'results_nusc.json'
    path.write_text(json.dumps(dict(meta={}, results={'tok': [
        dict(sample_token='tok', translation=[1.0, 2.0, 3.0], size=[1.0, 2.0, 1.0], rotation=[1.0, 0, 0, 0],
             velocity=[1.0, 0.0], detection_name='truck', detection_score=0.8, attribute_name=''),
        dict(sample_token='tok', translation=[1.0, 2.0, 3.0], size=[1.0, 2.0, 1.0], rotation=[1.0, 0, 0, 0],
             velocity=[0.0, 0.0], detection_name='car', detection_score=0.1, attribute_name='')]})))
    gt, pred = sample_boxes(info, load_results(path), score_thr=0.3)
    assert [b.name for b in gt] == ['car'] and np.all(np.isfinite(gt[0].velocity))
    assert [b.name for b in pred] == ['truck'] and pred[0].center.tolist() == [1.0, 2.0, 3.0]
    assert select_info([info], 0) is info and select_info([info], 'tok') is info and select_info([info], '0') is info
    with pytest.raises(ValueError, match='out of range'):
        select_info([info], 3)
    with pytest.raises(ValueError, match='not in this split'):
        select_info([info], 'missing')
    (tmp_path / 'bad.json').write_text('{"meta": {}}')
    with pytest.raises(ValueError, match='no "results"'):
        load_results(tmp_path / 'bad.json')
    with pytest.raises(FileNotFoundError):
        load_results(tmp_path / 'absent.json')


def test_bev_panel_draws_box_and_points():
    lidar_info = dict(ego_pose=dict(translation=[0.0, 0.0, 0.0], rotation=[1.0, 0, 0, 0]))
    box = _box((20.0, 10.0, 0.0))
    box.velocity = np.array([5.0, 0.0, 0.0])
    panel = render_bev(np.array([[-20.0, 0.0, 0.0]]), lidar_info, [box], [], size=440, bev_range=55.0)
    px_per_m = 440 / 110.0
    u, v = int(round(220 - 10 * px_per_m)), int(round(220 - 20 * px_per_m))  # box centre: x fwd = up, y = left
    region = panel[v - 10:v + 11, u - 10:u + 11].reshape(-1, 3)
    assert (region == np.array(GT_COLOUR, dtype=np.uint8)).all(1).any()
    assert (panel[int(round(220 + 20 * px_per_m)), 220] < 255).all()  # the LiDAR point 20 m behind


def _object_mask_colour_contrast(image, box, cam_info):
    """Mean |colour inside the projected box hull - colour in a ring around it| on the raw camera image."""
    segments = project_box_edges(box, cam_info, (image.shape[1], image.shape[0]))
    points = np.array([p for seg in segments for p in seg], dtype=np.int32)
    hull = cv2.convexHull(points)
    inside = np.zeros(image.shape[:2], np.uint8)
    cv2.fillPoly(inside, [hull], 1)
    eroded = cv2.erode(inside, np.ones((5, 5), np.uint8))
    ring = cv2.dilate(inside, np.ones((41, 41), np.uint8)) - inside
    return inside, eroded, ring


def _largest_visible_gt(info, gt_boxes):
    """(camera, box, projected area) of the GT box with the largest fully-in-front projection."""
    best = None
    for cam in [c for row in CAMERA_GRID for c in row]:
        cam_info = info['cam_infos'][cam]
        size = (cam_info.get('width', 1600), cam_info.get('height', 900))
        for box in gt_boxes:
            segments = project_box_edges(box, cam_info, size)
            if len(segments) != 12:
                continue
            points = np.array([p for seg in segments for p in seg], dtype=np.float32)
            area = cv2.contourArea(cv2.convexHull(points))
            if best is None or area > best[2]:
                best = (cam, box, area)
    return best


def test_gt_boxes_land_on_synthetic_objects(synthetic_dataroot, tmp_path):
    with open(synthetic_dataroot / 'nuscenes_infos_val.pkl', 'rb') as f:
        infos = pickle.load(f)
    info = next(i for i in infos if i.get('ann_infos'))
    gt, _ = sample_boxes(info)
    assert gt, 'the synthetic sample has annotated objects'
    cam, box, area = _largest_visible_gt(info, gt)
    assert area > 500, 'some object is fully visible in a camera'
    cam_info = info['cam_infos'][cam]
    image = cv2.imread(str(synthetic_dataroot / cam_info['filename']))
    inside, eroded, ring = _object_mask_colour_contrast(image, box, cam_info)
    # The object is drawn as a shaded box: its pixels differ from the ground / sky right around it, so the
    # projected hull (where the box is drawn) covers pixels unlike its surroundings.
    inside_colour = image[eroded.astype(bool)].reshape(-1, 3).astype(float)
    ring_colour = image[ring.astype(bool)].reshape(-1, 3).astype(float)
    contrast = np.abs(np.median(inside_colour, 0) - np.median(ring_colour, 0)).max()
    assert contrast > 20, f'projected box in {cam} does not sit on a distinct object (contrast {contrast:.1f})'
    # A box shifted by its own height (the reference's bug, doubled for a clear margin) sits off the object.
    shifted = box.copy()
    shifted.translate(np.array([0.0, 0.0, 2.0 * box.wlh[2]]))
    _, eroded_shifted, _ = _object_mask_colour_contrast(image, shifted, cam_info)
    overlap = (eroded & eroded_shifted).sum() / max(eroded.sum(), 1)
    assert overlap < 0.6


def test_projected_gt_centres_have_the_rendered_object_colour(synthetic_dataroot):
    """The synthetic writer records each instance's BGR colour; its box faces are that colour times a shading
    factor in [0.42, 1], and the front face carries a near-black panel around its centre. The pixel where a GT box
    centre projects must show that colour's hue or the panel (the object is there), and not after the reference's
    z bug (centre lifted by h / 2, here doubled to h for a clear miss)."""
    with open(synthetic_dataroot / 'synthetic_nuscenes.json') as f:
        colours = json.load(f)['instance_colors_bgr']
    with open(synthetic_dataroot / 'nuscenes_infos_val.pkl', 'rb') as f:
        infos = pickle.load(f)

    def centre_pixel(info, ann, cam, lift=0.0):
        from bevdepth.evaluators.visualize import global_to_camera

        cam_info = info['cam_infos'][cam]
        centre = np.asarray(ann['translation'], dtype=float) + [0.0, 0.0, lift]
        point = global_to_camera(cam_info)[:3] @ np.append(centre, 1.0)
        if point[2] < 2.0:
            return None
        uvw = np.asarray(cam_info['calibrated_sensor']['camera_intrinsic']) @ point
        u, v = uvw[:2] / uvw[2]
        return (int(u), int(v)) if 20 <= u < cam_info['width'] - 20 and 20 <= v < cam_info['height'] - 20 else None

    def matches(pixel_bgr, colour_bgr):
        a, b = np.asarray(pixel_bgr, float), np.asarray(colour_bgr, float)
        if a.max() < 50:  # the front panel (<= 38 grey levels); ground, sky and instance colours are brighter
            return True
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9)) > 0.985

    checked = hits = lifted_hits = 0
    for info in infos[:4]:
        for cam in info['cam_infos']:
            image = cv2.imread(str(synthetic_dataroot / info['cam_infos'][cam]['filename']))
            for ann in info['ann_infos']:
                pixel = centre_pixel(info, ann, cam)
                if pixel is None:
                    continue
                colour = colours[ann['instance_token']]
                checked += 1
                # 3x3 median: robust to JPEG ringing at a face edge.
                hits += matches(np.median(image[pixel[1] - 1:pixel[1] + 2, pixel[0] - 1:pixel[0] + 2], (0, 1)),
                                colour)
                lifted = centre_pixel(info, ann, cam, lift=ann['size'][2])
                if lifted is not None:
                    lifted_hits += matches(image[lifted[1], lifted[0]], colour)
    assert checked >= 20, 'enough boxes project into the cameras'
    # Occlusion by a nearer object can hide a centre; nearly all must show their own colour.
    assert hits >= 0.85 * checked, f'{hits} of {checked} projected GT centres show the object colour'
    assert lifted_hits <= 0.3 * checked


def test_render_sample_with_gt_as_prediction(synthetic_dataroot, tmp_path):
    with open(synthetic_dataroot / 'nuscenes_infos_val.pkl', 'rb') as f:
        infos = pickle.load(f)
    info = next(i for i in infos if i.get('ann_infos'))
    gt, _ = sample_boxes(info)
    results = {info['sample_token']: [
        dict(sample_token=info['sample_token'], translation=list(b.center), size=list(b.wlh),
             rotation=list(b.orientation.elements), velocity=list(b.velocity[:2]), detection_name=b.name,
             detection_score=0.9, attribute_name='') for b in gt]}
    with_pred = render_sample(synthetic_dataroot, info, results, score_thr=0.3, cam_width=320)
    gt_only = render_sample(synthetic_dataroot, info, None, cam_width=320)
    assert with_pred.shape == gt_only.shape and with_pred.dtype == np.uint8
    assert with_pred.shape[0] == 2 * round(900 * 320 / 1600) and with_pred.shape[1] == 3 * 320 + with_pred.shape[0]
    assert (with_pred != gt_only).any(), 'predictions are drawn'
    out = tmp_path / 'vis.png'
    write_png(out, with_pred)
    assert cv2.imread(str(out)).shape == with_pred.shape


def test_cli_writes_one_png_per_sample(synthetic_dataroot, tmp_path):
    with open(synthetic_dataroot / 'nuscenes_infos_val.pkl', 'rb') as f:
        infos = pickle.load(f)
    results = tmp_path / 'results_nusc.json'
    results.write_text(json.dumps(dict(meta={}, results={infos[0]['sample_token']: []})))
    out_dir = tmp_path / 'out'
    cmd = [sys.executable, 'scripts/visualize_nusc.py', '--data_root', str(synthetic_dataroot), '--version',
           'v1.0-mini', '--split', 'val', '--samples', infos[3]['sample_token'], '1', '--count', '2', '--results',
           str(results), '--out_dir', str(out_dir), '--cam_width', '160']
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD='0'))
    assert proc.returncode == 0, proc.stderr
    # Samples 3 and 1, then the first two (1 is not repeated): three PNGs named by token.
    expected = {infos[i]['sample_token'] + '.png' for i in (0, 1, 3)}
    assert set(os.listdir(out_dir)) == expected
    for name in expected:
        assert cv2.imread(str(out_dir / name)) is not None
    bad = subprocess.run(cmd[:2] + ['--data_root', str(tmp_path / 'nowhere'), '--out_dir', str(out_dir)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith('error: ')
    assert 'does not exist' in bad.stderr


def test_cli_rejects_unknown_sample(synthetic_dataroot, tmp_path, capsys):
    sys.path.insert(0, str(REPO_ROOT / 'scripts'))
    import visualize_nusc

    with pytest.raises(SystemExit) as excinfo:
        visualize_nusc.main(['--data_root', str(synthetic_dataroot), '--split', 'val', '--samples', 'nope',
                             '--out_dir', str(tmp_path)])
    assert excinfo.value.code == 1 and capsys.readouterr().err.startswith('error: sample token')
    assert not os.listdir(tmp_path)


def test_cli_reference_positional_form_and_aliases(synthetic_dataroot, tmp_path):
    sys.path.insert(0, str(REPO_ROOT / 'scripts'))
    import visualize_nusc

    with open(synthetic_dataroot / 'nuscenes_infos_val.pkl', 'rb') as f:
        infos = pickle.load(f)
    results = tmp_path / 'results_nusc.json'
    results.write_text(json.dumps(dict(meta={}, results={})))
    # The reference's form: IDX RESULT_PATH TARGET_PATH (the PNG path itself).
    written = visualize_nusc.main(['2', str(results), str(tmp_path / 'ref' / 'two.png'), '--data_root',
                                   str(synthetic_dataroot), '--cam_width', '64'])
    assert written == [str(tmp_path / 'ref' / 'two.png')] and cv2.imread(written[0]) is not None
    # scripts/demo.sh's spelling: --dataroot, --num-samples, --out.
    written = visualize_nusc.main(['--dataroot', str(synthetic_dataroot), '--num-samples', '2', '--out',
                                   str(tmp_path / 'demo'), '--cam_width', '64'])
    assert sorted(os.listdir(tmp_path / 'demo')) == sorted(i['sample_token'] + '.png' for i in infos[:2])
    with pytest.raises(SystemExit):
        visualize_nusc.parse_args(['2', str(results)])  # incomplete positional form
