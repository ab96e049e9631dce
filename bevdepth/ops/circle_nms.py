"""Greedy circle NMS on BEV centres (mmdet3d ``circle_nms`` semantics, as called by
upstream BEVDepth ``bevdepth/layers/heads/bev_depth_head.py`` ``BEVDepthHead.get_bboxes``).

Boxes are visited in descending score order; a kept box suppresses every later box whose squared centre
distance is ``<= thresh`` (so ``thresh`` is in m^2). The reference runs a numba double loop on the CPU; here
the pairwise matrix is built in one tensor op and only the O(n) greedy pass loops.
"""
import torch


def circle_nms(dets, thresh, post_max_size=83):
    """Indices of the boxes kept by greedy circle NMS.

    Args:
        dets: (n, 3) tensor of [x, y, score].
        thresh: suppression threshold on the squared centre distance.
        post_max_size: keep at most this many boxes.

    Returns:
        (k,) int64 indices into ``dets`` (on ``dets.device``), in descending score order, k <= post_max_size.
    """
    if dets.dim() != 2 or dets.shape[1] < 3:
        raise ValueError(f'circle_nms expects dets of shape (n, 3) [x, y, score], got {tuple(dets.shape)}')
    num_dets = dets.shape[0]
    if num_dets == 0 or post_max_size <= 0:
        return torch.zeros(0, dtype=torch.long, device=dets.device)
    # Like the reference: decide on the CPU with float32 distances compared in float64 against the python
    # threshold (numba promotes the float32 distance, torch would demote the threshold instead).
    dets_cpu = dets.detach().to('cpu', torch.float32)
    order = torch.argsort(dets_cpu[:, 2], descending=True, stable=True)
    centers = dets_cpu[order, :2]
    delta = centers[:, None, :] - centers[None, :, :]
    sq_dist = delta[..., 0] * delta[..., 0] + delta[..., 1] * delta[..., 1]
    suppresses = sq_dist.double() <= float(thresh)  # (n, n) in score order

    suppressed = torch.zeros(num_dets, dtype=torch.bool)
    keep = []
    for rank in range(num_dets):
        if suppressed[rank]:
            continue
        keep.append(rank)
        if len(keep) == post_max_size:
            break
        suppressed |= suppresses[rank]
    return order[torch.tensor(keep, dtype=torch.long)].to(dets.device)
