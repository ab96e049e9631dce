"""Seed-compatible command line for the experiments, mapped explicitly onto a Lightning 2 ``Trainer``.

The reference built its CLI from Lightning 1.x's ``pl.Trainer.add_argparse_args`` plus ``-e -p -b --seed
--ckpt_path`` (upstream ``bevdepth/exps/base_cli.py`` ``run_cli``) and the Ascend port's ``--learning_rate``. Here
every flag comes from one of two homes: the settings table (bevdepth/configs/settings.py: ``--<setting>``, typed,
checked, with the experiment's default) and the signature of ``pl.Trainer`` (every other Trainer argument as
``--<name> VALUE``, typed from its annotation); the Trainer arguments the engine must own, and Lightning 1.x names
that no longer exist, get a one-line error naming the replacement. Usage (from the repository root)::

    python exps/nuscenes/MatrixVT/matrixvt_bev_depth_lss_r50_256x704_128x128_24e_ema.py \\
        -b 8 --gpus 8 --amp_backend native --precision 16 --learning_rate 0.000003125 --max_epoch 24 --seed 0
    python exps/.../<exp>.py -e --ckpt_path outputs/<exp_name>/lightning_logs/version_0/23.pth
    python exps/.../<exp>.py -p --ckpt_path <ckpt>          # results_nusc.json next to the checkpoint
    python exps/.../<exp>.py ... --resume auto              # continue the newest checkpoint of the run folder
    python exps/.../<exp>.py --print_config                 # the resolved configuration as YAML

Outputs: ``<default_root_dir>/lightning_logs/version_N/`` holds ``config.yaml`` (the run's configuration), the
TensorBoard events, the EMA weights ``<epoch>.pth`` and ``checkpoints/`` (``epoch=E-step=S.ckpt`` of the latest
epoch, ``step=S.ckpt`` every ``--ckpt_every_n_steps``, and ``last.ckpt`` linking to the newest of them). Every file
is written to a temporary name and renamed; every checkpoint carries the configuration, so ``-e`` / ``-p`` rebuild
the trained model without repeating its flags.
"""
import argparse
import difflib
import glob
import inspect
import os
import re
import sys
import typing

import torch

from bevdepth.configs import settings
from bevdepth.configs.settings import PRECISION_ALIASES, SETTINGS, SETTINGS_BY_NAME, STRUCTURAL, SettingError
from bevdepth.engine import devices as devices_helpers
from bevdepth.engine.entry_point import one_line_message, run_entry_point  # noqa: F401  (one_line_message: API)
from bevdepth.engine.errors import UsageError
from bevdepth.models import checkpoints

RUN_CONFIG_FILE = 'config.yaml'
MODE_FLAGS = ('evaluate', 'predict', 'ckpt_path', 'resume', 'print_config')

