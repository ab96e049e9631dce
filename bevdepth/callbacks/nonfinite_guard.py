"""Skip training steps whose loss is NaN / inf, and stop after too many in a row.

The reference has no such guard: one non-finite loss poisons the weights (and, through AdamW's moments, every
later step) and the run continues for hours producing garbage. Here ``training_step`` asks
:class:`NonFiniteLossGuard` whether to skip and stores the answer in ``skipped_optimizer_step``;
:class:`SkipOptimizerStepMixin` then runs forward + backward but no optimiser step (and the EMA callback no
update). Lightning 2 refuses ``training_step`` returning ``None`` under DDP, hence the optimiser-step hook. The
decision is all-reduced, so either every rank skips or none does (a rank-local skip would leave the other
ranks waiting in the gradient all-reduce).
"""
import torch
import torch.distributed as dist
from pytorch_lightning.utilities.rank_zero import rank_zero_warn

from bevdepth.configs.settings import SETTINGS_BY_NAME

DEFAULT_MAX_BAD_STEPS = SETTINGS_BY_NAME['max_bad_steps'].default  # one home: the settings table


def any_rank_true(flag, device):
    """True if ``flag`` is True on any process of the default process group (plain bool when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return bool(flag)
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


class NonFiniteLossGuard:
    """Counts consecutive non-finite losses; raises once ``max_bad_steps`` consecutive steps were skipped.

    Args:
        max_bad_steps: how many consecutive skipped steps are tolerated (``--max_bad_steps``, default 20).
    """

    def __init__(self, max_bad_steps=DEFAULT_MAX_BAD_STEPS):
        if max_bad_steps < 1:
            raise ValueError(f'--max_bad_steps must be >= 1, got {max_bad_steps}')
        self.max_bad_steps = int(max_bad_steps)
        self.consecutive_bad_steps = 0
        self.total_bad_steps = 0

    def should_skip(self, loss, loss_parts, step, device=None):
        """Return True if this step must be skipped (non-finite loss on this or any other rank).

        Args:
            loss: scalar tensor, the total training loss.
            loss_parts: dict name -> scalar tensor or float (named in the warning).
            step: global step index, for the messages.
            device: where to all-reduce the flag (the loss's device by default).
        """
        local_bad = not bool(torch.isfinite(loss.detach()).all())
        bad = any_rank_true(local_bad, loss.device if device is None else device)
        if not bad:
            self.consecutive_bad_steps = 0
            return False
        self.consecutive_bad_steps += 1
        self.total_bad_steps += 1
        parts = ', '.join(f'{name}={_as_float(value):.6g}' for name, value in loss_parts.items())
        where = 'this rank' if local_bad else 'another rank'
        if self.consecutive_bad_steps >= self.max_bad_steps:
            raise RuntimeError(
                f'non-finite training loss for {self.consecutive_bad_steps} consecutive steps (last at step {step}, '
                f'{parts}): training diverged; lower --learning_rate, use --precision 32, or check the data')
        rank_zero_warn(f'non-finite loss at step {step} on {where} ({parts}): step skipped '
                       f'({self.consecutive_bad_steps}/{self.max_bad_steps} consecutive)')
        return True


def _as_float(value):
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().cpu())
    return float(value)


class SkipOptimizerStepMixin:
    """LightningModule mixin: no optimiser step when a micro-batch of the step had a non-finite loss.

    ``training_step`` reports each micro-batch with :meth:`mark_micro_batch`; under ``accumulate_grad_batches`` the
    optimiser step is skipped if any micro-batch of its window was bad (their gradients are in the sum). Forward and
    backward of the last micro-batch run here (Lightning's closure) so the decision is known before stepping;
    gradient clipping and AMP unscaling still happen inside ``optimizer.step`` as usual. Under fp16 AMP a skipped
    step also lowers the GradScaler's scale by its backoff factor, as an inf gradient would have.
    """

    skipped_optimizer_step = False
    _bad_in_window = False

    def mark_micro_batch(self, bad):
        """Record whether this micro-batch's loss was non-finite; returns whether the coming step is skipped."""
        self._bad_in_window = bool(self._bad_in_window or bad)
        self.skipped_optimizer_step = self._bad_in_window
        return self.skipped_optimizer_step

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        loss = optimizer_closure()
        skip, self._bad_in_window = self.skipped_optimizer_step, False
        if skip:
            lower_grad_scale(getattr(getattr(self, '_trainer', None), 'precision_plugin', None))
            return
        optimizer.step(closure=lambda: loss)


def lower_grad_scale(precision_plugin):
    """Multiply the fp16 GradScaler's scale by its backoff factor (no-op without an enabled scaler)."""
    scaler = getattr(precision_plugin, 'scaler', None)
    if scaler is not None and scaler.is_enabled():
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
