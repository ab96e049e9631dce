"""Export a trained MatrixVT to ONNX and check it once on onnxruntime.

    python scripts/export_onnx.py --exp exps/nuscenes/MatrixVT/matrixvt_bev_depth_lss_r50_256x704_128x128_24e_ema.py \
        --ckpt outputs/.../23.pth --out matrixvt.onnx [--sample 0 | --sample <sample token>] \
        [--data_root data/nuScenes] [--version v1.0-trainval] [--info_path <val infos pkl>] \
        [--dynamic-mats] [--dcn native|grid_sample] [--benchmark 5]

The camera matrices (and the ring / ray matrices built from them) of the chosen val sample are baked into the
graph unless --dynamic-mats is given (see docs/deployment.md). The script then runs onnxruntime (CPU) on that
sample, prints the largest |ONNX - PyTorch| over all head outputs and whether the decoded boxes (top-k +
circle NMS of the training code) are identical, and with --benchmark the median CPU latencies of both.
"""
import argparse
import os
import sys
import time

import numpy as np

# With torch_npu installed but no CANN toolkit, torch's automatic backend import breaks `import torch`.
os.environ.setdefault('TORCH_DEVICE_BACKEND_AUTOLOAD', '0')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bevdepth.deploy.errors import DeployError  # noqa: E402
from benchmarking.suite import measure_interleaved  # noqa: E402
from bevdepth.configs.settings import STRUCTURAL  # noqa: E402
from bevdepth.deploy import (DCN_MODES, DEFAULT_OPSET, HEAD_NAMES, build_experiment,  # noqa: E402
                             build_experiment_for_checkpoint, calibrate_heatmap_bias, create_session, dcn_mode,
                             decode_outputs, export_onnx, randomise_for_parity, run_session)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--exp', required=True, help='experiment file (exps/.../<exp>.py)')
    parser.add_argument('--ckpt', default=None,
                        help='EMA <epoch>.pth or Lightning .ckpt; omit only with --random-init')
    parser.add_argument('--random-init', action='store_true',
                        help='no checkpoint: seeded random weights with trained-like BN statistics, DCN offsets '
                             'and a heatmap bias giving 200 candidate boxes on the sample (bevdepth.deploy.'
                             'randomise_for_parity / calibrate_heatmap_bias), for parity checks and latency')
    parser.add_argument('--seed', type=int, default=0, help='seed of --random-init')
    parser.add_argument('--out', required=True, help='output .onnx path (written atomically)')
    parser.add_argument('--sample', default='0', help='val sample whose calibration is baked: index or token')
    parser.add_argument('--data_root', default=None, help='nuScenes dataroot (default: the experiment\'s)')
    parser.add_argument('--version', default=None, help='nuScenes version (default: the experiment\'s)')
    parser.add_argument('--info_path', default=None,
                        help='info pickle to take the sample from (default: <data_root>/nuscenes_infos_val.pkl)')
    parser.add_argument('--dynamic-mats', action='store_true',
                        help='camera matrices become graph inputs (ring / ray built inside the graph)')
    parser.add_argument('--dcn', default='native', choices=DCN_MODES,
                        help='native ONNX DeformConv (opset 19) or a GridSample decomposition')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET)
    parser.add_argument('--threads', type=int, default=None,
                        help='intra-op threads of onnxruntime and PyTorch (default: their own defaults)')
    parser.add_argument('--benchmark', type=int, default=0, metavar='RUNS',
                        help='also time RUNS onnxruntime and PyTorch CPU forwards of the sample (after 2 warm-up '
                             'runs each, interleaved) and print the medians')
    args = parser.parse_args(argv)
    if (args.ckpt is None) == (not args.random_init):
        parser.error('pass exactly one of --ckpt <checkpoint> and --random-init')
    return args


def select_sample(dataset, sample):
    """Dataset index of ``sample`` (an integer index or a sample token)."""
    if str(sample).isdigit():
        index = int(sample)
        if index >= len(dataset):
            raise DeployError(f'--sample {index} is out of range: the info file has {len(dataset)} samples')
        return index
    tokens = [info['sample_token'] for info in dataset.infos]
    if sample not in tokens:
        raise DeployError(f'--sample {sample} is neither an index nor a sample token of {dataset.info_paths}')
    return tokens.index(sample)


def load_sample(exp, sample, info_path=None):
    """(imgs (1, 1, N, 3, H, W), mats_dict, img_metas) of one sample through the eval-mode dataset."""
    from bevdepth.datasets.nusc_det_dataset import collate_fn

    dataset = exp.build_dataset(info_path or exp.val_info_paths, is_train=False)
    index = select_sample(dataset, sample)
    imgs, mats_dict, _, img_metas = collate_fn([dataset[index]])[:4]
    return imgs, mats_dict, img_metas


