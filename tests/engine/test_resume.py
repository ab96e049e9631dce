"""Resume end to end: a SIGKILLed tiny training resumed with --resume auto ends bit-identical to a straight run.

The pieces that make this work (resumable sampler, per-sample seeds) are unit-tested in test_samplers.py.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_EXP = os.path.join(REPO_ROOT, 'exps', 'nuscenes', 'tiny', 'matrixvt_tiny_synthetic.py')


# ------------------------------------------------------------------------- SIGKILL mid-epoch, then resume
def run_dir(root):
    return os.path.join(root, 'lightning_logs', 'version_0')


def tiny_command(dataroot, root, *extra):
    return [sys.executable, TINY_EXP, '--accelerator', 'cpu', '--data_root', str(dataroot), '--version',
            'v1.0-mini', '--default_root_dir', str(root), '-b', '1', '--max_epochs', '3', '--limit_train_batches',
            '4', '--ckpt_every_n_steps', '2', '--num_workers', '0', '--seed', '3', '--learning_rate', '1e-4',
            '--final_dim', '64', '192', '--progress_bar', 'off', *extra]


def test_sigkill_mid_epoch_then_resume_auto_matches_uninterrupted_run(synthetic_dataroot, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONHASHSEED='0')
    straight, killed = tmp_path / 'straight', tmp_path / 'killed'
    done = subprocess.run(tiny_command(synthetic_dataroot, straight), env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    # Kill the second run in epoch 1 (global steps 5..8), right after its step-6 checkpoint appeared.
    process = subprocess.Popen(tiny_command(synthetic_dataroot, killed), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    target = os.path.join(run_dir(killed), 'checkpoints', 'step=6.ckpt')
    deadline = time.time() + 300
    while not os.path.exists(target) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, 'training finished before it could be killed'
    assert not os.path.exists(os.path.join(run_dir(killed), '1.pth'))  # killed before the end of epoch 1

    resumed = subprocess.run(tiny_command(synthetic_dataroot, killed, '--resume', 'auto'), env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'resuming from' in resumed.stdout
    assert os.listdir(os.path.join(killed, 'lightning_logs')) == ['version_0']  # same run folder

    def final(root):
        checkpoint = torch.load(os.path.join(run_dir(root), 'checkpoints', 'last.ckpt'), map_location='cpu',
                                weights_only=True)
        ema = torch.load(os.path.join(run_dir(root), '2.pth'), map_location='cpu', weights_only=True)
        return checkpoint, ema

    (model_a, ema_a), (model_b, ema_b) = final(straight), final(killed)
    assert model_a['global_step'] == model_b['global_step'] == 12
    # The tiny experiment's multistep schedule drops the lr x0.1 at epoch round(3 * 5 / 6) = 2, after the resume.
    lrs = [m['optimizer_states'][0]['param_groups'][0]['lr'] for m in (model_a, model_b)]
    assert lrs[0] == lrs[1] == pytest.approx(1e-5)
    assert model_a['state_dict'].keys() == model_b['state_dict'].keys()
    for name, value in model_a['state_dict'].items():
        assert torch.equal(value, model_b['state_dict'][name]), name
    for name, value in ema_a['state_dict'].items():
        assert torch.equal(value, ema_b['state_dict'][name]), name
    optimizer_a, optimizer_b = model_a['optimizer_states'][0]['state'], model_b['optimizer_states'][0]['state']
    for index, state in optimizer_a.items():
        assert torch.equal(state['exp_avg'], optimizer_b[index]['exp_avg'])


def test_resume_from_missing_path_is_one_line_error(synthetic_dataroot, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run(tiny_command(synthetic_dataroot, tmp_path, '--resume', str(tmp_path / 'gone.ckpt')),
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1  # bad input file
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith('error: checkpoint ') and 'gone.ckpt does not exist' in last_line
    assert 'Traceback' not in result.stderr
