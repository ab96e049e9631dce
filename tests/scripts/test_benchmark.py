"""Smoke test of scripts/benchmark.py: the quick tiny run completes, writes every section to JSON and its
equality checks (ring/ray vs the reference loop, MatrixVT sparse vs dense vs reference style, the two dataset
pipelines' augmentation draws) pass. Timings are printed by the benchmark, never asserted."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def quick_tiny_results(tmp_path_factory):
    out = tmp_path_factory.mktemp('benchmark') / 'benchmark.json'
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD='0')
    proc = subprocess.run([sys.executable, 'scripts/benchmark.py', '--config', 'tiny', '--quick', '--threads', '1',
                           '--out', str(out)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f), proc.stdout


def test_json_has_every_section(quick_tiny_results):
    results, _ = quick_tiny_results
    assert results['meta']['quick'] is True
    assert list(results['configs']) == ['tiny']
    tiny = results['configs']['tiny']
    assert {'ring_ray', 'view_transform', 'train_step', 'dataset', 'targets'} <= set(tiny)
    assert {'dataset', 'depth_gt'} <= set(tiny['dataset'])
    assert [row['batch_size'] for row in tiny['ring_ray']['rows']] == [1, 8]
    for case in ('sparse', 'dense', 'reference', 'lss', 'module_sparse', 'module_dense', 'module_reference'):
        assert tiny['view_transform']['cases'][case]['time_s'] > 0
    if sys.platform.startswith('linux'):  # quick runs measure the memory of sparse and LSS only
        for case in ('sparse', 'lss'):
            assert tiny['view_transform']['cases'][case]['peak_mb'] > 0
    assert tiny['view_transform']['shapes']['bev'] == [1, 32, 64, 64]
    assert tiny['train_step']['samples_per_s'] > 0 and tiny['train_step']['losses_finite']
    assert 0 < tiny['train_step']['vt_share'] < 1
    # The experiment's own step in fp32 and bf16, each with its backbone floor and the overhead above it.
    for precision in ('32-true', 'bf16-mixed'):
        figures = tiny['train_step']['precisions'][precision]
        assert 0 < figures['floor_s'] < figures['step_s'] and figures['overhead_pct'] > 0 and figures['losses_finite']
    assert tiny['train_step']['bf16_speedup'] > 0
    for name in ('dataset', 'depth_gt'):
        section = tiny['dataset'][name]
        assert section['ours_samples_per_s'] > 0 and section['reference_style_samples_per_s'] > 0
    assert tiny['dataset']['dataset']['final_dim'] == [128, 352]


def test_equality_checks_passed(quick_tiny_results):
    tiny = quick_tiny_results[0]['configs']['tiny']
    ring_ray = tiny['ring_ray']
    assert ring_ray['identical'] is True
    assert all(row['identical_dense'] and row['identical_sparse'] and row['binary'] for row in ring_ray['rows'])
    assert all(row['ring_nnz_per_sample'] > 0 and row['ray_nnz_per_sample'] > 0 for row in ring_ray['rows'])
    # The loops dispatch one indexed write per ray / depth bin; the vectorised builds a fixed number of ops.
    for row in ring_ray['rows']:
        assert row['ops_loop'] > 5 * row['ops_sparse'] and row['ops_loop'] > 5 * row['ops_dense']
        assert row['cells_differing'] <= max(2, row['num_points'] // 20000)  # float rounding at borders only
    at_b8 = [row for row in ring_ray['rows'] if row['batch_size'] == 8][0]
    assert at_b8['ops_sparse'] <= ring_ray['rows'][0]['ops_sparse'] + 5  # no per-sample / per-ray loop
    view_transform = tiny['view_transform']
    assert view_transform['equal'] is True and view_transform['check']['num_param_grads'] > 0
    for other in ('dense', 'reference', 'module_dense', 'module_reference'):
        assert view_transform['check'][other]['max_rel'] <= 1e-5
    assert 'grad_params_rel' in view_transform['check']['module_reference']
    data_check = tiny['dataset']['dataset']['check']
    # Same augmentation draws in both pipelines: same matrices, (almost) the same depth map.
    assert data_check['ida_equal'] and data_check['bda_equal'] and data_check['sensor2ego_max_abs'] < 1e-4
    assert data_check['depth_equal_fraction'] > 0.999
    assert data_check['image_mean_abs_diff'] < 0.1  # normalised units: only the resize filter differs


def test_targets_reported_with_verdicts(quick_tiny_results):
    results, stdout = quick_tiny_results
    targets = results['configs']['tiny']['targets']
    assert len(targets) == 8
    for target in targets:
        assert target['passed'] in (True, False), target
    by_key = {t['key']: t for t in targets}
    assert by_key['identical']['passed'] and by_key['equal']['passed']
    assert 'PASS' in stdout and 'config: tiny' in stdout
