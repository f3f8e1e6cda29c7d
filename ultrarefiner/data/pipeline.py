"""The deterministic MONAI chain from PNG files to the TransUNet input, for code paths outside the bundles.

The bundles write their chains out in their configs as ``_target_`` lists (``train#preprocessing``,
``validate#preprocessing``, ``preprocessing``), augmentation included, so a run's recipe is read and changed there
(``--train#preprocessing#transforms#<i>#prob 0.0``). ``predict-transunet`` builds the same deterministic steps from
here (``tests/test_pipeline.py`` holds the two equal): images are scaled to [0, 1] per image, labels to 0/1 float,
and both resized to ``img_size`` x ``img_size`` (image bilinear with anti-aliasing, masks nearest). Every item keeps
``original_size`` (H, W) and MONAI's applied-operation trace, so predictions map back to native resolution
(``Invertd``). SAM's geometry (longest side, bottom/right padding) is ``networks.sam_geometry.SamGeometry``'s.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import AsDiscreted, EnsureChannelFirstd, Resized, ScaleIntensityd

from ultrarefiner.transforms.io import CheckSameSized, LoadImageMaskd, RecordSized


def load_transforms(keys: Sequence[str] = ("image", "label")) -> list:
    """Image file -> (1, H, W) float MetaTensor; image min-max scaled to [0, 1], label binarised to {0, 1}.

    ``keys``: the image key first, then mask keys (checked to have the image's size before anything resizes them).
    """
    keys = list(keys)
    label_keys = [k for k in keys if k != "image"]
    out = [
        LoadImageMaskd(keys=keys[0], mask_keys=label_keys),
        EnsureChannelFirstd(keys=keys),
        RecordSized(keys=keys[0]),
        ScaleIntensityd(keys="image"),
    ]
    if label_keys:
        out.insert(2, CheckSameSized(keys=label_keys, reference=keys[0]))
        out += [ScaleIntensityd(keys=label_keys), AsDiscreted(keys=label_keys, threshold=0.5)]
    return out


def resize_transforms(keys: Sequence[str], img_size: int = 224) -> list:
    """(1, H, W) -> (1, img_size, img_size): the image bilinear with anti-aliasing, masks nearest."""
    keys = list(keys)
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    anti_aliasing = [k == "image" for k in keys]
    return [Resized(keys=keys, spatial_size=(img_size, img_size), mode=modes, anti_aliasing=anti_aliasing)]
