"""Seed-compatible command line for the experiments, mapped explicitly onto a Lightning 2 ``Trainer``.

The reference built its CLI from ``pl.Trainer.add_argparse_args`` (removed in Lightning 2) plus ``-e -p -b
--seed --ckpt_path`` (upstream ``bevdepth/exps/base_cli.py`` ``run_cli``) and the Ascend port's ``--learning_rate``. The same flags keep
working here; each is translated into a Trainer argument below. Usage (from the repository root)::

    python exps/nuscenes/MatrixVT/matrixvt_bev_depth_lss_r50_256x704_128x128_24e_ema.py \\
        -b 8 --gpus 8 --amp_backend native --precision 16 --learning_rate 0.000003125 --max_epoch 24 --seed 0
    python exps/.../<exp>.py -e --ckpt_path outputs/<exp_name>/lightning_logs/version_0/23.pth
    python exps/.../<exp>.py -p --ckpt_path <ckpt>          # results_nusc.json next to the checkpoint
    python exps/.../<exp>.py ... --resume auto              # continue the newest checkpoint of the run folder

Outputs: ``<default_root_dir>/lightning_logs/version_N/`` holds the TensorBoard events, the EMA weights
``<epoch>.pth`` and ``checkpoints/`` (``epoch=E-step=S.ckpt`` of the latest epoch, ``step=S.ckpt`` every
``--ckpt_every_n_steps``, and ``last.ckpt`` linking to the newest of them). Every file is written to a
temporary name and renamed.
"""
import argparse
import glob
import os
import re
import sys

import torch

from bevdepth.engine import devices as devices_helpers
from bevdepth.datasets.nusc_det_dataset import IMAGE_BACKENDS
from bevdepth.engine.errors import USER_ERRORS, CheckpointMismatchError, UsageError

DEFAULT_BATCH_SIZE_PER_DEVICE = 8  # the reference README's -b 8 (the reference flag had no default)
DEFAULT_LR_PER_IMAGE = 2e-4 / 64
LR_SCHEDULES = ('multistep', 'constant')  # checked by BEVDepthLightningModel too
GRADIENT_CLIP_VAL = 5.0

PRECISION_ALIASES = {
    '16': '16-mixed', '16-mixed': '16-mixed', '16-true': '16-true',
    'bf16': 'bf16-mixed', 'bf16-mixed': 'bf16-mixed', 'bf16-true': 'bf16-true',
    '32': '32-true', '32-true': '32-true', '64': '64-true', '64-true': '64-true',
}


def _limit(value):
    """--limit_train_batches: an int counts batches, a float is a fraction of the epoch."""
    number = float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f'must be >= 0, got {value}')
    return int(number) if re.fullmatch(r'\d+', value) else number


def _devices_arg(value):
    if value == 'auto':
        return value
    if not re.fullmatch(r'\d+', value) or int(value) < 1:
        raise argparse.ArgumentTypeError(f"--devices must be a positive integer or 'auto', got {value!r}")
    return int(value)


