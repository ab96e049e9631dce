"""Is this environment ready for the MatrixVT port? Prints one plain-words line per check.

    python code_for_change/check_env.py

Exit code 0 when ready (no [FAIL] line), 1 otherwise. [warn] lines do not block; [info] lines describe optional
parts (NPU, CUDA). It replaces the seed's install step of copying three patched Lightning 1.6.5 files and
building mmcv (see code_for_change/README.md), and warns when such a patched file is still installed.
"""
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

# Our entry points import torch_npu themselves; without this, a torch_npu installed without the CANN toolkit
# makes `import torch` fail before anything can be checked (failure mode 1 below).
os.environ.setdefault('TORCH_DEVICE_BACKEND_AUTOLOAD', '0')

MIN_PYTHON = (3, 9)
MIN_TORCH = (2, 1)
MIN_LIGHTNING = (2, 6)

OK, INFO, WARN, FAIL = 'ok', 'info', 'warn', 'FAIL'


@dataclasses.dataclass
class Check:
    status: str
    message: str

    def line(self):
        return f'[{self.status}] {self.message}'


def version_tuple(text):
    """'2.14.1+cu130' -> (2, 14, 1); non-numeric tails are ignored."""
    numbers = []
    for part in str(text).split('+')[0].split('.'):
        match = re.match(r'\d+', part)
        if not match:
            break
        numbers.append(int(match.group()))
    return tuple(numbers)


def distribution_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_python(version_info=sys.version_info):
    text = '.'.join(str(part) for part in version_info[:3])
    if tuple(version_info[:2]) < MIN_PYTHON:
        return Check(FAIL, f'Python {text} is too old: use Python 3.11 (>= {MIN_PYTHON[0]}.{MIN_PYTHON[1]} needed)')
    if tuple(version_info[:2]) != (3, 11):
        return Check(WARN, f'Python {text}: the tested version is 3.11 (nuscenes-devkit 1.2.0 installs there)')
    return Check(OK, f'Python {text}')


def check_torch():
    checks = []
    try:
        import torch
    except Exception as error:
        return [Check(FAIL, f'torch does not import ({type(error).__name__}: {error}); pip install "torch>=2.1"')]
    if version_tuple(torch.__version__) < MIN_TORCH:
        checks.append(Check(FAIL, f'torch {torch.__version__} is too old: this port needs torch >= 2.1'))
    else:
        checks.append(Check(OK, f'torch {torch.__version__}'))
    try:
        import torchvision
        from torchvision.ops import deform_conv2d  # noqa: F401  (the DCN of the depth net on CPU/GPU)
    except Exception as error:
        checks.append(Check(FAIL, f'torchvision or torchvision.ops.deform_conv2d does not import '
                                  f'({type(error).__name__}: {error}); install the torchvision matching torch '
                                  f'{torch.__version__}'))
    else:
        checks.append(Check(OK, f'torchvision {torchvision.__version__}, torchvision.ops.deform_conv2d imports '
                                f'(no mmcv needed)'))
    return checks


def check_lightning():
    try:
        import pytorch_lightning
    except Exception as error:
        return Check(FAIL, f'pytorch_lightning does not import ({type(error).__name__}: {error}); '
                           f'pip install "pytorch-lightning>=2.6,<3"')
    version = pytorch_lightning.__version__
    if version_tuple(version) < MIN_LIGHTNING:
        return Check(FAIL, f'pytorch_lightning {version} is too old: this port needs Lightning 2.6+ (the seed used '
                           f'a patched 1.6.5, which is not needed any more); pip install "pytorch-lightning>=2.6,<3"')
    return Check(OK, f'pytorch_lightning {version}')


def lightning_package_dirs():
    """Installed Lightning trainer packages: pytorch_lightning and, if present, lightning.pytorch."""
    dirs = []
    for name in ('pytorch_lightning', 'lightning.pytorch'):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            dirs.extend(pathlib.Path(location) for location in spec.submodule_search_locations)
    return dirs


