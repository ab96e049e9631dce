"""The ModelZoo launch scripts test/train_performance_8p.sh and test/train_full_8p.sh, run for real on CPU.

- the performance script trains the tiny experiment on the synthetic dataroot with 2 CPU processes (DDP, gloo)
  and must print the seed's FPS / E2E lines and write the case log;
- the full script's bookkeeping (which version_N checkpoint it evaluates, metrics kept in the case log, a clear
  error when the checkpoint is missing) is checked with a stand-in experiment file that behaves like the CLI,
  so it runs in seconds.
"""
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import textwrap

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ['env_npu.sh', 'common_8p.sh', 'train_full_8p.sh', 'train_performance_8p.sh']
CASE_KEYS = ['Network', 'RankSize', 'BatchSize', 'DeviceType', 'CaseName', 'ActualFPS', 'TrainingTime',
             'E2ETrainingTime']
STEP_TIME = re.compile(r'step_time=\s*([0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)')


def _env(tmp_path, **overrides):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(REPO_ROOT), OUTPUT_DIR=str(tmp_path / 'test_output'),
               RUN_DIR=str(tmp_path / 'run'))
    env.pop('etp_running_flag', None)
    env.update({key: str(value) for key, value in overrides.items()})
    return env


def _run(script, env, cwd=REPO_ROOT, timeout=240):
    return subprocess.run(['bash', str(REPO_ROOT / 'test' / script)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _case_log(path):
    lines = path.read_text().splitlines()
    return lines, dict(line.split(' = ', 1) for line in lines if ' = ' in line)


@pytest.mark.parametrize('script', SCRIPTS)
def test_scripts_parse(script):
    result = subprocess.run(['bash', '-n', str(REPO_ROOT / 'test' / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which('shellcheck') is None, reason='shellcheck is not installed')
def test_scripts_shellcheck_clean():
    result = subprocess.run(['shellcheck', '-x', *[f'test/{name}' for name in SCRIPTS]], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.skipif(os.path.exists('/usr/local/Ascend') or os.path.exists('/etc/Ascend'),
                    reason='a CANN toolkit may be installed here')
def test_env_npu_without_cann_is_a_noop():
    result = subprocess.run(['bash', '-c', 'source test/env_npu.sh; echo "TQ=${TASK_QUEUE_ENABLE:-unset}"'],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert 'note: Ascend CANN set_env.sh not found' in result.stdout
    assert 'TQ=unset' in result.stdout


def test_env_npu_sources_cann_and_sets_the_seed_variables(tmp_path):
    """A stand-in CANN install (set_env.sh + msnpureport on PATH) found through Install_Path."""
    root = tmp_path / 'Ascend'
    (root / 'ascend-toolkit' / 'latest').mkdir(parents=True)
    (root / 'ascend-toolkit' / 'set_env.sh').write_text(f'export ASCEND_TOOLKIT_HOME={root}/ascend-toolkit/latest\n')
    info = tmp_path / 'ascend_cann_install.info'
    info.write_text(f'Install_Path={root}\n')
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'msnpureport').write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/msnpureport.calls\n')
    (bin_dir / 'msnpureport').chmod(0o755)
    names = ['ASCEND_TOOLKIT_HOME', 'ASCEND_GLOBAL_LOG_LEVEL', 'ASCEND_GLOBAL_EVENT_ENABLE',
             'ASCEND_SLOG_PRINT_TO_STDOUT', 'TASK_QUEUE_ENABLE', 'BMMV2_ENABLE', 'COMBINED_ENABLE', 'PTCOPY_ENABLE',
             'HCCL_WHITELIST_DISABLE', 'SCALAR_TO_HOST_MEM', 'LD_LIBRARY_PATH']
    show = '; '.join(f'echo "{name}=${{{name}:-unset}}"' for name in names)
    env = dict(os.environ, ASCEND_CANN_INSTALL_INFO=str(info), ASCEND_INSTALL_ROOT=str(tmp_path / 'elsewhere'),
               PATH=f'{bin_dir}:{os.environ["PATH"]}', LD_LIBRARY_PATH='/opt/lib')
    result = subprocess.run(['bash', '-c', f'source test/env_npu.sh; {show}; echo "leak=${{_cann_root:-none}}"'],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    values = dict(line.split('=', 1) for line in result.stdout.splitlines() if '=' in line and ' ' not in line)
    assert values['ASCEND_TOOLKIT_HOME'] == f'{root}/ascend-toolkit/latest'  # Install_Path beats the root override
    assert values['ASCEND_GLOBAL_LOG_LEVEL'] == '3' and values['ASCEND_GLOBAL_EVENT_ENABLE'] == '0'
    assert values['ASCEND_SLOG_PRINT_TO_STDOUT'] == '0' and values['HCCL_WHITELIST_DISABLE'] == '1'
    for name in ('TASK_QUEUE_ENABLE', 'BMMV2_ENABLE', 'COMBINED_ENABLE', 'PTCOPY_ENABLE', 'SCALAR_TO_HOST_MEM'):
        assert values[name] == '1', name
    assert values['LD_LIBRARY_PATH'] == '/opt/lib:/usr/include/hdf5/lib/'
    assert values['leak'] == 'none'  # its helper variables do not leak into the caller's shell
    calls = (tmp_path / 'msnpureport.calls').read_text().splitlines()
    assert calls == [f'-g error -d {device}' for device in range(8)] + ['-e disable']


def test_performance_script_on_cpu_with_tiny_experiment(tmp_path, synthetic_dataroot):
    env = _env(tmp_path, RANK_SIZE=2, ACCELERATOR='cpu', EXP='exps/nuscenes/tiny/matrixvt_tiny_synthetic.py',
               DATA_ROOT=synthetic_dataroot, VERSION='v1.0-mini', EPOCHS=1, BATCH_SIZE=1,
               EXTRA_ARGS='--limit_train_batches 3 --num_workers 0')
    result = _run('train_performance_8p.sh', env, cwd=REPO_ROOT / 'test')  # the seed also ran from test/
    output_dir = tmp_path / 'test_output'
    train_log = output_dir / 'train_0.log'
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:] + \
        (train_log.read_text()[-3000:] if train_log.exists() else '')

    fps_line = re.search(r'^Final Performance images/sec : (\d+\.\d{4})$', result.stdout, re.M)
    e2e_line = re.search(r'^E2E Training Duration sec : (\d+)$', result.stdout, re.M)
    assert fps_line and e2e_line, result.stdout

    step_times = [float(value) for value in STEP_TIME.findall(train_log.read_text())]
    assert len(step_times) == 2 * 3  # every rank prints each of its 3 steps into the shared log
    expected_fps = 1 * 2 / (sum(step_times[-50:]) / len(step_times[-50:]))  # batch x ranks / mean step time
    assert float(fps_line.group(1)) == pytest.approx(expected_fps, abs=1e-4)

    lines, case = _case_log(output_dir / 'MatrixVT_for_PyTorch_bs1_2p_perf.log')
    assert [line.split(' = ')[0] for line in lines] == CASE_KEYS
    assert case['Network'] == 'MatrixVT_for_PyTorch' and case['RankSize'] == '2' and case['BatchSize'] == '1'
    assert case['CaseName'] == 'MatrixVT_for_PyTorch_bs1_2p_perf'
    assert case['DeviceType'] == os.uname().machine
    assert case['ActualFPS'] == fps_line.group(1) and case['E2ETrainingTime'] == e2e_line.group(1)
    mean_step = sum(step_times[-50:]) / len(step_times[-50:])
    assert float(case['TrainingTime']) == pytest.approx(mean_step * 1000, abs=0.01)
    # The run folder is the one given as RUN_DIR (passed as --default_root_dir), with the EMA weights of epoch 0.
    assert list((tmp_path / 'run' / 'lightning_logs').glob('version_*/0.pth'))


_STANDIN_EXP = '''
"""Behaves like an experiment file's CLI for the launch scripts: step_time lines, <epoch>.pth, devkit metrics."""
import argparse, os, sys
parser = argparse.ArgumentParser()
parser.add_argument('-e', action='store_true')
parser.add_argument('--ckpt_path')
parser.add_argument('--default_root_dir')
parser.add_argument('--max_epoch', type=int, default=24)
args, _ = parser.parse_known_args()
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'argv.log'), 'a') as log:
    log.write(' '.join(sys.argv[1:]) + '\\n')
if args.e:
    if not os.path.isfile(args.ckpt_path):
        sys.exit('checkpoint missing: ' + args.ckpt_path)
    for name, value in [('mAP', 0.3265), ('mATE', 0.6609), ('mASE', 0.2720), ('mAOE', 0.5212), ('mAVE', 0.8621),
                        ('mAAE', 0.2195), ('NDS', 0.4097)]:
        if name == os.environ.get('STANDIN_DROP_METRIC'):
            continue
        # The devkit's progress bar (stderr, same log) can end without a newline right before "mAP: ...".
        prefix = '\\r  0%|          | 0/12 [00:00<?, ?it/s]  ' if name == 'mAP' else ''
        print(prefix + '%s: %.4f' % (name, value))
    print('Eval time: 1.0s')
    sys.exit(0)
logs = os.path.join(args.default_root_dir, 'lightning_logs')
os.makedirs(logs, exist_ok=True)
numbers = [int(name.split('_')[1]) for name in os.listdir(logs) if name.startswith('version_')]
version_dir = os.path.join(logs, 'version_%d' % (max(numbers) + 1 if numbers else 0))
os.makedirs(version_dir)
for step in range(60):
    print('step_time= ', 0.5 if step < 10 else 0.25)
if os.environ.get('STANDIN_WRITE_PTH', '1') == '1':
    open(os.path.join(version_dir, '%d.pth' % (args.max_epoch - 1)), 'w').close()
'''


@pytest.fixture
def standin_exp(tmp_path):
    path = tmp_path / 'standin_exp.py'
    path.write_text(textwrap.dedent(_STANDIN_EXP))
    return path


def test_full_script_evaluates_this_runs_checkpoint_and_keeps_metrics(tmp_path, standin_exp):
    # Older runs exist: version_0 and version_7 (with a 1.pth) - the script must evaluate the new version_8.
    for old in ('version_0', 'version_7'):
        (tmp_path / 'run' / 'lightning_logs' / old).mkdir(parents=True)
    (tmp_path / 'run' / 'lightning_logs' / 'version_7' / '1.pth').write_text('old')
    env = _env(tmp_path, RANK_SIZE=4, ACCELERATOR='cpu', EXP=standin_exp, EPOCHS=2, BATCH_SIZE=2,
               DATA_ROOT='/data/nusc', VERSION='v1.0-mini', EXTRA_ARGS='--limit_train_batches 4')
    result = _run('train_full_8p.sh', env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

    # Mean of the last 50 step times = 0.25 s -> int(2 * 4 / 0.25) = 32 (the first 10 slow steps are excluded).
    assert re.search(r'^Final Performance images/sec : 32\.0000$', result.stdout, re.M), result.stdout
    assert re.search(r'^E2E Training Duration sec : \d+$', result.stdout, re.M)
    assert 'NDS: 0.4097' in result.stdout

    train_argv, eval_argv = (tmp_path / 'argv.log').read_text().splitlines()
    assert train_argv.split() == [
        '--seed', '0', '--learning_rate', '0.000003125', '--max_epoch', '2', '--amp_backend', 'native',
        '--accelerator', 'cpu', '--devices', '4', '--precision', '32', '--batch_size_per_device', '2',
        '--default_root_dir', str(tmp_path / 'run'), '--data_root', '/data/nusc', '--version', 'v1.0-mini',
        '--limit_train_batches', '4']
    assert f"--ckpt_path {tmp_path / 'run' / 'lightning_logs' / 'version_8' / '1.pth'}" in eval_argv
    assert eval_argv.startswith('-e ') and '--limit_train_batches' not in eval_argv

    lines, case = _case_log(tmp_path / 'test_output' / 'MatrixVT_for_PyTorch_bs2_4p_acc.log')
    assert [line.split(' = ')[0] for line in lines[:8]] == CASE_KEYS
    assert case['ActualFPS'] == '32.0000' and case['TrainingTime'] == '250.00' and case['RankSize'] == '4'
    # The seed wrote the metrics first and then overwrote the file; here they follow the run facts.
    assert lines[8:] == ['mAP: 0.3265', 'mATE: 0.6609', 'mASE: 0.2720', 'mAOE: 0.5212', 'mAVE: 0.8621',
                         'mAAE: 0.2195', 'NDS: 0.4097']


def test_full_script_stops_clearly_when_the_checkpoint_is_missing(tmp_path, standin_exp):
    (tmp_path / 'run' / 'lightning_logs' / 'version_3').mkdir(parents=True)
    (tmp_path / 'run' / 'lightning_logs' / 'version_3' / '0.pth').write_text('an older run')
    env = _env(tmp_path, RANK_SIZE=1, ACCELERATOR='cpu', EXP=standin_exp, EPOCHS=1, BATCH_SIZE=1,
               STANDIN_WRITE_PTH=0, BIND_CPU_CORES=1)
    result = _run('train_full_8p.sh', env, timeout=120)
    assert result.returncode == 1
    assert re.search(r'error: EMA checkpoint 0\.pth of this run not found \(looked in .*version_4', result.stderr)
    train_argv = (tmp_path / 'argv.log').read_text().splitlines()
    assert len(train_argv) == 1  # no evaluation of the older run
    assert '--bind_cpu_cores' in train_argv[0].split()  # BIND_CPU_CORES=1 (the default on NPU only)


def test_scripts_reject_unusable_accelerator_and_missing_exp(tmp_path, standin_exp):
    (tmp_path / 'test_output').mkdir()
    (tmp_path / 'test_output' / 'kept.log').write_text('earlier run')
    missing = _run('train_performance_8p.sh', _env(tmp_path, EXP=tmp_path / 'nope.py'), timeout=60)
    assert missing.returncode == 1 and "experiment file '" in missing.stderr and 'not found' in missing.stderr
    env = _env(tmp_path, ACCELERATOR='tpu', EXP=standin_exp)
    bad = _run('train_performance_8p.sh', env, timeout=60)
    assert bad.returncode == 1 and "error: unknown ACCELERATOR 'tpu'" in bad.stderr
    # Checks come before the log folder is recreated: an earlier run's logs survive a bad call.
    assert (tmp_path / 'test_output' / 'kept.log').read_text() == 'earlier run'
    assert not (tmp_path / 'argv.log').exists()


@pytest.mark.skipif(importlib.util.find_spec('torch_npu') is not None, reason='torch_npu is installed here')
def test_scripts_explain_why_npu_is_not_usable(tmp_path, standin_exp):
    result = _run('train_full_8p.sh', _env(tmp_path, ACCELERATOR='npu', EXP=standin_exp), timeout=120)
    assert result.returncode == 1
    assert 'error: --accelerator npu requested but no NPU is usable: torch_npu is not installed' in result.stderr
    assert "error: accelerator 'npu' is not usable here" in result.stderr
    assert not (tmp_path / 'argv.log').exists()


def test_performance_script_reports_training_failure(tmp_path):
    failing = tmp_path / 'failing_exp.py'
    failing.write_text("import sys\nprint('step_time=  0.1')\nsys.exit('data_root not found: /nowhere')\n")
    result = _run('train_performance_8p.sh', _env(tmp_path, ACCELERATOR='cpu', EXP=failing, RANK_SIZE=1),
                  timeout=60)
    assert result.returncode == 1
    assert 'data_root not found: /nowhere' in result.stderr
    assert 'error: training failed with exit code 1' in result.stderr
    assert 'Final Performance' not in result.stdout


def test_performance_script_needs_step_time_lines(tmp_path):
    silent = tmp_path / 'silent_exp.py'
    silent.write_text("print('trained, but no step times printed')\n")
    result = _run('train_performance_8p.sh', _env(tmp_path, ACCELERATOR='cpu', EXP=silent, RANK_SIZE=1), timeout=60)
    assert result.returncode == 1
    assert re.search(r'error: no step_time= lines in \S+/train_0\.log, cannot compute FPS', result.stderr)
    assert 'Final Performance' not in result.stdout


def test_full_script_stops_when_a_metric_line_is_missing(tmp_path, standin_exp):
    env = _env(tmp_path, RANK_SIZE=1, ACCELERATOR='cpu', EXP=standin_exp, EPOCHS=1, BATCH_SIZE=1,
               STANDIN_DROP_METRIC='mAVE')
    result = _run('train_full_8p.sh', env, timeout=120)
    assert result.returncode == 1
    assert re.search(r"error: no 'mAVE: <value>' line in \S+/result\.log: the evaluation output is incomplete",
                     result.stderr)
    assert not (tmp_path / 'test_output' / 'MatrixVT_for_PyTorch_bs1_1p_acc.log').exists()
