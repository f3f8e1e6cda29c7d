"""The package's one mixed-precision decision.

Every autocast in ``ultrarefiner`` (training and evaluation steps, predictors, the network's cached encoder) goes
through :func:`autocast`, so the rule lives here once: bfloat16 on CUDA when asked, float32 elsewhere. bfloat16 has
float32's exponent range, so no loss scaling (``GradScaler``) is needed. CPU bfloat16 is only taken where a caller
opts in explicitly (``cpu=True``: the bf16 encoder of fast inference). Training steps stay float32 on the CPU: where
bf16 is emulated it is slower than float32, and where it is native (avx512_bf16) a phase-2 step under CPU autocast
(LiteMedSAM decoder, cached embeddings, batch 8, 2 cores) ran 1.2-1.3x faster but learned worse: on two phantom
sets of 16 batches, from the same first loss, its mean loss over the last 8 steps was 0.31 and 0.32, float32's 0.20
and 0.22. On CUDA, bf16 phase-2 training reached float32's validation Dice (bundles/sam_refiner/docs/README.md).
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast", "check_amp_dtype", "float32_region"]


def _device_type(device: torch.device | str | None) -> str:
    return torch.device(device).type if device is not None else "cpu"


def check_amp_dtype(dtype: torch.dtype) -> torch.dtype:
    """Refuse an autocast dtype other than bfloat16 (float16 would need a GradScaler, which no step has)."""
    if dtype != torch.bfloat16:
        raise ValueError(f"amp_dtype must be torch.bfloat16 (no GradScaler here), got {dtype}")
    return dtype


def autocast(device: torch.device | str | None, enabled: bool = True, dtype: torch.dtype = torch.bfloat16,
             cpu: bool = False) -> contextlib.AbstractContextManager:
    """Autocast for work on ``device``: ``dtype`` (bfloat16) autocast on CUDA when ``enabled``, otherwise nothing
    (an enclosing autocast stays in force).

    Arguments:
      device: where the autocast region's tensors live (None: the CPU).
      enabled: the caller's ``amp`` setting.
      dtype: autocast dtype.
      cpu: also autocast on the CPU (an explicit opt-in, not a default).
    """
    kind = _device_type(device)
    if enabled and (kind == "cuda" or (cpu and kind == "cpu")):
        return torch.autocast(kind, dtype=dtype)
    return contextlib.nullcontext()


def float32_region(device: torch.device | str | None) -> contextlib.AbstractContextManager:
    """Suspend an enclosing autocast on ``device`` (losses, reductions and cache look-ups stay in float32)."""
    return torch.autocast(_device_type(device), enabled=False)
