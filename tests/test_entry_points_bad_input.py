"""Every entry point x every kind of bad input it can meet: one line, the documented status, nothing touched.

Each case runs the command as a user would (a subprocess, from a scratch folder). Assertions: the status
(1 bad input, 2 bad usage: bevdepth/engine/entry_point.py), no traceback, at most three lines on stderr, the fix
named in the ``error:`` line, and every file that existed before byte-identical afterwards. The experiment rows of
docs/troubleshooting.md come from tests/test_bad_inputs.py; this table covers the other commands and the file kinds
(truncated, garbage, file in the way, missing).
"""
import dataclasses
import os
import pathlib
import subprocess
import sys
from typing import Callable

import pytest
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_EXP = REPO_ROOT / 'exps' / 'nuscenes' / 'tiny' / 'matrixvt_tiny_synthetic.py'
SCRIPTS = REPO_ROOT / 'scripts'
BAD_INPUT, USAGE = 1, 2


@dataclasses.dataclass
class Case:
    entry_point: str
    kind: str
    command: Callable  # (scratch folder, synthetic dataroot) -> argv after the python executable
    status: int
    fix: str  # a piece of the error line that names the problem / fix


def _truncated_checkpoint(folder):
    good = folder / 'good.pth'
    torch.save({'state_dict': {'model.w': torch.ones(4096)}}, good)
    cut = folder / 'cut.pth'
    cut.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    good.unlink()
    return cut


def _garbage(folder, name):
    path = folder / name
    path.write_bytes(b'this is not what the command expects\n' * 20)
    return path


def _file_in_the_way(folder):
    path = folder / 'in_the_way'
    path.write_text('a file where a folder should be')
    return path


def _cut_json(folder):
    path = folder / 'results_nusc.json'
    path.write_text('{"results": {"token": [')  # a copy cut short
    return path


def _empty_results(folder):
    path = folder / 'results_ok.json'
    path.write_text('{"results": {}}')
    return path


def _tiny(*args):
    return [str(TINY_EXP), '--accelerator', 'cpu', '--num_workers', '0', *args]


CASES = [
    Case('experiment -e', 'truncated checkpoint', lambda d, r: _tiny('-e', '--ckpt_path', _truncated_checkpoint(d)),
         BAD_INPUT, 'cannot be read'),
    Case('experiment -e', 'garbage checkpoint', lambda d, r: _tiny('-e', '--ckpt_path', _garbage(d, 'x.pth')),
         BAD_INPUT, 'copy or download it again'),
    Case('experiment --resume', 'garbage checkpoint', lambda d, r: _tiny('--resume', _garbage(d, 'x.ckpt')),
         BAD_INPUT, 'copy or download it again'),
    Case('experiment -p', 'missing checkpoint', lambda d, r: _tiny('-p', '--ckpt_path', d / 'gone.pth'),
         BAD_INPUT, 'does not exist: check --ckpt_path'),
    Case('experiment', 'misspelt flag', lambda d, r: _tiny('--head_chanels', '16'), USAGE,
         'did you mean --head_channels?'),
    Case('experiment', 'engine-owned Trainer flag', lambda d, r: _tiny('--logger', 'csv'), USAGE,
         '--logger: the engine logs to TensorBoard'),
    Case('experiment', 'value a setting refuses', lambda d, r: _tiny('--final_dim', '60', '192'), USAGE,
         '--final_dim must be two multiples of 32'),
    Case('export_onnx.py', 'truncated checkpoint',
         lambda d, r: [str(SCRIPTS / 'export_onnx.py'), '--exp', str(TINY_EXP), '--ckpt', str(_truncated_checkpoint(d)),
                       '--out', str(d / 'model.onnx')], BAD_INPUT, 'cannot be read'),
    Case('export_onnx.py', 'file in the way of --out',
         lambda d, r: [str(SCRIPTS / 'export_onnx.py'), '--exp', str(TINY_EXP), '--random-init',
                       '--out', str(_file_in_the_way(d) / 'model.onnx')], BAD_INPUT, 'is a file, not a folder'),
    Case('infer_onnx.py', 'garbage ONNX model',
         lambda d, r: [str(SCRIPTS / 'infer_onnx.py'), '--onnx', str(_garbage(d, 'model.onnx')), '--exp',
                       str(TINY_EXP), '--data_root', str(r), '--out', str(d / 'results.json')], BAD_INPUT,
         're-export it with scripts/export_onnx.py'),
    Case('infer_onnx.py', 'file in the way of --out',
         lambda d, r: [str(SCRIPTS / 'infer_onnx.py'), '--onnx', str(d / 'model.onnx'), '--exp', str(TINY_EXP),
                       '--out', str(_file_in_the_way(d) / 'results.json')], BAD_INPUT, 'is a file, not a folder'),
    Case('visualize_nusc.py', 'truncated results JSON',
         lambda d, r: [str(SCRIPTS / 'visualize_nusc.py'), '--data_root', str(r), '--version', 'v1.0-mini',
                       '--results', str(_cut_json(d)), '--count', '1', '--out_dir', str(d / 'pictures')],
         BAD_INPUT, 'is not valid JSON'),
    Case('visualize_nusc.py', 'file in the way of --out_dir',
         lambda d, r: [str(SCRIPTS / 'visualize_nusc.py'), '--data_root', str(r), '--version', 'v1.0-mini',
                       '--count', '1', '--out_dir', str(_file_in_the_way(d))], BAD_INPUT, 'is a file, not a folder'),
    Case('plot_pr_curves.py', 'truncated results JSON',
         lambda d, r: [str(SCRIPTS / 'plot_pr_curves.py'), '--results', str(_cut_json(d)), '--data_root', str(r),
                       '--version', 'v1.0-mini', '--out_dir', str(d / 'curves')], BAD_INPUT, 'regenerate it'),
    Case('plot_pr_curves.py', 'file in the way of --out_dir',
         lambda d, r: [str(SCRIPTS / 'plot_pr_curves.py'), '--results', str(_empty_results(d)), '--data_root',
                       str(r), '--version', 'v1.0-mini', '--out_dir', str(_file_in_the_way(d))], BAD_INPUT,
         'is a file, not a folder'),
    Case('gen_depth_gt.py', 'garbage info pickle',
         lambda d, r: [str(SCRIPTS / 'gen_depth_gt.py'), '--dataroot', str(_garbage_info_dataroot(d, r)),
                       '--splits', 'train'], BAD_INPUT, 'nuscenes_infos_train.pkl'),
    Case('make_synthetic_nuscenes.py', 'file in the way of --dataroot',
         lambda d, r: [str(SCRIPTS / 'make_synthetic_nuscenes.py'), '--dataroot', str(_file_in_the_way(d) / 'root'),
                       '--scenes-per-split', '1', '--samples-per-scene', '2'], BAD_INPUT, 'is a file, not a folder'),
    Case('benchmark.py', 'file in the way of --out',
         lambda d, r: [str(SCRIPTS / 'benchmark.py'), '--config', 'tiny', '--quick', '--sections', 'ring_ray',
                       '--out', str(_file_in_the_way(d) / 'bench.json')], BAD_INPUT, 'is a file, not a folder'),
    Case('check_accelerator.py', 'sample root without info file',
         lambda d, r: [str(SCRIPTS / 'check_accelerator.py'), '--sample-root', str(d)], BAD_INPUT,
         'nuscenes_infos_train.pkl'),
]
if not torch.cuda.is_available():
    CASES.append(Case('experiment', '--accelerator gpu without a GPU', lambda d, r: _tiny('--accelerator', 'gpu'),
                      USAGE, 'use --accelerator cpu'))


