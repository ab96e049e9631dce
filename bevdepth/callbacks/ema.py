"""Exponential moving average (EMA) of the model weights, as in the reference (upstream
``bevdepth/callbacks/ema.py`` ``ModelEMA`` / ``EMACallback``).

Reference behaviour reproduced:
- the EMA model is a copy of the LightningModule's ``.model`` taken when fitting starts;
- after every optimiser step the update counter ``u`` grows by one and every floating-point entry of the state
  dict (parameters *and* BatchNorm running_mean / running_var) becomes ``v = d * v + (1 - d) * model_v`` with
  ``d = 0.999 * (1 - exp(-u / 2000))``; integer entries (``num_batches_tracked``) keep the value they had when
  the copy was taken;
- ``u`` starts at ``len(train dataset) * max_epochs`` (the reference presets it so). For a nuScenes run
  (u >= 10^5) the ramp term is below 1e-20, i.e. d is the constant 0.999; on a small dataset (the tiny demo:
  80 samples x 12 epochs) the ramp is still active and d is ~0.4-0.6, which keeps the average close to the
  trained weights -- with a constant 0.999 the EMA of a few hundred steps would still be mostly the random init;
- at the end of every training epoch the EMA weights are written to ``<trainer.log_dir>/<epoch>.pth`` as
  ``{epoch, global_step, state_dict, bevdepth_config}``, weights prefixed ``model.`` (0.pth ... 23.pth for 24 epochs),
  which ``-e --ckpt_path <N>.pth`` evaluates.

Improvements over the reference (results unchanged):
- works on any device and strategy: the module is reached as ``pl_module.model`` (no ``.module.module``), the
  copy stays on the model's device (no ``.cuda()``); under DDP every rank keeps the same average (the weights
  are identical on all ranks after each step) and only global rank 0 writes;
- ``<epoch>.pth`` is written atomically (temp file + rename), with CPU tensors;
- the EMA weights and counter are part of the Lightning checkpoint (``state_dict`` / ``load_state_dict``), so
  ``--resume`` continues the average instead of restarting it (the reference README says EMA runs cannot resume);
- a step skipped by the non-finite-loss guard (no optimiser step) does not update the average.

Why not Lightning 2.6's ``EMAWeightAveraging`` / ``WeightAveraging``? It differs from the reference where it
matters: (1) ``torch.optim.swa_utils.AveragedModel`` *copies* the model at the first update instead of
averaging it into the weights at fit start, and its EMA has a constant decay, not the reference's ramp; (2) with
``use_buffers=True`` it also averages integer buffers (``num_batches_tracked``); (3) it writes no per-epoch
``<epoch>.pth`` files; (4) it swaps the averaged weights into the checkpoint's ``state_dict`` and copies them into
the live model at the end of training, so the Lightning checkpoint no longer holds the trained (non-averaged)
weights the reference keeps.
"""
import copy
import math
import os

import torch
from pytorch_lightning.callbacks import Callback

from bevdepth.configs.settings import CHECKPOINT_KEY, plain
from bevdepth.utils.io import atomic_torch_save

EMA_DECAY = 0.999
EMA_RAMP_UPDATES = 2000  # the reference's ramp constant: d = decay * (1 - exp(-u / 2000))


def ema_decay(updates, decay=EMA_DECAY, ramp_updates=EMA_RAMP_UPDATES):
    """The reference's decay after ``updates`` updates (counter including its preset)."""
    return decay * (1.0 - math.exp(-updates / ramp_updates))


def ema_update_(ema_state, model_state, decay):
    """One reference EMA update in place: floating entries ``v = d * v + (1 - d) * model_v``.

    Args:
        ema_state: state dict (name -> tensor) of the EMA copy; updated in place.
        model_state: state dict of the live model, same keys.
        decay: the decay ``d``.
    """
    with torch.no_grad():
        for name, ema_value in ema_state.items():
            if ema_value.dtype.is_floating_point:
                ema_value.mul_(decay)
                ema_value.add_((1.0 - decay) * model_state[name].detach().to(ema_value.dtype))


