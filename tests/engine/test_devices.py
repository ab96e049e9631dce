"""Device helpers, incl. every NPU path, tested with a stand-in ``torch_npu`` (no Ascend hardware here).

In-process tests inject a fake ``torch_npu`` into ``sys.modules`` and a fake ``torch.npu`` namespace. The
Trainer wiring needs ``torch.device('npu', i)``, which only exists after the privateuse1 backend is renamed
(what the real torch_npu does, irreversibly per process), so that part runs in a subprocess with a fake
``torch_npu`` package on PYTHONPATH.
"""
import contextlib
import importlib.util
import os
import pathlib
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from bevdepth.engine import devices
from bevdepth.engine.errors import UsageError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


class _FakeScaler:
    def __init__(self):
        self.kind = 'npu-scaler'


class _FakeFusedAdamW:
    def __init__(self, params, lr, weight_decay):
        self.params, self.lr, self.weight_decay = params, lr, weight_decay


def _fake_npu_namespace(count=2, available=True):
    calls = []

    @contextlib.contextmanager
    def stream(value):
        calls.append(('stream', value))
        yield

    return types.SimpleNamespace(
        calls=calls,
        is_available=lambda: available,
        device_count=lambda: count,
        set_device=lambda device: calls.append(('set_device', str(device))),
        synchronize=lambda device=None: calls.append(('synchronize', str(device))),
        memory_stats=lambda device=None: {'allocated_bytes.all.current': 7},
        empty_cache=lambda: calls.append(('empty_cache',)),
        Stream=object,
        stream=stream,
        amp=types.SimpleNamespace(GradScaler=_FakeScaler),
    )


@pytest.fixture
def fake_npu(monkeypatch):
    """torch_npu importable, torch.npu present with 2 devices; probe cache and registry restored after."""
    namespace = _fake_npu_namespace()
    module = types.ModuleType('torch_npu')
    module.optim = types.SimpleNamespace(NpuFusedAdamW=_FakeFusedAdamW)
    monkeypatch.setitem(sys.modules, 'torch_npu', module)
    monkeypatch.setattr(torch, 'npu', namespace, raising=False)
    monkeypatch.setattr(devices, '_NPU_PROBE', None)
    registry = devices.AcceleratorRegistry
    had_npu = 'npu' in registry
    yield namespace
    if not had_npu and 'npu' in registry:
        registry.remove('npu')


@pytest.fixture
def no_npu(monkeypatch):
    """torch_npu import fails like on a host with torch-npu installed but no CANN (failure mode 2)."""
    monkeypatch.setattr(devices, '_NPU_PROBE', None)
    monkeypatch.delitem(sys.modules, 'torch_npu', raising=False)

    def failing_import(name, *args, **kwargs):
        if name == 'torch_npu':
            raise ImportError('libhccl.so: cannot open shared object file: No such file or directory')
        return importlib.import_module(name, *args, **kwargs)

    monkeypatch.setattr(devices.importlib, 'import_module', failing_import)
    yield


def test_npu_probe_true_with_standin(fake_npu):
    assert devices.is_npu_available() is True
    assert devices.npu_unavailable_reason() is None
    assert devices.NPUAccelerator.is_available()
    assert devices.NPUAccelerator.auto_device_count() == 2


def test_npu_probe_explains_missing_cann_libraries(no_npu):
    assert devices.is_npu_available() is False
    reason = devices.npu_unavailable_reason()
    assert 'libhccl.so' in reason and 'set_env.sh' in reason
    assert not devices.register_npu_accelerator()
    with pytest.raises(UsageError, match='--accelerator npu requested but no NPU is usable: .*libhccl.so'):
        devices.resolve_accelerator('npu')


@pytest.mark.skipif(importlib.util.find_spec('torch_npu') is not None, reason='torch_npu is installed here')
def test_npu_probe_explains_not_installed(monkeypatch):
    monkeypatch.setattr(devices, '_NPU_PROBE', None)
    assert devices.is_npu_available() is False
    assert 'torch_npu is not installed' in devices.npu_unavailable_reason()
    assert 'torch-npu==2.' in devices.npu_unavailable_reason()


def test_npu_probe_false_when_no_device_visible(fake_npu, monkeypatch):
    monkeypatch.setattr(torch, 'npu', _fake_npu_namespace(count=0, available=False))
    assert devices.is_npu_available() is False
    assert 'no NPU device is visible' in devices.npu_unavailable_reason()