# Trainer arguments the engine sets itself: given on the command line they would break what it relies on.
ENGINE_OWNED_TRAINER_ARGS = {
    'logger': 'the engine logs to TensorBoard under <default_root_dir>/lightning_logs',
    'callbacks': 'the engine adds its callbacks itself (step time, EMA, checkpoints)',
    'plugins': 'the engine picks the precision and checkpoint-IO plugins (use --precision)',
    'use_distributed_sampler': 'the engine uses its own seeded, resumable distributed sampler',
    'enable_checkpointing': 'the engine saves a checkpoint every epoch (and every --ckpt_every_n_steps)',
    'barebones': 'the engine needs its logger, callbacks and checkpoints',
    'enable_progress_bar': 'use --progress_bar on|off|auto',
}
# Lightning 1.x Trainer arguments (the reference's CLI accepted them) that Lightning 2 removed.
LIGHTNING_1_ARGS = {
    'replace_sampler_ddp': 'renamed use_distributed_sampler in Lightning 2, and the engine owns the sampler '
                           '(seeded and resumable): drop the flag',
    'terminate_on_nan': 'removed in Lightning 2: here a non-finite loss skips its step and --max_bad_steps N in a '
                        'row stop the run',
    'track_grad_norm': 'removed in Lightning 2: log pytorch_lightning.utilities.grad_norm from a callback\'s '
                       'on_before_optimizer_step',
    'auto_lr_find': 'removed in Lightning 2: use pytorch_lightning.tuner.Tuner(trainer).lr_find',
    'auto_scale_batch_size': 'removed in Lightning 2: use pytorch_lightning.tuner.Tuner(trainer).scale_batch_size',
    'auto_select_gpus': 'removed in Lightning 2: use --devices N (or CUDA_VISIBLE_DEVICES)',
    'tpu_cores': 'removed in Lightning 2: use --accelerator and --devices',
    'ipus': 'removed in Lightning 2: use --accelerator and --devices',
    'num_processes': 'removed in Lightning 2: use --accelerator cpu --devices N',
    'amp_level': 'removed in Lightning 2 (apex AMP): use --precision 16',
    'weights_save_path': 'removed in Lightning 2: use --default_root_dir',
    'flush_logs_every_n_steps': 'removed in Lightning 2: the logger flushes itself',
    'progress_bar_refresh_rate': 'removed in Lightning 2: use --progress_bar on|off',
    'process_position': 'removed in Lightning 2: use --progress_bar on|off',
    'checkpoint_callback': 'removed in Lightning 2, and the engine owns checkpointing (--ckpt_every_n_steps)',
    'stochastic_weight_avg': 'removed in Lightning 2: add the StochasticWeightAveraging callback in the experiment',
    'reload_dataloaders_every_epoch': 'removed in Lightning 2: use --reload_dataloaders_every_n_epochs 1',
    'prepare_data_per_node': 'removed in Lightning 2: set it on a LightningDataModule',
    'weights_summary': 'removed in Lightning 2: use --enable_model_summary true|false',
    'log_gpu_memory': 'removed in Lightning 2: add the DeviceStatsMonitor callback',
    'move_metrics_to_cpu': 'removed in Lightning 2',
    'multiple_trainloader_mode': 'removed in Lightning 2: use a CombinedLoader',
    'truncated_bptt_steps': 'removed in Lightning 2',
}


# ------------------------------------------------------------------------------------------------ Trainer flags
def _annotation_types(annotation):
    """The leaf types / Literal values of a Trainer annotation, e.g. Optional[int] -> {int, NoneType}."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return set(typing.get_args(annotation))
    if origin is typing.Union:
        leaves = set()
        for arg in typing.get_args(annotation):
            leaves |= _annotation_types(arg)
        return leaves
    return {origin or annotation}


def trainer_value_parser(name, annotation):
    """A token parser for the Trainer argument ``name``, typed from its annotation."""
    leaves = _annotation_types(annotation)
    literals = {leaf for leaf in leaves if not isinstance(leaf, type)}

    def parse(token):
        lowered = token.lower()
        if type(None) in leaves and lowered in ('none', 'null'):
            return None
        if bool in leaves and lowered in ('true', 'false'):
            return lowered == 'true'
        if int in leaves and re.fullmatch(r'-?\d+', token):
            return int(token)
        if float in leaves and re.fullmatch(r'-?(\d+\.?\d*|\.\d+)([eE]-?\d+)?', token):
            return float(token)
        if token in literals or (str in leaves):
            return token
        for literal in literals:
            if str(literal) == token:
                return literal
        kinds = sorted({leaf.__name__ for leaf in leaves if isinstance(leaf, type)} |
                       {repr(literal) for literal in literals})
        raise argparse.ArgumentTypeError(f'--{name} takes {" | ".join(kinds)}, got {token!r}')

    parse.__name__ = name
    return parse


def passthrough_trainer_arguments():
    """{name: token parser} of every ``pl.Trainer`` argument that is neither a setting nor owned by the engine."""
    import pytorch_lightning as pl

    parameters = inspect.signature(pl.Trainer.__init__).parameters
    return {name: trainer_value_parser(name, parameter.annotation) for name, parameter in parameters.items()
            if name != 'self' and name not in SETTINGS_BY_NAME and name not in ENGINE_OWNED_TRAINER_ARGS}


class _Refuse(argparse.Action):
    """A flag that stops with one line saying why it cannot be used and what replaces it."""

    def __init__(self, option_strings, dest, reason, **kwargs):
        self.reason = reason
        super().__init__(option_strings, dest, nargs='?', **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f'{option_string}: {self.reason}')


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that name the closest valid flag of a misspelt one."""

    def error(self, message):
        match = re.match(r'unrecognized arguments: (.*)', message)
        if match:
            options = [option for action in self._actions for option in action.option_strings
                       if action.help is not argparse.SUPPRESS]
            hints = []
            for token in match.group(1).split():
                if token.startswith('-'):
                    close = difflib.get_close_matches(token.split('=')[0], options, n=1, cutoff=0.6)
                    hints.append(f'{token} (did you mean {close[0]}?)' if close else token)
            message = f'unrecognized arguments: {" ".join(hints) or match.group(1)}'
        self.exit(2, f'error: {message}\n')


