"""One sample's fields from an Ignite/MONAI engine's output or batch: the one lookup every handler uses.

A MONAI evaluator with ``decollate=True`` leaves ``engine.state.output`` and ``engine.state.batch`` as lists of
per-sample dicts; without decollation (or in a plain Ignite engine) they are one collated dict whose values are
batched (B, ...) tensors or lists. Post-processing keeps the input keys in the output only when it copies them, so a
handler looks in the output item first and falls back to the batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["as_scalar", "field", "image_stem", "is_item_list", "output_items"]


def is_item_list(batch: Any) -> bool:
    """A decollated or uncollated batch: a non-empty list (or tuple) of per-sample dicts (MONAI's decollation,
    ``monai.data.utils.no_collation``)."""
    return isinstance(batch, (list, tuple)) and bool(batch) and all(isinstance(b, Mapping) for b in batch)


def output_items(output: Any) -> list[Any]:
    """The engine output as a list of per-sample items (a collated dict or a single value is one item)."""
    return list(output) if isinstance(output, (list, tuple)) else [output]


def _sample(value: Any, index: int) -> Any:
    """Element ``index`` of a batched value (list, tuple, or tensor with a batch dimension); anything else as is."""
    if isinstance(value, torch.Tensor):
        return value[index] if value.ndim > 0 and len(value) > index else value
    if isinstance(value, (list, tuple)) and len(value) > index:
        return value[index]
    return value


def _keys(obj: Any) -> list[str]:
    if isinstance(obj, Mapping):
        return sorted(map(str, obj))
    if isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], Mapping):
        return sorted(map(str, obj[0]))
    return []


def field(item: Any, batch: Any, key: str, index: int = 0, required: bool = True) -> Any:
    """``key`` of sample ``index``: from the output item, else from the decollated or collated batch.

    Arguments:
      item: the sample's output item (``output_items(engine.state.output)[index]``).
      batch: ``engine.state.batch`` (list of per-sample dicts, or a collated dict).
      key: the field name.
      index: the sample's position in the batch.
      required: raise ``KeyError`` when neither has ``key``; otherwise return None.
    """
    if isinstance(item, Mapping) and key in item:
        return item[key]
    if isinstance(batch, (list, tuple)):
        if index < len(batch) and isinstance(batch[index], Mapping) and key in batch[index]:
            return batch[index][key]
    elif isinstance(batch, Mapping) and key in batch:
        return _sample(batch[key], index)
    if required:
        raise KeyError(f"'{key}' is neither in the engine output (keys: {_keys(item)}) nor in the batch "
                       f"(keys: {_keys(batch)})")
    return None


def as_scalar(value: Any) -> Any:
    """A one-element tensor, list or tuple as its element (collation wraps strings and flags); else as is."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return value[0]
    return value


def image_stem(item: Any, batch: Any, index: int = 0, image_key: str = "image") -> str | None:
    """Stem of sample ``index``'s image file, from the ``filename_or_obj`` metadata of ``image_key`` (a MetaTensor,
    or a ``<image_key>_meta_dict``) in the batch, else in the output item (a step may put a plain tensor there);
    None when unknown."""
    path = None
    for image in (field(None, batch, image_key, index, required=False), field(item, None, image_key, index, False)):
        path = getattr(image, "meta", {}).get("filename_or_obj") if image is not None else None
        if path is not None:
            break
    if path is None:
        meta = field(item, batch, f"{image_key}_meta_dict", index, required=False) or {}
        path = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    path = as_scalar(_sample(path, index) if isinstance(path, (list, tuple)) and len(path) > 1 else path)
    return Path(str(path)).stem if path is not None else None
