"""Loading by the package's reading rules (a MONAI ``ImageReader`` and the transforms that use it) and small dictionary
transforms for bookkeeping that MONAI has no ready equivalent for."""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.data import ImageReader
from monai.transforms import LoadImaged, MapTransform
from monai.utils import ensure_tuple

from ultrarefiner.data import imaging

logger = logging.getLogger(__name__)


def _label(path: str) -> np.ndarray:
    return imaging.read_label(path).astype(np.uint8) * np.uint8(255)


class RuleReader(ImageReader):
    """MONAI ``ImageReader`` of one 2D file by one of the package's reading rules, as an (H, W) uint8 array:

    - ``image``: ``imaging.read_image`` (colour and palette as luminance, 16-bit and float rescaled by their maximum);
    - ``label``: ``imaging.read_label`` as 0/255 (0/1 label maps, alpha-drawn RGBA, 16-bit and float masks, 2D NIfTI;
      multi-class label maps refused);
    - ``soft_mask``: ``imaging.read_soft_mask`` (0-255 levels: probabilities * 255; pictures and 2D NIfTI).

    ``classes`` (mask rules only): the files are class maps, read as 0/255 where they hold one of these values
    (``imaging.read_classes``: a multi-class segmenter's 0/1/2 map).

    A file the rule refuses raises ``BadInputError`` naming it. Give the reader to ``LoadImaged`` at call time
    (``LoadImaged(...)(data, reader=...)``, as :class:`LoadImageMaskd` does): a reader given to its constructor is
    only tried first, and a file it refuses is then read raw by MONAI's other readers (a raw ``PILReader``: a mask of
    logits read as is, transposed).
    """

    RULES: dict[str, Callable[[str], np.ndarray]] = {"image": imaging.read_image, "label": _label,
                                                     "soft_mask": imaging.read_soft_mask}

    def __init__(self, rule: str, classes: Sequence[int] = ()) -> None:
        if rule not in self.RULES:
            raise ValueError(f"rule must be one of {', '.join(self.RULES)}, got {rule!r}")
        if classes and rule == "image":
            raise ValueError("classes select lesion in masks, not in images")
        self.rule, self.classes = rule, tuple(classes)

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        suffixes = imaging.IMAGE_SUFFIXES if self.rule == "image" else imaging.MASK_SUFFIXES
        return all(str(f).lower().endswith(suffixes) for f in ensure_tuple(filename))

    def read(self, data: Sequence[str] | str, **kwargs: Any) -> tuple[np.ndarray, str]:
        files = ensure_tuple(data)
        if len(files) != 1:
            raise ValueError(f"one file per item, got {len(files)}: {', '.join(map(str, files))}")
        path = str(files[0])
        if self.classes:
            return imaging.read_classes(path, self.classes)[0].astype(np.uint8) * np.uint8(255), path
        return self.RULES[self.rule](path), path

    def get_data(self, img: tuple[np.ndarray, str]) -> tuple[np.ndarray, dict]:
        """(H, W) array in numpy order and its metadata; no channel axis (``EnsureChannelFirstd`` adds one)."""
        array, _ = img
        return array, {"spatial_shape": np.asarray(array.shape), "original_channel_dim": float("nan")}


class _RuleLoad:
    """``LoadImaged`` of ``keys`` with a ``RuleReader`` given at call time: nothing falls back to another reader."""

    def __init__(self, keys: KeysCollection, rule: str, allow_missing_keys: bool, classes: Sequence[int] = ()) -> None:
        self.reader = RuleReader(rule, classes)
        self.load = LoadImaged(keys, image_only=True, allow_missing_keys=allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        return self.load(data, reader=self.reader)


class LoadImageMaskd(MapTransform):
    """Load 2D images (``keys``) and masks (``mask_keys``) with MONAI's ``LoadImaged``, by the package's reading rules
    (:class:`RuleReader`), as (H, W) arrays in numpy order.

    - images by ``imaging.read_image``: colour and palette as luminance, 16-bit and float rescaled by their maximum;
    - masks by ``imaging.read_label``, as 0/255: 0/1 label maps, alpha-drawn RGBA, 16-bit and float masks and 2D
      NIfTI read as ``preprocess`` and ``evaluate`` read them.

    A raw ``PILReader`` gives a colour PNG 3 channels and a 16-bit one values up to 65535. A file the rules refuse is
    an error naming it (``BadInputError``), never read raw by another reader. One transform rather than two
    ``LoadImaged`` keeps the index of every later transform, which the bundles' READMEs give for overrides.
    """

    def __init__(self, keys: KeysCollection, mask_keys: KeysCollection = (), allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mask_keys = ensure_tuple(mask_keys)
        self.load_images = _RuleLoad(self.keys, "image", allow_missing_keys)
        self.load_masks = _RuleLoad(self.mask_keys, "label", allow_missing_keys) if self.mask_keys else None

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = self.load_images(data)
        return d if self.load_masks is None else self.load_masks(d)


class LoadSoftMaskd(MapTransform):
    """Load 2D soft masks (``keys``: coarse masks, predictions) with MONAI's ``LoadImaged`` by ``refine``'s rule,
    ``imaging.read_soft_mask`` (:class:`RuleReader`): (H, W) uint8 levels 0-255 in numpy order, from picture files
    (0/255, 0/1 label maps, probability * 255, 16-bit and float levels) and 2D NIfTI (read x first, as MONAI's
    ``SaveImage`` writes a picture). A file the rule refuses is an error naming it. ``classes``: the masks are class
    maps, read as 0/255 where they hold one of these values (``imaging.read_classes``); empty: the rule above.

    A mask with no pixel above 0.5 is logged as a warning naming the file (an inference cannot skip it, and its
    refined mask is empty or a few stray pixels), with what its values look like (``imaging.class_map_note``: a 0/2
    class map) and ``classes_option``, the config id that reads class maps, if given."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, classes: Sequence[int] = (),
                 classes_option: str = ""):
        super().__init__(keys, allow_missing_keys)
        self.classes, self.classes_option = tuple(classes), classes_option
        self.load = _RuleLoad(self.keys, "soft_mask", allow_missing_keys, classes)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = self.load(data)
        for key in self.key_iterator(d):
            if float(d[key].max()) <= 127:
                self._warn_blank(_source(d[key], key))
        return d

    def _warn_blank(self, path: str) -> None:
        if self.classes:
            note = imaging.read_classes(path, self.classes)[1] or "no pixel of the classes given"
        elif Path(path).is_file():
            note = imaging.class_map_note(path, soft=True, classes_option=self.classes_option)
        else:
            note = ""
        logger.warning(f"{path}: blank coarse mask: {note or 'no pixel above 0.5'}; its refined mask is empty or "
                       f"near-empty")


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
