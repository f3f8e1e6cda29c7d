"""Host-to-device copies that do not make the host wait for the device.

PyTorch ends a ``.to(device)`` of a host tensor made with ``non_blocking=False`` (its default) with a stream
synchronisation, and CUDA stages a copy from pageable (unpinned) memory through a synchronous step: either way the
host waits until every kernel queued before the copy has run, e.g. the previous training step's backward, and can
no longer queue the next kernels ahead of the GPU. A copy from pinned (page-locked) memory with
``non_blocking=True`` is queued like a kernel instead. So the loaders pin their batches on CUDA
(``pin_memory=True``; the engines pass ``non_blocking=True``), the embedding cache keeps pinned entries, and the
inference paths move their host tensors with :func:`to_device`. ``ultrarefiner.utils.sync_counter`` counts any
blocking move that comes back.
"""

from __future__ import annotations

import torch

__all__ = ["pins_for", "to_device"]


def pins_for(device: torch.device | str) -> bool:
    """Whether host tensors bound for ``device`` are pinned first (CUDA: asynchronous copies need pinned memory)."""
    return torch.device(device).type == "cuda"


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` on ``device`` without a host sync: a host tensor is pinned (unless it is already) and copied
    asynchronously on CUDA; a tensor already there is returned as is.

    The source of an asynchronous copy must not be written until the copy has run: the pinned copy made here is
    private, and a tensor pinned by its owner (a DataLoader batch, a cache entry) is never written in place.
    """
    device = torch.device(device)
    if x.device.type == "cpu" and pins_for(device) and not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, non_blocking=True)
