"""The tiny MatrixVT experiment driven through its command line on the synthetic dataroot, on CPU.

One 2-process DDP training run (gloo) is shared by the tests: it must write the Lightning checkpoint and the
per-epoch EMA weights; evaluating them must print the devkit metrics and give the same numbers on 1 and 2
processes; predicting must cover every sample token.
"""
import json
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_EXP = os.path.join(REPO_ROOT, 'exps', 'nuscenes', 'tiny', 'matrixvt_tiny_synthetic.py')
ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONHASHSEED='0')


def run_tiny(dataroot, root, *extra, timeout=300):
    command = [sys.executable, TINY_EXP, '--accelerator', 'cpu', '--data_root', str(dataroot), '--version',
               'v1.0-mini', '--default_root_dir', str(root), '--num_workers', '0', '--final_dim', '64', '192',
               '--progress_bar', 'off', *extra]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def val_tokens(dataroot):
    with open(os.path.join(dataroot, 'nuscenes_infos_val.pkl'), 'rb') as f:
        return {info['sample_token'] for info in pickle.load(f)}


@pytest.fixture(scope='module')
def ddp_run(synthetic_dataroot, tmp_path_factory):
    """2 processes x batch 1, 2 epochs of 2 steps; a tiny lr keeps the model near its (box-producing) init."""
    root = tmp_path_factory.mktemp('tiny_ddp')
    result = run_tiny(synthetic_dataroot, root, '--devices', '2', '-b', '1', '--max_epochs', '2',
                      '--limit_train_batches', '2', '--learning_rate', '1e-5', '--seed', '0')
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return root, result


def test_ddp_training_writes_checkpoint_and_ema_weights(ddp_run):
    root, result = ddp_run
    version_dir = os.path.join(root, 'lightning_logs', 'version_0')
    checkpoints = sorted(os.listdir(os.path.join(version_dir, 'checkpoints')))
    assert checkpoints == ['epoch=1-step=4.ckpt', 'last.ckpt']
    for epoch, step in ((0, 2), (1, 4)):
        ema = torch.load(os.path.join(version_dir, f'{epoch}.pth'), map_location='cpu', weights_only=True)
        assert (ema['epoch'], ema['global_step']) == (epoch, step)
        assert ema['state_dict'] and all(name.startswith('model.') for name in ema['state_dict'])
    checkpoint = torch.load(os.path.join(version_dir, 'checkpoints', 'last.ckpt'), map_location='cpu',
                            weights_only=True)
    assert checkpoint['global_step'] == 4 and 'EMACallback' in checkpoint['callbacks']
    assert checkpoint['state_dict'].keys() >= ema['state_dict'].keys()
    # 2 ranks x 4 steps, each printing the seed's step_time line; lr = 1e-5 x 1 x 2 devices.
    assert len(re.findall(r'step_time=\s+\d', result.stdout)) == 8
    assert result.stdout.count('recipe (train):') == 1  # printed by rank 0 only
    assert 'x 1 per device x 2 devices = 2e-05 (global batch 2)' in result.stdout
    assert 'pretrained       none (random init)' in result.stdout
    assert not [name for name in os.listdir(version_dir) if name.endswith('.tmp')]


def test_evaluate_prints_metrics_and_matches_across_process_counts(ddp_run, synthetic_dataroot, tmp_path):
    root, _ = ddp_run
    ckpt = os.path.join(root, 'lightning_logs', 'version_0', '1.pth')
    summaries, submissions = {}, {}
    for devices in (1, 2):
        out_dir = tmp_path / f'eval_{devices}'
        result = run_tiny(synthetic_dataroot, out_dir, '-e', '--ckpt_path', ckpt, '--devices', str(devices),
                          '--eval_batch_size', '1')
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        assert re.search(r'^mAP: \d\.\d{4}$', result.stdout, re.M), result.stdout[-2000:]
        assert re.search(r'^NDS: \d\.\d{4}$', result.stdout, re.M)
        assert 'Per-class results:' in result.stdout
        with open(out_dir / 'metrics_summary.json') as f:
            summaries[devices] = json.load(f)
        with open(out_dir / 'results_nusc.json') as f:
            submission = json.load(f)
        assert set(submission['results']) == val_tokens(synthetic_dataroot)
        submissions[devices] = submission
    # Same boxes, same order of boxes per sample: the 2-process run evaluated exactly the 1-process predictions.
    assert submissions[1] == submissions[2]
    assert sum(len(boxes) for boxes in submissions[1]['results'].values()) > 0
    one, two = summaries[1], summaries[2]
    assert one['mean_ap'] == two['mean_ap'] and one['nd_score'] == two['nd_score']
    assert one['label_aps'] == two['label_aps'] and one['tp_errors'] == two['tp_errors']


