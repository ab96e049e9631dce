"""Device helpers: NPU detection, a Lightning accelerator for ``npu``, DDP backends, AMP and CPU binding.

The engine (``bevdepth/engine/cli.py``) uses these names so the same code runs on Ascend NPUs (torch_npu),
NVIDIA GPUs and CPUs:

- ``is_npu_available()`` / ``npu_unavailable_reason()`` - a lazy, guarded ``import torch_npu``;
- ``NPUAccelerator`` + ``register_npu_accelerator()`` - Lightning 2's extension point for a new device type;
- ``npu_strategy()`` / ``npu_precision_plugin()`` / ``trainer_device_kwargs()`` - what Lightning 2.6 does not do
  for a third-party device (see the notes on each);
- ``resolve_accelerator()``, ``ddp_backend_for()``, ``synchronize()``,
  ``fused_adamw_or_none()``;
- ``pin_rank_cpu_affinity()`` - replaces the seed's patched Lightning 1.6.5 ``subprocess_script.py``, which
  prefixed every DDP child with ``taskset`` (``_SubprocessScriptLauncher._call_children_scripts`` in the Ascend
  port's ``code_for_change/subprocess_script.py``).

torch_npu is never required. Two failure modes without the Ascend CANN toolkit:
1. torch_npu installed, no CANN: ``import torch`` itself fails ("Failed to load the backend extension:
   torch_npu") because torch auto-loads device backends. Entry points set ``TORCH_DEVICE_BACKEND_AUTOLOAD=0``
   before importing torch (``disable_backend_autoload()``) and import torch_npu themselves, here.
2. With autoload off, ``import torch_npu`` raises ``ImportError: libhccl.so: cannot open shared object file``.
   ``is_npu_available()`` returns False and keeps the reason for messages.
Nothing in this module has run on real Ascend hardware; the NPU paths are unit-tested with a stand-in module.
"""
import importlib
import logging
import os
import warnings
from typing import Any, Optional, Union

import torch
from torch.nn.parallel import DistributedDataParallel

from pytorch_lightning.accelerators import Accelerator, AcceleratorRegistry
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from bevdepth.configs.settings import ACCELERATORS, PRECISION_ALIASES
from bevdepth.engine.errors import UsageError
# synchronize() lives below the engine so callbacks can use it; it is part of this module's interface too.
from bevdepth.utils.device_sync import device_type as _device_type, synchronize  # noqa: F401

log = logging.getLogger(__name__)

ACCELERATOR_CHOICES = ACCELERATORS

# Result of the one-time torch_npu probe: None = not probed yet, else (available, reason_if_not).
_NPU_PROBE: Optional[tuple] = None


def disable_backend_autoload() -> None:
    """Ask torch not to auto-import device backends (torch_npu); call before the first ``import torch``.

    With torch_npu installed but no CANN toolkit, the automatic import makes ``import torch`` itself fail;
    with autoload off, ``is_npu_available()`` imports torch_npu explicitly and degrades to CPU/GPU. When CANN
    is present the explicit import gives the same result as the automatic one.
    """
    os.environ.setdefault('TORCH_DEVICE_BACKEND_AUTOLOAD', '0')


def _torch_minor() -> str:
    return '.'.join(torch.__version__.split('+')[0].split('.')[:2])


def _explain_npu_import_error(error: BaseException) -> str:
    text = f'{type(error).__name__}: {error}'
    if isinstance(error, ModuleNotFoundError) and getattr(error, 'name', None) == 'torch_npu':
        return ('torch_npu is not installed (on an Ascend host: install the CANN toolkit, then '
                f'pip install "torch-npu=={_torch_minor()}.*" to match torch {torch.__version__})')
    if '.so' in str(error):
        return (f'torch_npu is installed but the Ascend CANN libraries cannot be loaded ({text}); source the '
                'CANN set_env.sh first (test/env_npu.sh does this), or uninstall torch-npu on hosts without NPUs')
    return f'import torch_npu failed ({text})'


