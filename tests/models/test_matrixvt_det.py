"""MatrixVT_Det / BaseBEVDepth: reference state dict and parameter counts, full-size forward, tiny training step,
device / dtype moves."""
import math
import pathlib
import time

import pytest
import torch

from bevdepth.configs import nuscenes, tiny
from bevdepth.models.base_bev_depth import BaseBEVDepth
from bevdepth.models.matrixvt_det import MatrixVT_Det

FIXTURE_KEYS = pathlib.Path(__file__).resolve().parents[1] / 'fixtures' / 'matrixvt_state_dict.txt'
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _reference_state_dict():
    """[(key, shape string)] in the reference's state-dict order."""
    return [tuple(line.split(' ', 1)) for line in FIXTURE_KEYS.read_text().splitlines()]


def _shape_string(value):
    return 'scalar' if value.dim() == 0 else str(tuple(value.shape))


def _rig_mats(batch_size, final_dim, num_cams=6):
    """Six nuScenes-like cameras (1600x900 raw images, resized and bottom-cropped to final_dim, no BEV aug)."""
    sensor2ego, intrin = [], []
    for yaw_deg in [55, 0, -55, 110, 180, -110]:
        yaw = math.radians(yaw_deg)
        mat = torch.eye(4)
        mat[:3, 0] = torch.tensor([math.sin(yaw), -math.cos(yaw), 0.0])  # camera x (right)
        mat[:3, 1] = torch.tensor([0.0, 0.0, -1.0])                      # camera y (down)
        mat[:3, 2] = torch.tensor([math.cos(yaw), math.sin(yaw), 0.0])   # camera z (forward)
        mat[:3, 3] = torch.tensor([1.0 + 0.6 * math.cos(yaw), 0.5 * math.sin(yaw), 1.55])
        sensor2ego.append(mat)
        k = torch.eye(4)
        k[0, 0] = k[1, 1] = 1260.0
        k[0, 2], k[1, 2] = 800.0, 450.0
        intrin.append(k)
    final_h, final_w = final_dim
    resize = max(final_h / 900, final_w / 1600)
    ida = torch.eye(4)
    ida[0, 0] = ida[1, 1] = resize
    ida[0, 3] = -int(max(0, int(1600 * resize) - final_w) / 2)
    ida[1, 3] = -(int(900 * resize) - final_h)
    expand = (batch_size, 1, num_cams, 4, 4)
    return dict(sensor2ego_mats=torch.stack(sensor2ego[:num_cams]).expand(expand).clone(),
                intrin_mats=torch.stack(intrin[:num_cams]).expand(expand).clone(),
                ida_mats=ida.expand(expand).clone(),
                sensor2sensor_mats=torch.eye(4).expand(expand).clone(),
                bda_mat=torch.eye(4).expand(batch_size, 4, 4).clone())


@pytest.fixture(scope='module')
def reference_model():
    torch.manual_seed(0)
    return MatrixVT_Det(nuscenes.backbone_conf(), nuscenes.head_conf())


def test_reference_state_dict_and_parameter_counts(reference_model):
    expected = _reference_state_dict()
    assert len(expected) == 912
    got = [(key, _shape_string(value)) for key, value in reference_model.state_dict().items()]
    assert sorted(got) == sorted(expected)
    assert got == expected  # also the same order as the reference
    params = list(reference_model.parameters())
    assert sum(p.numel() for p in params) == 79_220_639
    assert sum(p.numel() for p in params if p.requires_grad) == 79_211_103
    frozen = sorted(name for name, p in reference_model.named_parameters() if not p.requires_grad)
    assert frozen == ['backbone.img_backbone.bn1.bias', 'backbone.img_backbone.bn1.weight',
                      'backbone.img_backbone.conv1.weight']
    assert reference_model.is_train_depth


