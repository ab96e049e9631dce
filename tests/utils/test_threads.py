import os
import subprocess
import sys
import textwrap

import torch

from bevdepth.utils import threads


def test_env_defaults_fill_only_unset_variables():
    env = {}
    assert threads.set_openmp_env_defaults(env) == {'OMP_WAIT_POLICY': 'PASSIVE'}
    assert env == {'OMP_WAIT_POLICY': 'PASSIVE'}


def test_env_defaults_respect_any_user_wait_setting():
    for name, value in (('OMP_WAIT_POLICY', 'ACTIVE'), ('GOMP_SPINCOUNT', '100000'), ('KMP_BLOCKTIME', '0')):
        env = {name: value}
        assert threads.set_openmp_env_defaults(env) == {}
        assert env == {name: value}


def test_module_imports_without_torch():
    code = 'import sys, bevdepth.utils.threads; assert "torch" not in sys.modules and "numpy" not in sys.modules'
    subprocess.run([sys.executable, '-c', code], check=True, env=dict(os.environ))


def test_env_default_set_before_import_reaches_torchs_openmp():
    """Set in-process before `import torch`, the policy reaches torch's bundled libgomp: an idle worker no longer
    spins between parallel regions (CPU seconds per wall second of a mostly idle loop)."""
    code = textwrap.dedent('''
        import os, time
        from bevdepth.utils.threads import set_openmp_env_defaults
        if os.environ.get('CASE') == 'helper':
            set_openmp_env_defaults()
        import torch
        torch.set_num_threads(2)
        x = torch.randn(1 << 20)
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(100):
            x.add_(1.0)
            time.sleep(0.002)
        print((time.process_time() - c0) / (time.perf_counter() - w0))
    ''')
    ratios = {}
    for case in ('default', 'helper'):
        env = {k: v for k, v in os.environ.items() if k not in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT', 'KMP_BLOCKTIME')}
        env['CASE'] = case
        out = subprocess.run([sys.executable, '-c', code], check=True, env=env, capture_output=True, text=True)
        ratios[case] = float(out.stdout.strip().splitlines()[-1])
    if ratios['default'] < 0.6:  # runtime without spinning idle workers (other OpenMP build / one core)
        return
    assert ratios['helper'] < 0.5 * ratios['default'], ratios


def test_usable_cpu_count_reads_cgroup_quota(tmp_path):
    (tmp_path / 'cpu.max').write_text('150000 100000\n')
    assert threads._cgroup_cpu_quota(str(tmp_path)) == 1
    (tmp_path / 'cpu.max').write_text('max 100000\n')
    assert threads._cgroup_cpu_quota(str(tmp_path)) is None
    assert threads._cgroup_cpu_quota(str(tmp_path / 'missing')) is None
    assert 1 <= threads.usable_cpu_count(str(tmp_path)) <= (os.cpu_count() or 1)


def test_configure_torch_threads_caps_at_quota_and_respects_explicit_counts(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
        (tmp_path / 'cpu.max').write_text('100000 100000\n')
        assert threads.configure_torch_threads(cgroup_root=str(tmp_path)) == 1
        assert torch.get_num_threads() == 1
        torch.set_num_threads(before)
        assert threads.configure_torch_threads(num_threads=1) == 1
        torch.set_num_threads(before)
        monkeypatch.setenv('OMP_NUM_THREADS', str(before))
        assert threads.configure_torch_threads(cgroup_root=str(tmp_path)) == before
    finally:
        torch.set_num_threads(before)


def test_entry_point_environment_keeps_user_values():
    env = {'TORCH_DEVICE_BACKEND_AUTOLOAD': '1'}
    threads.prepare_process_environment(env)
    assert env == {'TORCH_DEVICE_BACKEND_AUTOLOAD': '1', 'OMP_WAIT_POLICY': 'PASSIVE'}
    env = {'GOMP_SPINCOUNT': '0'}
    threads.prepare_process_environment(env)
    assert env == {'GOMP_SPINCOUNT': '0', 'TORCH_DEVICE_BACKEND_AUTOLOAD': '0'}