def _add_setting(group, setting, default):
    """One flag of the settings table; its default is only shown (absent flags are resolved by settings)."""
    shown = 'none' if default is None else ' '.join(map(str, default)) if isinstance(default, list) else default
    kwargs = dict(dest=setting.name, help=f'{setting.help} (default: {shown})')
    if setting.boolean:
        kwargs['action'] = argparse.BooleanOptionalAction
    else:
        kwargs.update(type=setting.parse, metavar=setting.name.upper())
        if setting.nargs:
            kwargs['nargs'] = setting.nargs
        if setting.choices is not None and None not in setting.choices:
            kwargs.update(choices=list(setting.choices), metavar=None)
    group.add_argument(setting.flag, *setting.aliases, **kwargs)


def build_parser(exp_name, model_class=None, defaults=None):
    """Mode flags, one flag per setting (bevdepth/configs/settings.py), one per pass-through Trainer argument."""
    shown_defaults = settings.experiment_defaults(model_class or object)
    shown_defaults.update(defaults or {})
    parser = _Parser(prog=os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else exp_name,
                     description=f'Train / evaluate / predict {exp_name} (BEVDepth / MatrixVT, Lightning 2).',
                     argument_default=argparse.SUPPRESS, allow_abbrev=False)
    mode = parser.add_argument_group('mode')
    exclusive = mode.add_mutually_exclusive_group()
    exclusive.add_argument('-e', '--evaluate', '--eval', dest='evaluate', action='store_true',
                           help='evaluate --ckpt_path on the val split with the official nuScenes devkit')
    exclusive.add_argument('-p', '--predict', action='store_true',
                           help='write results_nusc.json for the test infos (val for v1.0-mini) next to --ckpt_path')
    mode.add_argument('--ckpt_path', help='.ckpt (Lightning) or .pth (EMA weights) for -e / -p')
    mode.add_argument('--resume', nargs='?', const='auto', metavar='auto|PATH',
                      help='resume training: auto = newest checkpoint under <default_root_dir>/lightning_logs')
    mode.add_argument('--resume_from_checkpoint', dest='resume', metavar='PATH',
                      help='the Lightning 1.x name of --resume PATH')
    mode.add_argument('--print_config', action='store_true', help='print the resolved configuration and exit')
    for group_name in settings.GROUPS:
        group = parser.add_argument_group(f'{group_name} settings')
        for setting in SETTINGS:
            if setting.group == group_name:
                _add_setting(group, setting, shown_defaults[setting.name])
    trainer_group = parser.add_argument_group('other pl.Trainer arguments (passed through; see Lightning docs)')
    for name, parse in passthrough_trainer_arguments().items():
        trainer_group.add_argument(f'--{name}', dest=f'trainer.{name}', type=parse, metavar='VALUE')
    for name, reason in {**ENGINE_OWNED_TRAINER_ARGS, **LIGHTNING_1_ARGS}.items():
        parser.add_argument(f'--{name}', action=_Refuse, reason=reason, help=argparse.SUPPRESS)
    return parser


