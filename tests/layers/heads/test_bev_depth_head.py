"""BEVDepthHead: keys, init, forward structure, CenterPoint targets, losses and decoding."""
import math
import pathlib

import pytest
import torch

from bevdepth.configs import nuscenes, tiny
from bevdepth.layers.backbones.resnet import BasicBlock
from bevdepth.layers.heads.bev_depth_head import BEVDepthHead, clip_sigmoid
from bevdepth.ops.gaussian import draw_heatmap_gaussian, gaussian_radius

FIXTURE_KEYS = pathlib.Path(__file__).resolve().parents[2] / 'fixtures' / 'matrixvt_state_dict.txt'
TASK_NAMES = ['reg', 'height', 'dim', 'rot', 'vel', 'heatmap']


@pytest.fixture(scope='module')
def reference_head():
    torch.manual_seed(0)
    return BEVDepthHead(**nuscenes.head_conf())


@pytest.fixture(scope='module')
def tiny_head():
    torch.manual_seed(0)
    return BEVDepthHead(**tiny.head_conf())


def _random_boxes(generator, num, extent=50.0):
    """(num, 9) boxes [x, y, z, l, w, h, yaw, vx, vy] and (num,) labels over the 10 classes."""
    boxes = torch.stack([
        (torch.rand(num, generator=generator) * 2 - 1) * extent,
        (torch.rand(num, generator=generator) * 2 - 1) * extent,
        torch.rand(num, generator=generator) * 3 - 2,
        torch.rand(num, generator=generator) * 10 + 0.3,
        torch.rand(num, generator=generator) * 3 + 0.3,
        torch.rand(num, generator=generator) * 3 + 0.5,
        (torch.rand(num, generator=generator) * 2 - 1) * math.pi,
        torch.randn(num, generator=generator) * 3,
        torch.randn(num, generator=generator) * 3,
    ], dim=1)
    labels = torch.randint(0, 10, (num,), generator=generator)
    return boxes, labels


def _loop_targets(head, gt_boxes, gt_labels):
    """Per-object transcription of the reference ``get_targets_single``."""
    cfg = head.train_cfg
    size_x = cfg['grid_size'][0] // cfg['out_size_factor']
    size_y = cfg['grid_size'][1] // cfg['out_size_factor']
    voxel_size = torch.tensor(cfg['voxel_size'])
    pc_range = torch.tensor(cfg['point_cloud_range'])
    heatmaps, anno_boxes, inds, masks = [], [], [], []
    offset = 0
    for names in head.class_names:
        task_boxes, task_classes = [], []
        for i in range(len(names)):
            pick = torch.where(gt_labels == offset + i)
            task_boxes.append(gt_boxes[pick])
            task_classes.append(gt_labels[pick] + 1 - offset)
        task_boxes = torch.cat(task_boxes)
        task_classes = torch.cat(task_classes)
        offset += len(names)
        heatmap = torch.zeros(len(names), size_y, size_x)
        anno_box = torch.zeros(cfg['max_objs'], 10)
        ind = torch.zeros(cfg['max_objs'], dtype=torch.int64)
        mask = torch.zeros(cfg['max_objs'], dtype=torch.uint8)
        for k in range(min(task_boxes.shape[0], cfg['max_objs'])):
            box = task_boxes[k]
            width = box[3] / voxel_size[0] / cfg['out_size_factor']
            length = box[4] / voxel_size[1] / cfg['out_size_factor']
            if not (width > 0 and length > 0):
                continue
            radius = max(cfg['min_radius'], int(gaussian_radius((length, width), cfg['gaussian_overlap'])))
            coor_x = (box[0] - pc_range[0]) / voxel_size[0] / cfg['out_size_factor']
            coor_y = (box[1] - pc_range[1]) / voxel_size[1] / cfg['out_size_factor']
            center = torch.tensor([coor_x, coor_y], dtype=torch.float32)
            center_int = center.to(torch.int32)
            if not (0 <= center_int[0] < size_x and 0 <= center_int[1] < size_y):
                continue
            draw_heatmap_gaussian(heatmap[task_classes[k] - 1], center_int, radius)
            x, y = center_int[0], center_int[1]
            ind[k] = y * size_x + x
            mask[k] = 1
            anno_box[k] = torch.cat([center - torch.tensor([x, y]), box[2:3], box[3:6].log(), torch.sin(box[6:7]),
                                     torch.cos(box[6:7]), box[7:9]])
        heatmaps.append(heatmap)
        anno_boxes.append(anno_box)
        inds.append(ind)
        masks.append(mask)
    return heatmaps, anno_boxes, inds, masks


