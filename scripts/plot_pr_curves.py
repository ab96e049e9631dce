"""Draw the nuScenes devkit's precision-recall and TP-error curves for a results file.

    python scripts/plot_pr_curves.py --results outputs/<run>/results_nusc.json --data_root DIR --version v1.0-mini \
        --out_dir outputs/<run>/pr_curves

Runs the official ``DetectionEval`` (detection_cvpr_2019) with ``render_curves=True`` in a scratch folder and moves
its plots/ PNGs to ``--out_dir``: one summary plot, one PR curve per class, one TP-error plot per class / per metric.
"""
import argparse
import os
import shutil
import sys
import tempfile

os.environ.setdefault('MPLBACKEND', 'Agg')  # headless


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--results', required=True, help='results_nusc.json (global frame, devkit format)')
    parser.add_argument('--data_root', '--dataroot', dest='data_root', default='data/nuScenes')
    parser.add_argument('--version', default='v1.0-trainval', choices=['v1.0-trainval', 'v1.0-mini'])
    parser.add_argument('--out_dir', '--out', dest='out_dir', required=True, help='folder for the PNGs')
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bevdepth.evaluators.visualize import load_results

    from bevdepth.engine.entry_point import run_entry_point

    # The same checks (missing, not JSON, not a results file) and messages as scripts/visualize_nusc.py.
    from bevdepth.utils.io import check_output_path

    run_entry_point(load_results, args.results)
    run_entry_point(check_output_path, args.out_dir, '--out_dir', True)
    if not os.path.isdir(os.path.join(args.data_root, args.version)):
        sys.exit(f"error: nuScenes tables '{args.version}' not found under {args.data_root}: pass --data_root "
                 f'and the matching --version')

    from nuscenes import NuScenes
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval

    eval_set = 'mini_val' if args.version == 'v1.0-mini' else 'val'
    nusc = NuScenes(version=args.version, dataroot=args.data_root, verbose=False)
    os.makedirs(args.out_dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix='.pr_curves.', dir=args.out_dir)
    try:
        evaluator = DetectionEval(nusc, config=config_factory('detection_cvpr_2019'), result_path=args.results,
                                  eval_set=eval_set, output_dir=scratch, verbose=False)
        evaluator.main(plot_examples=0, render_curves=True)
        plots = os.path.join(scratch, 'plots')
        names = sorted(name for name in os.listdir(plots) if name.endswith('.pdf') or name.endswith('.png'))
        for name in names:
            os.replace(os.path.join(plots, name), os.path.join(args.out_dir, name))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f'wrote {len(names)} devkit plots to {args.out_dir}')


if __name__ == '__main__':
    main()
