"""Small dictionary transforms for loading and bookkeeping that MONAI has no ready equivalent for."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

from monai.config import KeysCollection
from monai.data import PILReader
from monai.transforms import LoadImaged, MapTransform
from monai.utils import ensure_tuple


class LoadImageMaskd(MapTransform):
    """Load 2D images (``keys``) and masks (``mask_keys``) with MONAI's ``LoadImaged`` and ``PILReader``, by the
    package's reading rules, as (H, W) arrays in numpy order.

    - images by ``imaging.gray_image``: colour and palette as luminance, 16-bit and float rescaled by their maximum;
    - masks by ``imaging.label_image``: 0/255, with 0/1 label maps, alpha-drawn RGBA, 16-bit and float masks read as
      ``preprocess`` and ``evaluate`` read them.

    A raw ``PILReader`` gives a colour PNG 3 channels and a 16-bit one values up to 65535. One transform rather than
    two ``LoadImaged`` keeps the index of every later transform, which the bundles' READMEs give for overrides.
    """

    def __init__(self, keys: KeysCollection, mask_keys: KeysCollection = (), allow_missing_keys: bool = False):
        from ultrarefiner.data.imaging import gray_image, label_image

        super().__init__(keys, allow_missing_keys)
        self.mask_keys = ensure_tuple(mask_keys)
        self.load_images = LoadImaged(self.keys, reader=PILReader(converter=gray_image, reverse_indexing=False),
                                      image_only=True, allow_missing_keys=allow_missing_keys)
        self.load_masks = LoadImaged(self.mask_keys, reader=PILReader(converter=label_image, reverse_indexing=False),
                                     image_only=True, allow_missing_keys=allow_missing_keys) if self.mask_keys else None

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = self.load_images(data)
        return d if self.load_masks is None else self.load_masks(d)


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


class CheckSameSized(MapTransform):
    """Refuse a sample whose mask-like ``keys`` differ in spatial size from ``reference`` (the image).

    Resizing would stretch a mask of another image's size to fit without a word; the error names both files and
    both sizes (W x H, as image viewers show them).
    """

    def __init__(self, keys: KeysCollection, reference: str = "image", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.reference = reference

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        from ultrarefiner.errors import BadInputError

        d = dict(data)
        ref = d[self.reference]
        size = tuple(int(s) for s in ref.shape[-2:])
        for key in self.key_iterator(d):
            other = tuple(int(s) for s in d[key].shape[-2:])
            if other != size:
                raise BadInputError(_source(d[key], key), f"{key} size {other[1]}x{other[0]} (WxH) differs from the "
                                                          f"size {size[1]}x{size[0]} of {_source(ref, self.reference)}")
        return d


def _source(value: object, key: Hashable) -> str:
    """The file a loaded array came from (MONAI metadata), else the dictionary key."""
    meta = getattr(value, "meta", None) or {}
    return str(meta.get("filename_or_obj") or key)