def build_parser(exp_name, model_class=None):
    """The seed's flags (+ ours); an experiment adds its own with ``add_model_specific_args(parser)``."""
    parser = argparse.ArgumentParser(
        prog=os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else exp_name,
        description=f'Train / evaluate / predict {exp_name} (BEVDepth / MatrixVT, Lightning 2).')
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument('-e', '--evaluate', '--eval', dest='evaluate', action='store_true',
                      help='evaluate --ckpt_path on the val split with the official nuScenes devkit')
    mode.add_argument('-p', '--predict', action='store_true',
                      help='write results_nusc.json for the test infos (val infos for v1.0-mini) next to --ckpt_path')
    parser.add_argument('-b', '--batch_size_per_device', type=int, default=DEFAULT_BATCH_SIZE_PER_DEVICE,
                        help=f'samples (6 images each) per device and step (default {DEFAULT_BATCH_SIZE_PER_DEVICE})')
    parser.add_argument('--eval_batch_size', type=int, default=None,
                        help='samples per device for -e / -p (default: -b)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--ckpt_path', default=None, help='.ckpt (Lightning) or .pth (EMA weights) for -e / -p')
    parser.add_argument('--learning_rate', type=float, default=DEFAULT_LR_PER_IMAGE,
                        help='lr per image; lr = learning_rate x batch per device x devices x nodes '
                             '(default 2e-4/64 = 3.125e-6, i.e. 2e-4 for -b 8 on 8 devices)')
    parser.add_argument('--lr_schedule', choices=list(LR_SCHEDULES), default=None,
                        help="'multistep' = MultiStepLR([19, 23]) per epoch (Ascend seed), 'constant' = upstream; "
                             'default: the experiment\'s choice')
    parser.add_argument('--channels_last', action=argparse.BooleanOptionalAction, default=None,
                        help='keep conv weights / activations in channels-last memory format (measured ~14%% faster '
                             'training steps on CPU with oneDNN); default: the experiment\'s choice')
    parser.add_argument('--gpus', type=int, default=None,
                        help='seed alias: number of accelerator devices (GPU, or NPU when torch_npu is present)')
    parser.add_argument('--devices', type=_devices_arg, default=None, help="devices per node (int or 'auto')")
    parser.add_argument('--accelerator', choices=['auto', 'cpu', 'gpu', 'cuda', 'npu'], default='auto')
    parser.add_argument('--num_nodes', type=int, default=1)
    parser.add_argument('--precision', default=None, choices=sorted(PRECISION_ALIASES),
                        help='16 = fp16 mixed precision (native AMP), bf16, 32; default: 16 on GPU / NPU (the '
                             'reference run), 32 on CPU')
    parser.add_argument('--pretrained', default=None, metavar='torchvision|none|PATH',
                        help="initial weights of the image ResNet for a new training run: 'torchvision' = ImageNet "
                             "IMAGENET1K_V1 (downloaded once into the torch hub cache), 'none' = random init, or a "
                             "checkpoint file; default: the experiment's choice (torchvision for the R50 "
                             'experiments). Runs that load a checkpoint (-e, -p, --resume) ignore it')
    parser.add_argument('--image_backend', choices=list(IMAGE_BACKENDS), default='opencv',
                        help="image resize / crop / rotate: 'opencv' (faster, default) or 'pillow' (the reference's "
                             'PIL bicubic pipeline, to evaluate reference checkpoints exactly)')
    parser.add_argument('--cbgs', action=argparse.BooleanOptionalAction, default=None,
                        help="class-balanced grouping and sampling of the training split; default: the "
                             "experiment's choice (on for MatrixVT, as the reference)")
    parser.add_argument('--amp_backend', default=None,
                        help='accepted for seed compatibility and ignored: Lightning 2 always uses native AMP')
    parser.add_argument('--max_epochs', '--max_epoch', dest='max_epochs', type=int, default=24)
    parser.add_argument('--num_workers', type=int, default=4, help='dataloader workers per process')
    parser.add_argument('--limit_train_batches', type=_limit, default=1.0)
    parser.add_argument('--data_root', default='data/nuScenes')
    parser.add_argument('--version', default='v1.0-trainval', help="nuScenes version: 'v1.0-trainval' or 'v1.0-mini'")
    parser.add_argument('--ckpt_every_n_steps', type=int, default=0,
                        help='also save a checkpoint every N optimiser steps (0 = only at epoch ends)')
    parser.add_argument('--resume', nargs='?', const='auto', default=None, metavar='auto|PATH',
                        help='resume training: auto = newest checkpoint under <default_root_dir>/lightning_logs')
    parser.add_argument('--default_root_dir', default=None, help='run folder (default ./outputs/<exp_name>)')
    parser.add_argument('--log_every_n_steps', type=int, default=50)
    parser.add_argument('--bind_cpu_cores', action='store_true',
                        help='pin each local rank (and its dataloader workers) to its own block of CPU cores')
    parser.add_argument('--find_unused_parameters', action='store_true',
                        help='DDP find_unused_parameters (the Lightning 1.6 default; off = faster)')
    parser.add_argument('--max_bad_steps', type=int, default=20,
                        help='stop after this many consecutive steps with a non-finite loss (they are skipped)')
    parser.add_argument('--deterministic', action='store_true', help='torch deterministic algorithms')
    parser.add_argument('--profiler', choices=['simple', 'advanced'], default=None,
                        help="Lightning profiler (the reference always used 'simple')")
    parser.add_argument('--progress_bar', choices=['auto', 'on', 'off'], default='auto',
                        help='progress bars (tqdm, on stderr); auto = on when stderr is a terminal')
    parser.set_defaults(model_arg_names=[])
    if model_class is not None and hasattr(model_class, 'add_model_specific_args'):
        # The seed's hook (it added nothing there); ours passes every flag it adds to the model's __init__.
        known = {action.dest for action in parser._actions}
        model_class.add_model_specific_args(parser)
        parser.set_defaults(model_arg_names=[action.dest for action in parser._actions if action.dest not in known])
    return parser


