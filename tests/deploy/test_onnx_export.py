"""ONNX export of MatrixVT_Det on onnxruntime: bevdepth.deploy.{onnx_export,onnx_runtime,parity,
experiment_loading} and scripts/export_onnx.py, scripts/infer_onnx.py, on the tiny experiment and the synthetic
dataroot."""
import json
import os
import pathlib
import sys

import numpy as np
import pytest

from bevdepth.models.checkpoints import CheckpointError
import torch

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')

from bevdepth.deploy import (HEAD_NAMES, MATS_INPUT_NAMES, DeployError, build_experiment, dcn_mode,  # noqa: E402
                             calibrate_heatmap_bias, create_session, decode_outputs, export_onnx, load_model_weights,
                             mats_mismatch, randomise_for_parity, read_export_metadata, run_session)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY_EXP = REPO_ROOT / 'exps' / 'nuscenes' / 'tiny' / 'matrixvt_tiny_synthetic.py'
FULL_EXP = REPO_ROOT / 'exps' / 'nuscenes' / 'MatrixVT' / 'matrixvt_bev_depth_lss_r50_256x704_128x128_24e_ema.py'
sys.path.insert(0, str(REPO_ROOT / 'scripts'))

ATOL = 1e-3  # brief: onnxruntime head outputs equal PyTorch's within 1e-3 max abs


# ------------------------------------------------------------------------------------------- tiny MatrixVT
def _flat(preds):
    return [task_preds[0][name] for task_preds in preds for name in HEAD_NAMES]


def _max_diff(onnx_outputs, torch_preds):
    return max(float(np.abs(o - t.numpy()).max()) for o, t in zip(onnx_outputs, _flat(torch_preds)))


@pytest.fixture(scope='module')
def tiny_exported(synthetic_dataroot, tmp_path_factory):
    """scripts/export_onnx.py --random-init on the tiny experiment, baking val sample 0's calibration.

    Returns (graph path, metadata, the script's report)."""
    import export_onnx as export_script

    path = tmp_path_factory.mktemp('onnx') / 'tiny_static.onnx'
    report = export_script.main(['--exp', str(TINY_EXP), '--random-init', '--seed', '0', '--out', str(path),
                                 '--data_root', str(synthetic_dataroot), '--version', 'v1.0-mini', '--sample', '0'])
    return path, report['metadata'], report


@pytest.fixture(scope='module')
def tiny_exp(synthetic_dataroot, tiny_exported):
    """The same model the script exported: same seed, same parity randomisation and bias calibration."""
    from export_onnx import load_sample

    torch.manual_seed(0)
    exp = build_experiment(str(TINY_EXP), data_root=str(synthetic_dataroot), version='v1.0-mini')
    exp.model.eval()
    imgs, mats_dict, _ = load_sample(exp, '0')
    randomise_for_parity(exp.model, seed=0)
    calibrate_heatmap_bias(exp.model, imgs, mats_dict)
    return exp


@pytest.fixture(scope='module')
def tiny_sample(tiny_exp):
    from export_onnx import load_sample

    return load_sample(tiny_exp, '0')


@pytest.fixture(scope='module')
def tiny_torch_preds(tiny_exp, tiny_sample):
    # The static graph is exported with dcn='native' (torchvision's DCN arithmetic), not the CPU default
    # grid_sample decomposition: same arithmetic, so near-tied scores decode in the same order.
    imgs, mats_dict, _ = tiny_sample
    with torch.no_grad(), dcn_mode(tiny_exp.model, 'native'):
        return tiny_exp.model(imgs, mats_dict)


@pytest.fixture(scope='module')
def tiny_static_onnx(tiny_exported):
    return tiny_exported[:2]


def test_export_script_reports_parity(tiny_exported):
    report = tiny_exported[2]
    assert report['max_abs_diff'] < ATOL
    decoded = report['decoded']
    assert decoded['num_boxes'][0] == decoded['num_boxes'][1] > 10 and decoded['same_labels']
    assert decoded['max_box_diff'] < 1e-3 and decoded['max_score_diff'] < 1e-4


