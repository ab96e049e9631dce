"""scripts/plot_pr_curves.py: the devkit's PR / TP-error plots for a results file, and its bad-input errors."""
import json
import subprocess
import sys

import pytest
from nuscenes import NuScenes
from nuscenes.utils import splits

sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parent / 'synthetic_nuscenes'))
from test_writer import gt_copy_results  # noqa: E402

SCRIPT = str(__import__('pathlib').Path(__file__).resolve().parents[2] / 'scripts' / 'plot_pr_curves.py')


def test_writes_summary_and_per_class_plots(synthetic_dataroot, tmp_path):
    nusc = NuScenes('v1.0-mini', str(synthetic_dataroot), verbose=False)
    meta = dict(use_camera=True, use_lidar=False, use_radar=False, use_map=False, use_external=False)
    results_path = tmp_path / 'results_nusc.json'
    results_path.write_text(json.dumps(dict(meta=meta, results=gt_copy_results(nusc, splits.mini_val))))
    out_dir = tmp_path / 'curves'
    done = subprocess.run([sys.executable, SCRIPT, '--results', str(results_path), '--data_root',
                           str(synthetic_dataroot), '--version', 'v1.0-mini', '--out_dir', str(out_dir)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    names = {path.name for path in out_dir.iterdir()}
    assert 'summary.pdf' in names and 'car_pr.pdf' in names, names
    assert not [name for name in names if name.startswith('.pr_curves.')]  # scratch folder removed


@pytest.mark.parametrize('case', ['missing results', 'missing version', 'corrupt results'])
def test_bad_input_is_one_line(case, synthetic_dataroot, tmp_path):
    results = tmp_path / 'results_nusc.json'
    if case == 'missing version':
        results.write_text('{"results": {}}')
    if case == 'corrupt results':
        results.write_text('{"results": {"token": [')  # a copy cut short
    version = 'v1.0-trainval' if case == 'missing version' else 'v1.0-mini'
    done = subprocess.run([sys.executable, SCRIPT, '--results', str(results), '--data_root', str(synthetic_dataroot),
                           '--version', version, '--out_dir', str(tmp_path / 'curves')],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), done.stderr
    if case == 'corrupt results':
        assert 'is not valid JSON' in lines[0] and 'regenerate it' in lines[0]
