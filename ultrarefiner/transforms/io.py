"""Small dictionary transforms for bookkeeping that MONAI has no ready equivalent for."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

from monai.config import KeysCollection
from monai.transforms import MapTransform


class RecordSized(MapTransform):
    """Store the spatial size (H, W) of ``keys[0]`` under ``name`` before any resizing.

    MONAI's PIL reader records ``spatial_shape`` as (W, H) when ``reverse_indexing=False``; an explicit
    key avoids that ambiguity and survives collation as a (B, 2) tensor.
    """

    def __init__(self, keys: KeysCollection, name: str = "original_size", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.name = name

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        key = self.first_key(d)
        d[self.name] = tuple(int(s) for s in d[key].shape[-2:])
        return d
