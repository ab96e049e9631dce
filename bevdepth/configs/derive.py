"""The module configs (backbone / head / augmentation dicts) and the lr milestones of a configuration.

Each rule is a named function that one setting selects (bevdepth/configs/settings.py). With every model setting at
its default (None) the reference R50 configs come out unchanged.
"""
from bevdepth.configs import nuscenes, tiny

BASE_CONFIG_MODULES = {'nuscenes_r50': nuscenes, 'tiny': tiny}
IMAGE_LEVEL_STRIDES = (4, 8, 16, 32)  # strides of the four ResNet stages fed to the image FPN
REFERENCE_LR_MILESTONES = (19, 23)  # MultiStepLR of the Ascend seed (gamma 0.1), stepped per epoch
# The reference's training resize range belongs to its 704-pixel-wide input; other widths scale it.
REFERENCE_RESIZE_LIM = nuscenes.ida_aug_conf()['resize_lim']
REFERENCE_FINAL_WIDTH = nuscenes.ida_aug_conf()['final_dim'][1]
BEV_CELLS_OF_THE_TINY_GRID = (1.6, 0.8)


def set_input_size(backbone_conf, final_dim):
    """Network input (H, W) (multiples of 32, also of the feature stride)."""
    final_dim = tuple(int(v) for v in final_dim)
    if any(v % backbone_conf['downsample_factor'] for v in final_dim):
        raise ValueError(f"--final_dim {list(final_dim)} must be multiples of --downsample_factor "
                         f"{backbone_conf['downsample_factor']}")
    backbone_conf['final_dim'] = final_dim


def set_feature_stride(backbone_conf, downsample_factor):
    """Image stride of the depth / context features: the FPN resamples every ResNet level to it."""
    if downsample_factor not in IMAGE_LEVEL_STRIDES[:3]:
        raise ValueError(f'--downsample_factor must be one of {list(IMAGE_LEVEL_STRIDES[:3])} (a ResNet level '
                         f'stride), got {downsample_factor}')
    backbone_conf['downsample_factor'] = int(downsample_factor)
    backbone_conf['img_neck_conf']['upsample_strides'] = [s / downsample_factor for s in IMAGE_LEVEL_STRIDES]


def set_image_width(backbone_conf, base_channels):
    """Width of the image ResNet's first stage; the FPN's inputs follow (ResNet-18 / 34 layout: x1 x2 x4 x8)."""
    backbone_conf['img_backbone_conf'].update(base_channels=int(base_channels))
    expansion = 4 if backbone_conf['img_backbone_conf']['depth'] >= 50 else 1
    backbone_conf['img_neck_conf'].update(in_channels=[base_channels * expansion * 2**i for i in range(4)])


def set_bev_cell(backbone_conf, head_conf, bev_cell):
    """Put the view transform on ``bev_cell`` metre cells of the tiny grid (1.6 or 0.8 m).

    The head's target grid stays at 1.6 m: for 0.8 m cells the BEV trunk's first stage and the neck's first level
    (the raw BEV features) downsample by 2 more, so every trunk stage keeps its resolution and the head sees
    features computed from the finer splat at almost the same cost.
    """
    if bev_cell not in BEV_CELLS_OF_THE_TINY_GRID:
        raise ValueError(f'--bev_cell must be one of {list(BEV_CELLS_OF_THE_TINY_GRID)}, got {bev_cell}')
    step = backbone_conf['x_bound'][2]
    if bev_cell == step:
        return
    if step != BEV_CELLS_OF_THE_TINY_GRID[0]:
        raise ValueError(f'--bev_cell applies to the tiny 1.6 m grid; this config has {step} m cells')
    factor = round(step / bev_cell)
    for key in ('x_bound', 'y_bound'):
        backbone_conf[key] = [backbone_conf[key][0], backbone_conf[key][1], float(bev_cell)]
    trunk = head_conf['bev_backbone_conf']
    trunk['strides'] = (trunk['strides'][0] * factor,) + tuple(trunk['strides'][1:])
    neck = head_conf['bev_neck_conf']
    neck['upsample_strides'] = [neck['upsample_strides'][0] / factor] + list(neck['upsample_strides'][1:])