def test_probe_runs_once(fake_npu, monkeypatch):
    assert devices.is_npu_available()
    monkeypatch.delitem(sys.modules, 'torch_npu')  # a second import would now fail: the cached answer stands
    monkeypatch.setattr(devices.importlib, 'import_module', lambda name: (_ for _ in ()).throw(ImportError(name)))
    assert devices.is_npu_available()


def test_register_npu_accelerator_idempotent(fake_npu):
    assert devices.register_npu_accelerator()
    assert devices.register_npu_accelerator()
    assert devices.AcceleratorRegistry['npu']['accelerator'] is devices.NPUAccelerator
    assert isinstance(devices.AcceleratorRegistry.get('npu'), devices.NPUAccelerator)


def test_accelerator_device_calls(fake_npu):
    accelerator = devices.NPUAccelerator()
    accelerator.setup_device('npu:1')
    assert ('set_device', 'npu:1') in fake_npu.calls
    assert accelerator.get_device_stats('npu:0') == {'allocated_bytes.all.current': 7}
    accelerator.teardown()
    assert ('empty_cache',) in fake_npu.calls
    with pytest.raises(Exception, match='needs an npu device'):
        accelerator.setup_device(torch.device('cpu'))


@pytest.mark.parametrize('requested, expected', [
    (2, [0, 1]), ('auto', [0, 1]), (-1, [0, 1]), ('1', [0]), ('0,1', [0, 1]), ('1,', [1]), ([1], [1]),
])
def test_parse_devices(fake_npu, requested, expected):
    assert devices.NPUAccelerator.parse_devices(requested) == expected


@pytest.mark.parametrize('requested', [3, [2], '0,5', 0])
def test_parse_devices_rejects_bad_requests(fake_npu, requested):
    with pytest.raises(Exception, match='NPU'):
        devices.NPUAccelerator.parse_devices(requested)


def test_resolve_accelerator(fake_npu):
    assert isinstance(devices.resolve_accelerator('npu'), devices.NPUAccelerator)
    assert isinstance(devices.resolve_accelerator('AUTO'), devices.NPUAccelerator)
    assert devices.resolve_accelerator('cpu') == 'cpu'
    with pytest.raises(ValueError, match="unknown accelerator 'tpu'"):
        devices.resolve_accelerator('tpu')


def test_resolve_accelerator_without_npu(no_npu):
    assert devices.resolve_accelerator('auto') == 'auto'
    assert devices.default_accelerator() == 'auto'
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match='torch.cuda.is_available\\(\\) is False'):
            devices.resolve_accelerator('gpu')
        assert devices.accelerator_kind('auto') == 'cpu'


def test_ddp_backend_for(fake_npu):
    assert devices.ddp_backend_for('npu') == 'hccl'
    assert devices.ddp_backend_for(devices.NPUAccelerator()) == 'hccl'
    assert devices.ddp_backend_for('auto') == 'hccl'
    assert devices.ddp_backend_for('gpu') == 'nccl'
    assert devices.ddp_backend_for('cuda') == 'nccl'
    assert devices.ddp_backend_for('cpu') == 'gloo'


def test_ddp_backend_auto_without_npu(no_npu):
    expected = 'nccl' if torch.cuda.is_available() else 'gloo'
    assert devices.ddp_backend_for('auto') == expected


def test_synchronize(fake_npu):
    devices.synchronize('npu:0')
    assert ('synchronize', 'npu:0') in fake_npu.calls
    calls_before = len(fake_npu.calls)
    devices.synchronize(torch.device('cpu'))
    devices.synchronize(None)
    assert len(fake_npu.calls) == calls_before


def test_fused_adamw_only_for_npu_parameters(fake_npu):
    npu_param = types.SimpleNamespace(device='npu:0')
    optimizer = devices.fused_adamw_or_none([npu_param], lr=2e-4, weight_decay=1e-7)
    assert isinstance(optimizer, _FakeFusedAdamW)
    assert optimizer.params == [npu_param] and optimizer.lr == 2e-4 and optimizer.weight_decay == 1e-7
    grouped = devices.fused_adamw_or_none([{'params': [npu_param]}], lr=1.0, weight_decay=0.0)
    assert isinstance(grouped, _FakeFusedAdamW)
    assert devices.fused_adamw_or_none([torch.nn.Parameter(torch.zeros(1))], lr=1.0, weight_decay=0.0) is None
    assert devices.fused_adamw_or_none([], lr=1.0, weight_decay=0.0) is None


def test_fused_adamw_none_without_npu(no_npu):
    npu_param = types.SimpleNamespace(device='npu:0')
    assert devices.fused_adamw_or_none([npu_param], lr=1.0, weight_decay=0.0) is None


