"""Reading raw ultrasound images and masks in whatever PNG/JPEG/BMP flavour the datasets ship.

Images become 8-bit grayscale (H, W); masks become boolean (H, W). Every failure raises
:class:`BadInputError` naming the file, so batch jobs can report and skip it.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image

from ultrarefiner.errors import BadInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _open(path: str | os.PathLike) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()  # force decoding now: truncated files fail here, not later in a worker
    except FileNotFoundError as e:
        raise BadInputError(path, "file not found") from e
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise BadInputError(path, f"unreadable image ({type(e).__name__}: {e})") from e
    return img


def to_gray_uint8(img: Image.Image) -> np.ndarray:
    """(H, W) uint8: luminance for colour images; 16-bit and float images rescaled by their maximum."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max()
        return np.zeros(arr.shape, np.uint8) if top <= 0 else np.round(arr / top * 255).astype(np.uint8)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    # "L" conversion uses ITU-R 601 luminance and drops alpha (alpha may be 255 everywhere in masks)
    return np.asarray(img.convert("L"), dtype=np.uint8)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as (H, W) uint8 grayscale."""
    return to_gray_uint8(_open(path))


def read_mask(path: str | os.PathLike, colour_coded: bool = False) -> np.ndarray:
    """Read a mask as (H, W) bool.

    Args:
        path: the mask file.
        colour_coded: masks whose class is a colour (BUS_UCLM: green benign, red malignant, black
            background): any non-black pixel is lesion. Otherwise lesion = luminance > 127, which is right
            for 1-bit, 8-bit, RGB and RGBA (alpha ignored: taking the max over channels would make an
            opaque alpha channel an all-lesion mask).
    """
    img = _open(path)
    if colour_coded:
        arr = np.asarray(img.convert("RGB"))
        return arr.max(axis=-1) > 0
    return to_gray_uint8(img) > 127


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) from the header, without decoding pixels."""
    try:
        with Image.open(path) as img:
            w, h = img.size
    except Exception as e:
        raise BadInputError(path, f"unreadable image ({type(e).__name__}: {e})") from e
    return h, w
