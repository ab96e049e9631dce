"""The data preparation CLIs end to end on a tiny synthetic dataroot, and their one-line bad-input errors."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = REPO_ROOT / 'scripts'


def run(script, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=300)


def assert_one_line_error(result, pattern):
    import re

    assert result.returncode == 1, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and re.match(r'^error: ' + pattern, lines[0]), result.stderr


def test_make_gen_info_gen_depth_gt_end_to_end(tmp_path):
    root = tmp_path / 'synthetic'
    made = run('make_synthetic_nuscenes.py', '--dataroot', root, '--scenes-per-split', 1, '--samples-per-scene', 2,
               '--objects-per-scene', 12, '--seed', 5)
    assert made.returncode == 0, made.stderr
    assert 'wrote' in made.stdout and (root / 'v1.0-mini' / 'sample.json').is_file()

    info = run('gen_info.py', '--dataroot', root, '--version', 'v1.0-mini')
    assert info.returncode == 0, info.stderr
    for split in ('train', 'val'):
        with open(root / f'nuscenes_infos_{split}.pkl', 'rb') as f:
            assert len(pickle.load(f)) == 2

    depth = run('gen_depth_gt.py', '--dataroot', root, '--workers', 2, '--splits', 'train', 'val')
    assert depth.returncode == 0, depth.stderr
    assert '4 samples, 24 files written, 0 already complete' in depth.stdout
    assert len(list((root / 'depth_gt').iterdir())) == 24
    again = run('gen_depth_gt.py', '--dataroot', root, '--workers', 1, '--splits', 'train', 'val')
    assert again.returncode == 0 and '0 files written, 24 already complete' in again.stdout

    # A previous synthetic root may be regenerated in place; a foreign folder may not.
    remade = run('make_synthetic_nuscenes.py', '--dataroot', root, '--scenes-per-split', 1, '--samples-per-scene', 2,
                 '--objects-per-scene', 12, '--seed', 6, '--no-sweeps')
    assert remade.returncode == 0, remade.stderr
    assert not (root / 'depth_gt').exists() and not any((root / 'sweeps').rglob('*.*'))


@pytest.mark.parametrize('script, args, pattern', [
    ('make_synthetic_nuscenes.py', ['--version', 'v1.0-trainval'],
     r'synthetic nuScenes supports only version v1\.0-mini'),
    ('make_synthetic_nuscenes.py', ['--samples-per-scene', '1'], r'samples_per_scene must be >= 2'),
    ('make_synthetic_nuscenes.py', ['FOREIGN'],
     r'dataroot .*foreign is not empty and is not a synthetic nuScenes root'),
    ('gen_info.py', ['--version', 'v1.0-mini'], r'nuScenes dataroot .*missing does not exist'),
    ('gen_info.py', ['EMPTY', '--version', 'v1.0-mini'], r'nuScenes dataroot .*empty has no v1\.0-mini/ folder'),
    ('gen_depth_gt.py', [], r'dataroot .*missing does not exist'),
    ('gen_depth_gt.py', ['EMPTY'], r'info file .*empty/nuscenes_infos_train\.pkl does not exist: create it with '
                                   r'python scripts/gen_info\.py'),
    ('gen_depth_gt.py', ['EMPTY', '--workers', '0'], r'--workers must be >= 1'),
])
def test_bad_input_is_a_one_line_error(tmp_path, script, args, pattern):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'foreign').mkdir()
    (tmp_path / 'foreign' / 'notes.txt').write_text('not nuScenes')
    root = tmp_path / 'missing'
    if args and args[0] == 'EMPTY':
        root, args = tmp_path / 'empty', args[1:]
    elif args and args[0] == 'FOREIGN':
        root, args = tmp_path / 'foreign', args[1:]
    result = run(script, '--dataroot', root, *args)
    assert_one_line_error(result, pattern)
    assert (tmp_path / 'foreign' / 'notes.txt').read_text() == 'not nuScenes'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['empty', 'foreign']  # nothing half-written
