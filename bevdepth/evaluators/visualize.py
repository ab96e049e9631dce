"""Render one nuScenes sample: six camera images with projected 3D boxes and a bird's-eye-view panel.

Ground truth comes from the info file (``ann_infos``: global-frame nuScenes annotations), predictions from a
``results_nusc.json`` (global frame, the nuScenes detection submission format). Both are nuScenes boxes whose
``translation`` is the box CENTRE. The reference ``scripts/visualize_nusc.py`` added half the box height to
every predicted box's z (``box3d[2] += 0.5 * box3d[5]``), i.e. treated the submitted centre as the bottom centre
(mmdet3d's LiDAR-box convention), so its predicted boxes floated half a box height too high. Here GT and
predictions both go through ``nuscenes.utils.data_classes.Box`` with the translation as centre.

Camera projection: global -> ego at the camera's timestamp (the camera's own ``ego_pose``) -> camera
(``calibrated_sensor``) -> pixels (intrinsics). Box edges are clipped at a near plane in front of the camera
(a box entirely behind it is dropped) and then to the image. The reference used the mean-camera ego pose for
every camera and a fixed ego frame for the LiDAR; here every sensor uses its own ego pose.

BEV panel: the LiDAR ego frame (x forward = up, y left = left), LiDAR points as grey dots, box footprints with
a heading tick, velocity arrows (metres travelled in ``VELOCITY_ARROW_SECONDS``).
"""
import json
import os

import cv2
import numpy as np
from pyquaternion import Quaternion

from bevdepth.configs.nuscenes import CLASSES
from bevdepth.datasets.errors import DataError

__all__ = ['CAMERA_GRID', 'GT_COLOUR', 'CLASS_COLOURS', 'load_results', 'select_info', 'sample_boxes',
           'project_box_edges', 'render_camera', 'render_bev', 'render_sample', 'write_png']

# Display order: front row left to right, back row as seen from behind the car (left to right).
CAMERA_GRID = [['CAM_FRONT_LEFT', 'CAM_FRONT', 'CAM_FRONT_RIGHT'],
               ['CAM_BACK_LEFT', 'CAM_BACK', 'CAM_BACK_RIGHT']]
GT_COLOUR = (0, 200, 0)  # BGR green
PRED_COLOUR = (0, 0, 255)  # BGR red, for names outside CLASSES
# BGR colours of the matplotlib 'tab10' palette, one per detection class (red is left to unknown names).
CLASS_COLOURS = dict(zip(CLASSES, [
    (180, 119, 31), (14, 127, 255), (189, 103, 148), (75, 86, 140), (194, 119, 227),
    (127, 127, 127), (34, 189, 188), (207, 190, 23), (255, 0, 255), (0, 215, 255),
]))
NEAR_PLANE = 0.1  # metres in front of the camera
VELOCITY_ARROW_SECONDS = 1.0
# The 12 edges of a devkit Box.corners() cuboid: front face 0-3, back face 4-7, then the four side edges.
BOX_EDGES = [(0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7)]

def _pose_matrix(record):
    mat = np.eye(4)
    mat[:3, :3] = Quaternion(record['rotation']).rotation_matrix
    mat[:3, 3] = record['translation']
    return mat


def _transform(mat, points):
    """(4, 4) @ (M, 3) points -> (M, 3)."""
    return points @ mat[:3, :3].T + mat[:3, 3]


# --------------------------------------------------------------------------------------------- inputs

