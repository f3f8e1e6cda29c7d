"""MONAI image writers (``SaveImaged(writer=...)``) that write each file atomically, optionally on writer threads.

A crash or a full disk never leaves a half-written mask where a finished one was expected (``utils.io.atomic_write``:
a temporary file next to the destination, then a rename). With a ``BackgroundWrites`` the encoding runs on its
threads while the caller predicts the next batch: ``functools.partial(AtomicPILWriter, writes=...)``; whoever waits
on ``writes`` (the ultrarefiner bundle's ``PredictionReport``) makes sure the files are on disk.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monai.data.image_writer import NibabelWriter, PILWriter

from ultrarefiner.utils.background_writes import BackgroundWrites
from ultrarefiner.utils.io import atomic_write

__all__ = ["AtomicNibabelWriter", "AtomicPILWriter", "write_atomically"]


def write_atomically(write: Callable[[str], None], filename: str | os.PathLike) -> None:
    """``write(path)`` through ``utils.io.atomic_write``: a temporary file next to ``filename``, then a rename (no
    half-written file; a failed write names ``filename``). The temporary file keeps the suffix (``.png``,
    ``.nii.gz``) from which the MONAI writers pick the format."""
    suffix = ".nii.gz" if str(filename).endswith(".nii.gz") else Path(filename).suffix

    def to_tmp(tmp: str) -> None:
        named = tmp + suffix
        try:
            write(named)
            os.replace(named, tmp)
        finally:
            if os.path.exists(named):
                os.remove(named)

    atomic_write(filename, to_tmp)


class AtomicPILWriter(PILWriter):
    def __init__(self, writes: BackgroundWrites | None = None, **kwargs: Any) -> None:
        """MONAI's ``PILWriter`` (``SaveImaged``'s PNG writer) writing each file atomically; on a thread of
        ``writes`` when given (``SaveImaged(writer=functools.partial(AtomicPILWriter, writes=...))``), where the
        encoding no longer holds up the next batch. ``kwargs``: ``PILWriter``'s."""
        super().__init__(**kwargs)
        self.writes = writes

    def write(self, filename: str | os.PathLike, verbose: bool = False, **kwargs: Any) -> None:
        _write_in(self.writes, lambda path: PILWriter.write(self, path, verbose=verbose, **kwargs), filename)


class AtomicNibabelWriter(NibabelWriter):
    def __init__(self, writes: BackgroundWrites | None = None, **kwargs: Any) -> None:
        """MONAI's ``NibabelWriter`` (``SaveImaged``'s NIfTI writer) writing each file atomically, on a thread of
        ``writes`` when given (as ``AtomicPILWriter``). ``kwargs``: ``NibabelWriter``'s."""
        super().__init__(**kwargs)
        self.writes = writes

    def write(self, filename: str | os.PathLike, verbose: bool = False, **kwargs: Any) -> None:
        _write_in(self.writes, lambda path: NibabelWriter.write(self, path, verbose=verbose, **kwargs), filename)


def _write_in(writes: BackgroundWrites | None, write: Callable[[str], None], filename: str | os.PathLike) -> None:
    if writes is None:
        write_atomically(write, filename)
    else:  # the writer object is made per file by SaveImage and not touched again: the thread may own it
        writes.submit(write_atomically, write, filename)
