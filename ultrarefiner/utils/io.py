"""Atomic file writes: a reader never sees a half-written file, and a crash never destroys an old one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def _default_file_mode() -> int:
    mask = os.umask(0)  # the only way to read the umask; done once at import, os.umask is process-wide
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _default_file_mode()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it over ``path``.

    The rename is atomic on POSIX and Windows when both live on the same file system, which is why the
    temporary file is created in the destination folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)  # mkstemp creates 0600; outputs get the usual mode, as open() would give
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Atomically write ``obj`` as JSON (UTF-8, keys in insertion order)."""

    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, ensure_ascii=False)
            f.write("\n")

    return atomic_write(path, _write)


def write_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Atomically write a uint8 array (H, W) or (H, W, 3|4) as a PNG."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"write_png expects uint8, got {array.dtype} for {path}")
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