def max_abs_diff(onnx_outputs, torch_preds):
    """Largest |ONNX - PyTorch| over all head maps, and the name of the map where it occurs."""
    torch_outputs = [task_preds[0][name] for task_preds in torch_preds for name in HEAD_NAMES]
    names = [f'task{t}.{name}' for t in range(len(torch_preds)) for name in HEAD_NAMES]
    diffs = [float(np.abs(o - t.detach().numpy()).max()) for o, t in zip(onnx_outputs, torch_outputs)]
    worst = int(np.argmax(diffs))
    return diffs[worst], names[worst]


def compare_decoded(model, onnx_outputs, output_names, torch_preds, img_metas):
    """Decode both with the training code; returns dict(num_boxes, same_labels, max_box_diff, max_score_diff)."""
    onnx_boxes, onnx_scores, onnx_labels = decode_outputs(model, onnx_outputs, output_names, img_metas)[0]
    torch_boxes, torch_scores, torch_labels = (item.detach().float().numpy() if item.is_floating_point()
                                               else item.numpy() for item in model.get_bboxes(torch_preds,
                                                                                              img_metas)[0][:3])
    same_count = len(onnx_scores) == len(torch_scores)
    return dict(
        num_boxes=(len(torch_scores), len(onnx_scores)),
        same_labels=bool(same_count and np.array_equal(onnx_labels, torch_labels)),
        max_box_diff=float(np.abs(onnx_boxes - torch_boxes).max()) if same_count and len(onnx_scores) else None,
        max_score_diff=float(np.abs(onnx_scores - torch_scores).max()) if same_count and len(onnx_scores) else None)


def run(args):
    from bevdepth.utils.io import check_output_path

    check_output_path(args.out, '--out')  # before the minutes of work, not after
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.random_init:
        torch.manual_seed(args.seed)  # the same weights on every run with the same --seed
    if args.ckpt is not None:  # the model the checkpoint's saved configuration describes, without its flags
        exp = build_experiment_for_checkpoint(args.exp, args.ckpt, args.data_root, args.version)
    else:
        exp = build_experiment(args.exp, args.data_root, args.version)
    model = exp.model
    model.eval()
    imgs, mats_dict, img_metas = load_sample(exp, args.sample, args.info_path)
    if args.random_init:
        randomise_for_parity(model, seed=args.seed)
        shift = calibrate_heatmap_bias(model, imgs, mats_dict)
        print(f'random init (seed {args.seed}): trained-like BN statistics, heatmap bias shifted by {shift:.3f} '
              f'so 200 cells of the sample score above the threshold')

    start = time.perf_counter()
    metadata = export_onnx(model, mats_dict, args.out, opset=args.opset, dynamic_mats=args.dynamic_mats,
                           dcn=args.dcn, settings={name: exp.config[name] for name in STRUCTURAL})
    print(f'wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB, opset {metadata["opset"]}, '
          f'dcn={metadata["dcn"]}, dynamic_mats={metadata["dynamic_mats"]}) in {time.perf_counter() - start:.1f} s')

    # The PyTorch side of the parity check runs the DCN arithmetic that was exported (torchvision's kernel for
    # 'native', the grid_sample decomposition otherwise): near-tied scores then decode in the same order.
    with torch.no_grad(), dcn_mode(model, args.dcn):
        torch_preds = model(imgs, mats_dict)
    session = create_session(args.out, num_threads=args.threads)
    onnx_outputs = run_session(session, imgs, mats_dict)
    diff, where = max_abs_diff(onnx_outputs, torch_preds)
    scale = max(float(t.abs().max()) for task in torch_preds for t in task[0].values())
    print(f'onnxruntime vs PyTorch: max abs diff {diff:.3e} (at {where}) over {len(onnx_outputs)} head outputs '
          f'(largest |output| {scale:.3g})')
    decoded = compare_decoded(model, onnx_outputs, metadata['output_names'], torch_preds, img_metas)
    print(f'decoded boxes: PyTorch {decoded["num_boxes"][0]}, ONNX {decoded["num_boxes"][1]}, same labels '
          f'{decoded["same_labels"]}, max |box diff| {decoded["max_box_diff"]}, max |score diff| '
          f'{decoded["max_score_diff"]}')
    latencies = None
    if args.benchmark > 0:
        with torch.no_grad():
            timings = measure_interleaved(dict(onnxruntime=lambda: run_session(session, imgs, mats_dict),
                                               pytorch=lambda: model(imgs, mats_dict)), args.benchmark,
                                          warmup=2)  # PyTorch with its CPU default DCN
            latencies = {name: timing['median_s'] for name, timing in timings.items()}
        print(f'CPU latency per sample (median of {args.benchmark}, torch threads {torch.get_num_threads()}, '
              f'onnxruntime threads {args.threads or "default"}): onnxruntime '
              f'{1000 * latencies["onnxruntime"]:.0f} ms, PyTorch {1000 * latencies["pytorch"]:.0f} ms')
    return dict(max_abs_diff=diff, where=where, decoded=decoded, latencies=latencies, metadata=metadata)


def main(argv=None):
    from bevdepth.engine.entry_point import run_entry_point

    args = parse_args(argv)
    return run_entry_point(run, args, extra_input_errors=(DeployError,))  # one line and status 1 / 2 on bad input


if __name__ == '__main__':
    main()