def test_static_export_matches_pytorch(tiny_exp, tiny_sample, tiny_torch_preds, tiny_static_onnx):
    path, metadata = tiny_static_onnx
    imgs, mats_dict, _ = tiny_sample
    graph = onnx.load(str(path))
    op_types = {node.op_type for node in graph.graph.node}
    assert 'DeformConv' in op_types
    assert not op_types & {'ScatterElements', 'ScatterND'}  # ring / ray are constants, not built per call
    session = create_session(str(path))
    assert [i.name for i in session.get_inputs()] == ['imgs']
    assert [o.name for o in session.get_outputs()] == metadata['output_names']
    assert metadata['output_names'][:2] == ['task0.reg', 'task0.height'] and len(metadata['output_names']) == 36
    assert read_export_metadata(session)['baked_mats']['bda_mat'] == mats_dict['bda_mat'].tolist()
    outputs = run_session(session, imgs)
    # The script exported its own model (seed 0); tiny_exp rebuilt it the same way, so this also shows that
    # --random-init is deterministic.
    assert _max_diff(outputs, tiny_torch_preds) < ATOL


def test_decoded_onnx_boxes_identical(tiny_exp, tiny_sample, tiny_torch_preds, tiny_static_onnx):
    path, metadata = tiny_static_onnx
    imgs, _, img_metas = tiny_sample
    outputs = run_session(create_session(str(path)), imgs)
    onnx_boxes, onnx_scores, onnx_labels = decode_outputs(tiny_exp.model, outputs, metadata['output_names'],
                                                          img_metas)[0]
    torch_result = tiny_exp.model.get_bboxes(tiny_torch_preds, img_metas)[0][:3]
    torch_boxes, torch_scores, torch_labels = [item.detach().float().numpy() if item.is_floating_point()
                                               else item.numpy() for item in torch_result]
    assert len(torch_scores) > 10  # a non-vacuous comparison
    assert len(onnx_scores) == len(torch_scores)
    np.testing.assert_array_equal(onnx_labels, torch_labels)
    np.testing.assert_allclose(onnx_scores, torch_scores, atol=1e-4)
    np.testing.assert_allclose(onnx_boxes, torch_boxes, atol=1e-3)


def test_dynamic_mats_export_follows_new_calibration(tiny_exp, tiny_sample, tmp_path):
    imgs, mats_dict, _ = tiny_sample
    path = tmp_path / 'tiny_dynamic.onnx'
    metadata = export_onnx(tiny_exp.model, mats_dict, path, dynamic_mats=True, dcn='grid_sample', opset=17)
    assert metadata['baked_mats'] is None and metadata['input_names'] == ['imgs', *MATS_INPUT_NAMES]
    backbone = tiny_exp.model.backbone  # the export left the model as it was
    assert backbone.static_mat is None and backbone.projection == 'auto' and backbone.auto_cache
    assert not tiny_exp.model.training
    op_types = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert 'GridSample' in op_types and 'DeformConv' not in op_types
    assert op_types & {'ScatterElements', 'ScatterND'}  # ring / ray built in the graph
    session = create_session(str(path))
    # Another calibration: BEV rotation + flip (a training-style bda) and a shifted image crop.
    other = {name: value.clone() for name, value in mats_dict.items()}
    angle = torch.tensor(0.4)
    other['bda_mat'][0, :2, :2] = torch.stack([torch.stack([angle.cos(), -angle.sin()]),
                                               torch.stack([angle.sin(), angle.cos()])]) * torch.tensor([[-1.], [1.]])
    other['ida_mats'][..., 0, 3] -= 12.0
    for mats in (mats_dict, other):
        with torch.no_grad():
            expected = tiny_exp.model(imgs, mats)
        assert _max_diff(run_session(session, imgs, mats), expected) < ATOL
    with pytest.raises(ValueError, match='mats_dict'):
        run_session(session, imgs)


def test_baked_graph_rejects_other_calibration(tiny_exp, tiny_static_onnx):
    from infer_onnx import infer_dataset

    path, metadata = tiny_static_onnx
    session = create_session(str(path))
    shifted = json.loads(json.dumps(metadata))
    shifted['baked_mats']['sensor2ego_mats'][0][0][2][0][3] += 0.05  # 5 cm: another vehicle's extrinsics
    with pytest.raises(DeployError, match='--dynamic-mats'):
        infer_dataset(session, shifted, tiny_exp)
    assert mats_mismatch(metadata, {k: torch.tensor(v) for k, v in metadata['baked_mats'].items()}) is None


def test_checkpoint_of_other_architecture_is_rejected(tiny_exp, tmp_path):
    state = {'model.' + key: value for key, value in tiny_exp.model.state_dict().items()}
    key = 'model.head.shared_conv.conv.weight'
    state[key] = torch.zeros(3, 3, 3, 3)
    bad = tmp_path / 'bad.pth'
    torch.save({'state_dict': state}, bad)
    with pytest.raises(CheckpointError, match='does not fit MatrixVT_Det'):
        load_model_weights(tiny_exp.model, str(bad))
    with pytest.raises(CheckpointError, match='does not exist: check --ckpt'):
        load_model_weights(tiny_exp.model, str(tmp_path / 'missing.pth'))


