"""Circle NMS against a transcription of the reference's greedy loop."""
import numpy as np
import pytest
import torch

from bevdepth.ops.circle_nms import circle_nms


def _loop_circle_nms(dets, thresh, post_max_size):
    """The reference algorithm: greedy in score order, suppress j when dx^2 + dy^2 <= thresh."""
    x1, y1, scores = dets[:, 0], dets[:, 1], dets[:, 2]
    order = np.argsort(-scores, kind='stable')
    suppressed = np.zeros(len(dets), dtype=bool)
    keep = []
    for _i in range(len(dets)):
        i = order[_i]
        if suppressed[i]:
            continue
        keep.append(i)
        for _j in range(_i + 1, len(dets)):
            j = order[_j]
            if suppressed[j]:
                continue
            dist = (x1[i] - x1[j])**2 + (y1[i] - y1[j])**2
            if float(dist) <= thresh:
                suppressed[j] = True
    return keep[:post_max_size]


@pytest.mark.parametrize('seed,thresh,post_max_size', [(0, 4, 83), (1, 0.175, 83), (2, 12, 5), (3, 1.0, 500)])
def test_matches_greedy_loop(seed, thresh, post_max_size):
    generator = np.random.default_rng(seed)
    num = 300
    dets = np.concatenate([generator.uniform(-20, 20, (num, 2)), generator.permutation(num)[:, None] / num + 0.01],
                          axis=1).astype(np.float32)
    expected = _loop_circle_nms(dets, thresh, post_max_size)
    keep = circle_nms(torch.from_numpy(dets), thresh, post_max_size=post_max_size)
    assert keep.dtype == torch.long
    assert keep.tolist() == [int(i) for i in expected]
    assert len(expected) > 1


def test_squared_distance_threshold_and_boundary():
    # Two boxes exactly 2 m apart: suppressed with thresh 4 (m^2, <=), kept with thresh 3.99.
    dets = torch.tensor([[0.0, 0.0, 0.9], [2.0, 0.0, 0.8], [10.0, 0.0, 0.7]])
    assert circle_nms(dets, 4.0).tolist() == [0, 2]
    assert circle_nms(dets, 3.99).tolist() == [0, 1, 2]
    # Score order decides who survives, not input order.
    dets = torch.tensor([[0.0, 0.0, 0.2], [1.0, 0.0, 0.8]])
    assert circle_nms(dets, 4.0).tolist() == [1]


def test_chain_suppression_is_greedy():
    # b is suppressed by a; c is within range of b only, so it survives because b was removed.
    dets = torch.tensor([[0.0, 0.0, 0.9], [1.5, 0.0, 0.8], [3.0, 0.0, 0.7]])
    assert circle_nms(dets, 4.0).tolist() == [0, 2]


def test_empty_and_bad_input():
    assert circle_nms(torch.zeros(0, 3), 1.0).numel() == 0
    with pytest.raises(ValueError, match=r'\(n, 3\)'):
        circle_nms(torch.zeros(4), 1.0)
