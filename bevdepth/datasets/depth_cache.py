"""Per-camera depth GT cache ``<data_root>/depth_gt/<image file name>.bin``.

The layout is the one the Ascend port's ``scripts/gen_depth_gt.py`` writes. Each file holds float32 rows [u, v, depth]
(flattened) of the key-frame LiDAR points visible in that camera, in original-image pixels, exactly
``depth_projection.project_lidar_to_image``. ``write_depth_cache`` fills the cache for every sample of some info
files: resumable (complete files are skipped), atomic (temp + rename, so a killed run never leaves a truncated file
under a final name) and optionally with a process pool.
"""
import os
import pathlib

import numpy as np

from bevdepth.datasets.depth_projection import load_lidar_points, project_lidar_to_image
from bevdepth.datasets.errors import DataError
from bevdepth.datasets.info_files import load_infos
from bevdepth.utils.io import atomic_write_bytes

DEPTH_GT_DIR = 'depth_gt'
ROW_BYTES = 3 * 4  # one float32 row [u, v, depth]


def depth_cache_path(data_root, cam_filename):
    """Cache file of a camera image: ``data_root/depth_gt/<basename of the image>.bin``."""
    return pathlib.Path(data_root) / DEPTH_GT_DIR / (os.path.basename(cam_filename) + '.bin')


def is_complete(path):
    """A cache file exists and holds whole rows (an empty file is a camera without points)."""
    try:
        return os.path.getsize(path) % ROW_BYTES == 0
    except OSError:
        return False


def read_depth_cache(path):
    """float32 (M, 3) [u, v, depth] from a cache file; a clear error when it is missing or truncated."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f'depth cache {path} is missing: run python scripts/gen_depth_gt.py')
    size = os.path.getsize(path)
    if size % ROW_BYTES:
        raise DataError(f'depth cache {path} is corrupt: {size} bytes is not a multiple of 12 (3 float32 per '
                        f'point); delete it and run python scripts/gen_depth_gt.py')
    return np.fromfile(path, dtype=np.float32).reshape(-1, 3)


def _image_size(data_root, cam_info):
    """(W, H) from the info (gen_info stores them), else from the image header."""
    if cam_info.get('width') and cam_info.get('height'):
        return int(cam_info['width']), int(cam_info['height'])
    from PIL import Image

    path = os.path.join(data_root, cam_info['filename'])
    if not os.path.isfile(path):
        raise DataError(f'image {path} does not exist and its info has no width/height: extract the nuScenes '
                        f'camera blobs or regenerate the infos with python scripts/gen_info.py')
    with Image.open(path) as image:
        return image.size


def write_sample_depth(data_root, info, overwrite=False):
    """Write the 6 (all ``cam_infos``) cache files of one info dict; returns (written, skipped)."""
    data_root = os.fspath(data_root)
    targets = [(cam_info, depth_cache_path(data_root, cam_info['filename'])) for cam_info in info['cam_infos'].values()]
    todo = [(cam_info, path) for cam_info, path in targets if overwrite or not is_complete(path)]
    if not todo:
        return 0, len(targets)
    lidar_info = info['lidar_infos']['LIDAR_TOP']
    points = load_lidar_points(os.path.join(data_root, lidar_info['filename']))
    for cam_info, path in todo:
        uvd = project_lidar_to_image(points, lidar_info, cam_info, _image_size(data_root, cam_info))
        atomic_write_bytes(path, np.ascontiguousarray(uvd, dtype=np.float32).tobytes())
    return len(todo), len(targets) - len(todo)


def _worker(args):
    data_root, info, overwrite = args
    return write_sample_depth(data_root, info, overwrite)


def write_depth_cache(data_root, info_paths, workers=1, overwrite=False, progress=True):
    """Write the depth cache of every sample of ``info_paths`` (6 cameras each) under ``data_root/depth_gt``.

    ``workers`` > 1 uses a process pool. Files that already exist complete are skipped unless ``overwrite``.
    Returns ``{'written': n_files, 'skipped': n_files, 'samples': n_samples}``.
    """
    data_root = os.fspath(data_root)
    if not os.path.isdir(data_root):
        raise DataError(f'dataroot {data_root} does not exist: pass --dataroot of the nuScenes dataroot')
    if isinstance(info_paths, (str, os.PathLike)):
        info_paths = [info_paths]
    infos = [info for _, content in load_infos(info_paths) for info in content]
    os.makedirs(os.path.join(data_root, DEPTH_GT_DIR), exist_ok=True)
    tasks = [(data_root, info, overwrite) for info in infos]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(tasks), desc='depth_gt', unit='sample')
    written = skipped = 0
    try:
        if workers > 1 and len(tasks) > 1:
            import multiprocessing

            with multiprocessing.get_context('spawn' if os.name == 'nt' else 'fork').Pool(workers) as pool:
                for done, skip in pool.imap_unordered(_worker, tasks, chunksize=4):
                    written, skipped = written + done, skipped + skip
                    if bar is not None:
                        bar.update(1)
        else:
            for task in tasks:
                done, skip = _worker(task)
                written, skipped = written + done, skipped + skip
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return dict(written=written, skipped=skipped, samples=len(tasks))
