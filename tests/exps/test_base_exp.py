"""BEVDepthLightningModel pieces that need no data: lr scaling, schedule, eval gathering, rank-0 errors."""
import types

import pytest
import torch
import torch.distributed as dist

from exps import base_exp
from bevdepth.configs import derive, settings, tiny
from exps.nuscenes.tiny.matrixvt_tiny_synthetic import MatrixVTTinyExp


@pytest.fixture(scope='module')
def tiny_module():
    return MatrixVTTinyExp(batch_size_per_device=3, learning_rate=1e-4, data_root='unused', version='v1.0-mini')


def optimizers_for(module, world_size, lr_schedule):
    module._trainer = types.SimpleNamespace(world_size=world_size)
    module.lr_schedule = lr_schedule
    try:
        return module.configure_optimizers()
    finally:
        module._trainer = None


def test_lr_is_per_image_times_global_batch_and_schedule_is_multistep(tiny_module):
    optimizers, schedulers = optimizers_for(tiny_module, 4, 'multistep')
    (optimizer,), (scheduler,) = optimizers, schedulers
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]['lr'] == pytest.approx(1e-4 * 3 * 4)
    assert optimizer.param_groups[0]['weight_decay'] == base_exp.WEIGHT_DECAY == 1e-7
    assert isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR)
    # The seed's [19, 23] in the base class; the tiny demo steps once for the last sixth of its epochs.
    assert derive.lr_milestones('reference', 12) == [19, 23]
    assert sorted(scheduler.milestones) == tiny_module.lr_milestones() == [10] and scheduler.gamma == 0.1  # of 12
    # Every network parameter is optimised.
    assert sum(p.numel() for p in optimizer.param_groups[0]['params']) == \
        sum(p.numel() for p in tiny_module.model.parameters())
    (constant,) = optimizers_for(tiny_module, 1, 'constant')
    assert isinstance(constant, torch.optim.AdamW) and constant.param_groups[0]['lr'] == pytest.approx(3e-4)


def test_bad_lr_schedule_or_lr_rejected():
    with pytest.raises(ValueError, match='lr_schedule'):
        MatrixVTTinyExp(lr_schedule='cosine', data_root='unused')
    with pytest.raises(ValueError, match='learning_rate'):
        MatrixVTTinyExp(learning_rate=0.0, data_root='unused')


