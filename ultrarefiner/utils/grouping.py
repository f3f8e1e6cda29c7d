"""Batches of mixed image sizes: which rows share a key (a size, a frame shape), and those rows of a tensor."""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import torch

__all__ = ["index_groups", "take_rows"]


def index_groups(keys: Iterable[Hashable]) -> dict[Hashable, list[int]]:
    """The positions of each distinct key, keys in first-seen order, positions ascending."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def take_rows(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """``x[idx]``; a single row as a view (no gather kernel for the common one-image group)."""
    return x[idx[0] : idx[0] + 1] if len(idx) == 1 else x[idx]