def load_results(path):
    """The ``results`` dict {sample_token: [box dict]} of a nuScenes results JSON."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'results file {path} does not exist: pass the results_nusc.json written by '
                                f'evaluation (-e) or prediction (-p)')
    try:
        with open(path) as f:
            content = json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f'results file {path} is not valid JSON ({err}): regenerate it') from None
    if not isinstance(content, dict) or not isinstance(content.get('results'), dict):
        raise DataError(f'results file {path} has no "results" mapping of sample tokens to boxes: it is not a '
                         f'nuScenes detection results file')
    return content['results']


def select_info(infos, sample):
    """The info dict of ``sample``: an index (int or digit string) into ``infos`` or a sample token."""
    if isinstance(sample, (int, np.integer)) or (isinstance(sample, str) and sample.lstrip('-').isdigit()):
        index = int(sample)
        if not -len(infos) <= index < len(infos):
            raise ValueError(f'sample index {index} is out of range: the split has {len(infos)} samples')
        return infos[index]
    for info in infos:
        if info['sample_token'] == sample:
            return info
    raise ValueError(f'sample token {sample!r} is not in this split\'s info file: check --split or the token')


def sample_boxes(info, results=None, score_thr=0.3):
    """GT and predicted boxes of one sample as devkit ``Box`` objects in the global frame.

    Args:
        info: sample info dict (``ann_infos`` may be absent, e.g. on the test split).
        results: {sample_token: [box dict]} or None.
        score_thr: predictions below this detection_score are skipped.

    Returns:
        (gt, pred): lists of ``Box``; ``box.name`` is the detection class, ``box.score`` the score (NaN for GT).
        GT keeps the annotations of the 10 detection classes (point-count filter not applied).
    """
    from nuscenes.utils.data_classes import Box

    from bevdepth.datasets.nusc_det_dataset import detection_name

    gt = []
    for ann in info.get('ann_infos', []):
        name = detection_name(ann['category_name'])
        if name not in CLASSES:
            continue
        velocity = np.nan_to_num(np.asarray(ann.get('velocity', (0.0, 0.0, 0.0)), dtype=np.float64))
        gt.append(Box(ann['translation'], ann['size'], Quaternion(ann['rotation']), velocity=tuple(velocity),
                      name=name))
    pred = []
    for det in (results or {}).get(info['sample_token'], []):
        score = float(det.get('detection_score', 1.0))
        if score < score_thr:
            continue
        velocity = list(det.get('velocity', (0.0, 0.0)))[:2] + [0.0]
        pred.append(Box(det['translation'], det['size'], Quaternion(det['rotation']), velocity=tuple(velocity),
                        name=det.get('detection_name'), score=score))
    return gt, pred


# ---------------------------------------------------------------------------------------------- cameras

def global_to_camera(cam_info):
    """4x4 global -> camera transform for a camera info (its own ego pose and calibration)."""
    ego2global = _pose_matrix(cam_info['ego_pose'])
    cam2ego = _pose_matrix(cam_info['calibrated_sensor'])
    return np.linalg.inv(ego2global @ cam2ego)


def project_box_edges(box, cam_info, image_size):
    """Pixel segments of a global-frame box's 12 edges in one camera, clipped to the near plane and image.

    Args:
        box: devkit ``Box`` in the global frame (centre translation).
        cam_info: info dict of the camera (ego_pose, calibrated_sensor with camera_intrinsic).
        image_size: (width, height) of the original image.

    Returns:
        list of ((x1, y1), (x2, y2)) float pixel segments, empty when the box is behind the camera or outside
        the image.
    """
    corners = _transform(global_to_camera(cam_info), box.corners().T)  # (8, 3) camera frame
    if (corners[:, 2] <= NEAR_PLANE).all():
        return []
    intrinsic = np.asarray(cam_info['calibrated_sensor']['camera_intrinsic'], dtype=np.float64)
    width, height = image_size
    segments = []
    for start, end in BOX_EDGES:
        p, q = corners[start].copy(), corners[end].copy()
        if p[2] <= NEAR_PLANE and q[2] <= NEAR_PLANE:
            continue
        # Clip the edge at the near plane so a box reaching behind the camera still draws its visible part.
        if p[2] < NEAR_PLANE:
            p = p + (q - p) * (NEAR_PLANE - p[2]) / (q[2] - p[2])
        elif q[2] < NEAR_PLANE:
            q = q + (p - q) * (NEAR_PLANE - q[2]) / (p[2] - q[2])
        pixels = []
        for point in (p, q):
            uvw = intrinsic @ point
            pixels.append(uvw[:2] / uvw[2])
        # Clip against a generous frame first (cv2.clipLine takes int coordinates), then the image.
        limit = 4.0 * max(width, height)
        (x1, y1), (x2, y2) = (np.clip(pixels[0], -limit, limit), np.clip(pixels[1], -limit, limit))
        inside, a, b = cv2.clipLine((0, 0, int(width), int(height)), (int(round(x1)), int(round(y1))),
                                    (int(round(x2)), int(round(y2))))
        if inside:
            segments.append((a, b))
    return segments


def _box_colour(box, is_gt):
    if is_gt:
        return GT_COLOUR
    return CLASS_COLOURS.get(box.name, PRED_COLOUR)


def render_camera(image, cam_info, gt_boxes, pred_boxes, scale=1.0, thickness=2):
    """Draw projected boxes on a (resized) camera image in place and return it.

    Args:
        image: (h, w, 3) uint8 BGR, the camera image resized by ``scale`` from the original size in cam_info.
        gt_boxes, pred_boxes: devkit Boxes in the global frame.
    """
    full_size = (cam_info.get('width', round(image.shape[1] / scale)),
                 cam_info.get('height', round(image.shape[0] / scale)))
    for boxes, is_gt in ((gt_boxes, True), (pred_boxes, False)):
        for box in boxes:
            colour = _box_colour(box, is_gt)
            # GT one pixel thicker, so a prediction drawn exactly on it leaves a green rim.
            width = thickness + 1 if is_gt else thickness
            for a, b in project_box_edges(box, cam_info, full_size):
                pa = (int(round(a[0] * scale)), int(round(a[1] * scale)))
                pb = (int(round(b[0] * scale)), int(round(b[1] * scale)))
                cv2.line(image, pa, pb, colour, width, cv2.LINE_AA)
    return image


def _read_camera_image(data_root, cam_info):
    path = os.path.join(os.fspath(data_root), cam_info['filename'])
    if not os.path.isfile(path):
        raise FileNotFoundError(f'camera image {path} does not exist: check --data_root')
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f'camera image {path} cannot be decoded: re-extract it')
    return image


# -------------------------------------------------------------------------------------------------- BEV

def load_lidar_ego_points(data_root, lidar_info):
    """(M, 3) LiDAR points of the sample in the LiDAR's ego frame; None when the file is absent."""
    path = os.path.join(os.fspath(data_root), lidar_info['filename'])
    if not os.path.isfile(path):
        return None
    points = np.fromfile(path, dtype=np.float32)
    if points.size % 5:
        raise ValueError(f'LiDAR file {path} does not hold float32 x 5 records: re-extract it')
    points = points.reshape(-1, 5)[:, :3].astype(np.float64)
    return _transform(_pose_matrix(lidar_info['calibrated_sensor']), points)


