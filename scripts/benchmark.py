"""Benchmark suite: ring/ray build, view transform (MatrixVT sparse / dense / reference style, LSS), training
step, dataset and depth-GT throughput, each against a reference-style baseline run in the same process. Prints a
table with PASS / FAIL against the project's targets and writes all figures to JSON (docs/performance.md).

    python scripts/benchmark.py --config full --threads 1 --out benchmark_full.json
    python scripts/benchmark.py --config tiny --quick --out /tmp/bench.json      # smoke run, < 1 min
    python scripts/benchmark.py --config full --sections ring_ray view_transform --ring-ray-batches 1 8
"""
import argparse
import os
import sys

# With torch_npu installed but no CANN toolkit, torch's automatic backend import breaks `import torch`.
os.environ.setdefault('TORCH_DEVICE_BACKEND_AUTOLOAD', '0')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bevdepth.utils.threads import set_openmp_env_defaults  # noqa: E402  (imports no torch)

set_openmp_env_defaults()  # measure what the experiments run with: idle OpenMP threads sleep (docs/performance.md)

from benchmarking.suite import SECTIONS, format_table, run_benchmark  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', choices=['full', 'tiny', 'both'], default='full',
                        help='model / input configuration (full: 6 cams 256x704, 16x44 feats, D=112, C=80, '
                             '128x128 BEV; tiny: bevdepth/configs/tiny.py)')
    parser.add_argument('--sections', nargs='+', choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument('--repeats', type=int, default=5, help='timed runs per figure (median reported)')
    parser.add_argument('--quick', action='store_true',
                        help='smoke run: at most 2 repeats, fewer samples (not a measurement)')
    parser.add_argument('--ring-ray-batches', type=int, nargs='+', default=[1, 8], metavar='B',
                        help='batch sizes of the ring / ray build comparison')
    parser.add_argument('--vt-batch', type=int, default=1, help='batch size of the view-transform section')
    parser.add_argument('--train-batch', type=int, default=1, help='batch size of the training-step section')
    parser.add_argument('--samples-per-scene', type=int, default=None,
                        help='key frames of the temporary synthetic dataroot (default 4; 2 with --quick)')
    parser.add_argument('--data_root', default=None,
                        help='dataroot with nuscenes_infos_train.pkl for the data sections (default: a temporary '
                             'synthetic one); its depth_gt/ cache is rewritten')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory subprocesses')
    parser.add_argument('--out', default='benchmark.json', help='JSON output (written atomically)')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch default)')
    parser.add_argument('--contended', action='store_true',
                        help='run beside a competing process the suite starts and stops itself: 1024x1024 float32 '
                             'matrix products with 2 torch threads and default OpenMP settings')
    args = parser.parse_args(argv)
    sizes = [args.repeats, args.vt_batch, args.train_batch] + args.ring_ray_batches
    if args.samples_per_scene is not None:
        sizes.append(args.samples_per_scene - 1)
    if min(sizes) < 1:
        parser.error('--repeats and the batch sizes must be >= 1, --samples-per-scene >= 2')
    if args.data_root is not None and not os.path.isfile(os.path.join(args.data_root, 'nuscenes_infos_train.pkl')):
        parser.error(f'--data_root {args.data_root} has no nuscenes_infos_train.pkl: create it with '
                     f'python scripts/gen_info.py or omit --data_root')
    return args


def main(argv=None):
    from bevdepth.engine.entry_point import run_entry_point
    from bevdepth.utils.io import check_output_path

    args = parse_args(argv)
    run_entry_point(check_output_path, args.out, '--out')  # before minutes of measuring, not after
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    configs = ['tiny', 'full'] if args.config == 'both' else [args.config]
    results = run_benchmark(configs, repeats=args.repeats, quick=args.quick, sections=args.sections,
                            out=args.out, log=lambda msg: print(msg, flush=True),
                            ring_ray_batches=args.ring_ray_batches, vt_batch=args.vt_batch,
                            train_batch=args.train_batch, samples_per_scene=args.samples_per_scene,
                            data_root=args.data_root, measure_memory=not args.no_memory, contended=args.contended)
    print(format_table(results))
    print(f'\nwrote {args.out}')


if __name__ == '__main__':
    main()