def _probe_npu() -> tuple:
    try:
        importlib.import_module('torch_npu')
    except Exception as error:  # ImportError, OSError, RuntimeError from the CANN runtime: all mean "no NPU"
        return False, _explain_npu_import_error(error)
    npu = getattr(torch, 'npu', None)
    if npu is None:
        return False, 'torch_npu imported but did not register the torch.npu namespace (version mismatch?)'
    try:
        available = bool(npu.is_available())
        count = int(npu.device_count()) if available else 0
    except Exception as error:
        return False, f'torch.npu could not query devices ({type(error).__name__}: {error})'
    if not available or count < 1:
        return False, 'torch_npu imported but no NPU device is visible (torch.npu.device_count() == 0)'
    return True, None


def is_npu_available() -> bool:
    """True when torch_npu imports and at least one NPU is visible. Probed once per process, never raises."""
    global _NPU_PROBE
    if _NPU_PROBE is None:
        _NPU_PROBE = _probe_npu()
    return _NPU_PROBE[0]


def npu_unavailable_reason() -> Optional[str]:
    """Why ``is_npu_available()`` is False (one line), or None when an NPU is usable."""
    is_npu_available()
    return _NPU_PROBE[1]


def _npu():
    """The ``torch.npu`` namespace that torch_npu installs (only call after is_npu_available())."""
    return torch.npu


class NPUAccelerator(Accelerator):
    """Lightning accelerator for Ascend NPUs (``accelerator='npu'``), backed by ``torch.npu``."""

    def setup_device(self, device: torch.device) -> None:
        if _device_type(device) != 'npu':
            raise MisconfigurationException(f'NPUAccelerator needs an npu device, got {device}')
        _npu().set_device(device)

    def get_device_stats(self, device) -> dict[str, Any]:
        npu = _npu()
        if hasattr(npu, 'memory_stats'):
            return dict(npu.memory_stats(device))
        return {'memory_allocated': npu.memory_allocated(device)}

    def teardown(self) -> None:
        if is_npu_available() and hasattr(_npu(), 'empty_cache'):
            _npu().empty_cache()

    @staticmethod
    def parse_devices(devices: Union[int, str, list]) -> list[int]:
        """``devices`` as Lightning accepts it (count, ``'auto'``/-1, ``'0,1'``, ``[0, 1]``) -> NPU indices."""
        available = NPUAccelerator.auto_device_count()
        if devices in ('auto', -1, '-1', None):
            indices = list(range(available))
        elif isinstance(devices, int):
            indices = list(range(devices))
        elif isinstance(devices, str):
            text = devices.strip()
            if ',' in text:
                indices = [int(part) for part in text.split(',') if part.strip()]
            else:
                indices = list(range(int(text)))
        else:
            indices = [int(index) for index in devices]
        if not indices:
            raise MisconfigurationException(f'devices={devices!r} selects no NPU; pass a count >= 1 or indices')
        missing = [index for index in indices if index < 0 or index >= available]
        if missing:
            raise MisconfigurationException(
                f'NPU indices {missing} requested but only {available} NPU(s) are visible '
                f'(devices={devices!r}); lower --devices/--gpus or check ASCEND_RT_VISIBLE_DEVICES')
        return indices

    @staticmethod
    def get_parallel_devices(devices: list[int]) -> list[torch.device]:
        return [torch.device('npu', index) for index in devices]

    @staticmethod
    def auto_device_count() -> int:
        return int(_npu().device_count()) if is_npu_available() else 0

    @staticmethod
    def is_available() -> bool:
        return is_npu_available()

    @staticmethod
    def name() -> str:
        return 'npu'

    @classmethod
    def register_accelerators(cls, accelerator_registry) -> None:
        accelerator_registry.register(cls.name(), cls, description='Ascend NPU through torch_npu')


def register_npu_accelerator() -> bool:
    """Register ``'npu'`` in Lightning's accelerator registry when torch_npu works; idempotent. True if present."""
    if not is_npu_available():
        return False
    if NPUAccelerator.name() not in AcceleratorRegistry:
        NPUAccelerator.register_accelerators(AcceleratorRegistry)
    return True