def _perfect_preds(head, targets, batch_size, size_y, size_x):
    """Head outputs that encode the targets exactly: large logits at peaks, regressions at the GT cells."""
    heatmaps, anno_boxes, inds, masks = targets
    preds = []
    for task_id in range(len(head.class_names)):
        maps = torch.zeros(batch_size, 10, size_y * size_x)
        for b in range(batch_size):
            valid = masks[task_id][b].bool()
            maps[b][:, inds[task_id][b][valid]] = anno_boxes[task_id][b][valid].T
        maps = maps.view(batch_size, 10, size_y, size_x)
        heatmap_logits = torch.where(heatmaps[task_id] == 1, torch.tensor(8.0), torch.tensor(-8.0))
        preds.append([dict(reg=maps[:, 0:2], height=maps[:, 2:3], dim=maps[:, 3:6], rot=maps[:, 6:8],
                           vel=maps[:, 8:10], heatmap=heatmap_logits)])
    return tuple(preds)


def _well_separated_boxes(grid_extent, cell, num_per_class=2):
    """Boxes of every class on distinct, well separated cells (so circle NMS keeps all)."""
    boxes, labels = [], []
    generator = torch.Generator().manual_seed(3)
    spots = [(x, y) for x in range(-4, 5) for y in range(-4, 5)]
    for label in range(10):
        for j in range(num_per_class):
            sx, sy = spots[(label * num_per_class + j) % len(spots)]
            x = sx * grid_extent / 5 + 0.3 * cell
            y = sy * grid_extent / 5 + 0.6 * cell
            boxes.append([x, y, float(torch.rand(1, generator=generator)) - 1.0, 4.0 + label * 0.1, 1.5 + 0.05 * j,
                          1.7, -2.5 + 0.5 * label, 0.5 * label - 2.0, 1.0 - 0.2 * j])
            labels.append(label)
    return torch.tensor(boxes), torch.tensor(labels)


def test_state_dict_keys_shapes_and_order_match_reference(reference_head):
    expected = []
    for line in FIXTURE_KEYS.read_text().splitlines():
        key, shape = line.split(' ', 1)
        if key.startswith('head.'):
            expected.append((key[len('head.'):], shape))
    got = [(key, 'scalar' if value.dim() == 0 else str(tuple(value.shape)))
           for key, value in reference_head.state_dict().items()]
    assert got == expected
    assert len(got) == 408


