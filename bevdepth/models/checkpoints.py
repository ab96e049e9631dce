"""Reading checkpoints: the one loader of the command line, the deployment scripts and the accelerator check.

A checkpoint is a Lightning ``.ckpt`` or an EMA ``<epoch>.pth``: a dict with ``state_dict`` (network weights under
``model.``) and, when written by this repository, ``bevdepth_config`` (the run's configuration as plain types, see
bevdepth/configs/settings.py). Reference checkpoints have no configuration; their experiment's defaults apply.
Files are read with ``torch.load(weights_only=True)``: tensors and plain Python only, no code from the file runs.
Every problem raises :class:`CheckpointError` with one line naming the file and the fix.
"""
import os
import zipfile

import torch

from bevdepth.configs.settings import CHECKPOINT_KEY as CONFIG_KEY

NETWORK_PREFIX = 'model.'


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, not a checkpoint, or of another architecture / run."""


def read_checkpoint(path, flag='--ckpt_path'):
    """The checkpoint dict of ``path`` (memory-mapped where the format allows)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path} does not exist: check {flag}')
    if os.path.getsize(path) == 0:
        raise CheckpointError(f'checkpoint {path} is empty (0 bytes): copy or download it again')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # truncated zip, pickle of code objects, not a torch file at all: all bad input
        reason = ' '.join(str(error).split())
        if 'Weights only load failed' in reason or 'Unsupported global' in reason:
            reason = 'it holds Python objects other than tensors and plain values'
        elif zipfile.is_zipfile(path) or 'zip' in reason or 'central directory' in reason:
            reason = 'truncated or corrupt zip archive'
        else:
            reason = reason.split('. ')[0][:160] or type(error).__name__
        raise CheckpointError(f'checkpoint {path} cannot be read ({reason}): it is not a complete Lightning .ckpt / '
                              f'EMA .pth; copy or download it again') from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('state_dict'), dict):
        raise CheckpointError(f"{path} is not a BEVDepth checkpoint: expected a dict with 'state_dict' (a Lightning "
                              f'.ckpt or an EMA <epoch>.pth)')
    return checkpoint


def saved_config(checkpoint):
    """The run configuration stored in ``checkpoint``, or None (a reference checkpoint)."""
    config = checkpoint.get(CONFIG_KEY)
    return dict(config) if isinstance(config, dict) else None


def network_weights(checkpoint):
    """The network's state dict: keys without the LightningModule's ``model.`` prefix (a plain dict is kept)."""
    state_dict = checkpoint['state_dict']
    if any(key.startswith(NETWORK_PREFIX) for key in state_dict):
        return {key[len(NETWORK_PREFIX):]: value for key, value in state_dict.items()
                if key.startswith(NETWORK_PREFIX)}
    return dict(state_dict)


def check_weights_fit(network, weights, path, owner):
    """Raise CheckpointError naming the first missing / unexpected / reshaped keys when ``weights`` do not fit."""
    expected = {name: tuple(value.shape) for name, value in network.state_dict().items()}
    given = {name: tuple(value.shape) for name, value in weights.items()}
    missing = [name for name in expected if name not in given]
    unexpected = [name for name in given if name not in expected]
    wrong_shape = [f'{name} {given[name]} vs {expected[name]}' for name in expected
                   if name in given and given[name] != expected[name]]
    if missing or unexpected or wrong_shape:
        raise CheckpointError(
            f'checkpoint {path} does not fit {owner} (another architecture or config?): {len(missing)} missing keys '
            f'{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}, {len(wrong_shape)} shape '
            f'mismatches (checkpoint vs model) {wrong_shape[:3]}; use the experiment file that trained it')


def load_weights_of(network, checkpoint, path, owner=None):
    """Load the weights of an already read ``checkpoint`` (from ``path``) into ``network`` after checking they fit."""
    weights = network_weights(checkpoint)
    check_weights_fit(network, weights, path, owner or type(network).__name__)
    network.load_state_dict(weights, strict=True)


def load_network_weights(network, path, owner=None, flag='--ckpt_path'):
    """Load the weights of checkpoint ``path`` into ``network`` after checking they fit; returns the checkpoint."""
    checkpoint = read_checkpoint(path, flag)
    load_weights_of(network, checkpoint, path, owner)
    return checkpoint