def find_patched_lightning_files(package_dirs):
    """Files of the seed's patches still installed: a ``step_time=`` print in a loops file, ``taskset`` in the
    subprocess launcher (the patched ``types.py`` leaves no mark worth a warning)."""
    found = []
    for package_dir in package_dirs:
        loops = pathlib.Path(package_dir) / 'loops'
        for path in sorted(loops.rglob('*.py')) if loops.is_dir() else []:
            if 'step_time=' in path.read_text(errors='replace'):
                found.append((path, 'prints step_time= (patched training_epoch_loop.py)'))
        launcher = pathlib.Path(package_dir) / 'strategies' / 'launchers' / 'subprocess_script.py'
        if launcher.is_file() and 'taskset' in launcher.read_text(errors='replace'):
            found.append((launcher, 'runs DDP children under taskset (patched subprocess_script.py)'))
    return found


def check_patched_lightning(package_dirs=None):
    found = find_patched_lightning_files(lightning_package_dirs() if package_dirs is None else package_dirs)
    if not found:
        return Check(OK, 'no patched Lightning file from the seed is installed')
    listing = '; '.join(f'{path} {what}' for path, what in found)
    return Check(WARN, f'an old patched Lightning file is installed ({listing}): this port needs none of them; '
                       f'reinstall Lightning cleanly: pip install --force-reinstall --no-deps "pytorch-lightning>=2.6,<3"')


def check_nuscenes():
    try:
        importlib.import_module('nuscenes')
        importlib.import_module('nuscenes.eval.detection.evaluate')
    except Exception as error:
        return Check(FAIL, f'nuscenes-devkit does not import ({type(error).__name__}: {error}); '
                           f'pip install nuscenes-devkit==1.2.0')
    return Check(OK, f'nuscenes-devkit {distribution_version("nuscenes-devkit") or "(version unknown)"}')


def check_numpy():
    try:
        import numpy
    except Exception as error:
        return Check(FAIL, f'numpy does not import ({type(error).__name__}: {error}); pip install "numpy<2"')
    if version_tuple(numpy.__version__) >= (2,):
        return Check(FAIL, f'numpy {numpy.__version__}: nuscenes-devkit 1.2.0 needs numpy < 2; pip install "numpy<2"')
    return Check(OK, f'numpy {numpy.__version__} (< 2, as nuscenes-devkit 1.2.0 needs)')


OPENCV_GUI_DISTS = ('opencv-python', 'opencv-contrib-python')
OPENCV_HEADLESS_DISTS = ('opencv-python-headless', 'opencv-contrib-python-headless')


def check_opencv(installed=None):
    """``installed`` maps opencv distribution names to versions (default: what pip installed here)."""
    if installed is None:
        installed = {name: distribution_version(name) for name in OPENCV_GUI_DISTS + OPENCV_HEADLESS_DISTS}
    installed = {name: version for name, version in installed.items() if version}
    checks = []
    gui = [name for name in OPENCV_GUI_DISTS if name in installed]
    headless = [name for name in OPENCV_HEADLESS_DISTS if name in installed]
    if gui and headless:
        checks.append(Check(WARN, f'both {", ".join(gui)} and {", ".join(headless)} are installed: they share the '
                                  f'cv2 folder and the last one installed wins; pip uninstall {" ".join(gui)} '
                                  f'and keep opencv-python-headless'))
    elif gui:
        checks.append(Check(WARN, f'{", ".join(gui)} is installed; this port depends on opencv-python-headless '
                                  f'(no GUI libraries needed); both work for running'))
    try:
        cv2 = importlib.import_module('cv2')
    except Exception as error:
        checks.append(Check(FAIL, f'OpenCV (cv2) does not import ({type(error).__name__}: {error}); '
                                  f'pip install "opencv-python-headless<4.12"'))
    else:
        checks.append(Check(OK, f'OpenCV {cv2.__version__} ({", ".join(sorted(installed)) or "cv2"})'))
    return checks


