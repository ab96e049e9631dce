"""Shared pytest fixtures.

``synthetic_dataroot`` writes one small synthetic nuScenes dataroot per test session (devkit-loadable,
v1.0-mini) with info files and the depth cache, so data, engine and demo tests share the cost.

``scripts/`` is put on ``sys.path`` (as it is for ``python scripts/x.py``) so tests import the tooling packages
beside the scripts (``benchmarking``, ``synthetic_nuscenes``).
"""
import os
import pathlib
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / 'shared' / 'data'

sys.path.insert(0, str(REPO_ROOT / 'scripts'))

os.environ.setdefault('PYTHONHASHSEED', '0')


@pytest.fixture(scope='session')
def bevdepth_fixture_dir():
    """The real BEVDepth test keyframe (infos.pkl + 6 images); skipped when ../shared/data is absent."""
    path = SHARED_DATA / 'bevdepth_fixture'
    if not path.is_dir():
        pytest.skip('real nuScenes fixture ../shared/data/bevdepth_fixture is not present')
    return path


@pytest.fixture(scope='session')
def real_mini_dataroot():
    """The real v1.0-mini single-keyframe dataroot with LiDAR; skipped when ../shared/data is absent."""
    path = SHARED_DATA / 'nuscenes_mini_scene0061_frame0'
    if not path.is_dir():
        pytest.skip('real nuScenes dataroot ../shared/data/nuscenes_mini_scene0061_frame0 is not present')
    return path


@pytest.fixture(scope='session')
def synthetic_dataroot(tmp_path_factory):
    """A small synthetic v1.0-mini dataroot with nuscenes_infos_{train,val}.pkl and depth_gt/ written."""
    from bevdepth.datasets.depth_cache import write_depth_cache
    from bevdepth.datasets.info_builder import write_infos
    from synthetic_nuscenes.writer import write_synthetic_nuscenes

    root = tmp_path_factory.mktemp('synthetic_nuscenes')
    write_synthetic_nuscenes(root, version='v1.0-mini', seed=0, scenes_per_split=2, samples_per_scene=6)
    write_infos(root, version='v1.0-mini', out_dir=root)
    write_depth_cache(root, info_paths=[root / 'nuscenes_infos_train.pkl', root / 'nuscenes_infos_val.pkl'],
                      workers=1)
    return root


@pytest.fixture
def device_branch(monkeypatch):
    """``bevdepth.ops.device_branch.force_device_branch``, with no forcing from the environment: use it as
    ``with device_branch('cuda'): ...`` to run a CPU tensor through another device's branch."""
    from bevdepth.ops.device_branch import FORCE_ENV, force_device_branch
    monkeypatch.delenv(FORCE_ENV, raising=False)
    return force_device_branch


@pytest.fixture(scope='session')
def real_mini_copy(real_mini_dataroot, tmp_path_factory):
    """The real v1.0-mini frame behind symlinks (../shared stays read-only), with infos and the depth cache."""
    from bevdepth.datasets.depth_cache import write_depth_cache
    from bevdepth.datasets.info_builder import write_infos

    root = tmp_path_factory.mktemp('real_mini')
    for name in ('samples', 'maps', 'v1.0-mini'):
        (root / name).symlink_to(real_mini_dataroot / name, target_is_directory=True)
    write_infos(root, version='v1.0-mini', out_dir=root, progress=False)
    write_depth_cache(root, info_paths=[root / 'nuscenes_infos_train.pkl'], workers=1, progress=False)
    return root