def test_npu_precision_plugin(fake_npu):
    fp16 = devices.npu_precision_plugin(16)
    assert fp16.precision == '16-mixed' and fp16.device == 'npu' and isinstance(fp16.scaler, _FakeScaler)
    bf16 = devices.npu_precision_plugin('bf16')
    assert bf16.precision == 'bf16-mixed' and bf16.device == 'npu' and bf16.scaler is None
    assert devices.npu_precision_plugin('32') is None
    with pytest.raises(ValueError, match='unknown precision'):
        devices.npu_precision_plugin('8')


def test_trainer_kwargs_cpu_ddp_uses_gloo(no_npu):
    kwargs = devices.trainer_device_kwargs('cpu', devices=2, precision=32)
    assert kwargs['accelerator'] == 'cpu' and kwargs['precision'] == '32-true'
    assert isinstance(kwargs['strategy'], devices.DDPStrategy)
    assert kwargs['strategy'].process_group_backend == 'gloo'
    assert kwargs['strategy']._ddp_kwargs == {'find_unused_parameters': True}
    assert devices.trainer_device_kwargs('cpu', devices=1)['strategy'] == 'auto'
    assert isinstance(devices.trainer_device_kwargs('cpu', devices=1, num_nodes=2)['strategy'], devices.DDPStrategy)


@pytest.mark.parametrize('cores, world, expected', [
    (list(range(192)), 8, {0: list(range(0, 12)), 7: list(range(84, 96))}),  # the seed's 12 cores per rank
    (list(range(16)), 2, {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}),
    ([0, 1], 2, {0: [0], 1: [1]}),                    # n >= 1
    ([4, 5], 4, {2: [4], 3: [5]}),                    # more ranks than cores: wraps, never empty
    ([10, 11, 12, 13], 1, {0: [10, 11]}),             # uses the given core ids, not 0..N-1
])
def test_rank_core_block(cores, world, expected):
    for rank, block in expected.items():
        assert devices.rank_core_block(rank, world, cores) == block


def test_rank_core_block_rejects_bad_rank():
    with pytest.raises(ValueError, match='local_rank 2 is not in'):
        devices.rank_core_block(2, 2, [0, 1])
    with pytest.raises(ValueError, match='no CPU cores'):
        devices.rank_core_block(0, 1, [])


@pytest.mark.skipif(not hasattr(os, 'sched_setaffinity'), reason='no sched_setaffinity on this platform')
def test_pin_rank_cpu_affinity_sets_and_restores(monkeypatch):
    monkeypatch.setenv(devices.CPU_POOL_ENV, '')  # unset, restored after
    original = os.sched_getaffinity(0)
    try:
        block = devices.pin_rank_cpu_affinity(0, 1)
        assert block and set(block) == os.sched_getaffinity(0)
        assert set(block) <= original
        # The pool is recorded for the DDP children, which start with rank 0's (smaller) affinity.
        assert os.environ[devices.CPU_POOL_ENV] == ','.join(str(core) for core in sorted(original))
    finally:
        os.sched_setaffinity(0, original)


def test_children_split_the_recorded_pool_not_their_inherited_affinity(monkeypatch):
    monkeypatch.setenv(devices.CPU_POOL_ENV, '0,1,2,3,4,5,6,7')
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1}, raising=False)  # rank 0's block
    pinned = []
    monkeypatch.setattr(os, 'sched_setaffinity', lambda pid, cores: pinned.append(list(cores)), raising=False)
    assert devices.pin_rank_cpu_affinity(1, 2) == [2, 3]
    assert pinned == [[2, 3]]
    monkeypatch.setenv(devices.CPU_POOL_ENV, '0,x')
    with pytest.raises(ValueError, match='BEVDEPTH_CPU_POOL'):
        devices.pin_rank_cpu_affinity(1, 2)


def test_pin_rank_cpu_affinity_falls_back(monkeypatch):
    monkeypatch.setenv(devices.CPU_POOL_ENV, '')  # unset, restored after
    monkeypatch.delattr(os, 'sched_setaffinity', raising=False)
    with pytest.warns(UserWarning, match='CPU binding skipped'):
        assert devices.pin_rank_cpu_affinity(0, 2, cores=[0, 1]) == []


def test_pin_rank_cpu_affinity_refused(monkeypatch):
    monkeypatch.setenv(devices.CPU_POOL_ENV, '')  # unset, restored after
    def refuse(pid, cores):
        raise OSError(22, 'Invalid argument')
    monkeypatch.setattr(os, 'sched_setaffinity', refuse, raising=False)
    with pytest.warns(UserWarning, match='CPU binding to cores \\[1\\] failed'):
        assert devices.pin_rank_cpu_affinity(1, 2, cores=[0, 1]) == []


