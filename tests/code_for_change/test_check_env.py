"""code_for_change/check_env.py: plain-words readiness report, exit 0 when ready, 1 otherwise."""
import importlib.util
import os
import pathlib
import subprocess
import sys
import types

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CHECK_ENV = REPO_ROOT / 'code_for_change' / 'check_env.py'


@pytest.fixture(scope='module')
def check_env():
    spec = importlib.util.spec_from_file_location('check_env_under_test', CHECK_ENV)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path, extra_pythonpath=None):
    paths = ([str(extra_pythonpath)] if extra_pythonpath else []) + [str(REPO_ROOT)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, str(CHECK_ENV)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)


def test_this_environment_is_ready(tmp_path):
    result = _run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.strip().splitlines()[-1].startswith('READY')
    for expected in ('[ok] Python 3.', '[ok] torch 2.', 'torchvision.ops.deform_conv2d imports',
                     '[ok] pytorch_lightning 2.', '[ok] no patched Lightning file', '[ok] nuscenes-devkit 1.2.0',
                     '[ok] numpy 1.', '[ok] OpenCV 4.'):
        assert expected in out, out
    if importlib.util.find_spec('torch_npu') is None:
        assert '[info] torch_npu is not installed' in out
    assert 'CUDA' in out


def test_old_patched_lightning_fails_and_libhccl_only_warns(tmp_path):
    """One run (each costs seconds): a seed-era patched Lightning 1.6.5 blocks; torch_npu without CANN does not."""
    site = tmp_path / 'fake_site'
    (site / 'torch_npu').mkdir(parents=True)
    (site / 'torch_npu' / '__init__.py').write_text(
        "raise ImportError('libhccl.so: cannot open shared object file: No such file or directory')\n")
    package = site / 'pytorch_lightning'
    (package / 'loops' / 'epoch').mkdir(parents=True)
    (package / 'strategies' / 'launchers').mkdir(parents=True)
    (package / '__init__.py').write_text("__version__ = '1.6.5'\n")
    (package / 'loops' / 'epoch' / 'training_epoch_loop.py').write_text('print("step_time= ", 0.1)\n')
    (package / 'strategies' / 'launchers' / 'subprocess_script.py').write_text("command = ['taskset', '-c']\n")
    result = _run(tmp_path, site)
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert '[FAIL] pytorch_lightning 1.6.5 is too old' in out
    assert 'patched training_epoch_loop.py' in out and 'patched subprocess_script.py' in out
    npu_line = next(line for line in out.splitlines() if 'torch_npu' in line and 'libhccl.so' in line)
    assert npu_line.startswith('[warn]') and 'set_env.sh' in npu_line
    # The Lightning line is the only [FAIL]: the missing CANN libraries do not block CPU/GPU use.
    assert out.strip().splitlines()[-1] == 'NOT READY: 1 problem(s) above marked [FAIL].'


def test_version_tuple(check_env):
    assert check_env.version_tuple('2.14.1+cu130') == (2, 14, 1)
    assert check_env.version_tuple('1.6.5') < (2, 6)
    assert check_env.version_tuple('2.6.0rc1') == (2, 6, 0)


def test_python_versions(check_env):
    assert check_env.check_python((3, 8, 10)).status == 'FAIL'
    assert check_env.check_python((3, 10, 2)).status == 'warn'
    assert check_env.check_python((3, 11, 7)).status == 'ok'


def test_patched_file_detection(check_env, tmp_path):
    clean = tmp_path / 'clean'
    (clean / 'loops' / 'training_epoch_loop.py').parent.mkdir(parents=True)
    (clean / 'loops' / 'training_epoch_loop.py').write_text('def advance():\n    pass\n')
    assert check_env.check_patched_lightning([clean]).status == 'ok'
    patched = tmp_path / 'patched'
    (patched / 'loops' / 'epoch').mkdir(parents=True)
    (patched / 'loops' / 'epoch' / 'training_epoch_loop.py').write_text('print("step_time= ", t)\n')
    check = check_env.check_patched_lightning([patched])
    assert check.status == 'warn' and 'training_epoch_loop.py' in check.message
    assert 'pip install --force-reinstall' in check.message


