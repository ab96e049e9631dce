"""Run an exported MatrixVT ONNX graph with onnxruntime (CPU) on a split and write results_nusc.json.

    python scripts/infer_onnx.py --onnx matrixvt.onnx \
        --exp exps/nuscenes/MatrixVT/matrixvt_bev_depth_lss_r50_256x704_128x128_24e_ema.py \
        [--data_root data/nuScenes] [--version v1.0-trainval] [--info_path <infos pkl>] \
        [--out results_nusc.json] [--max-samples N] [--eval]

Images come from the experiment's eval-mode dataset (same preprocessing as training / evaluation); the raw
head maps are decoded and circle-NMSed by the experiment's own head (``get_bboxes``, the decoder of
``python exps/... --eval``), and the boxes are written in the nuScenes submission format by the experiment's
``DetNuscEvaluator``. ``--eval`` also scores the file with the official nuScenes devkit (metrics_summary.json
and metrics_details.json are written next to --out).

A graph exported without --dynamic-mats holds the calibration of one sample; every sample's matrices are
checked against it (``--mats-atol``) and a mismatch stops the run with a clear message (docs/deployment.md).
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

# With torch_npu installed but no CANN toolkit, torch's automatic backend import breaks `import torch`.
os.environ.setdefault('TORCH_DEVICE_BACKEND_AUTOLOAD', '0')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bevdepth.deploy.errors import DeployError  # noqa: E402
from bevdepth.deploy import (build_experiment, create_session, decode_outputs, mats_mismatch,  # noqa: E402
                             read_export_metadata, run_session)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--onnx', required=True, help='graph written by scripts/export_onnx.py')
    parser.add_argument('--exp', required=True, help='experiment file the graph was exported from')
    parser.add_argument('--data_root', default=None, help='nuScenes dataroot (default: the experiment\'s)')
    parser.add_argument('--version', default=None, help='nuScenes version (default: the experiment\'s)')
    parser.add_argument('--info_path', default=None,
                        help='info pickle of the samples to run (default: <data_root>/nuscenes_infos_val.pkl)')
    parser.add_argument('--out', default='results_nusc.json', help='results JSON path (written atomically)')
    parser.add_argument('--max-samples', type=int, default=None,
                        help='run only the first N samples (a partial submission cannot be --eval-uated)')
    parser.add_argument('--eval', action='store_true', help='score the results with the nuScenes devkit')
    parser.add_argument('--mats-atol', type=float, default=1e-4,
                        help='largest allowed |sample matrix - baked matrix| for graphs with baked calibration')
    parser.add_argument('--threads', type=int, default=None, help='onnxruntime intra-op threads')
    parser.add_argument('--workers', type=int, default=0, help='dataloader workers for image loading')
    args = parser.parse_args(argv)
    if args.max_samples is not None and args.max_samples < 1:
        parser.error('--max-samples must be >= 1')
    return args


def infer_dataset(session, metadata, exp, mats_atol=1e-4, workers=0, info_path=None, max_samples=None):
    """onnxruntime over the samples of ``info_path`` (default: the experiment's val infos).

    Returns (results: per sample [boxes (n, 9), scores (n,), labels (n,)] numpy, img_metas, latencies (s)).
    """
    import torch
    from torch.utils.data import DataLoader, Subset

    from bevdepth.datasets.nusc_det_dataset import collate_fn

    dataset = exp.build_dataset(info_path or exp.val_info_paths, is_train=False)
    final_dim = list(exp.ida_aug_conf['final_dim'])
    if final_dim != list(metadata['image_size']):
        raise DeployError(f'the graph takes {metadata["image_size"]} images but the experiment produces '
                          f'{final_dim}: pass the experiment file the graph was exported from')
    if max_samples is not None:
        dataset = Subset(dataset, range(min(max_samples, len(dataset))))
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=workers, collate_fn=collate_fn)
    results, img_metas, latencies = [], [], []
    with torch.no_grad():
        for imgs, mats_dict, _, metas in (batch[:4] for batch in loader):
            mismatch = mats_mismatch(metadata, mats_dict, atol=mats_atol)
            if mismatch is not None:
                name, diff = mismatch
                raise DeployError(
                    f'sample {metas[0]["token"]}: {name} differs from the calibration baked into the graph by '
                    f'{diff:.3g} (> --mats-atol {mats_atol}); this graph only serves samples with the same camera '
                    f'calibration - re-export with scripts/export_onnx.py --dynamic-mats')
            start = time.perf_counter()
            outputs = run_session(session, imgs, mats_dict)
            latencies.append(time.perf_counter() - start)
            results.extend(decode_outputs(exp.model, outputs, metadata['output_names'], metas))
            img_metas.extend(metas)
    return results, img_metas, latencies


def write_results(exp, results, img_metas, out_path, run_eval):
    """Write results_nusc.json to ``out_path`` through the experiment's evaluator (+ devkit metrics if run_eval,
    written next to it). The evaluator works in a scratch folder, so no other file of the output folder is
    touched until the finished files are renamed into place. Returns the metrics dict or None."""
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix='.infer_onnx.', dir=out_dir)
    try:
        metrics = None
        if run_eval:
            metrics = exp.evaluator.evaluate(results, img_metas, output_dir=scratch)
            for name in ('metrics_summary.json', 'metrics_details.json'):
                os.replace(os.path.join(scratch, name), os.path.join(out_dir, name))
            metrics['summary_path'] = os.path.join(out_dir, 'metrics_summary.json')
        else:
            exp.evaluator.format_results(results, img_metas, output_dir=scratch)
        os.replace(os.path.join(scratch, 'results_nusc.json'), out_path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if metrics is not None:
        metrics['result_path'] = os.path.abspath(out_path)
    return metrics


def run(args):
    from bevdepth.utils.io import check_output_path

    check_output_path(args.out, '--out')
    session = create_session(args.onnx, num_threads=args.threads)
    metadata = read_export_metadata(session)
    exp = build_experiment(args.exp, args.data_root, args.version, saved_config=metadata.get('settings'))
    exp.model.eval()
    results, img_metas, latencies = infer_dataset(session, metadata, exp, args.mats_atol, args.workers,
                                                  args.info_path, args.max_samples)
    print(f'onnxruntime: {len(latencies)} samples, median {1000 * float(np.median(latencies)):.1f} ms / sample '
          f'(network only; decode and NMS excluded), {sum(len(r[1]) for r in results)} boxes')
    metrics = write_results(exp, results, img_metas, args.out, args.eval)
    print(f'results written to {args.out}')
    if metrics is not None:
        print(f'mAP: {metrics["mAP"]:.4f}  NDS: {metrics["NDS"]:.4f}')
    return metrics


def main(argv=None):
    from bevdepth.engine.entry_point import run_entry_point

    args = parse_args(argv)
    return run_entry_point(run, args, extra_input_errors=(DeployError,))  # one line and status 1 / 2 on bad input


if __name__ == '__main__':
    main()
