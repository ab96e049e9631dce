"""Every setting of an experiment, defined once: name, default, type, check, one-line help and group.

The command line (``bevdepth/engine/cli.py``), the run configuration saved in the run folder (``config.yaml``) and
in every checkpoint, the recipe printed at start, and the model that ``-e`` / ``-p`` / export / visualisation
rebuild all derive from :data:`SETTINGS`. An experiment (``exps/.../<exp>.py``) changes defaults only, in its
``setting_defaults`` dict, each with a one-line reason; :func:`experiment_defaults` merges them along the class
hierarchy. Settings marked ``structural`` change the network's tensors: evaluation takes them from the checkpoint.

A configuration is a plain dict ``{name: value}`` of every setting (lists, not tuples), so it is readable YAML and
loads from a checkpoint with ``torch.load(weights_only=True)``.
"""
import dataclasses
import difflib
from typing import Any, Callable, Optional

from bevdepth.configs.derive import BASE_CONFIG_MODULES, IMAGE_LEVEL_STRIDES

GROUPS = ('model', 'data', 'optimisation', 'run')
CHECKPOINT_KEY = 'bevdepth_config'  # where .ckpt and EMA .pth files keep the run's configuration
ACCELERATORS = ('auto', 'cpu', 'gpu', 'cuda', 'npu')  # 'gpu' and 'cuda' are the same device kind
LR_SCHEDULES = ('multistep', 'constant')
LR_MILESTONE_RULES = ('reference', 'final_sixth')
IMAGE_BACKENDS = ('opencv', 'pillow')
BASE_CONFIGS = tuple(BASE_CONFIG_MODULES)
FEATURE_STRIDES = IMAGE_LEVEL_STRIDES[:3]  # --downsample_factor: the stride of a ResNet level the FPN resamples to
# --precision values: the seed's spellings and Lightning 2's names -> Lightning 2's names.
PRECISION_ALIASES = {
    '16': '16-mixed', '16-mixed': '16-mixed', '16-true': '16-true',
    'bf16': 'bf16-mixed', 'bf16-mixed': 'bf16-mixed', 'bf16-true': 'bf16-true',
    '32': '32-true', '32-true': '32-true', '64': '64-true', '64-true': '64-true',
}


class SettingError(ValueError):
    """A setting with a value its check refuses, or a name that is no setting."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting. ``parse`` turns one command-line token into a value; ``check`` returns None or the problem."""

    name: str
    default: Any
    help: str
    group: str
    parse: Callable = str
    nargs: Optional[int] = None  # a fixed number of tokens: the value is a list
    choices: Optional[tuple] = None
    aliases: tuple = ()  # other option strings (the seed's '-b', '--max_epoch')
    boolean: bool = False  # --name / --no-name
    check: Optional[Callable] = None
    structural: bool = False  # changes the network's tensors: -e / -p rebuild it from the checkpoint

    @property
    def flag(self):
        return '--' + self.name


def optional(parse):
    """A token parser that also reads 'none' / 'null' as None."""
    def parse_optional(token):
        return None if str(token).lower() in ('none', 'null') else parse(token)
    parse_optional.__name__ = getattr(parse, '__name__', 'value')
    return parse_optional


def int_or_fraction(token):
    """--limit_train_batches: '3' counts batches, '0.25' is a fraction of the epoch."""
    return int(token) if str(token).isdigit() else float(token)


def int_or_auto(token):
    return token if token == 'auto' else int(token)


def _at_least(low):
    def check(value):
        return None if value is None or value >= low else f'must be >= {low}'
    return check


def _positive(value):
    return None if value is None or value > 0 else 'must be > 0'


def _multiples_of_32(value):
    if value is None:
        return None
    if len(value) != 2 or any(v < 32 or v % 32 for v in value):
        return 'must be two multiples of 32 (ResNet stride 32), H W'
    return None


def _ordered_positive_pair(value):
    if value is None:
        return None
    return None if 0 < value[0] <= value[1] else 'must be 0 < LOW <= HIGH'


def _precision(value):
    return None if value is None or str(value) in PRECISION_ALIASES else f'must be one of {sorted(PRECISION_ALIASES)}'


def _devices(value):
    return None if value in (None, 'auto') or (isinstance(value, int) and value >= 1) else \
        "must be a positive integer or 'auto'"