def set_head_channels(head_conf, channels):
    """Channels of the task heads' shared conv and branch convs (the reference's 64)."""
    head_conf.update(share_conv_channel=int(channels), head_conv=int(channels))


def image_aug_conf(base_conf, final_dim, resize_lim=None, enabled=True, flip=True):
    """ida_aug_conf for input size ``final_dim`` (H, W); ``enabled=False`` = the eval transform in training too.

    Default resize range: the reference's (0.386, 0.55) x W / 704 (the same relative scale jitter; exactly the
    reference's for its own 256x704 input). ``flip`` is the reference's random horizontal flip (p = 0.5): ida_mat puts
    every flipped pixel back on its original ray, so positions stay right, but an object's appearance is mirrored
    while its yaw label is not.
    """
    conf = dict(base_conf)
    final_height, final_width = (int(v) for v in final_dim)
    reference_input = (final_height, final_width) == tuple(conf['final_dim']) and final_width == REFERENCE_FINAL_WIDTH
    if resize_lim is None and not reference_input:
        resize_lim = tuple(v * final_width / REFERENCE_FINAL_WIDTH for v in REFERENCE_RESIZE_LIM)
    conf['final_dim'] = (final_height, final_width)
    if resize_lim is not None:
        conf['resize_lim'] = tuple(float(v) for v in resize_lim)
    conf['rand_flip'] = bool(flip) and conf['rand_flip']
    if not enabled:
        # The eval resize (fit the width), no rotation, no flip: the sampled transform equals the eval one.
        eval_resize = max(final_height / conf['H'], final_width / conf['W'])
        conf.update(resize_lim=(eval_resize, eval_resize), rot_lim=(0.0, 0.0), rand_flip=False)
    return conf


def bev_aug_conf(base_conf, enabled=True):
    conf = dict(base_conf)
    if not enabled:
        conf.update(rot_lim=(0.0, 0.0), scale_lim=(1.0, 1.0), flip_dx_ratio=0.0, flip_dy_ratio=0.0)
    return conf


def lr_milestones(rule, max_epochs):
    """Epochs at which 'multistep' multiplies the lr by 0.1: 'reference' = [19, 23] (the Ascend seed);
    'final_sixth' = one drop for the last sixth of training (epoch 10 of 12), so a short run ends on settled
    weights instead of the noise of a constant lr."""
    if rule == 'reference':
        return list(REFERENCE_LR_MILESTONES)
    if rule == 'final_sixth':
        return [max(1, round(max_epochs * 5 / 6))]
    raise ValueError(f"lr milestone rule must be 'reference' or 'final_sixth', got {rule!r}")


def module_configs(config):
    """(backbone_conf, head_conf, ida_aug_conf, bda_aug_conf) of a configuration (bevdepth.configs.settings)."""
    base = BASE_CONFIG_MODULES[config['base_config']]
    backbone_conf, head_conf = base.backbone_conf(), base.head_conf()
    if config['downsample_factor'] is not None:
        set_feature_stride(backbone_conf, config['downsample_factor'])
    if config['final_dim'] is not None:
        set_input_size(backbone_conf, config['final_dim'])
    if config['img_base_channels'] is not None:
        set_image_width(backbone_conf, config['img_base_channels'])
    if config['bev_cell'] is not None:
        set_bev_cell(backbone_conf, head_conf, config['bev_cell'])
    if config['head_channels'] is not None:
        set_head_channels(head_conf, config['head_channels'])
    ida_conf = image_aug_conf(base.ida_aug_conf(), backbone_conf['final_dim'], config['resize_lim'],
                              config['ida_aug'], config['ida_flip'])
    bda_conf = bev_aug_conf(base.bda_aug_conf(), config['bda_aug'])
    return backbone_conf, head_conf, ida_conf, bda_conf
