"""Info pickles written by scripts/gen_info.py: read and checked in one place, with one-line errors naming the fix."""
import os
import pickle

from bevdepth.datasets.errors import DataError


def load_infos(info_paths):
    """Read and concatenate reference-format info pickles (lists of per-sample dicts)."""
    if isinstance(info_paths, (str, os.PathLike)):
        info_paths = [info_paths]
    infos = []
    for path in info_paths:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise DataError(f'info file {path} not found: create it with python scripts/gen_info.py '
                            f'(or pass the right info path)')
        try:
            with open(path, 'rb') as f:
                content = pickle.load(f)
        except Exception as err:  # any unpickling failure means the file is not usable
            raise DataError(f'info file {path} is not a readable info pickle ({type(err).__name__}: '
                            f'{err}): regenerate it with python scripts/gen_info.py') from err
        if isinstance(content, dict) and 'infos' in content:
            raise DataError(f'info file {path} is in the mmdetection3d format, not the BEVDepth one: '
                            f'create it with python scripts/gen_info.py')
        if not isinstance(content, list) or not all(isinstance(i, dict) and 'cam_infos' in i for i in content):
            raise DataError(f'info file {path} is not a list of BEVDepth sample infos: '
                            f'regenerate it with python scripts/gen_info.py')
        infos.append((path, content))
    return infos