def test_predict_writes_submission_for_every_sample(ddp_run, synthetic_dataroot):
    root, _ = ddp_run
    version_dir = os.path.join(root, 'lightning_logs', 'version_0')
    result = run_tiny(synthetic_dataroot, root, '-p', '--ckpt_path', os.path.join(version_dir, '0.pth'))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    with open(os.path.join(version_dir, 'results_nusc.json')) as f:
        submission = json.load(f)
    # v1.0-mini has no test split: predict uses the val infos.
    assert set(submission['results']) == val_tokens(synthetic_dataroot)
    assert submission['meta']['use_camera'] is True
    boxes = [box for boxes in submission['results'].values() for box in boxes]
    assert boxes and {'translation', 'size', 'rotation', 'velocity', 'detection_name', 'detection_score',
                      'attribute_name'} <= set(boxes[0])
    assert not os.path.exists(os.path.join(root, 'metrics_summary.json'))  # predict does not evaluate


def test_checkpoint_of_another_architecture_stops_with_one_line(synthetic_dataroot, tmp_path):
    foreign = tmp_path / 'foreign.pth'
    torch.save({'epoch': 0, 'global_step': 1, 'state_dict': {'model.backbone.x': torch.zeros(3)}}, foreign)
    result = run_tiny(synthetic_dataroot, tmp_path, '-e', '--ckpt_path', str(foreign))
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith('error: checkpoint') and 'does not fit MatrixVTTinyExp' in last_line
    assert "unexpected keys ['backbone.x']" in last_line


def _evaluate(dataroot, out_dir, ckpt, *model_flags):
    command = [sys.executable, TINY_EXP, '-e', '--ckpt_path', str(ckpt), '--accelerator', 'cpu', '--data_root',
               str(dataroot), '--version', 'v1.0-mini', '--default_root_dir', str(out_dir), '--num_workers', '0',
               '--progress_bar', 'off', '--eval_batch_size', '2', *model_flags]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    with open(os.path.join(out_dir, 'metrics_summary.json')) as f:
        return json.load(f), result


def test_a_copied_checkpoint_rebuilds_its_model_without_its_flags(synthetic_dataroot, tmp_path):
    """Train with non-default model settings; -e on the EMA .pth copied elsewhere, without those flags, builds the
    same model (no missing key) and prints the same metrics as -e with the flags."""
    import yaml

    root = tmp_path / 'run'
    result = run_tiny(synthetic_dataroot, root, '--head_channels', '16', '-b', '2', '--max_epochs', '1',
                      '--limit_train_batches', '2', '--learning_rate', '1e-5', '--accumulate_grad_batches', '1')
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    version_dir = root / 'lightning_logs' / 'version_0'
    record = yaml.safe_load((version_dir / 'config.yaml').read_text())
    assert record['settings']['head_channels'] == 16 and record['settings']['final_dim'] == [64, 192]
    assert record['trainer'] == {'accumulate_grad_batches': 1}
    ema = torch.load(version_dir / '0.pth', map_location='cpu', weights_only=True)
    assert ema['bevdepth_config']['head_channels'] == 16
    ckpt = torch.load(version_dir / 'checkpoints' / 'last.ckpt', map_location='cpu', weights_only=True)
    assert ckpt['bevdepth_config'] == ema['bevdepth_config']

    copied = tmp_path / 'elsewhere' / 'weights.pth'
    copied.parent.mkdir()
    copied.write_bytes((version_dir / '0.pth').read_bytes())
    without_flags, plain = _evaluate(synthetic_dataroot, tmp_path / 'eval_plain', copied)
    with_flags, _ = _evaluate(synthetic_dataroot, tmp_path / 'eval_flags', copied, '--head_channels', '16',
                              '--final_dim', '64', '192')
    without_flags.pop('eval_time'), with_flags.pop('eval_time')
    assert without_flags == with_flags
    assert 'warning' not in plain.stderr
    # A contradicting model flag: one warning naming both values; the flag wins and the weights do not fit.
    contradicting = run_tiny(synthetic_dataroot, tmp_path / 'eval_bad', '-e', '--ckpt_path', str(copied),
                             '--head_channels', '24')
    assert 'warning: --head_channels 24 given, but' in contradicting.stderr and 'trained with 16' in contradicting.stderr
    assert contradicting.returncode == 1 and 'does not fit MatrixVTTinyExp' in contradicting.stderr


@pytest.mark.parametrize('bev_cell, bev_size', [(1.6, 64), (0.8, 128)])
def test_bev_cell_changes_the_view_transform_grid_not_the_head_grid(bev_cell, bev_size):
    sys.path.insert(0, REPO_ROOT)
    from exps.nuscenes.tiny.matrixvt_tiny_synthetic import MatrixVTTinyExp
    exp = MatrixVTTinyExp(bev_cell=bev_cell)
    assert exp.model.backbone.bev_size == bev_size
    head = exp.model.head.eval()
    with torch.no_grad():
        task_outputs = head(torch.randn(1, exp.backbone_conf['output_channels'], bev_size, bev_size))
    assert task_outputs[0][0]['heatmap'].shape[-2:] == (64, 64)  # the 1.6 m target grid of tiny.head_conf
    with pytest.raises(ValueError, match='--bev_cell must be one of'):
        MatrixVTTinyExp(bev_cell=0.4)
