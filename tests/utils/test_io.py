"""Atomic writes: success replaces the file, a failure mid-write keeps the old file and leaves no temp file."""
import json
import os
import pickle
import stat

import pytest

from bevdepth.utils.io import atomic_json_dump, atomic_open, atomic_pickle_dump, atomic_write_bytes


def test_atomic_write_replaces_and_uses_umask_mode(tmp_path):
    path = tmp_path / 'out.json'
    atomic_json_dump({'a': 1}, path)
    atomic_json_dump({'a': 2}, path)
    assert json.loads(path.read_text()) == {'a': 2}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out.json']


def test_failure_mid_write_keeps_the_old_file(tmp_path):
    path = tmp_path / 'data.bin'
    atomic_write_bytes(path, b'good')
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write(b'half')
            raise RuntimeError('killed')
    assert path.read_bytes() == b'good'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['data.bin']


def test_unpicklable_object_keeps_the_old_file(tmp_path):
    path = tmp_path / 'infos.pkl'
    atomic_pickle_dump([1, 2], path)
    with pytest.raises(Exception):
        atomic_pickle_dump(lambda: None, path)
    assert pickle.loads(path.read_bytes()) == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['infos.pkl']