def parse_args(exp_name, argv=None, defaults=None, model_class=None):
    """Parsed flags: every setting resolved (given > ``defaults`` > the experiment's > the table's), the mode flags,
    ``trainer_args`` (pass-through Trainer arguments given), ``given_settings`` (names given on the command line)
    and ``config`` (the resolved configuration dict)."""
    unknown = sorted(set(defaults or {}) - set(SETTINGS_BY_NAME))
    if unknown:
        raise ValueError(f'unknown CLI defaults {unknown}')
    parser = build_parser(exp_name, model_class, defaults)
    namespace = vars(parser.parse_args(argv))
    given = {name: namespace[name] for name in SETTINGS_BY_NAME if name in namespace}
    try:
        config = settings.resolve(model_class or object, {**(defaults or {}), **given})
    except SettingError as error:
        parser.error(str(error))
    args = argparse.Namespace(**config)
    args.config = config
    args.given_settings = sorted(given)
    args.trainer_args = {key[len('trainer.'):]: value for key, value in namespace.items() if key.startswith('trainer.')}
    for name in MODE_FLAGS:
        setattr(args, name, namespace.get(name, False if name in ('evaluate', 'predict', 'print_config') else None))
    if (args.evaluate or args.predict) and not args.ckpt_path:
        parser.error('-e/--evaluate and -p/--predict need --ckpt_path <.ckpt or .pth>')
    if (args.evaluate or args.predict) and args.resume:
        parser.error('--resume is for training; use --ckpt_path with -e / -p')
    if args.gpus == 0:  # Lightning 1.x: --gpus 0 meant "no accelerator"
        args.gpus = None
        if args.accelerator == 'auto':
            args.accelerator = 'cpu'
    if args.gpus is not None and args.devices is not None and args.gpus != args.devices:
        parser.error(f'--gpus {args.gpus} and --devices {args.devices} disagree; give one of them')
    return args


# ------------------------------------------------------------------------------------------------ resolution
def resolve_accelerator(requested, gpus):
    """The device kind the run uses: 'npu', 'cuda' or 'cpu' ('auto': NPU if torch_npu works, else CUDA, else CPU).

    ``--gpus N`` (the seed's flag) means N accelerator devices, so it needs a GPU or an NPU.
    """
    kind = devices_helpers.accelerator_kind(requested)
    if gpus and kind == 'cpu':
        raise UsageError(f'--gpus {gpus} given but neither a GPU (CUDA) nor an NPU (torch_npu) is usable '
                           f'here: use --accelerator cpu --devices N to run N CPU processes')
    return kind


def resolve_precision(precision, kind):
    """Lightning precision name; None = the reference's fp16 AMP on a GPU / NPU, fp32 on CPU."""
    if precision is None:
        return '32-true' if kind == 'cpu' else '16-mixed'
    precision = PRECISION_ALIASES[str(precision)]
    if kind == 'cpu' and precision in ('16-mixed', '16-true'):
        raise UsageError(f'--precision {precision} (fp16) needs a GPU or NPU; on CPU use --precision 32 or bf16')
    return precision


def effective_learning_rate(lr_per_image, batch_size_per_device, world_size):
    """The optimiser's lr: per-image lr x global batch (the Ascend seed's scaling, e.g. 3.125e-6 x 8 x 8 = 2e-4)."""
    return lr_per_image * batch_size_per_device * world_size


def pretrained_source(config, loads_checkpoint):
    """The image backbone's initial weights for this run: the ``pretrained`` setting for a new training run; None
    when the run loads a checkpoint, whose weights replace the initial ones anyway."""
    source = config['pretrained']
    return None if loads_checkpoint or source in (None, 'none') else source


def describe_pretrained(network):
    """'none (random init)' or where the image ResNet's weights came from and how many tensors were loaded."""
    from bevdepth.layers.backbones.resnet import ResNet

    loaded = [module for module in network.modules() if isinstance(module, ResNet) and module.pretrained_path]
    if not loaded:
        return 'none (random init)'
    return '; '.join(f'{module.pretrained_path} ({module.pretrained_tensors_loaded} tensors loaded, fc.* not used)'
                     for module in loaded)


