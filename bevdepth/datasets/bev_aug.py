"""BEV-data augmentation (bda): rotate / scale / flip the GT boxes and return the matching 4x4 matrix.

Upstream ``bevdepth/datasets/nusc_det_dataset.py`` ``bev_transform`` / ``NuscDetDataset.sample_bda_augmentation``. The
model applies ``bda_mat`` to its BEV geometry, so boxes and features stay aligned. Arithmetic is float32 torch, in the
reference's order.
"""
import numpy as np
import torch


def sample_bda_augmentation(bda_aug_conf, is_train, rng):
    """Sample (rotate_deg, scale, flip_dx, flip_dy); identity (0, 1, False, False) in eval.

    Args:
        bda_aug_conf (dict): rot_lim (degrees), scale_lim, flip_dx_ratio, flip_dy_ratio.
        is_train (bool); rng (numpy.random.Generator).
    """
    if not is_train:
        return 0.0, 1.0, False, False
    rotate = float(rng.uniform(*bda_aug_conf['rot_lim']))
    scale = float(rng.uniform(*bda_aug_conf['scale_lim']))
    flip_dx = bool(rng.uniform() < bda_aug_conf['flip_dx_ratio'])
    flip_dy = bool(rng.uniform() < bda_aug_conf['flip_dy_ratio'])
    return rotate, scale, flip_dx, flip_dy


def bev_transform(gt_boxes, rotate_angle, scale_ratio, flip_dx, flip_dy):
    """Apply the BEV augmentation to boxes.

    rot_mat = F (S Rz): Rz = [[c, -s, 0], [s, c, 0], [0, 0, 1]], S = scale I, F = diag(-1, 1, 1) if flip_dx
    times diag(1, -1, 1) if flip_dy. Boxes: xyz <- rot_mat xyz; lwh *= scale; yaw += angle;
    flip_dx: yaw = pi - yaw; flip_dy: yaw = -yaw; (vx, vy) <- rot_mat[:2, :2] (vx, vy).

    Args:
        gt_boxes: (n, 9) [x, y, z, l, w, h, yaw, vx, vy] (torch or numpy; not modified). Fewer columns
            (e.g. (0, 7)) are accepted when there are no boxes.
        rotate_angle (degrees), scale_ratio (float), flip_dx (bool), flip_dy (bool).

    Returns:
        tuple: boxes (n, C) float32 torch tensor, bda_mat (4, 4) float32 with rot_mat in [:3, :3].
    """
    boxes = torch.as_tensor(np.asarray(gt_boxes, dtype=np.float32) if not torch.is_tensor(gt_boxes)
                            else gt_boxes, dtype=torch.float32).clone()
    angle = torch.tensor(rotate_angle / 180 * np.pi, dtype=torch.float32)
    rot_sin, rot_cos = torch.sin(angle), torch.cos(angle)
    rot_mat = torch.tensor([[rot_cos, -rot_sin, 0], [rot_sin, rot_cos, 0], [0, 0, 1]], dtype=torch.float32)
    scale_mat = torch.eye(3) * float(scale_ratio)
    flip_mat = torch.eye(3)
    if flip_dx:
        flip_mat = flip_mat @ torch.diag(torch.tensor([-1.0, 1.0, 1.0]))
    if flip_dy:
        flip_mat = flip_mat @ torch.diag(torch.tensor([1.0, -1.0, 1.0]))
    rot_mat = flip_mat @ (scale_mat @ rot_mat)
    if boxes.shape[0] > 0:
        if boxes.shape[1] < 9:
            raise ValueError(f'gt_boxes must be (n, 9) [x, y, z, l, w, h, yaw, vx, vy], got {tuple(boxes.shape)}')
        boxes[:, :3] = (rot_mat @ boxes[:, :3].unsqueeze(-1)).squeeze(-1)
        boxes[:, 3:6] *= scale_ratio
        boxes[:, 6] += angle
        if flip_dx:
            boxes[:, 6] = 2 * torch.asin(torch.tensor(1.0)) - boxes[:, 6]
        if flip_dy:
            boxes[:, 6] = -boxes[:, 6]
        boxes[:, 7:] = (rot_mat[:2, :2] @ boxes[:, 7:].unsqueeze(-1)).squeeze(-1)
    bda_mat = torch.zeros(4, 4)
    bda_mat[:3, :3] = rot_mat
    bda_mat[3, 3] = 1
    return boxes, bda_mat
