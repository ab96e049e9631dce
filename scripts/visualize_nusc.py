"""Draw nuScenes samples: the six camera images with projected GT (green) and predicted (class colour) 3D boxes,
and a bird's-eye view with the LiDAR points, boxes and velocity arrows. One PNG per sample.

    python scripts/visualize_nusc.py --data_root data/nuScenes --version v1.0-trainval --split val \
        [--samples <token or index> ...] [--count 5] [--results outputs/<exp>/results_nusc.json] \
        [--score_thr 0.3] --out_dir vis/

--samples takes indices into the split's info file and/or sample tokens; --count N draws the first N samples
(default: 1 when neither is given). Without --results only the GT is drawn. Info files are read from
<data_root>/nuscenes_infos_<split>.pkl unless --info_path is given. Each PNG is written atomically as
<out_dir>/<sample_token>.png. The reference's form ``visualize_nusc.py IDX RESULT_PATH TARGET_PATH`` (one sample
of the val infos under data/nuScenes, one PNG at TARGET_PATH) also works. Aliases: --dataroot, --num-samples,
--out.
"""
import argparse
import os
import sys

# With torch_npu installed but no CANN toolkit, torch's automatic backend import breaks `import torch`.
os.environ.setdefault('TORCH_DEVICE_BACKEND_AUTOLOAD', '0')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bevdepth.datasets.errors import DataError  # noqa: E402
from bevdepth.datasets.nusc_det_dataset import load_infos  # noqa: E402
from bevdepth.evaluators.visualize import load_results, render_sample, select_info, write_png  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('legacy', nargs='*', metavar='IDX RESULT_PATH TARGET_PATH',
                        help='the reference\'s form: sample index, results JSON, output PNG path (optional)')
    parser.add_argument('--data_root', '--dataroot', dest='data_root', default='data/nuScenes',
                        help='nuScenes dataroot (images, LiDAR, infos)')
    parser.add_argument('--version', default='v1.0-trainval',
                        help='nuScenes version the infos were built for (named in error messages)')
    parser.add_argument('--split', default='val', choices=['train', 'val', 'test'])
    parser.add_argument('--info_path', default=None,
                        help='info pickle (default <data_root>/nuscenes_infos_<split>.pkl)')
    parser.add_argument('--samples', '--sample', nargs='+', default=None, metavar='TOKEN_OR_INDEX',
                        help='indices into the split and/or sample tokens')
    parser.add_argument('--count', '--num-samples', dest='count', type=int, default=None,
                        help='draw the first N samples of the split')
    parser.add_argument('--results', default=None, help='results_nusc.json with predicted boxes (global frame)')
    parser.add_argument('--score_thr', type=float, default=0.3, help='minimum detection_score drawn')
    parser.add_argument('--cam_width', type=int, default=640, help='width of each camera tile in pixels')
    parser.add_argument('--bev_range', type=float, default=55.0, help='metres shown around the ego car')
    parser.add_argument('--out_dir', '--out', dest='out_dir', default=None,
                        help='output folder; PNGs are named <sample_token>.png')
    args = parser.parse_args(argv)
    args.target_path = None
    if args.legacy:
        if len(args.legacy) != 3 or not args.legacy[0].isdigit():
            parser.error('the positional form is: visualize_nusc.py IDX RESULT_PATH TARGET_PATH')
        if args.samples or args.count or args.results or args.out_dir:
            parser.error('use either the positional form or --samples/--count/--results/--out_dir')
        args.samples, args.results, args.target_path = [args.legacy[0]], args.legacy[1], args.legacy[2]
    elif args.out_dir is None:
        parser.error('--out_dir is required (or the positional form IDX RESULT_PATH TARGET_PATH)')
    if args.count is not None and args.count < 1:
        parser.error('--count must be >= 1')
    if args.cam_width < 16:
        parser.error('--cam_width must be >= 16 pixels')
    return args


def chosen_infos(infos, samples, count):
    """Info dicts of ``samples`` (indices / tokens), then the first ``count`` samples; 1 sample by default."""
    chosen = [select_info(infos, sample) for sample in samples or []]
    if count is not None:
        chosen.extend(infos[:count])
    if not samples and count is None:
        chosen.append(select_info(infos, 0))
    unique = {}
    for info in chosen:
        unique.setdefault(info['sample_token'], info)
    return list(unique.values())


def run(args):
    from bevdepth.utils.io import check_output_path

    if args.out_dir is not None:
        check_output_path(args.out_dir, '--out_dir', is_dir=True)
    if not os.path.isdir(args.data_root):
        raise FileNotFoundError(f'data_root {args.data_root} does not exist: pass --data_root of a nuScenes '
                                f'dataroot')
    info_path = args.info_path or os.path.join(args.data_root, f'nuscenes_infos_{args.split}.pkl')
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f'info file {info_path} not found: create it with python scripts/gen_info.py '
                                f'(version {args.version}) or pass --info_path')
    infos = [info for _, content in load_infos(info_path) for info in content]
    if not infos:
        raise DataError(f'info file {info_path} holds no sample: regenerate it with python scripts/gen_info.py')
    selected = chosen_infos(infos, args.samples, args.count)
    results = load_results(args.results) if args.results else None
    written = []
    for info in selected:
        token = info['sample_token']
        if results is not None and token not in results:
            print(f'warning: {args.results} has no boxes for sample {token}; drawing GT only')
        image = render_sample(args.data_root, info, results, score_thr=args.score_thr, cam_width=args.cam_width,
                              bev_range=args.bev_range)
        path = args.target_path or os.path.join(args.out_dir, f'{token}.png')
        write_png(path, image)
        print(f'wrote {path} ({image.shape[1]}x{image.shape[0]})')
        written.append(path)
    return written


def main(argv=None):
    from bevdepth.engine.entry_point import run_entry_point

    args = parse_args(argv)
    # ValueError too: a sample index or token that is not in the split is bad input here.
    return run_entry_point(run, args, extra_input_errors=(ValueError,))


if __name__ == '__main__':
    main()
