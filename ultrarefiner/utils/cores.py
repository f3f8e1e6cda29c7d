"""The CPU cores this process may use (its affinity mask, e.g. a job scheduler's share, not the machine's count)."""

from __future__ import annotations

import os

__all__ = ["usable_cores"]


def usable_cores() -> int:
    """Cores in this process's affinity mask (``os.cpu_count()`` where the platform has none), at least 1."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