_FAKE_TORCH_NPU = '''
"""Stand-in torch_npu: renames privateuse1 to 'npu' and installs a torch.npu namespace (like the real one)."""
import contextlib, types
import torch
torch.utils.rename_privateuse1_backend('npu')
calls = []

class Stream:
    pass

@contextlib.contextmanager
def _stream(value):
    calls.append('stream')
    yield

class GradScaler:
    def state_dict(self):
        return {}

torch.npu = types.SimpleNamespace(
    is_available=lambda: True, device_count=lambda: 2, set_device=lambda d: calls.append(('set_device', str(d))),
    synchronize=lambda d=None: None, Stream=Stream, stream=_stream, amp=types.SimpleNamespace(GradScaler=GradScaler),
    empty_cache=lambda: None)
'''

_TRAINER_CHECK = '''
import os
os.environ['TORCH_DEVICE_BACKEND_AUTOLOAD'] = '0'
import torch
import pytorch_lightning as pl
from bevdepth.engine import devices

assert devices.is_npu_available(), devices.npu_unavailable_reason()
import torch_npu

# 2 NPUs, fp16: NPU accelerator, hccl DDP, autocast on npu with the NPU scaler.
kwargs = devices.trainer_device_kwargs('npu', devices=2, precision=16)
trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, **kwargs)
strategy = trainer.strategy
assert isinstance(strategy, devices.NPUDDPStrategy), type(strategy)
assert strategy.parallel_devices == [torch.device('npu', 0), torch.device('npu', 1)], strategy.parallel_devices
assert strategy.root_device == torch.device('npu', 0)
assert strategy.process_group_backend == 'hccl'
assert strategy._get_process_group_backend() == 'hccl'
assert isinstance(trainer.accelerator, devices.NPUAccelerator)
assert trainer.precision_plugin.device == 'npu' and trainer.precision_plugin.precision == '16-mixed'
assert isinstance(trainer.precision_plugin.scaler, torch_npu.GradScaler)
assert trainer.num_devices == 2

# The DDP wrapper is built inside an NPU side stream (Lightning's own would call torch.cuda.Stream()).
built = {}
def fake_ddp(module, device_ids, **kwargs):
    built.update(device_ids=device_ids, **kwargs)
    return module
devices.DistributedDataParallel = fake_ddp
strategy._setup_model(torch.nn.Linear(1, 1))
assert built == {'device_ids': [0], 'find_unused_parameters': True}, built
assert torch_npu.calls == ['stream'], torch_npu.calls

# The accelerator places each process on its NPU.
trainer.accelerator.setup_device(torch.device('npu', 1))
assert ('set_device', 'npu:1') in torch_npu.calls

# One NPU: a single-device strategy on npu, not Lightning's default SingleDeviceStrategy('cpu').
single = pl.Trainer(logger=False, enable_checkpointing=False, **devices.trainer_device_kwargs('npu', devices=1))
assert single.strategy.root_device == torch.device('npu', 0), single.strategy.root_device
assert type(single.precision_plugin).__name__ == 'Precision'

# Why the helpers exist: Lightning alone picks cpu for one custom-accelerator device and CUDA autocast.
assert devices.register_npu_accelerator()
plain = pl.Trainer(logger=False, enable_checkpointing=False, accelerator='npu', devices=1, precision='16-mixed')
assert plain.strategy.root_device.type == 'cpu'
print('NPU-STANDIN-OK')
'''


def test_trainer_wiring_with_standin_torch_npu(tmp_path):
    package = tmp_path / 'torch_npu'
    package.mkdir()
    (package / '__init__.py').write_text(textwrap.dedent(_FAKE_TORCH_NPU))
    script = tmp_path / 'check_trainer.py'
    script.write_text(_TRAINER_CHECK)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO_ROOT)]), OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert 'NPU-STANDIN-OK' in result.stdout


def test_no_transfer_to_npu_monkey_patching():
    """The seed imported torch_npu.contrib.transfer_to_npu, which rewrites torch.cuda calls process-wide; here
    every device is explicit, so no source file may use it."""
    offenders = []
    for folder in ('bevdepth', 'exps', 'scripts', 'code_for_change'):
        for path in (REPO_ROOT / folder).rglob('*.py'):
            text = path.read_text(errors='replace')
            if 'transfer_to_npu' in text or 'torch_npu.contrib' in text:
                offenders.append(str(path.relative_to(REPO_ROOT)))
    assert offenders == []
