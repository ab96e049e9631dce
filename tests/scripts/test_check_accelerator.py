"""scripts/check_accelerator.py on a machine without an accelerator: the CPU subset passes, with the nuScenes
devkit and pyquaternion made unimportable (a stock GPU image has neither)."""
import json
import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

# Runs the check with `nuscenes` and `pyquaternion` blocked by a meta-path finder.
BLOCKED_RUN = '''
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('nuscenes', 'pyquaternion'):
            raise ImportError('blocked for the test: ' + name)
sys.meta_path.insert(0, Block())
sys.argv = ['scripts/check_accelerator.py'] + sys.argv[1:]
runpy.run_path('scripts/check_accelerator.py', run_name='__main__')
'''


def run_check(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES='')
    env.pop('BEVDEPTH_FORCE_DEVICE_BRANCH', None)
    return subprocess.run([sys.executable, '-c', BLOCKED_RUN, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cpu_subset_passes_without_devkit_and_pyquaternion(tmp_path):
    out = tmp_path / 'report.json'
    result = run_check('--out', str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'no GPU or NPU found: running the CPU subset' in result.stdout
    report = json.loads(out.read_text())
    assert report['passed'] and report['device'] == 'cpu'
    items = {item['name']: item for item in report['items']}
    assert set(items) == {'forced device branches on CPU', 'train tiny, 3 steps, fp32, -b 2'}
    assert all(item['status'] == 'PASS' for item in items.values())
    branches = items['forced device branches on CPU']['details']
    assert branches['sparse_build_cuda_branch_identical'] and branches['sparse_build_npu_branch_identical']
    assert branches['npu_branch_projection'] == 'dense' and branches['cuda_branch_islands_autocast_off']
    assert len(items['train tiny, 3 steps, fp32, -b 2']['details']['losses']) == 3


def test_bad_sample_root_is_one_line(tmp_path):
    result = run_check('--sample-root', str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip().count('\n') == 0 and 'nuscenes_infos_train.pkl' in result.stderr