def resolve_accelerator(name: Union[str, Accelerator]) -> Union[str, Accelerator]:
    """Map ``--accelerator`` to what ``pl.Trainer(accelerator=...)`` takes.

    'npu' (and 'auto' when an NPU is usable) -> an ``NPUAccelerator`` instance; 'gpu'/'cuda' -> 'cuda';
    'cpu' -> 'cpu'; 'auto' without NPU -> 'auto' (Lightning then picks CUDA or CPU).
    """
    if isinstance(name, Accelerator):
        return name
    key = str(name).strip().lower()
    if key not in ACCELERATOR_CHOICES:
        raise ValueError(f'unknown accelerator {name!r}; choose one of {", ".join(ACCELERATOR_CHOICES)}')
    if key == 'npu':
        if not is_npu_available():
            raise UsageError(f'--accelerator npu requested but no NPU is usable: {npu_unavailable_reason()}')
        register_npu_accelerator()
        return NPUAccelerator()
    if key in ('gpu', 'cuda'):
        if not torch.cuda.is_available():
            raise UsageError(f'--accelerator {key} requested but torch.cuda.is_available() is False '
                               f'(torch {torch.__version__}); use --accelerator cpu, npu or auto')
        return 'cuda'
    if key == 'auto' and is_npu_available():
        register_npu_accelerator()
        return NPUAccelerator()
    return key


def accelerator_kind(name: Union[str, Accelerator]) -> str:
    """The concrete device type ``'npu'|'cuda'|'cpu'`` that ``name`` ends up on in this environment."""
    resolved = resolve_accelerator(name)
    if isinstance(resolved, Accelerator):
        return 'npu' if isinstance(resolved, NPUAccelerator) else resolved.name()
    if resolved == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    return resolved


def ddp_backend_for(accelerator_name: Union[str, Accelerator]) -> str:
    """Collective backend for DDP: 'hccl' on NPU, 'nccl' on CUDA, 'gloo' on CPU."""
    if isinstance(accelerator_name, Accelerator):
        kind = 'npu' if isinstance(accelerator_name, NPUAccelerator) else accelerator_name.name()
    else:
        key = str(accelerator_name).strip().lower()
        if key == 'auto':
            kind = 'npu' if is_npu_available() else ('cuda' if torch.cuda.is_available() else 'cpu')
        elif key in ('gpu', 'cuda'):
            kind = 'cuda'
        elif key in ('npu', 'cpu'):
            kind = key
        else:
            raise ValueError(f'unknown accelerator {accelerator_name!r}; choose one of '
                             f'{", ".join(ACCELERATOR_CHOICES)}')
    return {'npu': 'hccl', 'cuda': 'nccl'}.get(kind, 'gloo')


def _first_tensor(params: list):
    for item in params:
        if isinstance(item, dict):
            for tensor in item.get('params', []):
                return tensor
        else:
            return item
    return None


def fused_adamw_or_none(params, lr: float, weight_decay: float):
    """``torch_npu.optim.NpuFusedAdamW`` when the parameters live on an NPU, else None (caller uses AdamW).

    ``params`` is an iterable of tensors or of param-group dicts (as for ``torch.optim.AdamW``).
    """
    params = list(params)
    first = _first_tensor(params)
    if first is None or _device_type(first.device) != 'npu' or not is_npu_available():
        return None
    optim = getattr(importlib.import_module('torch_npu'), 'optim', None)
    fused_cls = getattr(optim, 'NpuFusedAdamW', None)
    if fused_cls is None:
        return None
    return fused_cls(params, lr=lr, weight_decay=weight_decay)


def _npu_grad_scaler():
    npu = _npu()
    amp = getattr(npu, 'amp', None)
    if amp is not None and hasattr(amp, 'GradScaler'):
        return amp.GradScaler()
    return torch.amp.GradScaler(device='npu')


def normalize_precision(precision: Union[str, int]) -> str:
    """The seed's ``--precision`` values (16, 32, bf16, '16-mixed', ...) -> Lightning 2 names."""
    text = str(precision).strip().lower()
    if text not in PRECISION_ALIASES:
        raise ValueError(f'unknown precision {precision!r}; use 16, bf16 or 32')
    return PRECISION_ALIASES[text]


