"""Device kind and host-device synchronisation, without Lightning: for callbacks and ops below the engine.

``synchronize()`` waits for queued kernels before a wall clock is read (CUDA / NPU kernels run asynchronously).
On NPU it uses the ``torch.npu`` namespace that torch_npu installs; callers only pass an NPU device after the
engine has found torch_npu usable.
"""
from typing import Union

import torch

__all__ = ['device_type', 'synchronize']


def device_type(device: Union[torch.device, str, None]) -> str:
    """'cpu', 'cuda', 'npu', ... for a device, a device string such as 'npu:0', or None (= 'cpu')."""
    if device is None:
        return 'cpu'
    if isinstance(device, torch.device):
        return device.type
    return str(device).split(':')[0]


def synchronize(device: Union[torch.device, str, None]) -> None:
    """Wait for queued kernels on ``device`` (CUDA / NPU); no-op on CPU. Use before reading a wall clock."""
    kind = device_type(device)
    if kind == 'cuda':
        torch.cuda.synchronize(device)
    elif kind == 'npu':
        torch.npu.synchronize(device)
