"""Per-step training time, printed as ``step_time=  <seconds>`` (the format of the Ascend port's patched Lightning ``TrainingEpochLoop.advance``).

The Ascend seed patched Lightning's ``training_epoch_loop.py`` to print ``print("step_time= ", t)`` around
``run_training_batch``; ``test/train_performance_8p.sh`` greps ``step_time=\\s*<number>`` from the log and averages
the last 50 values. This callback keeps that exact output without patching Lightning:

- timed region = forward + loss + backward + gradient clipping + optimiser step, i.e. from
  ``on_train_batch_start`` (the batch is already fetched) to ``on_train_batch_end``; data fetching is excluded.
  Put this callback *before* the EMA callback so the EMA update is excluded too, as in the reference;
- unlike the reference, the device is synchronised at both ends (CUDA / NPU kernels run asynchronously, so
  an unsynchronised host clock measures only the kernel launches).
- every rank prints (as in the reference, where all ranks share one log).
"""
import time

from pytorch_lightning.callbacks import Callback

from bevdepth.utils.device_sync import synchronize


def print_flushed(line):
    # One write per line (ranks share the log, so separate writes could interleave), flushed so it reaches a
    # redirected log even if the run is killed.
    print(line, flush=True)


class StepTimeCallback(Callback):
    """Prints ``step_time=  <seconds>`` after every training step (forward + backward + optimiser step)."""

    def __init__(self, printer=print_flushed):
        super().__init__()
        self.printer = printer
        self._start = None
        self.last_step_time = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._start is None:
            return
        synchronize(pl_module.device)
        self.last_step_time = time.perf_counter() - self._start
        self._start = None
        # Same text as the seed's print("step_time= ", t): 'step_time=' + two spaces + the float.
        self.printer(f'step_time=  {self.last_step_time}')