def merge_saved_config(config, given, saved, path):
    """``config`` with the structural settings of a checkpoint's saved configuration (the model it holds).

    A structural flag given on the command line wins, with a warning naming both values when they differ.
    """
    merged = dict(config)
    for name in STRUCTURAL:
        if name not in saved:
            continue
        if name in given:
            if saved[name] != config[name]:
                _print_rank_zero(f'warning: --{name} {config[name]} given, but {path} was trained with {saved[name]}; '
                                 f'using {config[name]}', file=sys.stderr)
        else:
            merged[name] = saved[name]
    return merged


def recipe_lines(args, mode, kind, devices, precision, model):
    """The settings that decide what a run computes, one per line (printed at start by rank 0)."""
    world_size = devices * args.num_nodes
    precision_origin = ' (default on this device)' if args.precision is None else ''
    lines = [f'recipe ({mode}):',
             f'  devices          {kind} x {devices} per node x {args.num_nodes} node(s)',
             f'  precision        {precision}{precision_origin}',
             f'  image backend    {model.image_backend}']
    if mode == 'train':
        lr = effective_learning_rate(model.basic_lr_per_img, model.batch_size_per_device, world_size)
        accumulate = args.trainer_args.get('accumulate_grad_batches', 1)
        lines += [
            f'  learning rate    {model.basic_lr_per_img:.6g} per image x {model.batch_size_per_device} per device x '
            f'{world_size} devices = {lr:.6g} (global batch {model.batch_size_per_device * world_size})',
            f'  batch per device {model.batch_size_per_device}' +
            (f', {accumulate} micro-batches per optimiser step' if accumulate != 1 else ''),
            f'  epochs           {args.max_epochs}, lr schedule {model.lr_schedule}' +
            (f' (x0.1 at epochs {model.lr_milestones()})' if model.lr_schedule == 'multistep' else ''),
            f'  pretrained       {describe_pretrained(model.model)}',
            f"  EMA              {'on' if args.ema else 'off'}",
            f"  CBGS             {'on' if model.data_use_cbgs else 'off'}",
            f'  gradient clip    {args.gradient_clip_val or "off"}',
        ]
    else:
        lines.append(f'  batch per device {model.eval_batch_size}')
    if args.trainer_args:
        lines.append('  Trainer          ' + ', '.join(f'{k}={v}' for k, v in sorted(args.trainer_args.items())))
    return lines


def resolve_devices(args, kind):
    """Number of devices per node as an int."""
    devices = args.devices if args.devices is not None else args.gpus
    if devices in (None, 'auto'):
        if kind == 'cuda':
            return torch.cuda.device_count()
        if kind == 'npu':
            return devices_helpers.NPUAccelerator.auto_device_count()
        return 1
    return int(devices)


def find_latest_checkpoint(root_dir):
    """Newest ``*.ckpt`` (by modification time) under ``<root_dir>/lightning_logs/version_*/checkpoints``."""
    candidates = {}
    for path in glob.glob(os.path.join(root_dir, 'lightning_logs', 'version_*', 'checkpoints', '*.ckpt')):
        real = os.path.realpath(path)
        if os.path.isfile(real):
            candidates[real] = os.path.getmtime(real)
    if not candidates:
        return None
    return max(candidates, key=lambda path: (candidates[path], path))


def version_of_checkpoint(path, root_dir):
    """N if ``path`` is ``<root_dir>/lightning_logs/version_N/checkpoints/x.ckpt``, else None."""
    folder = os.path.dirname(os.path.abspath(path))
    match = re.fullmatch(r'version_(\d+)', os.path.basename(os.path.dirname(folder)))
    logs_dir = os.path.dirname(os.path.dirname(folder))
    if match and os.path.basename(folder) == 'checkpoints' and \
            os.path.abspath(logs_dir) == os.path.abspath(os.path.join(root_dir, 'lightning_logs')):
        return int(match.group(1))
    return None