def render_bev(lidar_points, lidar_info, gt_boxes, pred_boxes, size=900, bev_range=55.0):
    """(size, size, 3) uint8 BGR bird's-eye view in the LiDAR ego frame.

    Args:
        lidar_points: (M, 3) ego-frame points or None.
        lidar_info: the sample's LIDAR_TOP info (its ego_pose defines the panel's frame).
        bev_range: metres from the ego origin to the panel border.
    """
    panel = np.full((size, size, 3), 255, dtype=np.uint8)
    pixels_per_m = size / (2.0 * bev_range)
    centre = size / 2.0

    def to_px(xy):
        xy = np.atleast_2d(xy)
        return np.stack([centre - xy[:, 1] * pixels_per_m, centre - xy[:, 0] * pixels_per_m], 1)

    for radius in range(10, int(bev_range) + 1, 10):  # range rings every 10 m
        cv2.circle(panel, (int(centre), int(centre)), int(radius * pixels_per_m), (225, 225, 225), 1, cv2.LINE_AA)
    if lidar_points is not None and len(lidar_points):
        px = np.round(to_px(lidar_points[:, :2])).astype(np.int64)
        keep = (px[:, 0] >= 0) & (px[:, 0] < size) & (px[:, 1] >= 0) & (px[:, 1] < size)
        px, heights = px[keep], lidar_points[keep, 2]
        shade = np.clip(150 - (heights + 2.0) * 25, 40, 190).astype(np.uint8)  # higher = darker
        panel[px[:, 1], px[:, 0]] = shade[:, None]
    ego_from_global = np.linalg.inv(_pose_matrix(lidar_info['ego_pose']))
    for boxes, is_gt in ((gt_boxes, True), (pred_boxes, False)):
        for box in boxes:
            colour = _box_colour(box, is_gt)
            corners = _transform(ego_from_global, box.corners().T)  # (8, 3)
            footprint = to_px(corners[[2, 3, 7, 6], :2])  # devkit bottom_corners(): front pair then back pair
            width = 3 if is_gt else 2
            cv2.polylines(panel, [np.round(footprint).astype(np.int32)], True, colour, width, cv2.LINE_AA)
            centre_xy = _transform(ego_from_global, box.center[None])[0, :2]
            front_xy = corners[[2, 3], :2].mean(0)
            a, b = np.round(to_px(centre_xy)[0]).astype(int), np.round(to_px(front_xy)[0]).astype(int)
            cv2.line(panel, tuple(int(v) for v in a), tuple(int(v) for v in b), colour, 2, cv2.LINE_AA)
            velocity = np.nan_to_num(np.asarray(box.velocity, dtype=np.float64))[:2]
            if np.linalg.norm(velocity) > 0.2:
                velocity_ego = ego_from_global[:2, :2] @ velocity
                tip = np.round(to_px(centre_xy + velocity_ego * VELOCITY_ARROW_SECONDS)[0]).astype(int)
                cv2.arrowedLine(panel, tuple(int(v) for v in a), tuple(int(v) for v in tip), colour, 2,
                                cv2.LINE_AA, tipLength=0.25)
    cv2.drawMarker(panel, (int(centre), int(centre)), (0, 0, 0), cv2.MARKER_TRIANGLE_UP, 14, 2)
    return panel


