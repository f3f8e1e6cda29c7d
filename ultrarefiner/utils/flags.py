"""On/off, choice and list options as they arrive from configs and command lines."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ultrarefiner.errors import BadOptionError

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


def choice(value: Any, choices: Sequence[str], name: str) -> str:
    """``value`` if it is one of ``choices``; otherwise a ``BadOptionError`` naming the option and the choices (a
    config expression indexing a dict with it would fail with a bare ``KeyError`` inside MONAI's wrapper)."""
    if value not in choices:
        raise BadOptionError(f"--{name}: expected one of {', '.join(choices)}; got {value!r}")
    return value


def parse_list(value: str | Iterable[str] | None, name: str, allowed: Sequence[str] | None = None) -> list[str]:
    """``"BUSI,BUSBRA"``, ``("BUSI", "BUSBRA")`` or ``["BUSI", "BUSBRA"]`` -> a list, checked against ``allowed``."""
    if value is None:
        return []
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    else:
        items = [str(v).strip() for v in value]
    items = [v for v in items if v]
    if allowed is not None:
        unknown = [v for v in items if v not in allowed]
        if unknown:
            raise ValueError(f"--{name}: unknown value(s) {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return items