class _AtomicCheckpointIO:
    """Factory of a TorchCheckpointIO whose saves go through bevdepth.utils.io.atomic_torch_save.

    Lightning's own save writes through an fsspec transaction whose temporary file lives in the system temp
    folder: the final rename is atomic only when that folder is on the same filesystem, and nothing is fsynced.
    """

    @staticmethod
    def create():
        from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

        from bevdepth.utils.io import atomic_torch_save

        class AtomicTorchCheckpointIO(TorchCheckpointIO):
            def save_checkpoint(self, checkpoint, path, storage_options=None):
                if storage_options is not None:
                    raise TypeError('storage_options is not supported by AtomicTorchCheckpointIO')
                atomic_torch_save(checkpoint, path)

        return AtomicTorchCheckpointIO()


def progress_bar_enabled(choice):
    if choice == 'auto':
        return sys.stderr.isatty()
    return choice == 'on'


def _print_rank_zero(*message, file=None):
    if int(os.environ.get('LOCAL_RANK', '0')) == 0 and int(os.environ.get('NODE_RANK', '0')) == 0:
        print(*message, flush=True, file=file)


def _check_data(args, model):
    if not os.path.isdir(args.data_root):
        raise FileNotFoundError(f'nuScenes dataroot {args.data_root} not found: pass --data_root <dataroot> '
                                f'(or link data/nuScenes to it)')
    if not os.path.isdir(os.path.join(args.data_root, args.version)):
        # Training needs only the info files, but the version also picks the evaluation split: a wrong one
        # would only surface at evaluation time.
        raise FileNotFoundError(f"nuScenes tables '{args.version}' not found under {args.data_root}: pass "
                                f'--data_root <dataroot> and the matching --version')
    needed = model.predict_info_paths if args.predict else model.val_info_paths if args.evaluate else \
        model.train_info_paths
    for path in [needed] if isinstance(needed, str) else needed:
        if not os.path.isfile(path):
            raise FileNotFoundError(f'info file {path} not found: run python scripts/gen_info.py '
                                    f'--data_root {args.data_root}')


def build_trainer_kwargs(args, kind, devices, precision, extra_trainer_config_args=None):
    """Lightning 2 Trainer arguments equivalent to the seed's (upstream ``run_cli``): clip 5, no validation, no
    sanity run; then the pass-through Trainer flags given.

    Device, strategy and precision come from bevdepth.engine.devices.trainer_device_kwargs: an NPU accelerator
    with hccl DDP and NPU autocast on Ascend, DDP with nccl (GPU) or gloo (CPU) when more than one process runs.
    """
    accelerator = 'npu' if kind == 'npu' else 'gpu' if kind == 'cuda' else 'cpu'
    kwargs = devices_helpers.trainer_device_kwargs(accelerator=accelerator, devices=devices,
                                                   num_nodes=args.num_nodes, precision=precision,
                                                   find_unused_parameters=args.find_unused_parameters)
    plugins = list(kwargs.pop('plugins') or [])
    plugins.append(_AtomicCheckpointIO.create())
    kwargs.update(
        plugins=plugins, max_epochs=args.max_epochs, gradient_clip_val=args.gradient_clip_val or None,
        limit_val_batches=0, num_sanity_val_steps=0, limit_train_batches=args.limit_train_batches,
        log_every_n_steps=args.log_every_n_steps, deterministic=args.deterministic or None,
        profiler=args.profiler,
        # Our samplers are distributed already (resumable train order, padded eval order for gathering).
        use_distributed_sampler=False, enable_progress_bar=progress_bar_enabled(args.progress_bar),
    )
    trainer_args = dict(getattr(args, 'trainer_args', {}))
    if kind == 'npu' and 'strategy' in trainer_args:
        raise UsageError('--strategy: on NPU the engine sets its own DDP strategy (hccl backend); drop the flag')
    kwargs.update(extra_trainer_config_args or {})
    kwargs.update(trainer_args)
    return kwargs


