"""CPU threading defaults that keep training usable when other processes share the cores.

Why: PyTorch's CPU wheels run their intra-op parallelism on the bundled GNU OpenMP runtime (libgomp), whose
default wait policy keeps every idle worker thread spinning on a core after each parallel region (measured
here: a loop of 1M-element ``add_`` + 2 ms of idle main thread keeps the process at 1.00 CPU per wall second
with the default, 0.08 with ``OMP_WAIT_POLICY=PASSIVE``). A training step runs thousands of small ops with
Python / autograd work in between, so with the default the idle worker burns a core the whole step. Alone that
costs nothing; beside another busy process the spinning threads take the cores the running threads need and
each small parallel op waits for a descheduled partner: the tiny step went from 0.67 s to 7-15 s.

Two parts, because the OpenMP runtime reads its environment once, when torch is imported:

- ``set_openmp_env_defaults()``: call in an entry point *before* ``import torch`` (this module imports neither
  torch nor numpy). Sets ``OMP_WAIT_POLICY=PASSIVE`` unless the user set ``OMP_WAIT_POLICY`` or
  ``GOMP_SPINCOUNT`` themselves.
- ``configure_torch_threads()``: call after import (the CLI does). Caps torch's intra-op threads at the CPUs this
  process may actually use (affinity mask and cgroup CPU quota), unless ``OMP_NUM_THREADS`` was given or the
  caller set a count.
"""
import math
import os
import sys

__all__ = ['OPENMP_ENV_DEFAULTS', 'set_openmp_env_defaults', 'usable_cpu_count', 'configure_torch_threads']

# Idle OpenMP workers sleep on a futex instead of spinning (libgomp; the Intel runtime reads the same variable).
OPENMP_ENV_DEFAULTS = {'OMP_WAIT_POLICY': 'PASSIVE'}
# Any of these set by the user means they chose a wait behaviour: leave all of ours out.
_USER_WAIT_VARIABLES = ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT', 'KMP_BLOCKTIME')


def set_openmp_env_defaults(environ=None):
    """Put ``OPENMP_ENV_DEFAULTS`` into ``environ`` (default ``os.environ``) where the user set nothing.

    Returns the dict of variables set. Effective only before the OpenMP runtime is loaded, i.e. before the first
    ``import torch`` of the process; after that it still sets the variables (inherited by subprocesses such as
    spawned DataLoader workers or DDP ranks) and returns them, but the running process keeps its policy.
    """
    environ = os.environ if environ is None else environ
    if any(name in environ for name in _USER_WAIT_VARIABLES):
        return {}
    applied = {}
    for name, value in OPENMP_ENV_DEFAULTS.items():
        if name not in environ:
            environ[name] = value
            applied[name] = value
    return applied


def _cgroup_cpu_quota(root='/sys/fs/cgroup'):
    """CPUs allowed by a cgroup CPU quota (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), None when unlimited."""
    try:
        with open(os.path.join(root, 'cpu.max')) as f:
            quota, period = f.read().split()[:2]
        if quota != 'max':
            return max(1, math.floor(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, 'cpu', 'cpu.cfs_quota_us')) as f:
            quota = int(f.read())
        with open(os.path.join(root, 'cpu', 'cpu.cfs_period_us')) as f:
            period = int(f.read())
        if quota > 0 and period > 0:
            return max(1, math.floor(quota / period))
    except (OSError, ValueError):
        pass
    return None


def usable_cpu_count(cgroup_root='/sys/fs/cgroup'):
    """CPUs this process can run on: the affinity mask, capped by a cgroup CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota(cgroup_root)
    return max(1, min(count, quota) if quota else count)


def configure_torch_threads(num_threads=None, cgroup_root='/sys/fs/cgroup'):
    """Set torch's intra-op thread count; returns the count in effect.

    ``num_threads`` None: keep torch's default (its physical-core count) but never more than
    ``usable_cpu_count()`` -- under ``taskset`` or a container CPU quota torch's default counts the host's cores,
    and threads beyond the usable CPUs only wait for each other. ``OMP_NUM_THREADS`` set by the user wins.
    """
    import torch
    if num_threads is None:
        if os.environ.get('OMP_NUM_THREADS'):
            return torch.get_num_threads()
        num_threads = min(torch.get_num_threads(), usable_cpu_count(cgroup_root))
    num_threads = max(1, int(num_threads))
    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
    return num_threads


def openmp_runtime_loaded():
    """True once torch (and with it libgomp) is imported in this process: env defaults come too late then."""
    return 'torch' in sys.modules


def prepare_process_environment(environ=None):
    """What an entry point sets before ``import torch``: the OpenMP wait default above, and
    TORCH_DEVICE_BACKEND_AUTOLOAD=0 (with torch_npu installed but no CANN toolkit, torch's automatic backend import
    breaks ``import torch``; bevdepth.engine.devices imports torch_npu itself, guarded). User values win."""
    environ = os.environ if environ is None else environ
    environ.setdefault('TORCH_DEVICE_BACKEND_AUTOLOAD', '0')
    set_openmp_env_defaults(environ)
