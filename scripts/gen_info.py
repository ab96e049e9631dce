"""nuScenes tables -> BEVDepth info files ``nuscenes_infos_{train,val,test}.pkl`` (upstream gen_info format).

    python scripts/gen_info.py                                   # data/nuScenes: v1.0-trainval (+ v1.0-test if present)
    python scripts/gen_info.py --dataroot data/nuScenes --version v1.0-trainval v1.0-test
    python scripts/gen_info.py --dataroot data/synthetic_nuscenes --version v1.0-mini

v1.0-trainval writes train/val, v1.0-mini writes train/val from mini_train/mini_val, v1.0-test writes test
(without annotations). Files are written atomically into --out-dir (default: the dataroot). Unlike the
reference, sweeps carry their own ego pose and calibration (docs/data.md).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bevdepth.datasets.errors import DataError  # noqa: E402
from bevdepth.datasets.info_builder import VERSIONS, check_dataroot, write_infos  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--dataroot', '--data_root', dest='dataroot', default='data/nuScenes',
                        help='nuScenes dataroot holding the version folders')
    parser.add_argument('--version', nargs='+', default=None, choices=VERSIONS,
                        help='versions to convert (default: v1.0-trainval, plus v1.0-test when that folder exists)')
    parser.add_argument('--out', '--out-dir', '--out_dir', dest='out_dir', default=None,
                        help='where to write the pkl files (default: the dataroot)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    versions = args.version
    if not os.path.isdir(args.dataroot):
        print(f'error: nuScenes dataroot {args.dataroot} does not exist: pass --dataroot of the extracted dataset',
              file=sys.stderr)
        return 1
    if versions is None:
        versions = ['v1.0-trainval']
        if os.path.isdir(os.path.join(args.dataroot, 'v1.0-test')):
            versions.append('v1.0-test')
        else:
            print(f'note: {args.dataroot}/v1.0-test not found, skipping the test split')
    try:
        for version in versions:  # check all first so a bad second version does not fail after a long first one
            check_dataroot(args.dataroot, version)
        if args.out_dir is not None and os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
            raise DataError(f'--out-dir {args.out_dir} exists and is not a folder: pass a folder')
        for version in versions:
            for path in write_infos(args.dataroot, version=version, out_dir=args.out_dir):
                print(f'wrote {path}')
    except DataError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