def build_lightning_module(model_class, config):
    """The experiment's LightningModule for a resolved configuration."""
    return model_class(config=config)


def write_run_config(model, log_dir, exp_name, trainer_args):
    """``<log_dir>/config.yaml``: the experiment, every setting and the Trainer flags given (atomic)."""
    import yaml

    from bevdepth.utils.io import atomic_open

    record = {'experiment': f'{type(model).__module__}.{type(model).__name__}', 'name': exp_name,
              'settings': settings.plain(model.config), 'trainer': settings.plain(trainer_args)}
    os.makedirs(log_dir, exist_ok=True)
    with atomic_open(os.path.join(log_dir, RUN_CONFIG_FILE), 'w') as f:
        yaml.safe_dump(record, f, sort_keys=False)


def run_cli(model_class, exp_name, use_ema=None, extra_trainer_config_args=None, cli_defaults=None, argv=None,
            exit_on_user_error=True):
    """Parse the seed-compatible flags and train (default), evaluate (-e) or predict (-p) ``model_class``.

    Args:
        model_class: a BEVDepthLightningModel subclass.
        exp_name: run name; outputs go to ./outputs/<exp_name> unless --default_root_dir is given.
        use_ema: the upstream ``run_cli`` argument; when given it sets the default of the ``ema`` setting.
        extra_trainer_config_args: extra Trainer kwargs; 'epochs' / 'max_epochs' (the only key the reference
            read) set the default of --max_epochs.
        cli_defaults: defaults of settings for this call, over the experiment's ``setting_defaults``.
        argv: arguments (default sys.argv[1:]).
        exit_on_user_error: report an expected failure as one line ``error: ...`` on stderr and exit with its
            status (1 bad input, 2 bad usage: bevdepth/engine/entry_point.py) instead of raising.

    Returns:
        the trained / evaluated LightningModule (its ``metrics`` after -e).
    """
    if not exit_on_user_error:
        return _run(model_class, exp_name, use_ema, extra_trainer_config_args, cli_defaults, argv)
    return run_entry_point(_run, model_class, exp_name, use_ema, extra_trainer_config_args, cli_defaults, argv)


