"""Experiment files and checkpoints for the deployment scripts: import an ``exps/.../<exp>.py`` by path,
instantiate its experiment, load an EMA ``<epoch>.pth`` or a Lightning ``.ckpt`` into its model."""
import importlib.util
import os
import sys

from bevdepth.deploy.errors import DeployError
from bevdepth.models.checkpoints import load_network_weights, load_weights_of, read_checkpoint, saved_config

__all__ = ['load_experiment_class', 'build_experiment', 'build_experiment_for_checkpoint', 'load_model_weights']


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


def build_experiment(exp_path, data_root=None, version=None, saved_config=None):
    """Instantiate the experiment class of ``exp_path``.

    ``saved_config``: the configuration a checkpoint (or an exported graph) was made with; its structural settings
    rebuild exactly that model (bevdepth/configs/settings.py). data_root / version override the defaults.
    """
    from bevdepth.configs.settings import STRUCTURAL

    exp_class = load_experiment_class(exp_path)
    overrides = {name: value for name, value in (saved_config or {}).items() if name in STRUCTURAL}
    if data_root is not None:
        overrides['data_root'] = data_root
    if version is not None:
        overrides['version'] = version
    return exp_class(**overrides)


def build_experiment_for_checkpoint(exp_path, ckpt_path, data_root=None, version=None):
    """The experiment of ``exp_path`` rebuilt from the configuration saved in ``ckpt_path``, weights loaded."""
    checkpoint = read_checkpoint(ckpt_path, flag='--ckpt')
    exp = build_experiment(exp_path, data_root, version, saved_config=saved_config(checkpoint))
    load_weights_of(exp.model, checkpoint, ckpt_path, type(exp).__name__)
    return exp


def load_model_weights(model, ckpt_path):
    """Load ``model`` (the experiment's ``.model``) from an EMA ``<epoch>.pth`` or a Lightning ``.ckpt`` with the
    one checkpoint loader (bevdepth/models/checkpoints.py): one-line CheckpointError on bad files."""
    load_network_weights(model, ckpt_path, flag='--ckpt')
    return model
