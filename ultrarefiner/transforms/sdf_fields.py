"""Signed distance functions, Gaussian random fields, lesion shape descriptors and the failure-mode terms
built from them (used by :mod:`ultrarefiner.transforms.failure_simulation`, which documents the policy).

Everything works on 2D numpy arrays (H, W) and is vectorised (EDT from scipy, fields by FFT).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import cv2
import numpy as np
from scipy import fft as sfft
from scipy.ndimage import distance_transform_edt


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) float32 signed distance in pixels, positive inside, zero level set on the contour.

    Pixel centres sit half a pixel from the contour, hence the 0.5 shifts: thresholding at 0 gives the
    mask back exactly, and offsets of +/-d move the contour by about d pixels.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.full(mask.shape, -1e4, np.float32)
    if mask.all():
        return np.full(mask.shape, 1e4, np.float32)
    inside = distance_transform_edt(mask)
    outside = distance_transform_edt(~mask)
    return np.where(mask, inside - 0.5, 0.5 - outside).astype(np.float32)


def gaussian_random_field(shape: tuple[int, int], corr_len: float, rng: np.random.RandomState) -> np.ndarray:
    """Zero-mean, unit-std stationary field (H, W) float32 with autocorrelation rho(r) = exp(-r^2 / (2 corr_len^2)).

    White noise is filtered in the Fourier domain by H(f) = exp(-pi^2 corr_len^2 |f|^2) with f in cycles/pixel,
    i.e. a Gaussian of frequency-domain sigma 1 / (sqrt(2) pi corr_len); its power spectrum exp(-2 pi^2 l^2 f^2)
    is the transform of the Gaussian autocorrelation above (at lag l/2 it is exp(-1/8) = 0.88). The grid is
    padded by 2 corr_len so the periodic FFT does not correlate opposite crop edges.
    """
    h, w = int(shape[0]), int(shape[1])
    pad = int(math.ceil(2 * corr_len))
    gh, gw = sfft.next_fast_len(h + pad, real=True), sfft.next_fast_len(w + pad, real=True)
    noise = rng.standard_normal((gh, gw)).astype(np.float32)
    fy = sfft.fftfreq(gh).astype(np.float32)[:, None]
    fx = sfft.rfftfreq(gw).astype(np.float32)[None, :]
    filt = np.exp(-((math.pi * corr_len) ** 2) * (fy * fy + fx * fx))
    field = sfft.irfft2(sfft.rfft2(noise) * filt, s=(gh, gw))[:h, :w]
    field = field - field.mean()
    std = float(field.std())
    return (field / std if std > 1e-12 else field).astype(np.float32)


def autocorrelation(field: np.ndarray, lag: int) -> float:
    """Empirical autocorrelation of a 2D field at an integer lag, averaged over the x and y directions."""
    f = np.asarray(field, np.float64)
    f = f - f.mean()
    var = float((f * f).mean())
    if lag == 0 or var == 0:
        return 1.0
    cx = float((f[:, :-lag] * f[:, lag:]).mean())
    cy = float((f[:-lag, :] * f[lag:, :]).mean())
    return 0.5 * (cx + cy) / var


@dataclass
class LesionDescriptors:
    """Shape of a lesion mask, in the pixels of the mask it was measured on."""

    area: float  # pixels
    radius: float  # equivalent radius sqrt(area / pi)
    circularity: float  # 4 pi A / P^2, 1 for a disc, lower for elongated or ragged outlines
    solidity: float  # A / convex hull area, lower for lobulated or spiculated lesions
    n_components: int

    def as_dict(self) -> dict:
        return asdict(self)


def lesion_descriptors(mask: np.ndarray) -> LesionDescriptors:
    """Area, equivalent radius, circularity and solidity of a (H, W) bool mask (all components together)."""
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    area = float(np.count_nonzero(m))
    if area == 0:
        return LesionDescriptors(0.0, 0.0, 0.0, 0.0, 0)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    # a 1-px polygon approximation removes the staircase of pixel contours, which inflates the perimeter by ~8 %
    perimeter = sum(cv2.arcLength(cv2.approxPolyDP(c, 1.0, True), True) for c in contours)
    hull = cv2.convexHull(np.concatenate(contours))
    # contour polygons pass through pixel centres, so add half a pixel of border to compare with pixel counts
    hull_area = cv2.contourArea(hull) + 0.5 * cv2.arcLength(hull, True) + 1.0
    # + pi: the polygon runs through pixel centres, half a pixel inside the pixel boundary
    circ = 4 * math.pi * area / max(perimeter + math.pi, 1.0) ** 2
    return LesionDescriptors(
        area=area,
        radius=math.sqrt(area / math.pi),
        circularity=float(min(circ, 1.0)),
        solidity=float(min(area / hull_area, 1.0)),
        n_components=len(contours),
    )


def dice_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two bool masks; both 1.0 when both are empty."""
    inter = np.count_nonzero(pred & gt)
    a, b = np.count_nonzero(pred), np.count_nonzero(gt)
    if a + b == 0:
        return 1.0, 1.0
    return 2.0 * inter / (a + b), inter / (a + b - inter)


