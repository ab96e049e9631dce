"""Reference configuration of the MatrixVT / BEVDepth R50 256x704 experiments (upstream ``bevdepth/exps/nuscenes/base_exp.py``).

Every function returns a fresh dict so callers may edit their copy. The keys are the reference's
(``backbone_conf``, ``head_conf``, ``ida_aug_conf``, ``bda_aug_conf``); the ``type`` entries of the
reference's registry configs are gone because modules are built by direct import.
"""
import copy

CLASSES = [
    'car', 'truck', 'construction_vehicle', 'bus', 'trailer', 'barrier', 'motorcycle', 'bicycle',
    'pedestrian', 'traffic_cone'
]

TASKS = [
    dict(num_class=1, class_names=['car']),
    dict(num_class=2, class_names=['truck', 'construction_vehicle']),
    dict(num_class=2, class_names=['bus', 'trailer']),
    dict(num_class=1, class_names=['barrier']),
    dict(num_class=2, class_names=['motorcycle', 'bicycle']),
    dict(num_class=2, class_names=['pedestrian', 'traffic_cone']),
]

CAMERAS = ['CAM_FRONT_LEFT', 'CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_BACK_LEFT', 'CAM_BACK', 'CAM_BACK_RIGHT']

IMG_CONF = dict(img_mean=[123.675, 116.28, 103.53], img_std=[58.395, 57.12, 57.375], to_rgb=True)


def backbone_conf():
    """MatrixVT / BaseLSSFPN arguments (image backbone, neck, depth net, grids)."""
    return dict(
        x_bound=[-51.2, 51.2, 0.8],
        y_bound=[-51.2, 51.2, 0.8],
        z_bound=[-5, 3, 8],
        d_bound=[2.0, 58.0, 0.5],
        final_dim=(256, 704),
        downsample_factor=16,
        output_channels=80,
        # ResNet kwargs (mmdet ResNet semantics). pretrained: None | path | 'torchvision' (local cache only).
        img_backbone_conf=dict(depth=50, frozen_stages=0, out_indices=[0, 1, 2, 3], norm_eval=False,
                               pretrained=None),
        img_neck_conf=dict(in_channels=[256, 512, 1024, 2048], upsample_strides=[0.25, 0.5, 1, 2],
                           out_channels=[128, 128, 128, 128]),
        depth_net_conf=dict(in_channels=512, mid_channels=512),
    )


def head_conf():
    """BEVDepthHead arguments (BEV trunk, BEV neck, CenterPoint targets / decoding)."""
    return dict(
        bev_backbone_conf=dict(in_channels=80, depth=18, num_stages=3, strides=(1, 2, 2), dilations=(1, 1, 1),
                               out_indices=[0, 1, 2], norm_eval=False, base_channels=160),
        bev_neck_conf=dict(in_channels=[80, 160, 320, 640], upsample_strides=[1, 2, 4, 8],
                           out_channels=[64, 64, 64, 64]),
        tasks=copy.deepcopy(TASKS),
        common_heads=dict(reg=(2, 2), height=(1, 2), dim=(3, 2), rot=(2, 2), vel=(2, 2)),
        bbox_coder=dict(post_center_range=[-61.2, -61.2, -10.0, 61.2, 61.2, 10.0], max_num=500,
                        score_threshold=0.1, out_size_factor=4, voxel_size=[0.2, 0.2, 8],
                        pc_range=[-51.2, -51.2, -5, 51.2, 51.2, 3], code_size=9),
        train_cfg=dict(point_cloud_range=[-51.2, -51.2, -5, 51.2, 51.2, 3], grid_size=[512, 512, 1],
                       voxel_size=[0.2, 0.2, 8], out_size_factor=4, dense_reg=1, gaussian_overlap=0.1,
                       max_objs=500, min_radius=2, code_weights=[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5]),
        test_cfg=dict(post_center_limit_range=[-61.2, -61.2, -10.0, 61.2, 61.2, 10.0], max_per_img=500,
                      max_pool_nms=False, min_radius=[4, 12, 10, 1, 0.85, 0.175], score_threshold=0.1,
                      out_size_factor=4, voxel_size=[0.2, 0.2, 8], nms_type='circle', pre_max_size=1000,
                      post_max_size=83, nms_thr=0.2),
        in_channels=256,
        loss_cls_weight=1.0,   # GaussianFocalLoss(alpha=2, gamma=4), reduction mean
        loss_bbox_weight=0.25,  # L1Loss, reduction mean
        gaussian_overlap=0.1,
        min_radius=2,
    )


def ida_aug_conf():
    """Image-data augmentation (resize / crop / flip / rotate) of the reference."""
    return dict(resize_lim=(0.386, 0.55), final_dim=(256, 704), rot_lim=(-5.4, 5.4), H=900, W=1600,
                rand_flip=True, bot_pct_lim=(0.0, 0.0), cams=list(CAMERAS), Ncams=6)


def bda_aug_conf():
    """BEV-data augmentation (rotate / scale / flip) of the reference."""
    return dict(rot_lim=(-22.5, 22.5), scale_lim=(0.95, 1.05), flip_dx_ratio=0.5, flip_dy_ratio=0.5)
