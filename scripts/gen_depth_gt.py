"""LiDAR -> per-camera depth GT cache ``<dataroot>/depth_gt/<image file name>.bin`` (float32 rows u, v, depth).

    python scripts/gen_depth_gt.py                                   # data/nuScenes, train split, 8 workers
    python scripts/gen_depth_gt.py --dataroot data/nuScenes --workers 16 --splits train val

Reads ``<dataroot>/nuscenes_infos_<split>.pkl`` (python scripts/gen_info.py). Resumable: complete files are
skipped, so an interrupted run can simply be restarted; each file is written to a temporary name and renamed.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bevdepth.datasets.depth_cache import write_depth_cache  # noqa: E402
from bevdepth.datasets.errors import DataError  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--dataroot', '--data_root', dest='dataroot', default='data/nuScenes',
                        help='nuScenes dataroot holding the info pkl files and the LiDAR blobs')
    parser.add_argument('--workers', type=int, default=8, help='worker processes (1 = no pool)')
    parser.add_argument('--splits', nargs='+', default=['train'], choices=['train', 'val', 'test'],
                        help='info files to cover (default train, as the reference; val is optional)')
    parser.add_argument('--overwrite', action='store_true', help='rewrite files that already exist')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.workers < 1:
            raise DataError(f'--workers must be >= 1, got {args.workers}')
        if not os.path.isdir(args.dataroot):
            raise DataError(f'dataroot {args.dataroot} does not exist: pass --dataroot of the nuScenes dataroot')
        info_paths = [os.path.join(args.dataroot, f'nuscenes_infos_{split}.pkl') for split in args.splits]
        for path in info_paths:
            if not os.path.isfile(path):
                raise DataError(f'info file {path} does not exist: create it with python scripts/gen_info.py '
                                f'--dataroot {args.dataroot}')
        counts = write_depth_cache(args.dataroot, info_paths, workers=args.workers, overwrite=args.overwrite)
    except DataError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    print(f'depth_gt: {counts["samples"]} samples, {counts["written"]} files written, '
          f'{counts["skipped"]} already complete')
    return 0


if __name__ == '__main__':
    sys.exit(main())
