"""Depth GT cache (Ascend ``gen_depth_gt.py`` layout): naming, agreement with online projection, resume, pool,
atomicity."""
import os
import pickle

import numpy as np
import pytest

from bevdepth.datasets import depth_cache
from bevdepth.datasets.depth_cache import depth_cache_path, read_depth_cache, write_depth_cache
from bevdepth.datasets.depth_projection import load_lidar_points, project_lidar_to_image
from bevdepth.datasets.errors import DataError


def load_infos(root, split):
    with open(root / f'nuscenes_infos_{split}.pkl', 'rb') as f:
        return pickle.load(f)


@pytest.fixture()
def scratch_root(synthetic_dataroot, tmp_path):
    """A dataroot sharing the fixture's samples/ (read only) with its own, empty depth_gt/, and the train infos."""
    (tmp_path / 'samples').symlink_to(synthetic_dataroot / 'samples')
    infos = load_infos(synthetic_dataroot, 'train')[:4]
    with open(tmp_path / 'nuscenes_infos_train.pkl', 'wb') as f:
        pickle.dump(infos, f)
    return tmp_path


def test_cache_path_is_depth_gt_slash_image_basename_dot_bin(tmp_path):
    name = 'n015-2018-07-18-11-07-57+0800__CAM_FRONT__1531883530412470.jpg'
    path = depth_cache_path(tmp_path, f'samples/CAM_FRONT/{name}')
    assert path == tmp_path / 'depth_gt' / f'{name}.bin'


def test_cached_depth_equals_online_projection_exactly(synthetic_dataroot):
    checked = 0
    for split in ('train', 'val'):
        for info in load_infos(synthetic_dataroot, split)[::5]:
            lidar_info = info['lidar_infos']['LIDAR_TOP']
            points = load_lidar_points(synthetic_dataroot / lidar_info['filename'])
            for cam_info in info['cam_infos'].values():
                cached = read_depth_cache(depth_cache_path(synthetic_dataroot, cam_info['filename']))
                online = project_lidar_to_image(points, lidar_info, cam_info, (1600, 900))
                assert cached.dtype == np.float32 and cached.shape[1] == 3
                np.testing.assert_array_equal(cached, online)
                checked += len(cached)
    assert checked > 10000


def test_every_sample_and_camera_of_the_infos_is_cached(synthetic_dataroot):
    for split in ('train', 'val'):
        for info in load_infos(synthetic_dataroot, split):
            for cam_info in info['cam_infos'].values():
                path = depth_cache_path(synthetic_dataroot, cam_info['filename'])
                assert path.stat().st_size % 12 == 0 and path.stat().st_size > 0


def test_resume_skips_complete_files_and_redoes_missing_or_truncated_ones(scratch_root):
    info_path = scratch_root / 'nuscenes_infos_train.pkl'
    first = write_depth_cache(scratch_root, [info_path], workers=1, progress=False)
    assert first == dict(written=24, skipped=0, samples=4)
    files = sorted((scratch_root / 'depth_gt').iterdir())
    assert len(files) == 24
    reference = {path.name: path.read_bytes() for path in files}
    files[0].unlink()
    files[1].write_bytes(reference[files[1].name][:-5])  # a truncated file (not a multiple of 12)
    second = write_depth_cache(scratch_root, str(info_path), workers=1, progress=False)
    assert second == dict(written=2, skipped=22, samples=4)
    assert {path.name: path.read_bytes() for path in (scratch_root / 'depth_gt').iterdir()} == reference
    assert write_depth_cache(scratch_root, [info_path], overwrite=True, progress=False)['written'] == 24


def test_process_pool_writes_the_same_bytes(scratch_root, synthetic_dataroot):
    counts = write_depth_cache(scratch_root, [scratch_root / 'nuscenes_infos_train.pkl'], workers=2, progress=False)
    assert counts == dict(written=24, skipped=0, samples=4)
    for path in (scratch_root / 'depth_gt').iterdir():
        assert path.read_bytes() == (synthetic_dataroot / 'depth_gt' / path.name).read_bytes()


def test_a_crash_mid_sample_leaves_only_complete_files(scratch_root, monkeypatch):
    calls = []
    real_project = depth_cache.project_lidar_to_image

    def crash_on_third_camera(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_project(*args, **kwargs)

    monkeypatch.setattr(depth_cache, 'project_lidar_to_image', crash_on_third_camera)
    with pytest.raises(KeyboardInterrupt):
        write_depth_cache(scratch_root, [scratch_root / 'nuscenes_infos_train.pkl'], workers=1, progress=False)
    names = sorted(os.listdir(scratch_root / 'depth_gt'))
    assert len(names) == 2 and all(name.endswith('.jpg.bin') for name in names)  # no temp files left
    monkeypatch.setattr(depth_cache, 'project_lidar_to_image', real_project)
    counts = write_depth_cache(scratch_root, [scratch_root / 'nuscenes_infos_train.pkl'], progress=False)
    assert counts == dict(written=22, skipped=2, samples=4)


def test_bad_inputs_are_clear_errors(scratch_root, tmp_path):
    with pytest.raises(DataError, match=r'info file .*nuscenes_infos_val\.pkl not found: create it with '
                                        r'python scripts/gen_info\.py'):
        write_depth_cache(scratch_root, [scratch_root / 'nuscenes_infos_val.pkl'], progress=False)
    with pytest.raises(DataError, match=r'dataroot .*nowhere does not exist'):
        write_depth_cache(tmp_path / 'nowhere', [scratch_root / 'nuscenes_infos_train.pkl'], progress=False)
    empty_root = tmp_path / 'no_lidar'
    empty_root.mkdir()
    with pytest.raises(DataError, match=r'LiDAR file .*no_lidar/samples/LIDAR_TOP/.*\.pcd\.bin does not exist'):
        write_depth_cache(empty_root, [scratch_root / 'nuscenes_infos_train.pkl'], progress=False)
    with pytest.raises(DataError, match=r'depth cache .*gone\.bin is missing: run python scripts/gen_depth_gt\.py'):
        read_depth_cache(tmp_path / 'gone.bin')
    (tmp_path / 'cut.bin').write_bytes(b'\0' * 13)
    with pytest.raises(DataError, match=r'cut\.bin is corrupt: 13 bytes is not a multiple of 12'):
        read_depth_cache(tmp_path / 'cut.bin')