_S = Setting
SETTINGS = (
    # ---- model: what the network is
    _S('base_config', 'nuscenes_r50', 'architecture family: the reference R50 256x704 configs or the tiny CPU ones',
       'model', choices=BASE_CONFIGS, structural=True),
    _S('final_dim', None, "network input H W (multiples of 32); none = the base config's", 'model', int, nargs=2,
       check=_multiples_of_32, structural=True),
    _S('img_base_channels', None, "width of the image ResNet's first stage (64 = standard); none = the base "
       "config's", 'model', optional(int), check=_at_least(1), structural=True),
    _S('downsample_factor', None, "image stride of the depth / context features (4, 8, 16); none = the base "
       "config's", 'model', optional(int), choices=(None, *FEATURE_STRIDES), structural=True),
    _S('bev_cell', None, "BEV cell of the view transform in metres (1.6 or 0.8 with the tiny config); none = the "
       "base config's", 'model', optional(float), structural=True),
    _S('head_channels', None, "channels of the task-head convs (the reference's 64); none = the base config's",
       'model', optional(int), check=_at_least(1), structural=True),
    _S('heatmap_prior_bias', None, "initial bias of the heatmap convs (CenterPoint's prior is -2.19); none = the "
       "reference's default init", 'model', optional(float)),
    _S('pretrained', 'torchvision', "initial weights of the image ResNet for a new training run: torchvision "
       "(ImageNet IMAGENET1K_V1), none, or a checkpoint PATH; runs that load a checkpoint ignore it", 'model'),
    _S('channels_last', False, 'channels-last memory format for the model (a speed choice: same values)',
       'model', boolean=True),
    _S('ema', True, 'keep an EMA of the weights (decay 0.999) and save it as <epoch>.pth each epoch', 'model',
       boolean=True),
    # ---- data
    _S('data_root', 'data/nuScenes', 'nuScenes dataroot holding nuscenes_infos_*.pkl', 'data',
       aliases=('--data-root',)),
    _S('version', 'v1.0-trainval', "nuScenes version: 'v1.0-trainval' or 'v1.0-mini'", 'data'),
    _S('num_workers', 4, 'dataloader workers per process', 'data', int, check=_at_least(0)),
    _S('cbgs', False, 'class-balanced grouping and sampling of the training split', 'data', boolean=True),
    _S('image_backend', 'opencv', "image resize / crop / rotate: opencv (faster) or pillow (the reference's PIL "
       "bicubic pipeline)", 'data', choices=IMAGE_BACKENDS),
    _S('ida_aug', True, 'random image resize / crop / rotation (and flip) in training', 'data', boolean=True),
    _S('ida_flip', True, "the reference's random image flip in training", 'data', boolean=True),
    _S('resize_lim', None, "training resize range LOW HIGH of the 1600x900 images; none = the reference's "
       "scaled to the input width", 'data', float, nargs=2, check=_ordered_positive_pair),
    _S('bda_aug', True, 'random BEV rotation / scale / flips in training', 'data', boolean=True),
    # ---- optimisation
    _S('batch_size_per_device', 8, 'samples (6 images each) per device and step', 'optimisation', int,
       aliases=('-b',), check=_at_least(1)),
    _S('learning_rate', 2e-4 / 64, 'lr per image; lr = learning_rate x batch per device x devices x nodes '
       '(3.125e-6 = 2e-4 for -b 8 on 8 devices)', 'optimisation', float, check=_positive),
    _S('lr_schedule', 'multistep', "multistep = x0.1 at the milestones (the Ascend seed), constant (upstream)",
       'optimisation', choices=LR_SCHEDULES),
    _S('lr_milestones', 'reference', "epochs of the multistep drops: reference = [19, 23], final_sixth = one drop "
       "for the last sixth of the epochs", 'optimisation', choices=LR_MILESTONE_RULES),
    _S('gradient_clip_val', 5.0, 'gradient clipping (L2 norm) as the reference; 0 = off', 'optimisation', float,
       check=_at_least(0)),
    _S('max_epochs', 24, 'training epochs', 'optimisation', int, aliases=('--max_epoch',), check=_at_least(1)),
    _S('max_bad_steps', 20, 'stop after this many consecutive non-finite-loss steps (each is skipped)',
       'optimisation', int, check=_at_least(1)),
    # ---- run: where and how
    _S('accelerator', 'auto', 'device kind (auto: NPU if torch_npu works, else GPU, else CPU)', 'run',
       choices=ACCELERATORS),
    _S('devices', None, "devices per node (int or 'auto')", 'run', optional(int_or_auto), check=_devices),
    _S('gpus', None, 'the seed\'s alias: number of accelerator devices (GPU, or NPU with torch_npu)', 'run',
       optional(int), check=_at_least(0)),
    _S('num_nodes', 1, 'machines', 'run', int, check=_at_least(1)),
    _S('precision', None, '16 = fp16 mixed precision (native AMP), bf16, 32; none = 16 on GPU / NPU (the reference '
       'run), 32 on CPU', 'run', optional(str), check=_precision),
    _S('amp_backend', None, 'accepted for the seed\'s command lines; Lightning 2 has only native AMP', 'run',
       optional(str)),
    _S('seed', 0, 'seed of the weights, the training order and the augmentation', 'run', int),
    _S('eval_batch_size', None, 'samples per device for -e / -p; none = -b', 'run', optional(int),
       check=_at_least(1)),
    _S('limit_train_batches', 1.0, 'an int counts batches per epoch, a float is a fraction', 'run',
       int_or_fraction, check=_at_least(0)),
    _S('ckpt_every_n_steps', 0, 'also save a checkpoint every N optimiser steps (0 = at epoch ends only)', 'run',
       int, check=_at_least(0)),
    _S('log_every_n_steps', 50, 'TensorBoard logging interval in steps', 'run', int, check=_at_least(1)),
    _S('default_root_dir', None, 'run folder; none = ./outputs/<experiment name>', 'run', optional(str)),
    _S('progress_bar', 'auto', 'tqdm progress bars on stderr; auto = on when stderr is a terminal', 'run',
       choices=('auto', 'on', 'off')),
    _S('bind_cpu_cores', False, 'pin each local rank (and its dataloader workers) to its own block of CPU cores',
       'run', boolean=True),
    _S('find_unused_parameters', False, 'DDP find_unused_parameters (the Lightning 1.6 default; off is faster)',
       'run', boolean=True),
    _S('deterministic', False, 'torch deterministic algorithms', 'run', boolean=True),
    _S('profiler', None, "Lightning profiler: simple (the reference's) or advanced", 'run', optional(str),
       choices=(None, 'simple', 'advanced')),
)
SETTINGS_BY_NAME = {setting.name: setting for setting in SETTINGS}
STRUCTURAL = tuple(setting.name for setting in SETTINGS if setting.structural)