def parse_args(exp_name, argv=None, defaults=None, model_class=None):
    parser = build_parser(exp_name, model_class)
    if defaults:
        unknown = sorted(set(defaults) - {action.dest for action in parser._actions})
        if unknown:
            raise ValueError(f'unknown CLI defaults {unknown}')
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.learning_rate <= 0:
        parser.error(f'--learning_rate must be > 0 (per image), got {args.learning_rate}')
    if args.batch_size_per_device < 1:
        parser.error(f'--batch_size_per_device must be >= 1, got {args.batch_size_per_device}')
    if args.num_nodes < 1 or args.max_epochs < 1 or args.num_workers < 0 or args.ckpt_every_n_steps < 0:
        parser.error('--num_nodes and --max_epochs must be >= 1, --num_workers and --ckpt_every_n_steps >= 0')
    if (args.evaluate or args.predict) and not args.ckpt_path:
        parser.error('-e/--evaluate and -p/--predict need --ckpt_path <.ckpt or .pth>')
    if (args.evaluate or args.predict) and args.resume:
        parser.error('--resume is for training; use --ckpt_path with -e / -p')
    if args.gpus == 0:  # Lightning 1.x: --gpus 0 meant "no accelerator"
        args.gpus = None
        if args.accelerator == 'auto':
            args.accelerator = 'cpu'
    if args.gpus is not None and args.gpus < 0:
        parser.error(f'--gpus must be >= 0, got {args.gpus}')
    if args.gpus is not None and args.devices is not None and args.gpus != args.devices:
        parser.error(f'--gpus {args.gpus} and --devices {args.devices} disagree; give one of them')
    return args


def resolve_accelerator(requested, gpus):
    """The device kind the run uses: 'npu', 'cuda' or 'cpu' ('auto': NPU if torch_npu works, else CUDA, else CPU).

    ``--gpus N`` (the seed's flag) means N accelerator devices, so it needs a GPU or an NPU.
    """
    kind = devices_helpers.accelerator_kind(requested)
    if gpus and kind == 'cpu':
        raise UsageError(f'--gpus {gpus} given but neither a GPU (CUDA) nor an NPU (torch_npu) is usable '
                           f'here: use --accelerator cpu --devices N to run N CPU processes')
    return kind


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


def resolve_pretrained_source(pretrained, model_class, loads_checkpoint):
    """The image backbone's initial weights: ``--pretrained`` or the experiment's ``default_pretrained`` for a new
    training run; None when the run loads a checkpoint, whose weights replace the initial ones anyway."""
    if loads_checkpoint:
        if pretrained not in (None, 'none'):
            _print_rank_zero(f'note: --pretrained {pretrained} ignored: this run takes its weights from a checkpoint')
        return None
    source = pretrained if pretrained is not None else getattr(model_class, 'default_pretrained', None)
    return None if source in (None, 'none') else source


def describe_pretrained(model):
    """'none (random init)' or where the image ResNet's weights came from and how many tensors were loaded."""
    from bevdepth.layers.backbones.resnet import ResNet

    loaded = [module for module in model.modules() if isinstance(module, ResNet) and module.pretrained_path]
    if not loaded:
        return 'none (random init)'
    return '; '.join(f'{module.pretrained_path} ({module.pretrained_tensors_loaded} tensors loaded, fc.* not used)'
                     for module in loaded)


def recipe_lines(args, mode, kind, devices, precision, model, use_ema):
    """The settings that decide what a run computes, one per line (printed at start by rank 0)."""
    world_size = devices * args.num_nodes
    precision_origin = ' (default on this device)' if args.precision is None else ''
    lines = [f'recipe ({mode}):',
             f'  devices          {kind} x {devices} per node x {args.num_nodes} node(s)',
             f'  precision        {precision}{precision_origin}',
             f'  image backend    {model.image_backend}']
    if mode == 'train':
        lr = effective_learning_rate(model.basic_lr_per_img, model.batch_size_per_device, world_size)
        lines += [
            f'  learning rate    {model.basic_lr_per_img:.6g} per image x {model.batch_size_per_device} per device x '
            f'{world_size} devices = {lr:.6g} (global batch {model.batch_size_per_device * world_size})',
            f'  batch per device {model.batch_size_per_device}',
            f'  epochs           {args.max_epochs}, lr schedule {model.lr_schedule}',
            f'  pretrained       {describe_pretrained(model.model)}',
            f"  EMA              {'on' if use_ema else 'off'}",
            f"  CBGS             {'on' if model.data_use_cbgs else 'off'}",
            f'  gradient clip    {GRADIENT_CLIP_VAL}',
        ]
    else:
        lines.append(f'  batch per device {model.eval_batch_size}')
    return lines


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


