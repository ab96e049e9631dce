"""Experiment files and checkpoints for the deployment scripts: import an ``exps/.../<exp>.py`` by path,
instantiate its experiment, load an EMA ``<epoch>.pth`` or a Lightning ``.ckpt`` into its model."""
import importlib.util
import os
import sys

import torch

from bevdepth.deploy.errors import DeployError

__all__ = ['load_experiment_class', 'build_experiment', 'load_model_weights']


def load_experiment_class(exp_path):
    """The LightningModule class defined in an experiment file (exps/.../<exp>.py), imported by path.

    When the file defines several LightningModule subclasses, the most derived one (not a base of another
    class of the file) is taken.
    """
    import pytorch_lightning as pl

    if not os.path.isfile(exp_path):
        raise FileNotFoundError(f'experiment file {exp_path} not found; pass e.g. '
                                f'exps/nuscenes/MatrixVT/matrixvt_bev_depth_lss_r50_256x704_128x128_24e_ema.py')
    module_name = '_bevdepth_exp_' + os.path.splitext(os.path.basename(exp_path))[0]
    spec = importlib.util.spec_from_file_location(module_name, exp_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # pickling / dataclasses inside the file need a registered module
    spec.loader.exec_module(module)
    classes = [obj for obj in vars(module).values()
               if isinstance(obj, type) and issubclass(obj, pl.LightningModule) and obj.__module__ == module_name]
    leaves = [cls for cls in classes if not any(other is not cls and issubclass(other, cls) for other in classes)]
    if len(leaves) != 1:
        names = ', '.join(cls.__name__ for cls in leaves) or 'none'
        raise DeployError(f'experiment file {exp_path} must define exactly one LightningModule experiment class '
                          f'(found: {names})')
    return leaves[0]


def build_experiment(exp_path, data_root=None, version=None):
    """Instantiate the experiment class of ``exp_path`` (data_root / version override its defaults)."""
    exp_class = load_experiment_class(exp_path)
    kwargs = {}
    if data_root is not None:
        kwargs['data_root'] = data_root
    if version is not None:
        kwargs['version'] = version
    return exp_class(**kwargs)


def _read_checkpoint(ckpt_path):
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f'checkpoint {ckpt_path} not found; pass an EMA <epoch>.pth or a Lightning .ckpt')
    try:
        return torch.load(ckpt_path, map_location='cpu', weights_only=True)
    except Exception:
        # Lightning .ckpt files also pickle hyper-parameters and RNG states (numpy objects), which the
        # weights-only unpickler refuses; the user's own checkpoint is trusted input here.
        return torch.load(ckpt_path, map_location='cpu', weights_only=False)


def load_model_weights(model, ckpt_path):
    """Load ``model`` (the experiment's ``.model``) from an EMA ``<epoch>.pth`` ({'state_dict': {'model.<key>'}})
    or a Lightning ``.ckpt``; raise a clear error when the checkpoint belongs to another architecture."""
    checkpoint = _read_checkpoint(ckpt_path)
    state = checkpoint.get('state_dict', checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise DeployError(f'checkpoint {ckpt_path} holds no state_dict (got {type(checkpoint).__name__})')
    if any(key.startswith('model.') for key in state):
        state = {key[len('model.'):]: value for key, value in state.items() if key.startswith('model.')}
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [f'{key} {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}' for key in expected
                   if key in state and tuple(state[key].shape) != tuple(expected[key].shape)]
    if missing or unexpected or wrong_shape:
        details = '; '.join(part for part in (
            f'{len(missing)} missing (e.g. {missing[0]})' if missing else '',
            f'{len(unexpected)} unexpected (e.g. {unexpected[0]})' if unexpected else '',
            f'{len(wrong_shape)} with another shape (e.g. {wrong_shape[0]})' if wrong_shape else '') if part)
        raise DeployError(f'checkpoint {ckpt_path} does not match the experiment\'s architecture: {details}; '
                          f'pass the experiment file the checkpoint was trained with')
    model.load_state_dict(state)
    return model