def segment_distance(yy: np.ndarray, xx: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Distance of every grid point (yy, xx) to the segment p0-p1 (points as (y, x))."""
    d = p1 - p0
    length2 = float(d @ d)
    if length2 == 0:
        return np.hypot(yy - p0[0], xx - p0[1])
    t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / length2, 0.0, 1.0)
    return np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))


PhiOp = Callable[[np.ndarray, float], np.ndarray]  # (SDF, strength a in [0, 1]) -> SDF


class WorkCrop:
    """Per-draw working state: the (downscaled) lesion crop (H, W) bool, its SDF and pixel grids."""

    def __init__(
        self, gt: np.ndarray, rng: np.random.RandomState, radius: float, k: float, corr_len: tuple[float, float]
    ):
        self.gt, self.rng, self.R, self.k, self.corr_len = gt, rng, max(radius, 1.0), k, corr_len
        self.phi = signed_distance(gt)
        h, w = gt.shape
        self.yy, self.xx = np.mgrid[0:h, 0:w].astype(np.float32)
        self.n_gt = int(np.count_nonzero(gt))

    def field(self, corr_len: float) -> np.ndarray:
        return gaussian_random_field(self.gt.shape, max(corr_len, 0.7), self.rng)

    def pick(self, candidates: np.ndarray) -> np.ndarray | None:
        """A random (y, x) among the True pixels of ``candidates``."""
        idx = np.flatnonzero(candidates)
        if idx.size == 0:
            return None
        i = int(idx[self.rng.randint(idx.size)])
        return np.array(divmod(i, candidates.shape[1]), np.float32)


# ---- failure-mode terms in the SDF domain. Each builder returns (additive term or None, list of constructive
# ops), or None when the mode does not apply to this lesion (no room for it in the crop, lesion too thin).


def _erosion(c: WorkCrop):
    return -1.0 * c.R * np.ones_like(c.phi), []


def _dilation(c: WorkCrop):
    return 2.0 * c.R * np.ones_like(c.phi), []


def _warp(c: WorkCrop):
    lo, hi = c.corr_len
    corr = c.R * c.rng.uniform(lo, hi) * (1.0 - 0.4 * c.k)
    return 1.2 * c.R * c.field(corr), []


def _missing_part(c: WorkCrop):
    theta = c.rng.uniform(0, 2 * math.pi)
    proj = c.yy * math.sin(theta) + c.xx * math.cos(theta)
    inside = proj[c.gt]
    pmin, pmax = float(inside.min()), float(inside.max())
    ext = max(pmax - pmin, 2.0)
    wig = 0.08 * ext * c.field(0.3 * ext)

    def op(phi: np.ndarray, a: float) -> np.ndarray:
        level = pmax + 0.3 * ext - a * 1.2 * ext  # cut line sweeps from outside the lesion through 90 % of it
        return np.minimum(phi, level + wig - proj)

    return None, [op]


def _breakage(c: WorkCrop):
    p = c.pick(c.phi > 0.4 * float(c.phi.max()))
    if p is None:
        return None
    theta = c.rng.uniform(0, math.pi)
    # a wavy centre line; |.| keeps the gap band continuous so it always splits the lesion
    signed = (c.yy - p[0]) * math.cos(theta) - (c.xx - p[1]) * math.sin(theta)
    dist = np.abs(signed + 0.1 * c.R * c.field(0.5 * c.R))
    width = c.rng.uniform(0.2, 0.45) * c.R

    def op(phi: np.ndarray, a: float) -> np.ndarray:
        return np.minimum(phi, dist - max(1.0, a * width))

    return None, [op]


def _ellipse_distance(c: WorkCrop, centre: np.ndarray, ratio: float) -> np.ndarray:
    """Scaled distance whose level set r is an ellipse of semi-axes r and ratio * r, inside the disc of radius r."""
    theta = c.rng.uniform(0, math.pi)
    dy, dx = c.yy - centre[0], c.xx - centre[1]
    u = dy * math.cos(theta) + dx * math.sin(theta)
    v = -dy * math.sin(theta) + dx * math.cos(theta)
    return np.sqrt(u * u + (v / ratio) ** 2)


def _holes(c: WorkCrop):
    gap = 2.0
    ops = []
    for _ in range(1 + c.rng.binomial(2, 0.3)):
        centre = c.pick(c.phi >= 0.25 * c.R + gap)
        if centre is None:
            break
        r_max = min(float(c.phi[int(centre[0]), int(centre[1])]) - gap, 0.7 * c.R)
        dist = _ellipse_distance(c, centre, c.rng.uniform(0.6, 1.0))
        ops.append(lambda phi, a, d=dist, r=r_max: np.minimum(phi, d - a * r))
    return (None, ops) if ops else None


def _fp_islands(c: WorkCrop):
    gap = max(2.0, 0.1 * c.R)
    ops = []
    h, w = c.gt.shape
    for _ in range(1 + c.rng.binomial(2, 0.3)):
        r_max = max(2.0, c.rng.uniform(0.2, 0.5) * c.R)
        far = -(r_max + gap)
        ok = (c.phi <= far) & (c.phi >= far - 0.8 * c.R)
        ok &= (c.yy >= r_max) & (c.yy < h - r_max) & (c.xx >= r_max) & (c.xx < w - r_max)
        centre = c.pick(ok)
        if centre is None:
            continue
        dist = np.hypot(c.yy - centre[0], c.xx - centre[1])
        shape = 1.0 + 0.25 * c.field(0.5 * r_max)
        # radius <= r_max everywhere, so the island stays >= gap away from the lesion at any strength
        ops.append(lambda phi, a, d=dist, s=shape, r=r_max: np.maximum(phi, np.minimum(a * r * s, r) - d))
    return (None, ops) if ops else None


def _bridge(c: WorkCrop):
    gap = max(2.0, 0.1 * c.R)
    r_s = max(2.5, c.rng.uniform(0.25, 0.5) * c.R)
    h, w = c.gt.shape
    far = -(r_s + gap + c.rng.uniform(0.3, 0.8) * c.R)
    ok = (c.phi <= far) & (c.phi >= far - 0.3 * c.R - 2)
    ok &= (c.yy >= r_s) & (c.yy < h - r_s) & (c.xx >= r_s) & (c.xx < w - r_s)
    centre = c.pick(ok)
    if centre is None:
        return None
    border = np.argwhere(c.gt & (c.phi < 1.0)).astype(np.float32)  # contour pixels of the lesion
    anchor = border[np.argmin(((border - centre) ** 2).sum(1))]
    seg = segment_distance(c.yy, c.xx, anchor, centre)
    dist = np.hypot(c.yy - centre[0], c.xx - centre[1])
    shape = 1.0 + 0.2 * c.field(0.5 * r_s)
    w_max = c.rng.uniform(0.1, 0.25) * c.R

    def op(phi: np.ndarray, a: float) -> np.ndarray:
        # the structure keeps 40 % of its size at zero strength (a real neighbouring structure, not a dot);
        # half-width >= 1 px keeps the band 8-connected to the lesion
        phi = np.maximum(phi, max(1.0, (0.4 + 0.6 * a) * w_max) - seg)
        return np.maximum(phi, max(2.0, (0.4 + 0.6 * a) * r_s) * shape - dist)

    return None, [op]


MODE_BUILDERS = {
    "erosion": _erosion,
    "dilation": _dilation,
    "warp": _warp,
    "missing_part": _missing_part,
    "breakage": _breakage,
    "holes": _holes,
    "fp_islands": _fp_islands,
    "bridge": _bridge,
}
