"""StepTimeCallback: the seed's ``step_time=  <seconds>`` line once per training step."""
import re

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from bevdepth.callbacks.ema import EMACallback
from bevdepth.callbacks.step_time import StepTimeCallback


class SlowModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.model(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(tmp_path, callbacks, steps=5):
    trainer = pl.Trainer(accelerator='cpu', devices=1, max_epochs=1, callbacks=callbacks, default_root_dir=tmp_path,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    trainer.fit(SlowModule(), DataLoader(TensorDataset(torch.randn(steps * 2, 4)), batch_size=2))


def test_prints_seed_format_once_per_step(tmp_path, capsys):
    fit(tmp_path, [StepTimeCallback()])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('step_time=')]
    assert len(lines) == 5
    for line in lines:
        # print("step_time= ", t): two spaces, then a float; the launch scripts grep step_time=\s*<number>.
        match = re.fullmatch(r'step_time=  (\d+\.\d+(e-\d+)?)', line)
        assert match, line
        assert 0 < float(match.group(1)) < 10


def test_timed_region_excludes_callbacks_after_it(tmp_path):
    seen = []
    timer = StepTimeCallback(printer=lambda line: seen.append(float(line.split()[-1])))

    class Sleeper(EMACallback):  # stands for a slow EMA update running after the timer
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            import time
            time.sleep(0.2)

    fit(tmp_path, [timer, Sleeper(save_epoch_weights=False)], steps=3)
    assert len(seen) == 3 and max(seen) < 0.2
