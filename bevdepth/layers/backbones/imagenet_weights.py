"""torchvision's ImageNet ResNet weights (``IMAGENET1K_V1``), the files mmcv's ``torchvision://resnetXX`` loads.

The reference R50 experiments initialise the image backbone from ``torchvision://resnet50`` (upstream
``bevdepth/layers/backbones/base_lss_fpn.py``, ``img_backbone_conf['init_cfg']``), which mmcv resolves to
torchvision's original ImageNet file ``resnet50-0676ba61.pth``. torchvision's weights API today defaults to V2
(``resnet50-11ad3fa6.pth``, another training recipe): only the V1 file name is looked up, so a cached V2 file is
never used by mistake.

Files live in torch's hub cache (``$TORCH_HOME/hub/checkpoints``, as torchvision's own downloads): downloaded
once where there is internet (sha256-prefix checked, written to a temporary name and renamed), offline afterwards.
"""
import os
import socket
import time

import torch

DOWNLOAD_TIMEOUT_S = 60  # per network operation (connect / read), not for the whole file


class PretrainedWeightsError(ValueError):
    """ImageNet weights that cannot be found, fetched or loaded into the backbone."""


def _v1_weights(depth):
    """torchvision's ``ResNet<depth>_Weights.IMAGENET1K_V1`` entry."""
    from torchvision import models

    enums = {18: models.ResNet18_Weights, 34: models.ResNet34_Weights, 50: models.ResNet50_Weights,
             101: models.ResNet101_Weights}
    if depth not in enums:
        raise PretrainedWeightsError(f'no torchvision ImageNet weights for ResNet-{depth}: use one of {sorted(enums)} '
                                     f'or --pretrained none / PATH')
    return enums[depth].IMAGENET1K_V1


def weights_url(depth):
    return _v1_weights(depth).url


def weights_file_name(depth):
    """``resnet50-0676ba61.pth`` for depth 50."""
    return os.path.basename(weights_url(depth))


def cache_dir():
    """Where torchvision keeps downloaded weights: ``<torch.hub.get_dir()>/checkpoints``."""
    return os.path.join(torch.hub.get_dir(), 'checkpoints')


def cached_weights_path(depth):
    """Path of the V1 file in the cache (it may not exist yet)."""
    return os.path.join(cache_dir(), weights_file_name(depth))


def missing_weights_message(depth, reason):
    return (f'ImageNet weights {weights_file_name(depth)} are not in {cache_dir()} and could not be downloaded '
            f'({reason}): put that file (from {weights_url(depth)}) into that folder, or pass '
            f'--pretrained PATH (a local copy) or --pretrained none (random init, not the reference recipe)')


def download_weights(depth, timeout_s=DOWNLOAD_TIMEOUT_S):
    """The cached V1 file's path, downloading it first when absent (hash-checked, atomic)."""
    path = cached_weights_path(depth)
    if os.path.isfile(path):
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    hash_prefix = torch.hub.HASH_REGEX.search(os.path.basename(path)).group(1)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        # Writes to a temporary file in the same folder, checks the sha256 prefix, then renames.
        torch.hub.download_url_to_file(weights_url(depth), path, hash_prefix=hash_prefix, progress=False)
    except (OSError, RuntimeError, ValueError) as error:  # URLError / timeout are OSErrors; hash mismatch RuntimeError
        reason = ' '.join(str(error).split()) or type(error).__name__
        raise PretrainedWeightsError(missing_weights_message(depth, reason)) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return path


def wait_for_weights(depth, timeout_s):
    """The cached V1 file's path once another process (local rank 0) has put it there."""
    path = cached_weights_path(depth)
    deadline = time.monotonic() + timeout_s
    while not os.path.isfile(path):
        if time.monotonic() > deadline:
            raise PretrainedWeightsError(missing_weights_message(
                depth, f'local rank 0 did not provide it within {timeout_s:.0f} s'))
        time.sleep(1.0)
    return path


def local_rank():
    """This process's rank on its node (torchrun / Lightning: LOCAL_RANK, SLURM: SLURM_LOCALID), 0 alone."""
    return int(os.environ.get('LOCAL_RANK', os.environ.get('SLURM_LOCALID', '0')))


def obtain_weights(depth, timeout_s=DOWNLOAD_TIMEOUT_S):
    """The cached V1 file's path: local rank 0 downloads it when absent, the other ranks of the node wait for it."""
    path = cached_weights_path(depth)
    if os.path.isfile(path):
        return path
    if local_rank() == 0:
        return download_weights(depth, timeout_s)
    # Rank 0's download: at most a few connect / read timeouts plus the transfer of ~100 MB.
    return wait_for_weights(depth, timeout_s=20 * timeout_s)