def _garbage_info_dataroot(folder, dataroot):
    """A dataroot view (tables and samples linked) whose train info pickle is garbage."""
    root = folder / 'garbage_info_root'
    root.mkdir()
    for name in ('v1.0-mini', 'samples', 'sweeps'):
        (root / name).symlink_to(dataroot / name, target_is_directory=True)
    _garbage(root, 'nuscenes_infos_train.pkl')
    return root


def _states(folder):
    return {path: path.read_bytes() for path in pathlib.Path(folder).rglob('*')
            if path.is_file() and not path.is_symlink()}


@pytest.mark.parametrize('case', CASES, ids=[f'{case.entry_point}: {case.kind}' for case in CASES])
def test_bad_input_is_one_line_with_the_documented_status(case, tmp_path, synthetic_dataroot):
    scratch = tmp_path / 'scratch'
    scratch.mkdir()
    argv = [str(part) for part in case.command(scratch, synthetic_dataroot)]
    before = _states(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS='1')
    env.pop('BEVDEPTH_DEBUG', None)
    result = subprocess.run([sys.executable, *argv], cwd=scratch, env=env, capture_output=True, text=True,
                            timeout=300)
    stderr_lines = [line for line in result.stderr.splitlines() if line.strip() and 'Warning' not in line
                    and not line.startswith(('warnings.warn', '  '))]
    assert result.returncode == case.status, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr, result.stderr[-2000:]
    errors = [line for line in stderr_lines if line.startswith('error:')]
    assert len(errors) == 1 and len(stderr_lines) <= 3, result.stderr[-2000:]
    assert case.fix in errors[0], errors[0]
    assert _states(tmp_path) == before, 'a failed command changed or removed a file that existed before it'


def test_debug_switch_shows_the_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), BEVDEPTH_DEBUG='1')
    result = subprocess.run([sys.executable, str(TINY_EXP), '-e', '--ckpt_path', str(tmp_path / 'gone.pth')],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and 'Traceback' in result.stderr and 'CheckpointError' in result.stderr


DOCS = REPO_ROOT / 'docs' / 'troubleshooting.md'
BEGIN, END = '<!-- entry-point table: begin -->', '<!-- entry-point table: end -->'


def render_docs_table():
    """The markdown table of CASES that docs/troubleshooting.md holds between BEGIN and END."""
    rows = ['| command | bad input | exit status | the `error:` line says |', '|---|---|---|---|']
    for case in CASES:
        rows.append(f'| {case.entry_point} | {case.kind} | {case.status} | `{case.fix}` |')
    return '\n'.join([BEGIN, *rows, END])


def test_troubleshooting_lists_this_table():
    """docs/troubleshooting.md is generated from CASES: BEVDEPTH_WRITE_DOCS=1 rewrites its block."""
    text = DOCS.read_text()
    start, stop = text.index(BEGIN), text.index(END) + len(END)
    if os.environ.get('BEVDEPTH_WRITE_DOCS') == '1':
        DOCS.write_text(text[:start] + render_docs_table() + text[stop:])
        text = DOCS.read_text()
        start, stop = text.index(BEGIN), text.index(END) + len(END)
    assert text[start:stop] == render_docs_table(), 'run BEVDEPTH_WRITE_DOCS=1 pytest -k troubleshooting'