def closest_name(name, names):
    """' (did you mean X?)' for a misspelt name, else ''."""
    match = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return f' (did you mean {match[0]}?)' if match else ''


def experiment_defaults(experiment_class):
    """Every setting's default for ``experiment_class``: the table's, then each class's ``setting_defaults`` from
    the base down."""
    defaults = {setting.name: setting.default for setting in SETTINGS}
    for cls in reversed(experiment_class.__mro__):
        overrides = vars(cls).get('setting_defaults', {})
        for name, value in overrides.items():
            if name not in SETTINGS_BY_NAME:
                raise SettingError(f'{cls.__name__}.setting_defaults: {name!r} is no setting'
                                   f'{closest_name(name, SETTINGS_BY_NAME)}')
            defaults[name] = value
    return defaults


def plain(value):
    """Tuples -> lists, recursively: the YAML / weights_only-loadable form of a value."""
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value


def check_value(name, value):
    """Raise SettingError naming the flag when ``value`` does not pass the setting's check / choices."""
    setting = SETTINGS_BY_NAME[name]
    if setting.choices is not None and value not in setting.choices:
        raise SettingError(f'{setting.flag} must be one of {[c for c in setting.choices if c is not None]}, '
                           f'got {value!r}')
    problem = setting.check(value) if setting.check is not None else None
    if problem:
        raise SettingError(f'{setting.flag} {problem}, got {value!r}')


def resolve(experiment_class, overrides=None):
    """The complete, checked configuration of ``experiment_class`` with ``overrides`` ({name: value}) applied."""
    config = experiment_defaults(experiment_class)
    for name, value in (overrides or {}).items():
        if name not in SETTINGS_BY_NAME:
            raise SettingError(f'{name!r} is no setting of {experiment_class.__name__}'
                               f'{closest_name(name, SETTINGS_BY_NAME)}')
        config[name] = value
    config = plain(config)
    for name, value in config.items():
        check_value(name, value)
    return config
