"""Argument checks shared by the CLI commands (fire passes strings, numbers, tuples or lists)."""

from __future__ import annotations

from ultrarefiner.utils.cores import usable_cores


def check_postfix(value: object, name: str) -> str:
    """A file-name postfix (``_seg``): the text between an image's stem and the extension of its mask's name."""
    from ultrarefiner.data.imaging import IMAGE_SUFFIXES

    postfix = "" if value is None else str(value)
    if "/" in postfix or "\\" in postfix:
        raise ValueError(f"--{name} is part of a file name, not a path: got {postfix!r}")
    if postfix.lower().endswith(IMAGE_SUFFIXES):
        raise ValueError(f"--{name} goes before the extension, which any image suffix may be: got {postfix!r}, "
                         f"use {postfix.rsplit('.', 1)[0]!r}")
    return postfix


def check_range(value, name: str, low: float, high: float, integer: bool = False):
    """Return ``value`` if ``low <= value <= high`` (and an integer when asked), else raise a clear ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and int(value) != value):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"--{name} must be {kind} in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"--{name} must be in [{low}, {high}], got {value}")
    return int(value) if integer else value


def data_workers(num_workers: int | None, default: int) -> int:
    """``--num_workers`` checked (0-64), or, when None, ``default`` bounded by the cores this process may use."""
    if num_workers is None:
        return min(default, usable_cores())
    return check_range(num_workers, "num_workers", 0, 64, integer=True)
