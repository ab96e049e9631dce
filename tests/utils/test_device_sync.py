"""bevdepth.utils.device_sync: device kinds and the wall-clock synchronisation (no-op on CPU)."""
import types

import torch

from bevdepth.utils.device_sync import device_type, synchronize


def test_device_type_of_devices_strings_and_none():
    assert device_type(torch.device('cuda', 1)) == 'cuda'
    assert device_type('npu:0') == 'npu'
    assert device_type(None) == 'cpu'


def test_synchronize_waits_on_npu_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, 'npu', types.SimpleNamespace(synchronize=calls.append), raising=False)
    synchronize(torch.device('cpu'))
    synchronize(None)
    assert calls == []
    synchronize('npu:1')
    assert calls == ['npu:1']
