"""MONAI datasets and transforms from a datalist, a fold and a split.

Two geometries:

* ``transunet``: resized to ``img_size`` x ``img_size`` (224), image bilinear with anti-aliasing, mask nearest.
* ``sam``: longest side resized to ``long_side`` (1024) and padded bottom/right to a square, as SAM's
  ``ResizeLongestSide`` + ``Sam.preprocess`` do; ``sam_square`` squashes to ``long_side`` x ``long_side``
  as MedSAM's inference does. SAM sees the native image, never a 224 image upsampled.

Images are scaled to [0, 1] per image; labels are 0/1 float. Every item keeps ``original_size`` (H, W) and
MONAI's applied-operation trace, so predictions can be mapped back to native resolution (``Invertd``) for
evaluation. Training adds left-right flips, small rotations and zooms (image bilinear, mask nearest) and
intensity jitter.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import (
    AsDiscreted,
    Compose,
    CopyItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    RandAdjustContrastd,
    RandFlipd,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandZoomd,
    Resized,
    ScaleIntensityd,
    ScaleIntensityRanged,
    SpatialPadd,
)

from ultrarefiner.data.datalist import load_split
from ultrarefiner.transforms.io import CheckSameSized, RecordSized

GEOMETRIES = ("transunet", "sam", "sam_square")
CACHES = ("none", "memory", "disk")


def load_transforms(keys: Sequence[str] = ("image", "label")) -> list:
    """PNG -> (1, H, W) float MetaTensor; image min-max scaled to [0, 1], label binarised to {0, 1}."""
    keys = list(keys)
    label_keys = [k for k in keys if k != "image"]
    out = [
        # reverse_indexing=False keeps numpy's (H, W) order instead of MONAI's default (W, H) for 2D PIL images
        LoadImaged(keys=keys, reader="PILReader", reverse_indexing=False, image_only=True),
        EnsureChannelFirstd(keys=keys),
        RecordSized(keys=keys[0]),
        ScaleIntensityd(keys="image"),
    ]
    if label_keys:
        out.insert(2, CheckSameSized(keys=label_keys, reference=keys[0]))  # before anything resizes them
        out += [ScaleIntensityd(keys=label_keys), AsDiscreted(keys=label_keys, threshold=0.5)]
    return out


def spatial_transforms(geometry: str, keys: Sequence[str], img_size: int = 224, long_side: int = 1024) -> list:
    """Resizing (and padding) for one network input."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
    keys = list(keys)
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    anti = [k == "image" for k in keys]
    if geometry == "transunet":
        return [Resized(keys=keys, spatial_size=(img_size, img_size), mode=modes, anti_aliasing=anti)]
    if geometry == "sam_square":
        return [Resized(keys=keys, spatial_size=(long_side, long_side), mode=modes, anti_aliasing=anti)]
    return [
        Resized(keys=keys, spatial_size=long_side, size_mode="longest", mode=modes, anti_aliasing=anti),
        SpatialPadd(keys=keys, spatial_size=(long_side, long_side), method="end"),  # bottom/right, as SAM pads
    ]


def augment_transforms(keys: Sequence[str], rotate_degrees: float = 15.0, zoom: float = 0.1, prob: float = 0.5) -> list:
    """Training augmentation. No vertical flips: the skin line is always at the top of an ultrasound image."""
    keys = list(keys)
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    return [
        RandFlipd(keys=keys, prob=prob, spatial_axis=1),
        RandRotated(keys=keys, range_x=math.radians(rotate_degrees), prob=prob, mode=modes, padding_mode="zeros"),
        RandZoomd(keys=keys, prob=prob, min_zoom=1 - zoom, max_zoom=1 + zoom, mode=modes, padding_mode="constant"),
        RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.8, 1.25)),
        RandScaleIntensityd(keys="image", factors=0.1, prob=prob),
        RandShiftIntensityd(keys="image", offsets=0.05, prob=prob),
        ScaleIntensityRanged(keys="image", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
    ]


def get_transforms(
    geometry: str = "transunet",
    train: bool = False,
    keys: Sequence[str] = ("image", "label"),
    img_size: int = 224,
    long_side: int = 1024,
    augment: dict | None = None,
    native_keys: Sequence[str] = (),
) -> Compose:
    """The full chain for one network and one split.

    Args:
        geometry: ``transunet``, ``sam`` (longest side + bottom/right padding) or ``sam_square`` (MedSAM).
        train: add random augmentation.
        keys: image key first, then mask-like keys (label, coarse masks) that are resized with nearest.
        img_size: TransUNet input size.
        long_side: SAM input size.
        augment: keyword overrides for :func:`augment_transforms`.
        native_keys: keys copied to ``<key>_native`` before resizing, for evaluation at native resolution
            (batch size 1, since native sizes differ).
    """
    chain = load_transforms(keys)
    if native_keys:
        chain.append(CopyItemsd(keys=list(native_keys), names=[f"{k}_native" for k in native_keys]))
    chain += spatial_transforms(geometry, keys, img_size, long_side)
    if train:
        chain += augment_transforms(keys, **(augment or {}))
    chain.append(EnsureTyped(keys=list(keys) + [f"{k}_native" for k in native_keys], dtype="float32", track_meta=True))
    return Compose(chain)


def make_dataset(
    items: list[dict],
    transform: Compose,
    cache: str = "none",
    cache_dir: str | os.PathLike | None = None,
    cache_rate: float = 1.0,
    num_workers: int = 0,
):
    """``Dataset`` (no cache), ``CacheDataset`` (deterministic part in memory) or ``PersistentDataset`` (on disk)."""
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    if cache == "memory":
        return CacheDataset(items, transform, cache_rate=cache_rate, num_workers=num_workers or None, progress=False)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError("cache='disk' needs cache_dir")
        return PersistentDataset(items, transform, cache_dir=cache_dir)
    return Dataset(items, transform)


def get_dataset(
    datalist: str | os.PathLike,
    fold: int | None = 0,
    split: str = "train",
    geometry: str = "transunet",
    train_augment: bool | None = None,
    cache: str = "none",
    cache_dir: str | os.PathLike | None = None,
    **kwargs,
):
    """Dataset of one split of a datalist (see :func:`ultrarefiner.data.datalist.load_split`).

    ``train_augment`` defaults to True for the ``train`` split only; other keyword arguments go to
    :func:`get_transforms`.
    """
    items = load_split(datalist, fold, split)
    augment = split == "train" if train_augment is None else train_augment
    return make_dataset(items, get_transforms(geometry, train=augment, **kwargs), cache=cache, cache_dir=cache_dir)
