"""A tiny MatrixVT configuration for CPU tests and the synthetic-data demo.

Same architecture as the reference, scaled down: ResNet-18 image backbone, small images, a 64x64 BEV
grid of 1.6 m cells over the reference's +-51.2 m range, 1 m depth bins.
"""
from bevdepth.configs import nuscenes

FINAL_DIM = (128, 352)


def backbone_conf():
    conf = nuscenes.backbone_conf()
    conf.update(
        x_bound=[-51.2, 51.2, 1.6],
        y_bound=[-51.2, 51.2, 1.6],
        d_bound=[2.0, 58.0, 1.0],
        final_dim=FINAL_DIM,
        downsample_factor=16,
        output_channels=32,
        img_backbone_conf=dict(depth=18, frozen_stages=0, out_indices=[0, 1, 2, 3], norm_eval=False,
                               pretrained=None),
        img_neck_conf=dict(in_channels=[64, 128, 256, 512], upsample_strides=[0.25, 0.5, 1, 2],
                           out_channels=[32, 32, 32, 32]),
        depth_net_conf=dict(in_channels=128, mid_channels=64),
    )
    return conf


def head_conf():
    conf = nuscenes.head_conf()
    conf['bev_backbone_conf'].update(in_channels=32, base_channels=32)
    conf['bev_neck_conf'].update(in_channels=[32, 32, 64, 128], out_channels=[32, 32, 32, 32])
    conf['in_channels'] = 128
    for cfg in (conf['bbox_coder'], conf['train_cfg'], conf['test_cfg']):
        cfg['voxel_size'] = [0.4, 0.4, 8]
    conf['train_cfg']['grid_size'] = [256, 256, 1]
    return conf


def ida_aug_conf():
    conf = nuscenes.ida_aug_conf()
    # Same relative scale range as the reference (final width / 1600 ~ 0.44 at eval).
    conf.update(final_dim=FINAL_DIM, resize_lim=(0.193, 0.275))
    return conf


def bda_aug_conf():
    return nuscenes.bda_aug_conf()