AUTOLOAD_FAILURE = ('torch_npu is installed but torch cannot load it (no Ascend CANN toolkit?), so a plain '
                    '`import torch` fails: this port\'s commands set TORCH_DEVICE_BACKEND_AUTOLOAD=0 and work on '
                    'CPU/GPU; for your own scripts export TORCH_DEVICE_BACKEND_AUTOLOAD=0, or source the CANN '
                    'set_env.sh (test/env_npu.sh), or pip uninstall torch-npu on hosts without NPUs')


def classify_plain_torch_import(returncode, stderr):
    """Failure mode 1: with torch_npu installed and no CANN, torch's backend auto-loading breaks ``import torch``."""
    if returncode == 0:
        return None
    if 'torch_npu' in stderr or 'backend extension' in stderr:
        return Check(WARN, AUTOLOAD_FAILURE)
    last = stderr.strip().splitlines()[-1] if stderr.strip() else f'exit code {returncode}'
    return Check(FAIL, f'`import torch` fails in a fresh interpreter: {last}')


def check_plain_torch_import():
    env = {key: value for key, value in os.environ.items() if key != 'TORCH_DEVICE_BACKEND_AUTOLOAD'}
    try:
        result = subprocess.run([sys.executable, '-c', 'import torch'], env=env, capture_output=True, text=True,
                                timeout=120)
    except subprocess.TimeoutExpired:
        return Check(WARN, 'a plain `import torch` took over 120 s in a fresh interpreter')
    return classify_plain_torch_import(result.returncode, result.stderr)


def check_npu(torch_version):
    """torch_npu / CANN status (failure mode 2: `import torch_npu` cannot load libhccl.so & co)."""
    npu_version = distribution_version('torch-npu') or distribution_version('torch_npu')
    try:
        from bevdepth.engine.devices import is_npu_available, npu_unavailable_reason
    except Exception:  # run outside the repository (or Lightning broken): the same probe, inline
        is_npu_available = npu_unavailable_reason = None
    if npu_version is None and importlib.util.find_spec('torch_npu') is None:
        return [Check(INFO, 'torch_npu is not installed: no Ascend NPU training here (CPU/GPU are unaffected); '
                            'on an Ascend host install the CANN toolkit and the torch-npu release matching torch '
                            f'{torch_version}')]
    if is_npu_available is not None:
        available, reason = is_npu_available(), npu_unavailable_reason()
    else:
        try:
            importlib.import_module('torch_npu')
            import torch
            available = bool(torch.npu.is_available())
            reason = None if available else 'no NPU device is visible'
        except Exception as error:
            available, reason = False, f'{type(error).__name__}: {error}'
    checks = []
    if not available:
        checks.append(Check(WARN, f'torch_npu {npu_version or ""} is installed but NPUs are not usable: {reason}. '
                                  f'Without the CANN toolkit `import torch_npu` fails (libhccl.so not found); '
                                  f'source the CANN set_env.sh (test/env_npu.sh) on Ascend hosts, '
                                  f'or uninstall torch-npu elsewhere'))
    else:
        import torch
        checks.append(Check(OK, f'torch_npu {npu_version or ""}: {torch.npu.device_count()} NPU(s) visible '
                                f'(DDP backend hccl)'))
    if npu_version and version_tuple(npu_version)[:2] != version_tuple(torch_version)[:2]:
        checks.append(Check(WARN, f'torch_npu {npu_version} does not match torch {torch_version}: install the '
                                  f'torch-npu release with the same major.minor as torch'))
    return checks


CANN_INSTALL_INFO = '/etc/Ascend/ascend_cann_install.info'
CANN_DEFAULT_ROOT = '/usr/local/Ascend'
# Set by the CANN set_env.sh; any one of them means the toolkit's environment is active in this shell.
CANN_ENV_VARS = ('ASCEND_HOME_PATH', 'ASCEND_TOOLKIT_HOME', 'ASCEND_OPP_PATH')