def npu_precision_plugin(precision: Union[str, int]) -> Optional[MixedPrecision]:
    """AMP plugin that autocasts on 'npu' (fp16 with an NPU GradScaler, or bf16); None for full precision.

    Why: Lightning 2.6's connector builds ``MixedPrecision(precision, device='cuda')`` for every accelerator
    other than cpu/mps, so with a custom NPU accelerator autocast would target CUDA and the NPU would run fp32.
    """
    name = normalize_precision(precision)
    if name == '16-mixed':
        return MixedPrecision('16-mixed', device='npu', scaler=_npu_grad_scaler())
    if name == 'bf16-mixed':
        return MixedPrecision('bf16-mixed', device='npu')
    return None


class NPUDDPStrategy(DDPStrategy):
    """DDP on NPUs with the 'hccl' backend.

    Why a subclass: Lightning 2.6's ``DDPStrategy._setup_model`` builds the DDP wrapper inside
    ``torch.cuda.stream(torch.cuda.Stream())`` whenever the device is not CPU, which fails on a host without
    CUDA. Here the side stream is an NPU stream, as the seed got through torch_npu's cuda->npu redirection.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault('process_group_backend', 'hccl')
        super().__init__(**kwargs)

    def _setup_model(self, model: torch.nn.Module) -> DistributedDataParallel:
        device_ids = self.determine_ddp_device_ids()
        npu = _npu()
        with npu.stream(npu.Stream()):
            return DistributedDataParallel(module=model, device_ids=device_ids, **self._ddp_kwargs)


def npu_strategy(num_processes: int, num_nodes: int = 1, find_unused_parameters: bool = True,
                 device_index: int = 0):
    """Strategy for NPU training: ``NPUDDPStrategy`` (hccl) for several processes, else a single NPU.

    Why: for a single device of a custom accelerator Lightning 2.6 picks ``SingleDeviceStrategy('cpu')``.
    """
    if num_processes * num_nodes > 1:
        return NPUDDPStrategy(find_unused_parameters=find_unused_parameters)
    return SingleDeviceStrategy(device=torch.device('npu', device_index))


def trainer_device_kwargs(accelerator: str = 'auto', devices: Union[int, str, list] = 'auto', num_nodes: int = 1,
                          precision: Union[str, int] = 32, find_unused_parameters: bool = True) -> dict:
    """``pl.Trainer`` keyword arguments (accelerator, devices, num_nodes, strategy, precision, plugins).

    NPU: ``NPUAccelerator`` + ``npu_strategy`` + ``npu_precision_plugin``. CUDA / CPU: the accelerator name,
    DDP with nccl / gloo when more than one process takes part, and Lightning's own precision handling.
    ``find_unused_parameters`` defaults to True like Lightning 1.6's DDP, which the reference ran on.
    """
    resolved = resolve_accelerator(accelerator)
    if isinstance(resolved, NPUAccelerator):
        device_indices = NPUAccelerator.parse_devices(devices)
        plugin = npu_precision_plugin(precision)
        kwargs = dict(accelerator=resolved, devices=device_indices, num_nodes=num_nodes,
                      strategy=npu_strategy(len(device_indices), num_nodes, find_unused_parameters,
                                            device_indices[0]))
        if plugin is None:
            kwargs.update(precision=normalize_precision(precision), plugins=None)
        else:
            kwargs.update(precision=None, plugins=[plugin])
        return kwargs
    if isinstance(devices, int):
        process_count = devices
    elif isinstance(devices, (list, tuple)):
        process_count = len(devices)
    elif str(devices).strip().isdigit():
        process_count = int(str(devices).strip())
    else:  # 'auto': what Lightning will pick (all GPUs, or one CPU process)
        process_count = torch.cuda.device_count() if accelerator_kind(accelerator) == 'cuda' else 1
    if process_count * num_nodes > 1:
        strategy = DDPStrategy(find_unused_parameters=find_unused_parameters,
                               process_group_backend=ddp_backend_for(accelerator))
    else:
        strategy = 'auto'
    return dict(accelerator=resolved, devices=devices, num_nodes=num_nodes, strategy=strategy,
                precision=normalize_precision(precision), plugins=None)


# The cores the job may use, recorded by the first pin_rank_cpu_affinity() call and inherited through the
# environment: DDP children are started by rank 0 *after* it pinned itself, so their own affinity is rank 0's
# block, not the pool to split.
CPU_POOL_ENV = 'BEVDEPTH_CPU_POOL'


def _allowed_cores() -> list[int]:
    pool = os.environ.get(CPU_POOL_ENV, '').strip()
    if pool:
        try:
            return sorted({int(core) for core in pool.split(',') if core.strip()})
        except ValueError:
            raise ValueError(f'{CPU_POOL_ENV}={pool!r} is not a comma-separated list of core ids; unset it') from None
    if hasattr(os, 'sched_getaffinity'):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def rank_core_block(local_rank: int, local_world_size: int, cores: Optional[list[int]] = None) -> list[int]:
    """The cores rank ``local_rank`` gets: block ``[r*n, r*n+n-1]`` of ``cores`` with n = len // world // 2.

    Same formula as the seed's taskset binding (``int(cpu_count() / num_processes / 2)``). The /2 is
    kept so the 8-rank figures stay comparable: it leaves the upper half of the host's cores to the system,
    the HCCL/runtime threads and the launcher (on the 192-core Ascend hosts: 12 cores per rank). n >= 1; a
    rank beyond the available cores wraps around instead of getting an empty set.
    """
    if local_world_size < 1 or not 0 <= local_rank < local_world_size:
        raise ValueError(f'local_rank {local_rank} is not in [0, {local_world_size}) for CPU binding')
    cores = sorted(cores) if cores is not None else _allowed_cores()
    if not cores:
        raise ValueError('no CPU cores to bind to (empty core list)')
    per_rank = max(1, len(cores) // local_world_size // 2)
    start = local_rank * per_rank
    return [cores[(start + offset) % len(cores)] for offset in range(per_rank)]


def pin_rank_cpu_affinity(local_rank: int, local_world_size: int, cores: Optional[list[int]] = None) -> list[int]:
    """Pin this process (and the DataLoader workers it forks later) to its block of cores; returns the block.

    Replaces the seed's patched Lightning launcher that ran each DDP child under ``taskset -c a-b``. Unlike
    the seed it also pins rank 0 and uses the cores this process may run on (a container's cpuset), not
    0..cpu_count-1; the pool is passed to the DDP children in ``BEVDEPTH_CPU_POOL``. Where
    ``os.sched_setaffinity`` is missing (macOS, Windows) or refused, it warns and returns [].
    """
    pool = sorted(cores) if cores is not None else _allowed_cores()
    block = rank_core_block(local_rank, local_world_size, pool)
    if not os.environ.get(CPU_POOL_ENV, '').strip():
        os.environ[CPU_POOL_ENV] = ','.join(str(core) for core in pool)
    if not hasattr(os, 'sched_setaffinity'):
        warnings.warn('CPU binding skipped: os.sched_setaffinity is not available on this platform')
        return []
    try:
        os.sched_setaffinity(0, block)
    except OSError as error:
        warnings.warn(f'CPU binding to cores {block} failed ({error}); continuing unbound')
        return []
    log.info('local rank %d bound to CPU cores %s', local_rank, block)
    return block


def default_accelerator() -> str:
    """'npu' when torch_npu works here, else 'auto' (the launch scripts' default ACCELERATOR)."""
    return 'npu' if is_npu_available() else 'auto'


if __name__ == '__main__':
    # `python -m bevdepth.engine.devices [ACCELERATOR]` prints "<accelerator> <device kind>", e.g. "npu npu" or
    # "auto cpu": the --accelerator value the launch scripts pass and the device it resolves to here.
    import sys
    requested = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else default_accelerator()
    try:
        print(requested, accelerator_kind(requested))
    except (RuntimeError, ValueError) as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(1)
