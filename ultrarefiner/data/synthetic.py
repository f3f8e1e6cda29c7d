"""Seeded synthetic breast-ultrasound phantoms, written in the BUSI raw layout.

They let every command and test run without downloaded data. Each phantom has layered tissue (bright skin
line, dark subcutaneous fat, textured glandular tissue, striated muscle), correlated speckle, and for lesion
classes a hypo-echoic lesion whose outline is a radial Fourier series: smooth ovals for ``benign`` (with
posterior enhancement), irregular, spiculated outlines for ``malignant`` (with posterior shadowing). A few
lesions are tiny, some images carry a second lesion in a separate ``_mask_1`` file (as BUSI does), one pair
of images is a near-duplicate, and ``normal`` images have blank masks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from ultrarefiner.utils.io import write_png


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return field / (field.std() + 1e-8)


def _speckle(rng: np.random.Generator, shape: tuple[int, int], grain: float = 1.2) -> np.ndarray:
    """Fully developed speckle: magnitude of a low-pass complex Gaussian field (Rayleigh), mean 1."""
    re = ndimage.gaussian_filter(rng.standard_normal(shape), grain)
    im = ndimage.gaussian_filter(rng.standard_normal(shape), grain)
    mag = np.hypot(re, im)
    return mag / mag.mean()


def _tissue(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Echogenicity map in [0, 1] before speckle: skin, fat, glandular tissue, muscle, depth attenuation."""
    yy = np.arange(h, dtype=np.float64)[:, None] / h
    undulation = 0.04 * _smooth_field(rng, (1, w), w / 8)[0][None, :]
    d = yy + undulation
    skin, fat, gland = 0.04 + 0.02 * rng.random(), 0.15 + 0.1 * rng.random(), 0.55 + 0.15 * rng.random()
    tissue = np.select(
        [d < skin, d < fat, d < gland],
        [np.full_like(d, 0.9), np.full_like(d, 0.3), 0.55 + 0.15 * _smooth_field(rng, (h, w), min(h, w) / 20)],
        default=0.35 + 0.12 * np.sin(d * h / 6.0 + 0.5 * _smooth_field(rng, (h, w), 12)),  # muscle striations
    )
    attenuation = np.exp(-1.2 * yy)
    return np.clip(tissue * attenuation * (1 + 0.15 * _smooth_field(rng, (h, w), min(h, w) / 6)), 0.02, 1)


def lesion_mask(
    rng: np.random.Generator,
    shape: tuple[int, int],
    centre: tuple[float, float],
    radius: float,
    irregularity: float,
    spicules: int = 0,
) -> np.ndarray:
    """(H, W) bool lesion whose outline is r(theta) = radius * (1 + sum_k a_k cos(k theta + phi_k)).

    ``irregularity`` scales low-order harmonics (lobulation); ``spicules`` adds sharp high-order ones.
    """
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    aspect = 0.6 + 0.4 * rng.random()  # wider than tall, as most breast lesions
    theta = np.arctan2((yy - centre[0]) / aspect, xx - centre[1])
    r = np.hypot((yy - centre[0]) / aspect, xx - centre[1])
    outline = np.ones_like(theta)
    for k in range(2, 6):
        outline += irregularity * rng.normal(0, 0.5 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    if spicules:
        outline += 0.25 * np.maximum(np.cos(spicules * theta + rng.uniform(0, 2 * np.pi)), 0) ** 8
    return r <= radius * np.clip(outline, 0.4, None)


def make_phantom(
    rng: np.random.Generator,
    kind: str,
    size: tuple[int, int] | None = None,
    tiny: bool = False,
    second_lesion: bool = False,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One phantom.

    Args:
        rng: the generator (the only source of randomness).
        kind: ``benign``, ``malignant`` or ``normal``.
        size: (H, W); random in [300, 480] x [380, 620] when None.
        tiny: a lesion of radius 4-9 px.
        second_lesion: add another lesion returned as a second mask (BUSI ``_mask_1``).
    Returns:
        (H, W) uint8 image and a list of (H, W) bool masks (one blank mask for ``normal``).
    """
    h, w = size or (int(rng.integers(300, 481)), int(rng.integers(380, 621)))
    echo = _tissue(rng, h, w)
    masks = []
    for i in range(0 if kind == "normal" else 1 + int(second_lesion)):
        radius = rng.uniform(4, 9) if tiny and i == 0 else rng.uniform(0.06, 0.2) * min(h, w) / (1 + i)
        centre = (rng.uniform(0.3, 0.7) * h, rng.uniform(0.2, 0.8) * w)
        malignant = kind == "malignant"
        m = lesion_mask(
            rng,
            (h, w),
            centre,
            radius,
            irregularity=1.6 if malignant else 0.5,
            spicules=int(rng.integers(7, 14)) if malignant and not tiny else 0,
        )
        masks.append(m)
        # soft margin for benign, ragged for malignant: blur the indicator, then darken
        edge = ndimage.gaussian_filter(m.astype(np.float64), 1.0 if malignant else 2.5)
        echo = echo * (1 - edge * rng.uniform(0.65, 0.85)) + edge * 0.03 * rng.random()
        # posterior effect in the columns below the lesion: shadow (malignant) or enhancement (benign)
        cols = ndimage.gaussian_filter1d(m.any(axis=0).astype(np.float64), 3)[None, :]
        below = np.clip(np.arange(h)[:, None] - (np.argmax(m.any(axis=1)) + m.any(axis=1).sum()), 0, None)
        decay = np.exp(-below / (0.5 * h)) * (below > 0)
        echo = echo * (1 + (-0.55 if malignant else 0.35) * cols * decay)
    image = np.clip(echo * _speckle(rng, (h, w)) * 200 + rng.normal(0, 3, (h, w)), 0, 255).astype(np.uint8)
    return image, masks or [np.zeros((h, w), bool)]


def write_busi_tree(
    root: str | os.PathLike,
    n_benign: int = 12,
    n_malignant: int = 8,
    n_normal: int = 4,
    seed: int = 0,
    size: tuple[int, int] | None = None,
) -> Path:
    """Write phantoms as ``root/BUSI/Dataset_BUSI_with_GT/<class>/'<class> (N).png'`` (+ masks).

    Every fifth lesion is tiny, every fourth benign image gets a second lesion in ``_mask_1``, and the
    last benign image is a near-duplicate (grey values jittered by up to 2) of the first. Returns the
    ``BUSI`` folder.
    """
    rng = np.random.default_rng(seed)
    base = Path(root) / "BUSI" / "Dataset_BUSI_with_GT"
    counts = {"benign": n_benign, "malignant": n_malignant, "normal": n_normal}
    first_benign = None
    for cls, n in counts.items():
        for i in range(1, n + 1):
            if cls == "benign" and i == n and n >= 3 and first_benign is not None:
                img0, masks = first_benign  # a re-saved copy: same scan, slightly different grey values
                image = np.clip(img0.astype(np.int16) + rng.integers(-2, 3, img0.shape), 0, 255).astype(np.uint8)
            else:
                image, masks = make_phantom(
                    rng,
                    cls,
                    size=size,
                    tiny=cls != "normal" and i % 5 == 0,
                    second_lesion=cls == "benign" and i % 4 == 0,
                )
            if cls == "benign" and i == 1:
                first_benign = (image, masks)
            stem = f"{cls} ({i})"
            write_png(base / cls / f"{stem}.png", image)
            for j, m in enumerate(masks):
                suffix = "_mask" if j == 0 else f"_mask_{j}"
                write_png(base / cls / f"{stem}{suffix}.png", m.astype(np.uint8) * 255)
    return base.parent
