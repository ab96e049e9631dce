"""Atomic file output: write to a temporary file in the same folder, then rename over the final name.

A kill at any moment leaves either the old complete file or the new complete file, never a truncated one.
"""
import contextlib
import json
import os
import pickle
import tempfile


def _read_umask():
    umask = os.umask(0)  # the only portable way to read it; done once at import, before any threads exist
    os.umask(umask)
    return umask


# What a plain open() would create; mkstemp alone leaves 0o600.
_FILE_MODE = 0o666 & ~_read_umask()


@contextlib.contextmanager
def atomic_open(path, mode='wb'):
    """Open a temporary sibling of ``path`` for writing; rename it to ``path`` only on success."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        # No fsync: the rename already protects against killed processes, which is what we guard against;
        # an fsync per file would make the depth cache (one file per image) several times slower on disks.
        os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise


def atomic_write_bytes(path, data):
    with atomic_open(path, 'wb') as f:
        f.write(data)


def atomic_pickle_dump(obj, path):
    with atomic_open(path, 'wb') as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


def atomic_json_dump(obj, path, **kwargs):
    with atomic_open(path, 'w') as f:
        json.dump(obj, f, **kwargs)


def atomic_torch_save(obj, path):
    import torch
    with atomic_open(path, 'wb') as f:
        torch.save(obj, f)


class OutputPathError(ValueError):
    """An output path that cannot be written (a file in the way of a folder, a folder in the way of a file)."""


def check_output_path(path, flag, is_dir=False):
    """Fail before any work when ``path`` (a file, or a folder with ``is_dir``) cannot be written; creates nothing.

    Its folder may not exist yet (it is created when writing), but no ancestor may be a file.
    """
    path = os.path.abspath(os.fspath(path))
    if is_dir and os.path.exists(path) and not os.path.isdir(path):
        raise OutputPathError(f'{flag} {path} is a file, not a folder: remove it or pass another {flag}')
    if not is_dir and os.path.isdir(path):
        raise OutputPathError(f'{flag} {path} is a folder: pass a file path')
    folder = path if is_dir else os.path.dirname(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise OutputPathError(f'{flag} {path} cannot be written: {folder} is a file, not a folder; remove it or '
                              f'pass another {flag}')
    if not os.access(folder, os.W_OK):
        raise OutputPathError(f'{flag} {path} cannot be written: no write permission in {folder}')
