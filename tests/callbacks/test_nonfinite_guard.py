"""Non-finite loss guard: skipped steps leave the weights alone; too many in a row stop the run clearly."""
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from bevdepth.callbacks.ema import EMACallback
from bevdepth.callbacks.nonfinite_guard import NonFiniteLossGuard, SkipOptimizerStepMixin


class PoisonedModule(SkipOptimizerStepMixin, pl.LightningModule):
    """Its loss is NaN at the listed batch indices."""

    def __init__(self, bad_batches, max_bad_steps=20):
        super().__init__()
        self.model = torch.nn.Linear(3, 1)
        self.bad_batches = set(bad_batches)
        self.loss_guard = NonFiniteLossGuard(max_bad_steps)
        self.weights_before = []

    def training_step(self, batch, batch_idx):
        self.weights_before.append(self.model.weight.detach().clone())
        (x,) = batch
        loss = self.model(x).pow(2).mean()
        if batch_idx in self.bad_batches:
            loss = loss * float('nan')
        self.mark_micro_batch(self.loss_guard.should_skip(loss, {'detection_loss': loss, 'depth_loss': 0.5},
                                                          self.global_step))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)


def fit(tmp_path, module, callbacks=(), **trainer_kwargs):
    trainer = pl.Trainer(accelerator='cpu', devices=1, max_epochs=1, default_root_dir=tmp_path, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=5, callbacks=list(callbacks), **trainer_kwargs)
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(12, 3)), batch_size=2))
    return trainer


def test_non_finite_steps_are_skipped_and_named(tmp_path):
    module = PoisonedModule(bad_batches={1, 2})
    ema = EMACallback(save_epoch_weights=False)
    with pytest.warns(UserWarning, match=r'non-finite loss at step 1 .*detection_loss=nan, depth_loss=0.5.*skipped'):
        fit(tmp_path, module, [ema])
    weights = module.weights_before + [module.model.weight.detach()]
    assert torch.equal(weights[1], weights[2]) and torch.equal(weights[2], weights[3])  # no update on 1, 2
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[3], weights[4])
    assert torch.isfinite(module.model.weight).all()
    assert module.loss_guard.total_bad_steps == 2 and module.loss_guard.consecutive_bad_steps == 0
    assert ema.num_averaged == 4  # 6 batches, 2 skipped


def test_too_many_consecutive_bad_steps_stop_the_run(tmp_path):
    module = PoisonedModule(bad_batches={0, 1, 2, 3}, max_bad_steps=3)
    with pytest.raises(RuntimeError, match='non-finite training loss for 3 consecutive steps.*--learning_rate'):
        with pytest.warns(UserWarning):
            fit(tmp_path, module)


def test_guard_counts_and_validates():
    guard = NonFiniteLossGuard(max_bad_steps=2)
    assert not guard.should_skip(torch.tensor(1.0), {}, 0)
    with pytest.warns(UserWarning):
        assert guard.should_skip(torch.tensor(float('inf')), {'x': torch.tensor(float('inf'))}, 1)
    assert not guard.should_skip(torch.tensor(2.0), {}, 2) and guard.consecutive_bad_steps == 0
    with pytest.raises(ValueError, match='max_bad_steps'):
        NonFiniteLossGuard(0)


def test_a_bad_micro_batch_skips_its_whole_accumulated_step(tmp_path):
    """accumulate_grad_batches=2: batch 2 is NaN, so the step of batches 2-3 is skipped, not only batch 3's."""
    module = PoisonedModule(bad_batches={2})
    fit(tmp_path, module, accumulate_grad_batches=2)
    before = module.weights_before  # 6 batches = 3 windows of 2
    assert torch.equal(before[2], before[4])  # weights unchanged across the skipped window
    assert not torch.equal(before[0], before[2]) and torch.isfinite(module.model.weight).all()


def test_a_skipped_fp16_step_lowers_the_grad_scale_as_an_inf_gradient_would(tmp_path):
    """The real fp16 AMP path on CPU: Lightning's MixedPrecision plugin with torch.amp.GradScaler('cpu')."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler('cpu', init_scale=1024.0, growth_interval=1000)
    module = PoisonedModule(bad_batches={1, 3})
    fit(tmp_path, module, plugins=[MixedPrecision('16-mixed', 'cpu', scaler)])
    assert scaler.get_scale() == 1024.0 * 0.5 ** 2  # two skipped steps, two backoffs
    assert torch.isfinite(module.model.weight).all()