def find_cann_set_env(install_info=CANN_INSTALL_INFO, default_root=CANN_DEFAULT_ROOT):
    """The CANN set_env.sh that test/env_npu.sh would source (same search and the same two overrides,
    ASCEND_CANN_INSTALL_INFO and ASCEND_INSTALL_ROOT, passed in by run_checks), or None when there is none."""
    root = pathlib.Path(default_root)
    info = pathlib.Path(install_info)
    if info.is_file():
        for line in info.read_text(errors='replace').splitlines():
            if line.startswith('Install_Path='):
                root = pathlib.Path(line.split('=', 1)[1].strip())
                break
    if (root / 'ascend-toolkit' / 'latest').is_dir():
        candidate = root / 'ascend-toolkit' / 'set_env.sh'
    else:
        candidate = root / 'nnae' / 'set_env.sh'
    return candidate if candidate.is_file() else None


def check_cann(environ=None, install_info=CANN_INSTALL_INFO, default_root=CANN_DEFAULT_ROOT):
    """Is the Ascend CANN toolkit installed, and is its environment set in this shell?"""
    environ = os.environ if environ is None else environ
    active = [name for name in CANN_ENV_VARS if environ.get(name)]
    if active:
        return Check(OK, f'Ascend CANN environment is set ({active[0]}={environ[active[0]]})')
    set_env = find_cann_set_env(install_info, default_root)
    if set_env is not None:
        return Check(WARN, f'Ascend CANN toolkit found ({set_env}) but its environment is not set in this shell: '
                           f'run `source test/env_npu.sh` before training on NPUs')
    return Check(INFO, 'no Ascend CANN toolkit found (only needed for NPUs; test/env_npu.sh looks in '
                       f'Install_Path of {install_info}, else {default_root})')


def check_cuda():
    import torch
    if torch.cuda.is_available():
        return Check(OK, f'CUDA available: {torch.cuda.device_count()} GPU(s), {torch.cuda.get_device_name(0)} '
                         f'(DDP backend nccl)')
    built = torch.version.cuda
    return Check(INFO, f'no CUDA GPU usable (torch built with CUDA {built})' if built else
                 'no CUDA GPU usable (CPU-only torch build)')


def check_mmcv():
    present = [name for name in ('mmcv', 'mmcv-full', 'mmdet', 'mmdet3d') if distribution_version(name)]
    if present:
        return Check(INFO, f'{", ".join(present)} installed: not used by this port (it needs no OpenMMLab package)')
    return None


def run_checks():
    checks = [check_python()]
    plain_import = check_plain_torch_import()
    if plain_import is not None:
        checks.append(plain_import)
    torch_checks = check_torch()
    checks.extend(torch_checks)
    if any(check.status == FAIL and 'does not import' in check.message for check in torch_checks[:1]):
        return checks
    checks.append(check_lightning())
    checks.append(check_patched_lightning())
    checks.append(check_nuscenes())
    checks.append(check_numpy())
    checks.extend(check_opencv())
    import torch
    checks.append(check_cann(install_info=os.environ.get('ASCEND_CANN_INSTALL_INFO', CANN_INSTALL_INFO),
                             default_root=os.environ.get('ASCEND_INSTALL_ROOT', CANN_DEFAULT_ROOT)))
    checks.extend(check_npu(torch.__version__))
    checks.append(check_cuda())
    mmcv = check_mmcv()
    if mmcv is not None:
        checks.append(mmcv)
    return checks


def main():
    repo_root = str(pathlib.Path(__file__).resolve().parents[1])
    if repo_root not in sys.path:  # so the NPU probe of bevdepth.engine.devices is used from a checkout
        sys.path.insert(0, repo_root)
    checks = run_checks()
    for check in checks:
        print(check.line())
    failures = [check for check in checks if check.status == FAIL]
    warnings = [check for check in checks if check.status == WARN]
    if failures:
        print(f'NOT READY: {len(failures)} problem(s) above marked [FAIL].')
        return 1
    print('READY' + (f' ({len(warnings)} warning(s) above)' if warnings else '') + '.')
    return 0


if __name__ == '__main__':
    sys.exit(main())