def _run(model_class, exp_name, use_ema, extra_trainer_config_args, cli_defaults, argv):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import TensorBoardLogger

    from bevdepth.callbacks.ema import EMACallback
    from bevdepth.callbacks.step_time import StepTimeCallback

    # CPU threads that hold up on shared cores (bevdepth/utils/threads.py): intra-op threads capped at the usable
    # CPUs; the OpenMP wait default reaches DataLoader workers / DDP ranks started from here.
    from bevdepth.utils.threads import configure_torch_threads, set_openmp_env_defaults
    set_openmp_env_defaults()
    configure_torch_threads()

    extra = dict(extra_trainer_config_args or {})
    defaults = dict(cli_defaults or {})
    for key in ('epochs', 'max_epochs'):  # the reference read 'epochs' from extra_trainer_config_args
        if key in extra:
            defaults['max_epochs'] = extra.pop(key)
    if use_ema is not None:
        defaults.setdefault('ema', bool(use_ema))
    args = parse_args(exp_name, argv, defaults, model_class)
    if args.amp_backend not in (None, 'native'):
        _print_rank_zero(f'note: --amp_backend {args.amp_backend} ignored: Lightning 2 supports only native AMP')
    default_root_dir = args.default_root_dir or os.path.join('.', 'outputs', exp_name)
    config = dict(args.config, default_root_dir=default_root_dir, gpus=args.gpus, accelerator=args.accelerator)

    resume_path = None
    if args.resume == 'auto':
        resume_path = find_latest_checkpoint(default_root_dir)
        if resume_path is None:
            _print_rank_zero(f'--resume auto: no checkpoint under {default_root_dir}/lightning_logs, '
                             f'starting a new run')
    elif args.resume:
        resume_path = args.resume
    loaded_path = args.ckpt_path if (args.evaluate or args.predict) else resume_path
    checkpoint = None
    if loaded_path is not None:
        checkpoint = checkpoints.read_checkpoint(loaded_path, '--ckpt_path' if args.ckpt_path else '--resume')
        saved = checkpoints.saved_config(checkpoint)
        if saved is not None:
            config = merge_saved_config(config, set(args.given_settings), saved, loaded_path)
    if args.print_config:
        import yaml
        print(yaml.safe_dump({'settings': config, 'trainer': args.trainer_args}, sort_keys=False), end='')
        return None

    kind = resolve_accelerator(args.accelerator, args.gpus)
    devices = resolve_devices(args, kind)
    precision = resolve_precision(args.precision, kind)
    if args.bind_cpu_cores:
        devices_helpers.pin_rank_cpu_affinity(int(os.environ.get('LOCAL_RANK', '0')), devices)
    if args.deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')

    pl.seed_everything(args.seed, workers=True)
    model = build_lightning_module(model_class, config)
    _check_data(args, model)
    if checkpoint is None:
        model.load_pretrained_image_backbone(pretrained_source(config, loads_checkpoint=False))
    elif args.pretrained not in (None, 'none') and 'pretrained' in args.given_settings:
        _print_rank_zero(f'note: --pretrained {args.pretrained} ignored: this run takes its weights from a checkpoint')
    trainer_kwargs = build_trainer_kwargs(args, kind, devices, precision, extra)
    mode = 'evaluate' if args.evaluate else 'predict' if args.predict else 'train'
    _print_rank_zero('\n'.join(recipe_lines(args, mode, kind, devices, precision, model)))

    if args.evaluate or args.predict:
        checkpoints.load_weights_of(model.model, checkpoint, loaded_path, type(model).__name__)
        del checkpoint
        trainer = pl.Trainer(default_root_dir=default_root_dir, logger=False, enable_checkpointing=False,
                             **trainer_kwargs)
        if args.evaluate:
            trainer.test(model)
        else:
            model.predict_output_dir = os.path.dirname(os.path.abspath(args.ckpt_path))
            trainer.predict(model, return_predictions=False)
        return model

    if args.batch_size_per_device == 1:
        _print_rank_zero(f'warning: --batch_size_per_device 1: every BatchNorm layer then normalises one sample per '
                         f'device (a single BEV map in the head), which makes its statistics noisy; use -b 2 or '
                         f'more when memory allows', file=sys.stderr)
    version = None
    if resume_path is not None:
        checkpoints.check_weights_fit(model.model, checkpoints.network_weights(checkpoint), resume_path,
                                      type(model).__name__)
        del checkpoint
        version = version_of_checkpoint(resume_path, default_root_dir)
        _print_rank_zero(f'resuming from {resume_path}')

    callbacks = [StepTimeCallback()]  # before EMA: the EMA update is not part of the timed step
    if args.ema:
        callbacks.append(EMACallback())
    # Latest epoch-end checkpoint, optionally the latest every-N-steps one, and last.ckpt linking to whichever
    # was saved last. No '-v1' name variants after a resume: last.ckpt is relinked. (Lightning keeps the
    # checkpoint a run was resumed from; delete it by hand once the resumed run has saved newer ones.)
    callbacks.append(ModelCheckpoint(filename='{epoch}-{step}', save_last='link', save_top_k=1,
                                     save_on_train_epoch_end=True, enable_version_counter=False))
    if args.ckpt_every_n_steps:
        callbacks.append(ModelCheckpoint(filename='{step}', every_n_train_steps=args.ckpt_every_n_steps,
                                         save_top_k=1, save_last='link', enable_version_counter=False))
    logger = TensorBoardLogger(save_dir=default_root_dir, name='lightning_logs', version=version)
    trainer = pl.Trainer(default_root_dir=default_root_dir, logger=logger, callbacks=callbacks, **trainer_kwargs)
    if trainer.global_rank == 0:
        write_run_config(model, logger.log_dir, exp_name, args.trainer_args)
    trainer.fit(model, ckpt_path=resume_path)
    return model
