"""Host-to-device copies that do not make the host wait for the device.

PyTorch ends a ``.to(device)`` of a host tensor made with ``non_blocking=False`` (its default) with a stream
synchronisation, and CUDA stages a copy from pageable (unpinned) memory through a synchronous step: either way the
host waits until every kernel queued before the copy has run, e.g. the previous training step's backward, and can
no longer queue the next kernels ahead of the GPU. A copy from pinned (page-locked) memory with
``non_blocking=True`` is queued like a kernel instead. So the loaders pin their batches on CUDA
(``pin_memory=True``; the engines pass ``non_blocking=True``), the embedding cache keeps pinned entries, and the
inference paths move their host tensors with :func:`to_device`. ``ultrarefiner.utils.sync_counter`` counts any
blocking move that comes back.

The other way, a device-to-host copy always makes the host wait for the copy, so inference brings a batch's outputs
back in one copy (:func:`to_host`), not one per image (their sizes differ, so they cannot be one stacked tensor).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ultrarefiner.utils.grouping import index_groups

__all__ = ["pins_for", "to_device", "to_host"]


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


def to_host(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """``tensors`` (any shapes, e.g. a batch's maps at each image's own size) as numpy arrays, with one
    device-to-host copy per dtype instead of one per tensor: on a GPU one host sync for the batch.

    Each dtype's tensors are flattened into one buffer on their device, copied, and split on the host; the arrays
    are views of that buffer (disjoint, writable), in ``tensors`` order and shapes. numpy has no bfloat16: convert
    such tensors first.
    """
    out: list[np.ndarray] = [np.empty(0)] * len(tensors)
    for idx in index_groups(t.dtype for t in tensors).values():
        parts = [tensors[i].detach().reshape(-1) for i in idx]
        flat = torch.cat(parts) if len(parts) > 1 else parts[0]
        host = flat.cpu().numpy()
        bounds = np.cumsum([p.numel() for p in parts])[:-1]
        for i, piece in zip(idx, np.split(host, bounds), strict=True):
            out[i] = piece.reshape(tuple(tensors[i].shape))
    return out
