"""Atomic file writes (a reader never sees a half-written file, and a crash never destroys an old one), and the one
reader of torch files."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ultrarefiner.errors import BadInputError


def _default_file_mode() -> int:
    mask = os.umask(0)  # the only way to read the umask; done once at import, os.umask is process-wide
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _default_file_mode()
DIR_MODE = FILE_MODE | ((FILE_MODE & 0o444) >> 2)  # rw for whom the umask allows, plus x where r: 0644 -> 0755


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it over ``path``.

    The rename is atomic on POSIX and Windows when both live on the same file system, which is why the
    temporary file is created in the destination folder.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, FILE_MODE)  # mkstemp creates 0600; outputs get the usual mode, as open() would give
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno is not None and _about(e.filename, path):
            # name the file the user asked for, not our temporary one (PIL/torch often give no name at all)
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e  # errno picks the subclass
        raise
    return path


def _about(filename: object, path: Path) -> bool:
    """Whether an error's file name is unset or concerns writing ``path``: the temporary file next to it, or a
    folder above it that could not be created."""
    if filename is None:
        return True
    name = Path(os.fsdecode(filename)) if isinstance(filename, str | bytes | os.PathLike) else None
    return name is not None and (name.parent == path.parent or name in path.parents)


def remove_stale_temporaries(folder: str | os.PathLike, pattern: str = ".*.tmp") -> int:
    """Delete the temporary files that a killed ``atomic_write`` left in ``folder``; returns how many.

    Call it at the start of a command that owns ``folder``: the files are never read, and the outputs they were
    meant to replace are still whole.
    """
    folder = Path(folder)
    n = 0
    for stale in folder.glob(pattern) if folder.is_dir() else []:
        if stale.is_file():
            stale.unlink(missing_ok=True)
            n += 1
    return n


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Atomically write ``obj`` as JSON (UTF-8, keys in insertion order)."""

    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, ensure_ascii=False)
            f.write("\n")

    return atomic_write(path, _write)


# zlib level of the overlay pictures written per image by predict, refine and the evaluations: on BUSI overlays level
# 1 encodes 3.8x faster than PIL's default (6) for 18% more bytes (benchmarks/bench_output_writing.py); masks, which
# compress well either way, keep the default
PICTURE_PNG_LEVEL = 1


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
              extrasaction: str = "raise") -> Path:
    """Atomically write ``rows`` as CSV; columns: the given ones, else every key in order of first appearance
    (a row lacking one leaves it empty). ``extrasaction``: ``csv.DictWriter``'s, for keys outside ``columns``."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), restval="", extrasaction=extrasaction)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue(), encoding="utf-8"))


def write_png(path: str | os.PathLike, array: np.ndarray, compress_level: int | None = None) -> Path:
    """Atomically write a uint8 array (H, W) or (H, W, 3|4) as a PNG; ``compress_level`` 0-9 (None: PIL's default,
    6; ``PICTURE_PNG_LEVEL`` for overlays)."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"write_png expects uint8, got {array.dtype} for {path}")
    options = {} if compress_level is None else {"compress_level": compress_level}
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG", **options))


def _restore_interrupted_swap(dest: Path) -> None:
    """A kill between the two renames of ``replace_folder`` leaves the old folder as ``.<name>.*.old`` and no
    ``dest``: put it back. Leftover ``.partial`` folders of killed builds are dropped."""
    olds = sorted(dest.parent.glob(f".{dest.name}.*.old"))
    if olds and not dest.exists():
        os.replace(olds.pop(), dest)
    for stale in olds + sorted(dest.parent.glob(f".{dest.name}.*.partial")):
        shutil.rmtree(stale, ignore_errors=True)


def replace_folder(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Put folder ``src`` in place of ``dest`` (removing the old ``dest``) with two renames on one file system; a
    failure between them puts the old folder back."""
    src, dest = Path(src), Path(dest)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.{os.getpid()}.old")
        os.replace(dest, old)
    try:
        os.replace(src, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


@contextlib.contextmanager
def staged_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """Build a folder out of sight and put it in place of ``dest`` only when the ``with`` block succeeds.

    Yields an empty temporary folder next to ``dest`` (same file system, so the final renames are cheap). On an
    error the temporary folder is removed and an existing ``dest`` stays exactly as it was: a failed run never
    leaves a half-written output, nor destroys a good one.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _restore_interrupted_swap(dest)
        stage = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial"))
    except OSError as e:
        renamed = _renamed(e, None, dest)
        if renamed is e:
            raise
        raise renamed from e
    try:
        os.chmod(stage, DIR_MODE)  # mkdtemp creates 0700
        yield stage
        replace_folder(stage, dest)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        renamed = _renamed(e, stage, dest) if isinstance(e, OSError) else e
        if renamed is e:
            raise
        raise renamed from e


def _renamed(e: OSError, stage: Path | None, dest: Path) -> OSError:
    """``e`` naming the path the user asked for: ``dest`` for the staging folder itself, ``dest/x`` for ``stage/x``."""
    name = str(e.filename) if e.filename is not None else None
    if e.errno is None or (name is not None and stage is not None and not name.startswith(str(stage))):
        return e
    tail = name[len(str(stage)):] if name is not None and stage is not None else ""
    return OSError(e.errno, e.strerror or os.strerror(e.errno), str(dest) + tail)


def read_checkpoint(path: str | os.PathLike, what: str = "checkpoint", mmap: bool = False) -> Any:
    """The one reader of every torch file the package loads (``best.pt``, ``last.pt``, ``models/model.pt``, SAM and
    TransUNet ``.pth`` weights): ``torch.load`` on the CPU with ``weights_only`` (no code runs from a file), with
    errors that name the file: missing or unreadable. ``mmap``: map the tensors instead of reading them (when only
    the metadata is wanted)."""
    if not Path(path).is_file():
        raise BadInputError(path, f"{what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise BadInputError(path, unreadable_reason(e)) from e


def unreadable_reason(e: Exception) -> str:
    """Why ``torch.load`` failed, in one short line (torch's messages run to a paragraph of advice)."""
    first = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
    return f"not a readable PyTorch checkpoint, truncated or corrupt? ({type(e).__name__}: {first[:200]})"