def test_gather_interleaves_ranks_and_drops_padding(monkeypatch):
    # 5 samples on 2 ranks: DistributedSampler(shuffle=False) gives rank 0 [0, 2, 4], rank 1 [1, 3, 0 (padding)].
    per_rank = [['s0', 's2', 's4'], ['s1', 's3', 's0']]
    monkeypatch.setattr(dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(dist, 'get_world_size', lambda: 2)

    def all_gather_object(out, obj):
        out[:] = per_rank

    monkeypatch.setattr(dist, 'all_gather_object', all_gather_object)
    assert base_exp.gather_in_sampler_order(per_rank[0], 5) == ['s0', 's1', 's2', 's3', 's4']
    per_rank[1] = per_rank[1][:2]
    with pytest.raises(RuntimeError, match='different numbers of eval samples'):
        base_exp.gather_in_sampler_order(per_rank[0], 5)


def test_gather_and_rank_zero_run_on_one_process():
    assert base_exp.gather_in_sampler_order(['a', 'b', 'c'], 2) == ['a', 'b']
    assert base_exp.run_on_rank_zero(lambda: 7) == 7
    with pytest.raises(KeyError):
        base_exp.run_on_rank_zero(lambda: {}['x'])


def test_tiny_image_size_and_augmentation_switches():
    def image_aug_conf(final_dim, **kwargs):
        return derive.image_aug_conf(tiny.ida_aug_conf(), final_dim, **kwargs)

    conf = image_aug_conf((64, 192))
    assert conf['final_dim'] == (64, 192)
    assert conf['resize_lim'] == pytest.approx((0.386 * 192 / 704, 0.55 * 192 / 704))
    off = image_aug_conf((64, 192), enabled=False)
    assert off['resize_lim'] == (0.12, 0.12) and off['rot_lim'] == (0.0, 0.0) and off['rand_flip'] is False
    assert image_aug_conf((64, 192), resize_lim=(0.1, 0.2))['resize_lim'] == (0.1, 0.2)
    with pytest.raises(settings.SettingError, match='--final_dim must be two multiples of 32'):
        MatrixVTTinyExp(final_dim=(60, 192), data_root='unused')
    bda = tiny.bda_aug_conf()
    assert derive.bev_aug_conf(bda, False)['flip_dx_ratio'] == 0.0 and derive.bev_aug_conf(bda)['flip_dx_ratio'] == 0.5
    module = MatrixVTTinyExp(final_dim=(64, 192), ida_aug=False, data_root='unused')
    assert module.backbone_conf['final_dim'] == (64, 192) and module.ida_aug_conf['rand_flip'] is False
    # The reference's image flip is on by default; --no-ida_flip turns it off (training only).
    assert conf['rand_flip'] is True and image_aug_conf((64, 192), flip=False)['rand_flip'] is False
    assert MatrixVTTinyExp(data_root='unused').ida_aug_conf['rand_flip'] is True
    assert MatrixVTTinyExp(ida_flip=False, data_root='unused').ida_aug_conf['rand_flip'] is False
    # The tiny input keeps the resize range it always had (the reference's x 352 / 704).
    assert MatrixVTTinyExp(data_root='unused').ida_aug_conf['resize_lim'] == (0.386 * 352 / 704, 0.55 * 352 / 704)


def test_reference_configs_come_out_unchanged():
    """With every model setting at its default the R50 experiments get the reference configs exactly."""
    from bevdepth.configs import nuscenes

    config = settings.resolve(base_exp.BEVDepthLightningModel)
    assert derive.module_configs(config) == (nuscenes.backbone_conf(), nuscenes.head_conf(),
                                             nuscenes.ida_aug_conf(), nuscenes.bda_aug_conf())


def test_tiny_demo_starts_heatmaps_from_the_focal_prior_but_reference_head_does_not(tiny_module):
    # Demo-only deviation: sigmoid(-2.19) = 0.1 at the start; the reference head keeps PyTorch's default bias.
    from bevdepth.configs import nuscenes
    from bevdepth.models.matrixvt_det import MatrixVT_Det

    for task_head in tiny_module.model.head.task_heads:
        assert torch.all(task_head.heatmap[-1].bias == torch.tensor(-2.19))
    torch.manual_seed(0)
    reference_head = MatrixVT_Det(nuscenes.backbone_conf(), nuscenes.head_conf()).head
    bias = reference_head.task_heads[0].heatmap[-1].bias
    assert bias.abs().max() < 0.5  # PyTorch's default uniform init, as the reference


@pytest.mark.parametrize('downsample_factor, feature_size, neck_strides', [
    (16, (8, 22), [0.25, 0.5, 1, 2]),  # the reference's stride
    (8, (16, 44), [0.5, 1, 2, 4]),
])
def test_tiny_feature_stride(downsample_factor, feature_size, neck_strides):
    """--downsample_factor sets the frustum, the image FPN's resampling and the depth-label stride together."""
    module = MatrixVTTinyExp(downsample_factor=downsample_factor, data_root='unused')
    backbone = module.model.backbone
    assert tuple(backbone.frustum.shape[1:3]) == feature_size
    assert backbone.img_neck.upsample_strides == neck_strides
    assert module.model.depth_loss.downsample_factor == downsample_factor
    backbone.eval()
    with torch.no_grad():
        feats = backbone.get_cam_feats(torch.zeros(1, 1, 2, 3, 128, 352))
    assert tuple(feats.shape[-2:]) == feature_size
    with pytest.raises(ValueError, match='--downsample_factor must be one of'):
        MatrixVTTinyExp(downsample_factor=12, data_root='unused')


def test_channels_last_is_a_layout_choice_only():
    """The tiny experiment keeps conv weights channels-last (CPU speed); the reference default stays contiguous,
    and both layouts compute the same heads from the same weights."""
    fast = MatrixVTTinyExp(data_root='unused')
    plain = MatrixVTTinyExp(data_root='unused', channels_last=False)
    weight = fast.model.backbone.img_backbone.conv1.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert plain.model.backbone.img_backbone.conv1.weight.is_contiguous()
    assert settings.experiment_defaults(base_exp.BEVDepthLightningModel)['channels_last'] is False
    plain.model.load_state_dict(fast.model.state_dict())
    fast.model.eval(), plain.model.eval()
    torch.manual_seed(0)
    imgs = torch.randn(1, 1, 6, 3, 128, 352)
    mats = {name: torch.eye(4).expand(1, 1, 6, 4, 4).clone() for name in ('sensor2ego_mats', 'intrin_mats',
                                                                           'ida_mats')}
    mats['intrin_mats'][..., 0, 0] = mats['intrin_mats'][..., 1, 1] = 300.0
    mats['intrin_mats'][..., 0, 2], mats['intrin_mats'][..., 1, 2] = 176.0, 64.0
    mats['bda_mat'] = torch.eye(4).expand(1, 4, 4).clone()
    with torch.no_grad():
        fast_preds, plain_preds = fast.model(imgs, mats), plain.model(imgs, mats)
    for fast_task, plain_task in zip(fast_preds, plain_preds):
        for name, value in fast_task[0].items():
            torch.testing.assert_close(value, plain_task[0][name], rtol=1e-4, atol=1e-4)
