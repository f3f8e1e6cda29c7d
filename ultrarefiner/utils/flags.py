"""On/off options as they arrive from configs and command lines."""

from __future__ import annotations

from typing import Any

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", "", "none"}


def as_flag(value: Any, name: str = "flag") -> bool:
    """``value`` as a bool. ``python -m monai.bundle run --x false`` (and fire CLIs) pass lowercase words as the
    *string* ``'false'``, which Python counts as true; here 'true'/'false' (any case), 1/0, yes/no, on/off mean what
    they say, and anything else is an error naming the option."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if value is None:
        return False
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"--{name}: expected true or false, got {value!r}")
