"""Write a small synthetic nuScenes dataroot (v1.0-mini, mini scene names) that the unmodified devkit loads.

    python scripts/make_synthetic_nuscenes.py --dataroot data/synthetic_nuscenes [--seed 0] \
        [--scenes-per-split 8] [--samples-per-scene 10] [--overwrite] [--workers N]
    python scripts/gen_info.py --dataroot data/synthetic_nuscenes --version v1.0-mini
    python scripts/gen_depth_gt.py --dataroot data/synthetic_nuscenes --splits train val

The dataroot is written to a temporary sibling folder and renamed, so an interrupted run leaves nothing
half-written under --dataroot. A non-empty --dataroot is only replaced if it is a previous synthetic root,
or with --overwrite.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bevdepth.datasets.errors import DataError  # noqa: E402
from bevdepth.utils.io import OutputPathError, check_output_path  # noqa: E402
from synthetic_nuscenes.writer import SUPPORTED_VERSION, write_synthetic_nuscenes  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--dataroot', '--data_root', dest='dataroot', required=True,
                        help='output folder (created; must be empty, new or a previous synthetic root)')
    parser.add_argument('--version', default=SUPPORTED_VERSION, help='only v1.0-mini is supported')
    parser.add_argument('--seed', type=int, default=0, help='same seed -> same bytes')
    parser.add_argument('--scenes-per-split', type=int, default=8,
                        help='mini_train scenes (max 8); mini_val gets min(N, 2)')
    parser.add_argument('--samples-per-scene', type=int, default=10, help='key frames per scene (2 Hz, >= 2)')
    parser.add_argument('--objects-per-scene', type=int, default=24, help='boxes per scene (>= 10 recommended)')
    parser.add_argument('--no-sweeps', action='store_true', help='write key frames only (no sweeps/)')
    parser.add_argument('--overwrite', action='store_true', help='replace a non-empty folder that is not synthetic')
    parser.add_argument('--workers', type=int, default=min(4, os.cpu_count() or 1),
                        help='scenes rendered at a time, in separate processes (the output does not depend on it; '
                             'default: the CPU count, at most 4)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        check_output_path(args.dataroot, '--dataroot', is_dir=True)
        summary = write_synthetic_nuscenes(args.dataroot, version=args.version, seed=args.seed,
                                           scenes_per_split=args.scenes_per_split,
                                           samples_per_scene=args.samples_per_scene,
                                           objects_per_scene=args.objects_per_scene, with_sweeps=not args.no_sweeps,
                                           overwrite=args.overwrite, progress=True, workers=args.workers)
    except (DataError, OutputPathError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    print(f'wrote {summary["root"]}: {len(summary["scenes"])} scenes, {summary["num_samples"]} samples, '
          f'{summary["num_sample_data"]} sample_data, {summary["num_annotations"]} annotations in '
          f'{summary["seconds"]:.1f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