def load_checkpoint_state_dict(path):
    """The ``state_dict`` of a Lightning .ckpt or an EMA .pth, without loading the rest into memory."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path} does not exist: check --ckpt_path / --resume')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except RuntimeError:  # not the zip format (legacy torch.save): mmap unsupported
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint:
        raise CheckpointMismatchError(f"{path} is not a BEVDepth checkpoint: expected a dict with 'state_dict' "
                                      f'(a Lightning .ckpt or an EMA <epoch>.pth)')
    return checkpoint['state_dict']


def check_state_dict_matches(state_dict, lightning_module, path):
    """Raise a one-line ValueError naming the first mismatching keys if ``state_dict`` is another architecture.

    Only the network weights (keys ``model.*``) are compared: they are what a .pth holds.
    """
    expected = {name: tuple(value.shape) for name, value in lightning_module.state_dict().items()
                if name.startswith('model.')}
    given = {name: tuple(value.shape) for name, value in state_dict.items() if name.startswith('model.')}
    missing = [name for name in expected if name not in given]
    unexpected = [name for name in given if name not in expected]
    wrong_shape = [f'{name} {given[name]} vs {expected[name]}' for name in expected
                   if name in given and given[name] != expected[name]]
    if missing or unexpected or wrong_shape:
        raise CheckpointMismatchError(
            f'checkpoint {path} does not fit {type(lightning_module).__name__} (another architecture or config?): '
            f'{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}, '
            f'{len(wrong_shape)} shape mismatches (checkpoint vs model) {wrong_shape[:3]}')


def load_weights(lightning_module, path):
    """Load the network weights of a .ckpt / .pth into ``lightning_module.model`` after checking them."""
    state_dict = load_checkpoint_state_dict(path)
    check_state_dict_matches(state_dict, lightning_module, path)
    weights = {name[len('model.'):]: value for name, value in state_dict.items() if name.startswith('model.')}
    lightning_module.model.load_state_dict(weights, strict=True)


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


def build_trainer_kwargs(args, kind, devices, precision, extra_trainer_config_args=None):
    """Lightning 2 Trainer arguments equivalent to the seed's (upstream ``run_cli``): clip 5, no validation, no sanity run.

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
        plugins=plugins, max_epochs=args.max_epochs, gradient_clip_val=GRADIENT_CLIP_VAL, limit_val_batches=0,
        num_sanity_val_steps=0, limit_train_batches=args.limit_train_batches,
        log_every_n_steps=args.log_every_n_steps, deterministic=args.deterministic or None,
        profiler=args.profiler,
        # Our samplers are distributed already (resumable train order, padded eval order for gathering).
        use_distributed_sampler=False, enable_progress_bar=progress_bar_enabled(args.progress_bar),
    )
    kwargs.update(extra_trainer_config_args or {})
    return kwargs


def _print_rank_zero(*message, file=None):
    if int(os.environ.get('LOCAL_RANK', '0')) == 0 and int(os.environ.get('NODE_RANK', '0')) == 0:
        print(*message, flush=True, file=file)