class EMACallback(Callback):
    """Keeps an EMA copy of ``pl_module.model`` and saves it as ``<log_dir>/<epoch>.pth`` each epoch.

    Args:
        decay: EMA decay (0.999 in the reference).
        ramp_updates: ramp constant of the decay (2000 in the reference).
        preset_updates: initial value of the update counter; None = the reference's
            ``len(train dataset) * max_epochs``, read when training starts.
        save_epoch_weights: write ``<trainer.log_dir>/<epoch>.pth`` at each epoch end.
    """

    def __init__(self, decay=EMA_DECAY, ramp_updates=EMA_RAMP_UPDATES, preset_updates=None,
                 save_epoch_weights=True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f'EMA decay must be in [0, 1), got {decay}')
        if ramp_updates <= 0:
            raise ValueError(f'EMA ramp_updates must be > 0, got {ramp_updates}')
        self.decay = decay
        self.ramp_updates = ramp_updates
        self.preset_updates = preset_updates
        self.save_epoch_weights = save_epoch_weights
        self.ema_model = None
        self.updates = None  # the reference's counter u (preset + updates); set when training starts
        self.num_averaged = 0  # optimiser steps averaged so far
        self._last_update_step = -1  # trainer.global_step of the latest update
        self._pending_state = None  # loaded from a checkpoint before the EMA copy exists

    @property
    def state_key(self):
        return 'EMACallback'

    def on_fit_start(self, trainer, pl_module):
        # Taken after the strategy moved the model to its device, so the copy lives there too.
        self.ema_model = copy.deepcopy(pl_module.model).eval()
        for param in self.ema_model.parameters():
            param.requires_grad_(False)
        if self._pending_state is not None:
            self._load_ema_state(self._pending_state)
            self._pending_state = None
        else:
            self._last_update_step = trainer.global_step

    def on_train_start(self, trainer, pl_module):
        # The train dataloader exists from here on; a resumed counter (load_state_dict) is kept.
        if self.updates is None:
            if self.preset_updates is not None:
                self.updates = int(self.preset_updates)
            else:
                self.updates = len(trainer.train_dataloader.dataset) * int(trainer.max_epochs)

    def current_decay(self):
        """The decay the next update uses."""
        return ema_decay((self.updates or 0) + 1, self.decay, self.ramp_updates)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # No update without a new optimiser step: under gradient accumulation, or when the module skipped the
        # step because of a non-finite loss (it then sets ``skipped_optimizer_step``).
        if self.ema_model is None or trainer.global_step == self._last_update_step:
            return
        if getattr(pl_module, 'skipped_optimizer_step', False):
            self._last_update_step = trainer.global_step
            return
        decay = self.current_decay()
        ema_update_(self.ema_model.state_dict(), pl_module.model.state_dict(), decay)
        self.updates = (self.updates or 0) + 1
        self.num_averaged += 1
        self._last_update_step = trainer.global_step

    def ema_checkpoint(self, trainer):
        """The reference's ``<epoch>.pth`` content: EMA weights with keys prefixed ``model.``, on CPU."""
        state_dict = {'model.' + name: value.detach().cpu().clone()
                      for name, value in self.ema_model.state_dict().items()}
        checkpoint = {'epoch': trainer.current_epoch, 'global_step': trainer.global_step, 'state_dict': state_dict}
        config = getattr(trainer.lightning_module, 'config', None)
        if config is not None:  # the run's configuration: a copied .pth still knows its model
            checkpoint[CHECKPOINT_KEY] = plain(config)
        return checkpoint

    def on_train_epoch_end(self, trainer, pl_module):
        if not self.save_epoch_weights or self.ema_model is None:
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if trainer.is_global_zero:
            atomic_torch_save(self.ema_checkpoint(trainer), os.path.join(log_dir, f'{trainer.current_epoch}.pth'))

    def state_dict(self):
        state = {'decay': self.decay, 'ramp_updates': self.ramp_updates, 'updates': self.updates,
                 'num_averaged': self.num_averaged, 'last_update_step': self._last_update_step}
        if self.ema_model is not None:
            state['ema_state_dict'] = {name: value.detach().clone()
                                       for name, value in self.ema_model.state_dict().items()}
        elif self._pending_state is not None:
            state['ema_state_dict'] = self._pending_state['ema_state_dict']
        return state

    def load_state_dict(self, state_dict):
        if 'ema_state_dict' not in state_dict:
            return
        self.updates = None if state_dict['updates'] is None else int(state_dict['updates'])
        self.num_averaged = int(state_dict.get('num_averaged', 0))
        self._last_update_step = int(state_dict['last_update_step'])
        if self.ema_model is None:
            self._pending_state = state_dict
        else:
            self._load_ema_state(state_dict)

    def _load_ema_state(self, state_dict):
        self.ema_model.load_state_dict(state_dict['ema_state_dict'], strict=True)