def test_init_matches_reference(reference_head):
    head = reference_head
    # ConvModule convs: Kaiming normal, fan_out.
    weight = head.shared_conv.conv.weight
    expected_std = math.sqrt(2.0 / (weight.shape[0] * 9))
    assert abs(weight.std().item() - expected_std) / expected_std < 0.05
    # Final convs keep PyTorch's default uniform init: no -2.19 heatmap bias, as upstream.
    bound = 1 / math.sqrt(64 * 9)
    for task_head in head.task_heads:
        assert task_head.heatmap[1].bias.abs().max().item() <= bound
    # BEV trunk: zero-init residual, no max-pool.
    blocks = [m for m in head.trunk.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 6 and all(torch.count_nonzero(b.bn2.weight) == 0 for b in blocks)
    assert head.trunk.maxpool is None


def test_forward_structure_and_fp32_under_autocast(tiny_head):
    head = tiny_head.train()
    x = torch.randn(2, 32, 64, 64)
    with torch.autocast(device_type='cpu', dtype=torch.bfloat16):
        preds = head(x.bfloat16())
    assert isinstance(preds, tuple) and len(preds) == 6
    for task_id, task_preds in enumerate(preds):
        assert isinstance(task_preds, list) and len(task_preds) == 1
        assert list(task_preds[0]) == TASK_NAMES
        shapes = {name: tuple(value.shape) for name, value in task_preds[0].items()}
        num_cls = head.num_classes[task_id]
        assert shapes == dict(reg=(2, 2, 64, 64), height=(2, 1, 64, 64), dim=(2, 3, 64, 64), rot=(2, 2, 64, 64),
                              vel=(2, 2, 64, 64), heatmap=(2, num_cls, 64, 64))
        assert all(value.dtype == torch.float32 for value in task_preds[0].values())


@pytest.mark.parametrize('config', ['reference', 'tiny'])
def test_targets_equal_per_object_reference_loop(config, reference_head, tiny_head):
    head = reference_head if config == 'reference' else tiny_head
    generator = torch.Generator().manual_seed(7)
    boxes, labels = _random_boxes(generator, 60, extent=55.0)  # some centres fall outside the grid
    boxes[3, 3] = 0.0  # zero length: skipped, leaves a hole
    boxes[5, 4] = -1.0
    boxes[8, 0:2] = torch.tensor([-51.5, 10.0])  # coor_x in (-1, 0): truncates to 0 and is kept
    boxes2, labels2 = _random_boxes(generator, 5)
    targets = head.get_targets([boxes, boxes2], [labels, labels2])
    for sample, (b, lab) in enumerate([(boxes, labels), (boxes2, labels2)]):
        expected = _loop_targets(head, b, lab)
        for field in range(4):
            for task_id in range(6):
                got = targets[field][task_id][sample]
                exp = expected[field][task_id]
                assert got.dtype == exp.dtype and got.shape == exp.shape
                assert torch.equal(got, exp), (config, field, task_id)
    heatmaps, anno_boxes, inds, masks = targets
    size = 128 if config == 'reference' else 64
    assert heatmaps[0].shape == (2, 1, size, size) and heatmaps[1].shape == (2, 2, size, size)
    assert anno_boxes[0].shape == (2, 500, 10) and inds[0].dtype == torch.int64 and masks[0].dtype == torch.uint8
    # Holes exist: some masked-out slots come before valid ones.
    all_masks = torch.cat([m[0] for m in masks])
    assert (all_masks == 0).any()


def test_skipped_object_leaves_a_hole_and_truncation(reference_head):
    boxes = torch.tensor([[80.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0, 0.0, 0.0],   # outside the grid: skipped
                          [0.5, -0.3, 0.2, 4.0, 2.0, 1.5, 0.1, 1.0, 2.0]])
    labels = torch.tensor([0, 0])
    heatmaps, anno_boxes, inds, masks = reference_head.get_targets([boxes], [labels])
    assert masks[0][0, :3].tolist() == [0, 1, 0]
    cx, cy = (0.5 + 51.2) / 0.8, (-0.3 + 51.2) / 0.8  # 64.625, 63.625
    assert inds[0][0, 1].item() == 63 * 128 + 64
    torch.testing.assert_close(anno_boxes[0][0, 1, :3], torch.tensor([cx - 64, cy - 63, 0.2]))
    torch.testing.assert_close(anno_boxes[0][0, 1, 3:6], torch.log(torch.tensor([4.0, 2.0, 1.5])))
    assert heatmaps[0][0, 0, 63, 64] == 1.0
    # radius = max(2, int(gaussian_radius)) = 2 -> the Gaussian reaches 2 cells, not 3.
    assert heatmaps[0][0, 0, 63, 66] > 0 and heatmaps[0][0, 0, 63, 67] == 0


@pytest.mark.parametrize('config', ['reference', 'tiny'])
def test_encode_decode_roundtrip(config, reference_head, tiny_head):
    head = reference_head if config == 'reference' else tiny_head
    cell = 0.8 if config == 'reference' else 1.6
    size = 128 if config == 'reference' else 64
    boxes, labels = _well_separated_boxes(45.0, cell)
    targets = head.get_targets([boxes], [labels])
    preds = _perfect_preds(head, targets, 1, size, size)
    (out_boxes, out_scores, out_labels), = head.get_bboxes(preds, [dict()])
    assert out_labels.dtype == torch.int32 and out_boxes.shape == (len(boxes), 9)
    assert (out_scores > 0.99).all()
    for box, label in zip(boxes, labels):
        distance = (out_boxes[:, :2] - box[:2]).norm(dim=1)
        match = int(torch.argmin(distance))
        assert distance[match] < 1e-4
        assert out_labels[match].item() == label.item()
        decoded = out_boxes[match]
        torch.testing.assert_close(decoded[2:6], box[2:6], atol=1e-4, rtol=1e-5)
        yaw_error = (decoded[6] - box[6] + math.pi) % (2 * math.pi) - math.pi
        assert abs(yaw_error) < 1e-5
        torch.testing.assert_close(decoded[7:9], box[7:9], atol=1e-5, rtol=1e-5)


def test_decode_filters_nms_and_caps(reference_head):
    head = reference_head
    size = 128
    preds = []
    for num_cls in head.num_classes:
        zeros = torch.zeros(1, 2, size, size)
        preds.append([dict(reg=zeros.clone(), height=zeros[:, :1].clone(), dim=torch.zeros(1, 3, size, size),
                           rot=torch.stack([torch.zeros(1, size, size), torch.ones(1, size, size)], dim=1),
                           vel=zeros.clone(), heatmap=torch.full((1, num_cls, size, size), -8.0))])
    car = preds[0][0]
    car['heatmap'][0, 0, 64, 64] = 5.0
    car['heatmap'][0, 0, 64, 65] = 4.0   # 0.8 m away: inside the 2 m car circle -> suppressed
    car['heatmap'][0, 0, 64, 70] = 3.0   # 4.8 m away: kept
    car['heatmap'][0, 0, 10, 10] = -3.0  # score 0.047 < 0.1 -> dropped
    car['reg'][0, 0, 64, 70] = 20.0      # x = (70 + 20) * 0.8 - 51.2 = 20.8
    car['height'][0, 0, 64, 64] = 11.0   # z = 11 > 10 -> outside post_center_range
    # Barrier task: 200 isolated peaks with a tiny radius -> capped at 83.
    barrier = preds[3][0]
    ys, xs = torch.meshgrid(torch.arange(0, 128, 8), torch.arange(0, 128, 8), indexing='ij')
    barrier['heatmap'][0, 0, ys.flatten()[:200], xs.flatten()[:200]] = 6.0
    (boxes, scores, labels), = head.get_bboxes(tuple(preds), None)
    car_boxes = boxes[labels == 0]
    # (64, 64) was dropped by the z range, so (64, 65) is no longer suppressed by it.
    assert sorted(round(v, 3) for v in car_boxes[:, 0].tolist()) == [0.8, 20.8]
    assert (labels == 5).sum().item() == min(83, len(ys.flatten()[:200]))
    assert set(labels.tolist()) == {0, 5}


def test_loss_values_by_hand(tiny_head):
    head = tiny_head
    boxes = torch.tensor([[0.5, -0.3, 0.2, 4.0, 2.0, 1.5, 0.1, 1.0, 2.0]])
    targets = head.get_targets([boxes], [torch.tensor([0])])
    size = 64
    preds = _perfect_preds(head, targets, 1, size, size)
    total, parts = head.loss(targets, preds)
    assert set(parts) == {f'task{t}.loss_{kind}' for t in range(6) for kind in ('heatmap', 'bbox')}
    for t in range(6):
        assert parts[f'task{t}.loss_bbox'].item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(total, sum(parts.values()))

    # Zero box predictions: L1 = 0.25 * sum(|target| * code_weights) / num_objects.
    zero_preds = tuple([{k: torch.zeros_like(v) for k, v in p[0].items()}] for p in preds)
    _, parts = head.loss(targets, zero_preds)
    target = targets[1][0][0, 0]
    code_weights = torch.tensor(head.train_cfg['code_weights'])
    expected = 0.25 * (target.abs() * code_weights).sum() / (1 + torch.finfo(torch.float32).eps)
    assert parts['task0.loss_bbox'].item() == pytest.approx(expected.item(), rel=1e-6)
    # Heatmap: focal loss of p = sigmoid(0) = 0.5 against the Gaussian target, over 1 positive.
    heatmap = targets[0][0]
    pos = -(math.log(0.5) * 0.25) * (heatmap == 1).float()
    neg = -math.log(0.5) * 0.25 * (1 - heatmap).pow(4)
    assert parts['task0.loss_heatmap'].item() == pytest.approx((pos + neg).sum().item(), rel=1e-5)
    # No positive: the avg factor is clamped to 1.
    assert parts['task1.loss_heatmap'].item() == pytest.approx((-math.log(0.5) * 0.25) * 2 * size * size, rel=1e-5)
    assert torch.equal(clip_sigmoid(torch.tensor([-100.0, 100.0])), torch.tensor([1e-4, 1 - 1e-4]))


def test_loss_backward_and_nan_targets(tiny_head):
    head = tiny_head.train()
    generator = torch.Generator().manual_seed(1)
    boxes, labels = _random_boxes(generator, 12, extent=45.0)
    targets = head.get_targets([boxes], [labels])
    targets[1][0][0, 0, 2] = float('nan')  # masked out by isnotnan
    head.zero_grad()
    preds = head(torch.randn(1, 32, 64, 64))
    total, _ = head.loss(targets, preds)
    assert torch.isfinite(total)
    total.backward()
    assert head.task_heads[0].heatmap[1].weight.grad is not None
    assert torch.isfinite(head.trunk.conv1.weight.grad).all()


def test_bad_inputs_raise(tiny_head):
    with pytest.raises(ValueError, match=r'\(n, 9\)'):
        tiny_head.get_targets([torch.zeros(2, 7)], [torch.zeros(2, dtype=torch.long)])
    with pytest.raises(ValueError, match='labels'):
        tiny_head.get_targets([torch.zeros(2, 9)], [torch.zeros(3, dtype=torch.long)])
    conf = tiny.head_conf()
    conf['test_cfg']['nms_type'] = 'rotate'
    with pytest.raises(ValueError, match='nms_type'):
        BEVDepthHead(**conf)
