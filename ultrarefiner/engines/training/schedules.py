"""Learning-rate schedules stepped once per iteration (MONAI's ``LrScheduleHandler(epoch_level=False)``).

``warmup_schedule`` is phase 3's: a linear warmup from 0, then a cosine decay to 0 or a constant rate, built on
MONAI's ``WarmupCosineSchedule``. At a constant peak rate the end-to-end steps keep moving the converged phase-1
TransUNet away from its optimum; the decay shrinks the later steps, and it is what keeps TransUNet (the ultrarefiner
bundle's README crosses warmup and decay over two seeds on BUSI: the decay +0.083 coarse Dice, the warmup nothing
measurable, kept because it costs nothing).
"""

from __future__ import annotations

import math

import torch
from monai.optimizers import WarmupCosineSchedule

__all__ = ["SCHEDULES", "warmup_schedule"]

SCHEDULES = ("cosine", "constant")


def warmup_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.05,
    schedule: str = "cosine",
) -> WarmupCosineSchedule:
    """Linear warmup over ``warmup_fraction`` of ``total_steps``, then ``schedule``: cosine decay to 0, or constant.

    Every param group keeps its own base rate (phase 3: TransUNet and SAM), scaled by the same factor.

    Arguments:
      optimizer: the optimizer whose groups' ``lr`` is each group's peak rate.
      total_steps: iterations of the whole run (epochs x iterations per epoch).
      warmup_fraction: the share of ``total_steps`` spent warming up, in [0, 1); 0: no warmup. At least one
        warmup step when it is above 0.
      schedule: ``cosine`` (to 0 at ``total_steps``) or ``constant`` (the peak rate after the warmup; with
        ``warmup_fraction`` 0, a constant rate throughout).

    Returns:
      the scheduler; its ``t_total``, ``warmup_steps`` and ``cycles`` are what a resumed run takes from its own
      config (``TrainingCheckpoints``).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if not 0.0 <= float(warmup_fraction) < 1.0:
        raise ValueError(f"lr_warmup_fraction must be in [0, 1), got {warmup_fraction!r}")
    total_steps = int(total_steps)
    if total_steps < 1:
        raise ValueError(f"the schedule needs at least one training iteration, got total_steps={total_steps}")
    warmup = math.ceil(float(warmup_fraction) * total_steps)
    # cycles 0 makes the cosine factor cos(0) = 1: MONAI's schedule then holds the peak rate after the warmup
    return WarmupCosineSchedule(optimizer, warmup_steps=warmup, t_total=total_steps,
                                cycles=0.5 if schedule == "cosine" else 0.0)
