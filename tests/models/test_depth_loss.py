"""Depth loss: min-non-zero patch rule, binning edges, BCE value, normalisation."""
import math

import pytest
import torch

from bevdepth.models.depth_loss import DepthLoss


def _hand_labels():
    """(1, 2, 4, 4) depth maps, 2x2 patches. Camera 0 patches: (0,0) min non-zero 2.7 -> bin 1 ([2.5, 3.0));
    (0,1) empty; (1,0) only 1.9 < d0 -> no label; (1,1) 6.2 >= d1 -> no label. Camera 1: (0,0) exactly 2.0 -> bin 0;
    (0,1) 5.9 -> last bin 7; (1,0) zeros ignored, min(4.4, 4.1) -> bin 4; (1,1) 6.0 == d1 -> no label."""
    labels = torch.zeros(1, 2, 4, 4)
    labels[0, 0, 0:2, 0:2] = torch.tensor([[0.0, 3.2], [0.0, 2.7]])
    labels[0, 0, 2:4, 0:2] = torch.tensor([[1.9, 0.0], [0.0, 0.0]])
    labels[0, 0, 2:4, 2:4] = torch.tensor([[6.2, 7.0], [0.0, 0.0]])
    labels[0, 1, 0:2, 0:2] = torch.tensor([[2.0, 9.0], [0.0, 0.0]])
    labels[0, 1, 0:2, 2:4] = torch.tensor([[0.0, 0.0], [5.9, 0.0]])
    labels[0, 1, 2:4, 0:2] = torch.tensor([[0.0, 4.4], [4.1, 0.0]])
    labels[0, 1, 2:4, 2:4] = torch.tensor([[6.0, 0.0], [0.0, 0.0]])
    return labels


def test_binning_and_min_nonzero_rule():
    loss = DepthLoss(downsample_factor=2, d_bound=[2.0, 6.0, 0.5])
    assert loss.depth_channels == 8
    one_hot = loss.get_downsampled_gt_depth(_hand_labels())
    assert one_hot.shape == (2 * 2 * 2, 8) and one_hot.dtype == torch.float32
    expected_bins = [1, None, None, None, 0, 7, 4, None]  # rows: camera, patch row, patch column
    for row, expected in zip(one_hot, expected_bins):
        if expected is None:
            assert row.sum() == 0
        else:
            assert row.sum() == 1 and row[expected] == 1


def test_loss_value_normalised_by_foreground_count():
    loss_fn = DepthLoss(downsample_factor=2, d_bound=[2.0, 6.0, 0.5])
    preds = torch.full((2, 8, 2, 2), 1 / 8)
    value = loss_fn(_hand_labels(), preds)
    per_row = -math.log(1 / 8) - 7 * math.log(1 - 1 / 8)
    assert value.item() == pytest.approx(3.0 * per_row, rel=1e-5)  # 4 fg rows, sum / 4
    # A 5-D (B, S, N, H, W) label tensor uses the key frame.
    assert loss_fn(_hand_labels().unsqueeze(1).repeat(1, 2, 1, 1, 1), preds).item() == pytest.approx(value.item())
    # No label at all: 0, not NaN.
    assert loss_fn(torch.zeros(1, 2, 4, 4), preds).item() == 0.0


def test_gradient_flows_only_from_labelled_rows_and_fp32_under_autocast():
    loss_fn = DepthLoss(downsample_factor=2, d_bound=[2.0, 6.0, 0.5], loss_weight=1.0)
    logits = torch.randn(2, 8, 2, 2, requires_grad=True)
    with torch.autocast(device_type='cpu', dtype=torch.bfloat16):
        value = loss_fn(_hand_labels(), logits.softmax(1))
    assert value.dtype == torch.float32
    value.backward()
    grad_norm = logits.grad.abs().sum(1)  # (B*N, h, w)
    assert (grad_norm[0, 0, 0] > 0) and grad_norm[0, 0, 1] == 0 and grad_norm[1, 1, 1] == 0


def test_reference_bins_and_shapes():
    loss_fn = DepthLoss(downsample_factor=16, d_bound=[2.0, 58.0, 0.5])
    assert loss_fn.depth_channels == 112
    labels = torch.zeros(1, 6, 256, 704)
    labels[0, 0, 5, 5] = 57.99   # patch (0, 0) -> last bin
    labels[0, 0, 5, 20] = 58.0   # patch (0, 1) -> out of range
    labels[0, 0, 20, 5] = 2.49   # patch (1, 0) -> bin 0
    one_hot = loss_fn.get_downsampled_gt_depth(labels)
    assert one_hot.shape == (6 * 16 * 44, 112)
    assert one_hot[0, 111] == 1 and one_hot[1].sum() == 0 and one_hot[44, 0] == 1
    assert one_hot.sum() == 2


def test_bad_shapes_raise():
    loss_fn = DepthLoss(downsample_factor=2, d_bound=[2.0, 6.0, 0.5])
    with pytest.raises(ValueError, match='multiple of downsample_factor'):
        loss_fn.get_downsampled_gt_depth(torch.zeros(1, 1, 5, 4))
    with pytest.raises(ValueError, match='label patches'):
        loss_fn(torch.zeros(1, 2, 4, 4), torch.zeros(1, 8, 2, 2))
    with pytest.raises(ValueError, match=r'\(B \* N, 8, h, w\)'):
        loss_fn(torch.zeros(1, 2, 4, 4), torch.zeros(2, 7, 2, 2))