def test_export_keeps_the_structural_settings_of_a_checkpoint(tiny_exp, tmp_path):
    """A checkpoint trained with a non-default model setting exports (and infers) that model without its flags."""
    from bevdepth.configs.settings import CHECKPOINT_KEY
    from bevdepth.deploy import build_experiment_for_checkpoint

    narrow = type(tiny_exp)(head_channels=16, final_dim=[64, 192], data_root='unused', version='v1.0-mini')
    path = tmp_path / 'narrow.pth'
    torch.save({'state_dict': {'model.' + k: v for k, v in narrow.model.state_dict().items()},
                CHECKPOINT_KEY: narrow.config}, path)
    rebuilt = build_experiment_for_checkpoint(str(TINY_EXP), str(path), data_root="unused")
    assert rebuilt.config['head_channels'] == 16 and rebuilt.config['final_dim'] == [64, 192]
    for key, value in narrow.model.state_dict().items():
        assert torch.equal(rebuilt.model.state_dict()[key], value), key


# ------------------------------------------------------------------------------------------- scripts
def test_infer_script_writes_the_pytorch_boxes(tiny_exp, tiny_static_onnx, synthetic_dataroot, tmp_path):
    """scripts/infer_onnx.py over val samples: results_nusc.json holds the boxes of the PyTorch evaluation path
    (the experiment's eval_step + evaluator) for the same model."""
    import infer_onnx as infer_script

    from bevdepth.datasets.nusc_det_dataset import collate_fn

    graph, _ = tiny_static_onnx
    out = tmp_path / 'out' / 'onnx_results.json'
    num_samples = 3
    infer_script.main(['--onnx', str(graph), '--exp', str(TINY_EXP), '--data_root', str(synthetic_dataroot),
                       '--version', 'v1.0-mini', '--out', str(out), '--max-samples', str(num_samples)])
    with open(out) as f:
        onnx_results = json.load(f)['results']
    assert sorted(os.listdir(out.parent)) == ['onnx_results.json']  # no scratch files left behind

    dataset = tiny_exp.build_dataset(tiny_exp.val_info_paths, is_train=False)
    outputs = []
    with torch.no_grad(), dcn_mode(tiny_exp.model, 'native'):  # the arithmetic of the exported graph
        for index in range(num_samples):
            outputs.extend(tiny_exp.eval_step(collate_fn([dataset[index]])))
    torch_path = tiny_exp.evaluator.format_results([o[:3] for o in outputs], [o[3] for o in outputs],
                                                   output_dir=tmp_path / 'torch')
    with open(torch_path) as f:
        torch_results = json.load(f)['results']
    assert set(onnx_results) == set(torch_results) and len(onnx_results) == num_samples
    assert sum(len(v) for v in torch_results.values()) > 10 * num_samples
    for token, torch_boxes in torch_results.items():
        onnx_boxes = onnx_results[token]
        assert [b['detection_name'] for b in onnx_boxes] == [b['detection_name'] for b in torch_boxes]
        for a, b in zip(onnx_boxes, torch_boxes):
            assert np.abs(np.subtract(a['translation'], b['translation'])).max() < 1e-3
            assert abs(a['detection_score'] - b['detection_score']) < 1e-4


def test_scripts_report_bad_input_in_one_line(synthetic_dataroot, tmp_path, capsys):
    import export_onnx as export_script
    import infer_onnx as infer_script

    def one_error_line(main, argv):
        with pytest.raises(SystemExit) as excinfo:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert excinfo.value.code == 1 and '\n' not in err, err
        return err

    assert one_error_line(export_script.main, [
        '--exp', str(TINY_EXP), '--random-init', '--out', str(tmp_path / 'x.onnx'), '--data_root',
        str(synthetic_dataroot), '--version', 'v1.0-mini', '--sample', '999']).startswith(
        'error: --sample 999 is out of range')
    assert not (tmp_path / 'x.onnx').exists()
    err = one_error_line(infer_script.main, ['--onnx', str(tmp_path / 'missing.onnx'), '--exp', str(TINY_EXP)])
    assert err.startswith('error: ONNX model') and 'not found' in err
    assert one_error_line(export_script.main, ['--exp', str(tmp_path / 'nope.py'), '--random-init', '--out',
                                               str(tmp_path / 'x.onnx')]).startswith('error: experiment file')