def one_line_message(error):
    """The message of ``error`` as one line.

    An exception raised in a DataLoader worker is re-raised in the main process with a multi-line message
    ('Caught DataError in DataLoader worker process 0.' + the worker's traceback); its last line holds the
    original ``module.ClassName: message``, of which the message is kept.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) == 1:
        return lines[0]
    return re.sub(r'^[A-Za-z_][\w.]*: ', '', lines[-1])


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


def run_cli(model_class, exp_name, use_ema=False, extra_trainer_config_args=None, cli_defaults=None, argv=None,
            exit_on_user_error=True):
    """Parse the seed-compatible flags and train (default), evaluate (-e) or predict (-p) ``model_class``.

    Args:
        model_class: a BEVDepthLightningModel subclass.
        exp_name: run name; outputs go to ./outputs/<exp_name> unless --default_root_dir is given.
        use_ema: keep an EMA of the weights and save <log_dir>/<epoch>.pth each epoch.
        extra_trainer_config_args: extra Trainer kwargs; 'epochs' / 'max_epochs' (the only key the reference
            read) set the default of --max_epochs.
        cli_defaults: experiment-specific defaults of the flags, e.g. {'data_root': ..., 'version': ...}.
        argv: arguments (default sys.argv[1:]).
        exit_on_user_error: report bad input (bevdepth.engine.errors.USER_ERRORS) as one line
            ``error: ...`` on stderr and exit with code 2 instead of raising.

    Returns:
        the trained / evaluated LightningModule (its ``metrics`` after -e).
    """
    try:
        return _run(model_class, exp_name, use_ema, extra_trainer_config_args, cli_defaults, argv)
    except USER_ERRORS as error:
        if not exit_on_user_error:
            raise
        print(f'error: {one_line_message(error)}', file=sys.stderr, flush=True)
        sys.exit(2)


def build_lightning_module(model_class, args, default_root_dir, pretrained):
    """The experiment's LightningModule from parsed flags (``pretrained`` from resolve_pretrained_source)."""
    return model_class(batch_size_per_device=args.batch_size_per_device, learning_rate=args.learning_rate,
                       data_root=args.data_root, version=args.version, num_workers=args.num_workers,
                       default_root_dir=default_root_dir, seed=args.seed, max_bad_steps=args.max_bad_steps,
                       lr_schedule=args.lr_schedule, eval_batch_size=args.eval_batch_size,
                       channels_last=args.channels_last, pretrained=pretrained, image_backend=args.image_backend,
                       use_cbgs=args.cbgs, **{name: getattr(args, name) for name in args.model_arg_names})


def _run(model_class, exp_name, use_ema, extra_trainer_config_args, cli_defaults, argv):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import TensorBoardLogger

    from bevdepth.callbacks.ema import EMACallback
    from bevdepth.callbacks.step_time import StepTimeCallback

    extra = dict(extra_trainer_config_args or {})
    defaults = dict(cli_defaults or {})
    for key in ('epochs', 'max_epochs'):  # the reference read 'epochs' from extra_trainer_config_args
        if key in extra:
            defaults['max_epochs'] = extra.pop(key)
    args = parse_args(exp_name, argv, defaults, model_class)
    if args.amp_backend not in (None, 'native'):
        _print_rank_zero(f'note: --amp_backend {args.amp_backend} ignored: Lightning 2 supports only native AMP')
    default_root_dir = args.default_root_dir or os.path.join('.', 'outputs', exp_name)

    kind = resolve_accelerator(args.accelerator, args.gpus)
    devices = resolve_devices(args, kind)
    precision = resolve_precision(args.precision, kind)
    if args.bind_cpu_cores:
        devices_helpers.pin_rank_cpu_affinity(int(os.environ.get('LOCAL_RANK', '0')), devices)
    if args.deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')

    resume_path = None
    if args.resume == 'auto':
        resume_path = find_latest_checkpoint(default_root_dir)
        if resume_path is None:
            _print_rank_zero(f'--resume auto: no checkpoint under {default_root_dir}/lightning_logs, '
                             f'starting a new run')
    elif args.resume:
        resume_path = args.resume
    loads_checkpoint = bool(args.evaluate or args.predict or resume_path)
    pretrained = resolve_pretrained_source(args.pretrained, model_class, loads_checkpoint)

    pl.seed_everything(args.seed, workers=True)
    model = build_lightning_module(model_class, args, default_root_dir, pretrained)
    _check_data(args, model)
    trainer_kwargs = build_trainer_kwargs(args, kind, devices, precision, extra)
    mode = 'evaluate' if args.evaluate else 'predict' if args.predict else 'train'
    _print_rank_zero('\n'.join(recipe_lines(args, mode, kind, devices, precision, model, use_ema)))

    if args.evaluate or args.predict:
        load_weights(model, args.ckpt_path)
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
        check_state_dict_matches(load_checkpoint_state_dict(resume_path), model, resume_path)
        version = version_of_checkpoint(resume_path, default_root_dir)
        _print_rank_zero(f'resuming from {resume_path}')

    callbacks = [StepTimeCallback()]  # before EMA: the EMA update is not part of the timed step
    if use_ema:
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
    trainer.fit(model, ckpt_path=resume_path)
    return model