# ----------------------------------------------------------------------------------------------- sample

def _label(image, text, origin=(12, 34), scale=0.9):
    cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 4, cv2.LINE_AA)
    cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 2, cv2.LINE_AA)


def render_sample(data_root, info, results=None, score_thr=0.3, cam_width=640, bev_range=55.0):
    """Composite (H, W, 3) uint8 BGR image: 2 x 3 camera grid with boxes and a BEV panel on the right.

    Args:
        data_root: nuScenes dataroot holding the info's image / LiDAR files.
        info: one sample info dict (scripts/gen_info.py format).
        results: {sample_token: [box dict]} from ``load_results`` (global frame), or None for GT only.
        score_thr: minimum detection_score of drawn predictions.
        cam_width: width of each camera tile in pixels (height keeps the image aspect ratio).
        bev_range: metres shown from the ego origin to the BEV panel border.

    GT boxes are green; predictions use their class colour (``CLASS_COLOURS``), red for unknown names.
    """
    gt_boxes, pred_boxes = sample_boxes(info, results, score_thr)
    tiles = []
    for row in CAMERA_GRID:
        row_tiles = []
        for cam in row:
            if cam not in info['cam_infos']:
                raise ValueError(f'sample {info["sample_token"]} has no {cam} camera in its info')
            cam_info = info['cam_infos'][cam]
            image = _read_camera_image(data_root, cam_info)
            scale = cam_width / image.shape[1]
            tile = cv2.resize(image, (cam_width, int(round(image.shape[0] * scale))), interpolation=cv2.INTER_AREA)
            cam_info = dict(cam_info, width=image.shape[1], height=image.shape[0])
            render_camera(tile, cam_info, gt_boxes, pred_boxes, scale=scale)
            _label(tile, cam, scale=0.6, origin=(8, 22))
            row_tiles.append(tile)
        heights = {t.shape[0] for t in row_tiles}
        if len(heights) != 1:
            target = min(heights)
            row_tiles = [cv2.resize(t, (cam_width, target), interpolation=cv2.INTER_AREA) for t in row_tiles]
        tiles.append(np.concatenate(row_tiles, 1))
    width = min(t.shape[1] for t in tiles)
    cameras = np.concatenate([t[:, :width] for t in tiles], 0)
    lidar_info = info['lidar_infos']['LIDAR_TOP']
    bev = render_bev(load_lidar_ego_points(data_root, lidar_info), lidar_info, gt_boxes, pred_boxes,
                     size=cameras.shape[0], bev_range=bev_range)
    _label(bev, 'BEV (LiDAR ego)', scale=0.6, origin=(8, 22))
    legend_y = bev.shape[0] - 12
    cv2.putText(bev, f'GT: green  pred: class colour (score >= {score_thr:g})', (8, legend_y),
                cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([cameras, bev], 1)


def write_png(path, image):
    """Encode ``image`` (H, W, 3) uint8 BGR as PNG and write it atomically."""
    from bevdepth.utils.io import atomic_write_bytes

    ok, encoded = cv2.imencode('.png', image)
    if not ok:
        raise RuntimeError(f'OpenCV could not encode the {image.shape} image as PNG')
    atomic_write_bytes(path, encoded.tobytes())
