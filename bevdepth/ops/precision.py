"""fp32 islands under mixed precision: ``autocast_off(device)`` disables autocast for the code it wraps.

Geometry, sparse products and the BCE depth loss need the inputs' own dtype (fp16 would move points across
cell borders, sparse kernels have no fp16 version, BCE is fp32-only under autocast). Autocast is also active
in backward when ``loss.backward()`` runs inside the autocast block, so the island covers backward too.
"""
from typing import Union

import torch

from bevdepth.utils.device_sync import device_type

__all__ = ['AUTOCAST_DEVICE_TYPES', 'autocast_device_type', 'autocast_off']

# Device types with their own autocast; torch.autocast rejects others (e.g. 'meta'), which fall back to 'cpu'.
AUTOCAST_DEVICE_TYPES = ('cuda', 'npu', 'xpu', 'mps')


def autocast_device_type(device: Union[torch.device, str, None]) -> str:
    """``device_type`` for ``torch.autocast`` on ``device``: its type if autocast knows it, else 'cpu'."""
    kind = device_type(device)
    return kind if kind in AUTOCAST_DEVICE_TYPES else 'cpu'


def autocast_off(device: Union[torch.device, str, None]):
    """A context in which autocast is disabled on ``device`` (a tensor's ``.device``)."""
    return torch.autocast(device_type=autocast_device_type(device), enabled=False)
