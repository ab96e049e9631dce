"""EMACallback: reference EMA maths (incl. BN buffers), per-epoch .pth export, checkpoint round trip."""
import copy
import math
import os

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from bevdepth.callbacks.ema import EMA_DECAY, EMACallback, ema_decay, ema_update_


class TinyModule(pl.LightningModule):
    """A LightningModule holding its network in ``.model`` (like BEVDepthLightningModel), with BatchNorm."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                         torch.nn.Linear(8, 1))
        self.skipped_optimizer_step = False

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.model(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RecordStates(Callback):
    """Records the live model's state dict at fit start and after every step (runs after the EMA callback)."""

    def __init__(self):
        self.initial = None
        self.after_steps = []

    def on_fit_start(self, trainer, pl_module):
        self.initial = copy.deepcopy(pl_module.model.state_dict())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_steps.append(copy.deepcopy(pl_module.model.state_dict()))


def make_trainer(tmp_path, callbacks, max_epochs=2, **kwargs):
    return pl.Trainer(accelerator='cpu', devices=1, max_epochs=max_epochs, callbacks=callbacks,
                      default_root_dir=tmp_path, logger=pl.loggers.TensorBoardLogger(tmp_path),
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, **kwargs)


def loader(num_samples=24, batch_size=4):
    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(num_samples, 4, generator=generator) * 3 + 1),
                      batch_size=batch_size)


def test_ema_equals_hand_computed_average_including_bn_buffers(tmp_path):
    torch.manual_seed(0)
    module = TinyModule()
    ema, recorder = EMACallback(), RecordStates()
    trainer = make_trainer(tmp_path, [ema, recorder])
    trainer.fit(module, loader())

    # The reference presets the counter to len(dataset) x max_epochs = 24 x 2, then counts every update.
    assert len(recorder.after_steps) == 12 and ema.num_averaged == 12 and ema.updates == 48 + 12
    expected = {name: value.clone().double() for name, value in recorder.initial.items()
                if value.is_floating_point()}
    for step, state in enumerate(recorder.after_steps):
        decay = EMA_DECAY * (1 - math.exp(-(48 + step + 1) / 2000))
        for name, value in expected.items():
            expected[name] = decay * value + (1 - decay) * state[name].double()
    ema_state = ema.ema_model.state_dict()
    assert len(expected) == 8  # 2 Linear x (weight, bias) + BN weight, bias, running_mean, running_var
    for name, value in expected.items():
        assert torch.allclose(ema_state[name].double(), value, rtol=0, atol=1e-6), name
    # BN running statistics moved (the live model's did) and were averaged, not copied.
    assert not torch.equal(ema_state['1.running_mean'], recorder.initial['1.running_mean'])
    assert not torch.allclose(ema_state['1.running_mean'], module.model.state_dict()['1.running_mean'])
    # Integer buffers keep the value of the copy taken at fit start (reference: not updated).
    assert ema_state['1.num_batches_tracked'].item() == recorder.initial['1.num_batches_tracked'].item() == 0
    assert module.model.state_dict()['1.num_batches_tracked'].item() == 12
    assert all(not param.requires_grad for param in ema.ema_model.parameters())


def test_ema_update_formula_matches_reference_in_place():
    ema_state = {'w': torch.tensor([1.0, 2.0]), 'n': torch.tensor(3)}
    model_state = {'w': torch.tensor([3.0, 0.0]), 'n': torch.tensor(10)}
    ema_update_(ema_state, model_state, 0.5)
    assert torch.equal(ema_state['w'], torch.tensor([2.0, 1.0]))
    assert ema_state['n'].item() == 3