def test_opencv_gui_and_headless_together_warns(check_env):
    checks = check_env.check_opencv({'opencv-python': '4.8.1', 'opencv-python-headless': '4.11.0'})
    assert checks[0].status == 'warn' and 'pip uninstall opencv-python' in checks[0].message
    headless_only = check_env.check_opencv({'opencv-python-headless': '4.11.0'})
    assert [check.status for check in headless_only] == ['ok']


def test_numpy_2_fails(check_env, monkeypatch):
    monkeypatch.setitem(sys.modules, 'numpy', types.SimpleNamespace(__version__='2.0.1'))
    check = check_env.check_numpy()
    assert check.status == 'FAIL' and 'numpy < 2' in check.message


def test_torch_autoload_failure_mode_is_explained(check_env):
    assert check_env.classify_plain_torch_import(0, '') is None
    check = check_env.classify_plain_torch_import(
        1, 'RuntimeError: Failed to load the backend extension: torch_npu. You can disable extension '
           'auto-loading with TORCH_DEVICE_BACKEND_AUTOLOAD=0.')
    assert check.status == 'warn' and 'TORCH_DEVICE_BACKEND_AUTOLOAD=0' in check.message
    other = check_env.classify_plain_torch_import(1, 'Traceback...\nImportError: libtorch_cpu.so: bad ELF\n')
    assert other.status == 'FAIL' and 'libtorch_cpu.so' in other.message


def test_npu_version_pairing(check_env, monkeypatch):
    monkeypatch.setattr(check_env, 'distribution_version', lambda name: '2.1.0' if name == 'torch-npu' else None)
    fake = types.ModuleType('torch_npu')
    monkeypatch.setitem(sys.modules, 'torch_npu', fake)
    from bevdepth.engine import devices
    monkeypatch.setattr(devices, '_NPU_PROBE', (False, 'torch_npu imported but no NPU device is visible'))
    checks = check_env.check_npu('2.14.1')
    assert checks[0].status == 'warn' and 'no NPU device is visible' in checks[0].message
    assert checks[1].status == 'warn' and 'does not match torch 2.14.1' in checks[1].message


def test_cann_detection(check_env, tmp_path):
    missing = tmp_path / 'no_such_info'
    none = check_env.check_cann({}, install_info=missing, default_root=tmp_path / 'Ascend')
    assert none.status == 'info' and 'no Ascend CANN toolkit found' in none.message

    # Install_Path from the install-info file wins over the default root; ascend-toolkit/latest selects its set_env.sh.
    root = tmp_path / 'custom' / 'Ascend'
    (root / 'ascend-toolkit' / 'latest').mkdir(parents=True)
    (root / 'ascend-toolkit' / 'set_env.sh').write_text('export ASCEND_HOME_PATH=x\n')
    info = tmp_path / 'ascend_cann_install.info'
    info.write_text(f'Install_Path={root}\n')
    assert check_env.find_cann_set_env(info, tmp_path / 'Ascend') == root / 'ascend-toolkit' / 'set_env.sh'
    unset = check_env.check_cann({}, install_info=info, default_root=tmp_path / 'Ascend')
    assert unset.status == 'warn' and 'source test/env_npu.sh' in unset.message and str(root) in unset.message

    # Without ascend-toolkit, nnae/set_env.sh is used (as test/env_npu.sh does).
    nnae_root = tmp_path / 'Ascend'
    (nnae_root / 'nnae').mkdir(parents=True)
    (nnae_root / 'nnae' / 'set_env.sh').write_text('')
    assert check_env.find_cann_set_env(missing, nnae_root) == nnae_root / 'nnae' / 'set_env.sh'

    active = check_env.check_cann({'ASCEND_TOOLKIT_HOME': '/opt/Ascend/ascend-toolkit/latest'}, install_info=missing,
                                  default_root=tmp_path / 'none')
    assert active.status == 'ok' and 'ASCEND_TOOLKIT_HOME=/opt/Ascend' in active.message