def test_reference_checkpoint_keys_load_back(reference_model):
    # A reference checkpoint is this state dict under the LightningModule's "model." prefix.
    checkpoint = {f'model.{k}': v for k, v in reference_model.state_dict().items()}
    fresh = MatrixVT_Det(nuscenes.backbone_conf(), nuscenes.head_conf())
    result = fresh.load_state_dict({k[len('model.'):]: v for k, v in checkpoint.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(fresh.head.task_heads[5].heatmap[1].bias, reference_model.head.task_heads[5].heatmap[1].bias)


def test_lss_model_builds_with_the_same_keys_minus_matrixvt_parts():
    torch.manual_seed(0)
    model = BaseBEVDepth(nuscenes.backbone_conf(), nuscenes.head_conf())
    expected = {key for key, _ in _reference_state_dict()
                if not key.startswith(('backbone.bev_anchors', 'backbone.horiconv.', 'backbone.depth_reducer.'))}
    assert set(model.state_dict()) == expected
    assert not model.is_train_depth

    # Tiny LSS model: training with depth returns (preds, depth); eval returns preds only.
    torch.manual_seed(0)
    tiny_model = BaseBEVDepth(tiny.backbone_conf(), tiny.head_conf(), is_train_depth=True).train()
    imgs = torch.randn(1, 1, 6, 3, *tiny.FINAL_DIM)
    mats = _rig_mats(1, tiny.FINAL_DIM)
    preds, depth = tiny_model(imgs, mats)
    assert preds[1][0]['heatmap'].shape == (1, 2, 64, 64) and depth.shape[0] == 6
    with torch.no_grad():
        eval_preds = tiny_model.eval()(imgs, mats)
    assert len(eval_preds) == 6 and isinstance(eval_preds[0], list)


@pytest.mark.slow
def test_full_size_forward_on_cpu(reference_model):
    model = reference_model.eval()
    imgs = torch.randn(1, 1, 6, 3, 256, 704)
    mats = _rig_mats(1, (256, 704))
    start = time.perf_counter()
    with torch.no_grad():
        preds = model(imgs, mats)
    elapsed = time.perf_counter() - start
    assert len(preds) == 6
    for task_id, task_preds in enumerate(preds):
        maps = task_preds[0]
        assert maps['heatmap'].shape == (1, model.head.num_classes[task_id], 128, 128)
        assert maps['reg'].shape == (1, 2, 128, 128) and maps['dim'].shape == (1, 3, 128, 128)
        assert all(torch.isfinite(v).all() for v in maps.values())
    assert elapsed < 120, f'full-size CPU forward took {elapsed:.1f} s'


def test_tiny_training_step_and_decoding():
    torch.manual_seed(0)
    model = MatrixVT_Det(tiny.backbone_conf(), tiny.head_conf())
    model.train()
    assert not model.backbone.img_backbone.bn1.training  # frozen stem BN stays in eval mode
    assert model.backbone.img_backbone.layer1[0].bn1.training and model.head.trunk.bn1.training
    final_h, final_w = tiny.FINAL_DIM
    batch_size = 1
    imgs = torch.randn(batch_size, 1, 6, 3, final_h, final_w)
    mats = _rig_mats(batch_size, tiny.FINAL_DIM)
    preds, depth = model(imgs, mats)
    assert depth.shape == (batch_size * 6, 56, final_h // 16, final_w // 16)
    assert preds[0][0]['heatmap'].shape == (batch_size, 1, 64, 64)

    boxes = torch.tensor([[10.0, 5.0, -0.5, 4.5, 1.9, 1.6, 0.3, 2.0, 0.0],
                          [-20.0, 8.0, -0.8, 0.7, 0.7, 1.8, 1.0, 0.5, 0.5],
                          [3.0, -30.0, -0.2, 10.0, 2.8, 3.5, -1.2, 0.0, 0.0]])
    labels = torch.tensor([0, 8, 3])
    targets = model.get_targets([boxes], [labels])
    detection_loss, parts = model.loss(targets, preds)
    depth_labels = torch.zeros(batch_size, 6, final_h, final_w)
    depth_labels[:, :, 60:, :] = torch.linspace(3.0, 40.0, final_w)
    depth_loss = model.get_depth_loss(depth_labels, depth)
    assert torch.isfinite(detection_loss) and torch.isfinite(depth_loss) and depth_loss > 0
    assert len(parts) == 12
    (detection_loss + depth_loss).backward()
    assert model.backbone.img_backbone.conv1.weight.grad is None  # frozen stem
    for module in (model.backbone.img_backbone.layer1[0].conv1, model.backbone.depth_net.depth_conv[5],
                   model.backbone.horiconv.reduce_conv[0], model.head.trunk.conv1, model.head.task_heads[0].reg[1]):
        assert module.weight.grad is not None and torch.isfinite(module.weight.grad).all()

    model.eval()
    with torch.no_grad():
        eval_preds = model(imgs, mats)
    assert isinstance(eval_preds, tuple) and len(eval_preds) == 6
    results = model.get_bboxes(eval_preds, [dict()] * batch_size)
    assert len(results) == batch_size
    bboxes, scores, out_labels = results[0]
    assert bboxes.shape[1] == 9 and bboxes.shape[0] == scores.shape[0] == out_labels.shape[0] <= 6 * 83
    assert out_labels.dtype == torch.int32
    assert ((scores > 0.1) | (scores.numel() == 0)).all()


def test_model_moves_with_to_dtype_and_meta():
    torch.manual_seed(0)
    model = MatrixVT_Det(tiny.backbone_conf(), tiny.head_conf())
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.backbone.frustum.dtype == torch.float64 and model.backbone.voxel_num.dtype == torch.long
    model.to('meta')
    assert all(t.device.type == 'meta' for t in list(model.parameters()) + list(model.buffers()))


def test_no_cuda_calls_in_my_sources():
    sources = ['bevdepth/layers/backbones/resnet.py', 'bevdepth/layers/backbones/second_fpn.py',
               'bevdepth/ops/gaussian.py', 'bevdepth/ops/circle_nms.py', 'bevdepth/layers/heads/bev_depth_head.py',
               'bevdepth/models/depth_loss.py', 'bevdepth/models/base_bev_depth.py',
               'bevdepth/models/matrixvt_det.py']
    for source in sources:
        text = (REPO_ROOT / source).read_text()
        assert '.cuda(' not in text and "device='cuda'" not in text, source
