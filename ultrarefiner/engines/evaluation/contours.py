"""Contour pictures: a gray image with the inner boundaries of masks drawn in colour (validation overlays, the
``refine`` and ``predict`` overlays). Plain numpy, no engine import: ``refine`` draws them without loading Ignite or
MONAI."""

from __future__ import annotations

import numpy as np

__all__ = ["COARSE_COLOUR", "GREEN", "GT_COLOUR", "RED", "REFINED_COLOUR", "YELLOW", "contour", "gray_uint8",
           "overlay_coarse_refined", "overlay_contours"]

GREEN = (0, 255, 0)
RED = (255, 0, 0)
YELLOW = (255, 255, 0)


def contour(mask: np.ndarray) -> np.ndarray:
    """Inner boundary of a bool (H, W) mask: foreground pixels with a 4-neighbour outside the mask or the image."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def gray_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W) or (C, H, W) image -> uint8 (H, W) gray: [0, 1] scaled to 0-255, other ranges stretched."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:  # (C, H, W) -> first channel
        image = image[0]
    lo, hi = float(image.min(initial=0.0)), float(image.max(initial=0.0))
    if image.size and (lo < 0.0 or hi > 1.0):  # not in [0, 1]: stretch (e.g. uint8 range or normalised input)
        image = (image - lo) / max(hi - lo, 1e-8)
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


def overlay_contours(image: np.ndarray, label: np.ndarray | None, pred: np.ndarray | None) -> np.ndarray:
    """RGB uint8 (H, W, 3): ``image`` (H, W) in [0, 1] (other ranges are stretched) in gray, contour of the bool
    ``label`` in green and of ``pred`` in red; pixels on both contours are yellow."""
    gray = gray_uint8(image)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    gt = contour(label) if label is not None else np.zeros(gray.shape, bool)
    pr = contour(pred) if pred is not None else np.zeros(gray.shape, bool)
    rgb[gt] = GREEN
    rgb[pr] = RED
    rgb[gt & pr] = YELLOW
    return rgb


GT_COLOUR = (0, 255, 0)
COARSE_COLOUR = (0, 128, 255)
REFINED_COLOUR = (255, 0, 0)


def overlay_coarse_refined(image: np.ndarray, coarse: np.ndarray | None, refined: np.ndarray | None,
                           label: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 (H, W, 3): ``image`` (H, W) gray ([0, 1] or stretched), contours of the bool masks: ground truth
    green, coarse blue, refined red (drawn in that order, so the refined contour is on top)."""
    gray = gray_uint8(image)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    for mask, colour in ((label, GT_COLOUR), (coarse, COARSE_COLOUR), (refined, REFINED_COLOUR)):
        if mask is not None:
            rgb[contour(np.asarray(mask, bool))] = colour
    return rgb