def test_epoch_weights_are_saved_with_model_prefix(tmp_path):
    torch.manual_seed(0)
    module = TinyModule()
    ema = EMACallback()
    trainer = make_trainer(tmp_path, [ema])
    trainer.fit(module, loader())
    log_dir = trainer.log_dir
    for epoch, step in ((0, 6), (1, 12)):
        saved = torch.load(os.path.join(log_dir, f'{epoch}.pth'), map_location='cpu', weights_only=True)
        assert saved['epoch'] == epoch and saved['global_step'] == step
        assert set(saved['state_dict']) == {'model.' + name for name in module.model.state_dict()}
    final = torch.load(os.path.join(log_dir, '1.pth'), map_location='cpu', weights_only=True)['state_dict']
    for name, value in ema.ema_model.state_dict().items():
        assert torch.equal(final['model.' + name], value)
    assert not [name for name in os.listdir(log_dir) if name.endswith('.tmp')]


def test_skipped_optimizer_step_does_not_update(tmp_path):
    class SkipAll(TinyModule):
        def on_train_batch_start(self, batch, batch_idx):
            self.skipped_optimizer_step = True

    torch.manual_seed(0)
    module = SkipAll()
    ema = EMACallback(save_epoch_weights=False)
    make_trainer(tmp_path, [ema], max_epochs=1).fit(module, loader())
    assert ema.num_averaged == 0 and ema.updates == 24


def test_ema_state_round_trips_through_lightning_checkpoint(tmp_path):
    torch.manual_seed(0)
    module = TinyModule()
    ema = EMACallback(save_epoch_weights=False)
    trainer = make_trainer(tmp_path, [ema], max_epochs=1)
    trainer.fit(module, loader())
    ckpt_path = tmp_path / 'run.ckpt'
    trainer.save_checkpoint(ckpt_path)
    saved_ema = {name: value.clone() for name, value in ema.ema_model.state_dict().items()}

    # Resume with nothing left to train: the restored EMA must be the saved one, not a fresh copy.
    torch.manual_seed(1)
    resumed_module = TinyModule()
    resumed_ema = EMACallback(save_epoch_weights=False)
    make_trainer(tmp_path, [resumed_ema], max_epochs=1).fit(resumed_module, loader(), ckpt_path=ckpt_path)
    assert resumed_ema.updates == ema.updates == 24 + 6 and resumed_ema.num_averaged == 6
    for name, value in resumed_ema.ema_model.state_dict().items():
        assert torch.equal(value, saved_ema[name]), name
    # The live model got the trained weights, which differ from the EMA ones.
    assert not torch.equal(resumed_module.model[0].weight, resumed_ema.ema_model[0].weight)

    # Training on from the checkpoint continues the average from the saved state.
    continued_ema = EMACallback(save_epoch_weights=False)
    make_trainer(tmp_path, [continued_ema], max_epochs=2).fit(TinyModule(), loader(), ckpt_path=ckpt_path)
    assert continued_ema.num_averaged == 12 and continued_ema.updates == 24 + 12  # preset kept from the first run


def test_decay_ramp_is_constant_for_nuscenes_and_active_for_small_data():
    # nuScenes train (28130 samples) x 24 epochs: exactly the constant 0.999 (as the reference intends).
    assert ema_decay(28130 * 24 + 1) == EMA_DECAY
    # The tiny demo (80 samples x 12 epochs): the ramp keeps the average close to the trained weights.
    assert 0.38 < ema_decay(80 * 12 + 1) < 0.39
    assert ema_decay(0) == 0.0
    ema = EMACallback(preset_updates=100)
    assert ema.current_decay() == pytest.approx(EMA_DECAY * (1 - math.exp(-1 / 2000)))  # counter unset: 0


def test_preset_counter_can_be_given(tmp_path):
    torch.manual_seed(0)
    ema = EMACallback(preset_updates=10 ** 6, save_epoch_weights=False)
    make_trainer(tmp_path, [ema], max_epochs=1).fit(TinyModule(), loader())
    assert ema.updates == 10 ** 6 + 6 and ema.current_decay() == EMA_DECAY


def test_invalid_decay_rejected():
    with pytest.raises(ValueError, match='decay'):
        EMACallback(decay=1.0)
