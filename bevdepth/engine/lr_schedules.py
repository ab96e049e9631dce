"""Per-step learning-rate factors (multipliers of the base lr) for schedules the reference did not have.

The reference schedules (MultiStepLR per epoch, constant) are built in ``exps/base_exp.py``; this file holds the
``'cosine'`` schedule used by the tiny CPU demo, where ~1000 optimiser steps make the end of training matter:
a short linear warm-up, then a cosine decay to a small floor, updated every optimiser step.
"""
import math

LR_SCHEDULES = ('multistep', 'constant', 'cosine')

COSINE_WARMUP_FRACTION = 0.05  # of all optimiser steps
COSINE_WARMUP_START = 0.1  # lr factor at step 0
COSINE_FLOOR = 0.01  # lr factor at the last step


def warmup_cosine_factor(step, total_steps, warmup_steps, start=COSINE_WARMUP_START, floor=COSINE_FLOOR):
    """lr factor at optimiser step ``step`` (0-based): ``start`` -> 1 linearly over ``warmup_steps``, then
    ``floor + (1 - floor) (1 + cos(pi p)) / 2`` with p going 0 -> 1 from the end of the warm-up to ``total_steps``
    (and ``floor`` after it, e.g. when a resumed run trains longer)."""
    if step < warmup_steps:
        return start + (1.0 - start) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_warmup_steps(total_steps):
    """Warm-up length of the 'cosine' schedule: COSINE_WARMUP_FRACTION of the run, at least 1 step."""
    return max(1, round(COSINE_WARMUP_FRACTION * total_steps))
