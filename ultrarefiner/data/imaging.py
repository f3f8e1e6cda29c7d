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


def label_map_levels(gray: np.ndarray) -> np.ndarray:
    """Mask levels on the 0-255 scale (uint8 array, or the tensor a MONAI reader loads) with a 0/1 label map (the
    values nnU-Net and MONAI's ``SaveImage`` write for a binary label) scaled to 0/255; any other mask (0/255,
    probability * 255, blank) as it is. Same type and dtype as ``gray``.

    Read as luminance, a 0/1 map would be blank at any threshold: its lesion would vanish without a word."""
    return gray * 255 if gray.max() == 1 else gray


def read_soft_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask or soft prediction as (H, W) uint8 on the 0-255 scale: 0/255 masks and probability * 255 maps as
    they are, 0/1 label maps as 0/255 (``label_map_levels``)."""
    return label_map_levels(read_image(path))


def _alpha(img: Image.Image) -> np.ndarray | None:
    """The alpha channel (H, W) uint8 of an image with transparency (RGBA, LA, PA, P with a transparent colour)."""
    if not img.has_transparency_data:
        return None
    return np.asarray(img.convert("RGBA").getchannel("A"))


def read_mask(path: str | os.PathLike, colour_coded: bool = False) -> np.ndarray:
    """Read a mask as (H, W) bool.

    Args:
        path: the mask file.
        colour_coded: masks whose class is a colour (BUS_UCLM: green benign, red malignant, black
            background): any non-black pixel is lesion. Otherwise lesion = luminance > 127, which is right
            for 1-bit, 8-bit, 16-bit, RGB and RGBA with a constant alpha; an 8-bit 0/1 label map is lesion
            where it is 1 (``label_map_levels``).

    A varying alpha channel carries the mask too: where the colour is the same everywhere (e.g. white, with
    the background transparent) the mask is the opaque region; otherwise it is what shows over black (bright
    and opaque). A mask whose opaque region is dark and whose bright region is transparent is refused
    (BadInputError): which of the two is the lesion cannot be told.
    """
    img = _open(path)
    if colour_coded:
        drawn = np.asarray(img.convert("RGB")).max(axis=-1) > 0
    else:
        drawn = label_map_levels(to_gray_uint8(img)) > 127
    alpha = _alpha(img)
    if alpha is None or alpha.min() == alpha.max():  # a constant alpha carries nothing
        return drawn
    opaque = alpha > 127
    gray = np.asarray(img.convert("RGB").convert("L"))
    if gray.min() == gray.max():  # one colour everywhere: only the alpha channel draws the mask
        return opaque
    mask = drawn & opaque
    if opaque.any() and not mask.any():
        raise BadInputError(path, "RGBA mask with a dark opaque region and a bright transparent one: cannot tell "
                                  "which is the lesion; save the mask as 8-bit grayscale 0/255")
    return mask


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) from the header, without decoding pixels."""
    try:
        with Image.open(path) as img:
            w, h = img.size
    except Exception as e:
        raise BadInputError(path, f"unreadable image ({type(e).__name__}: {e})") from e
    return h, w
