"""Which device-specific branch the kernels take, and one switch that makes CPU tensors take another device's.

Code with a per-device path asks ``branch_type(device)`` instead of reading ``device.type``, so every such
path can run (and be tested against the CPU path) on a machine without an accelerator. The branches:

- compaction and sort of the sparse projection build (``ring_ray_projection._masked`` /
  ``_sorted_unique_kept``): NumPy on 'cpu', ``masked_select`` + ``torch.sort`` otherwise;
- ``ring_ray_projection.fast_cells_supported``: float64 row-moment cells on 'cpu' / 'cuda', the float32
  reference geometry on 'npu' (the "slow cells" path);
- ``ring_ray_projection.resolve_projection('auto', ...)``: dense projection on 'npu', sparse elsewhere;
- ``autocast_off(device)``: the fp32 islands (MatrixVT, LSS geometry, detection head, depth loss) disable
  autocast for the branch's device type ('cuda' autocast state exists on every CUDA-enabled torch build;
  'npu' needs torch_npu, without it the island falls back to 'cpu');
- ``deform_conv2d(backend='auto')``: grid_sample on 'cpu', torchvision otherwise (the NPU kernel is chosen
  only for tensors really on an NPU: it needs torch_npu).

Forcing, for CPU tensors only (a tensor on a real accelerator always takes its own branch):

    with force_device_branch('cuda'):   # or 'npu', 'cpu'; None = no forcing inside the block
        ...
    BEVDEPTH_FORCE_DEVICE_BRANCH=npu python ...   # the same for a whole process

The context manager wins over the environment variable. Tests use it through the ``device_branch`` fixture
(tests/conftest.py); ``scripts/check_accelerator.py`` uses it for its parity checks.
"""
import contextlib
import os
from typing import Optional, Union

import torch

__all__ = ['BRANCH_TYPES', 'FORCE_ENV', 'branch_type', 'forced_branch', 'force_device_branch',
           'autocast_device_type', 'autocast_off']

BRANCH_TYPES = ('cpu', 'cuda', 'npu')
FORCE_ENV = 'BEVDEPTH_FORCE_DEVICE_BRANCH'

# Set by force_device_branch: None = follow the environment, '' = explicitly no forcing, else a BRANCH_TYPES entry.
_forced: Optional[str] = None


def _check(value: str, source: str) -> str:
    if value not in BRANCH_TYPES:
        raise ValueError(f'{source}: device branch must be one of {", ".join(BRANCH_TYPES)}, got {value!r}')
    return value


def forced_branch() -> Optional[str]:
    """The forced branch type ('cpu' | 'cuda' | 'npu'), or None when nothing is forced."""
    if _forced is not None:
        return _forced or None
    value = os.environ.get(FORCE_ENV, '').strip().lower()
    return _check(value, FORCE_ENV) if value else None


@contextlib.contextmanager
def force_device_branch(device_type: Optional[str]):
    """Within the block CPU tensors take ``device_type``'s branch (None: no forcing, whatever the environment)."""
    global _forced
    new = '' if device_type is None else _check(str(device_type).lower(), 'force_device_branch')
    previous, _forced = _forced, new
    try:
        yield
    finally:
        _forced = previous


def _device_type(device: Union[torch.device, str]) -> str:
    # str parsing: torch.device('npu') only parses once torch_npu is imported.
    return device.type if isinstance(device, torch.device) else str(device).split(':')[0]


def branch_type(device: Union[torch.device, str]) -> str:
    """The branch a tensor on ``device`` takes: its device type, or the forced type for CPU tensors."""
    device_type = _device_type(device)
    if device_type == 'cpu':
        return forced_branch() or 'cpu'
    return device_type


def autocast_device_type(device: Union[torch.device, str]) -> str:
    """``device_type`` for ``torch.autocast`` on ``device``'s branch; 'cpu' where torch has no autocast for it
    (an 'npu' branch without torch_npu, 'mps' on old torch)."""
    device_type = branch_type(device)
    try:
        available = torch.amp.is_autocast_available(device_type)
    except RuntimeError:  # torch does not even parse the device type (npu without torch_npu)
        available = False
    return device_type if available else 'cpu'


def autocast_off(device: Union[torch.device, str]):
    """Context that disables autocast on ``device``'s branch: the fp32 islands of the model."""
    return torch.autocast(device_type=autocast_device_type(device), enabled=False)
