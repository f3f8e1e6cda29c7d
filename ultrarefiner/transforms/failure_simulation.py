"""Realistic segmentation failures simulated from a ground-truth mask, in the signed-distance domain (issue 3).

Policy (every number is a field of :class:`FailurePolicy`):

1. **Bucket.** Each draw picks a quality bucket: ``perfect`` (10 %, the mask unchanged), ``mild`` (55 %, Dice to
   the ground truth in [0.80, 0.95]) or ``heavy`` (35 %, Dice in [0.40, 0.80]). A target Dice is drawn inside the
   bucket and a corruption strength ``a`` in [0, 1] is found by bisection until the Dice lands near it; when the
   chosen modes cannot reach the bucket, new modes are drawn (``max_retries``), then plain erosion or dilation,
   which reach any Dice, is used.
2. **Signed distance.** phi = SDF of the mask (positive inside). Additive terms shift the contour:
   ``erosion`` (phi - a 1.0 R), ``dilation`` (phi + a 2.0 R), ``warp`` (phi + a 1.2 R g, g a low-frequency
   Gaussian random field of unit std whose correlation length is 0.25-0.7 R), ``roughness`` (a small fixed
   high-frequency field, 1-1.5 px correlation, 0.5-1.5 px amplitude). Constructive terms cut or add shapes:
   ``missing_part`` (a cap of the lesion cut away along a wavy line), ``breakage`` (a gap band splitting the lesion),
   ``holes`` (1-3 ellipses strictly inside, at least 1.5 px from the contour), ``fp_islands`` (1-3 blobs at least
   2 px away from the lesion, so never connected to it), ``bridge`` (a new structure 0.3-0.8 R away joined to the
   lesion by a band; both keep at least 40 % of their size at zero strength), ``small_lesion`` (only for small
   lesions, heavy bucket: extreme erosion or disappearance).
   R is the lesion's equivalent radius sqrt(A / pi), so every size is relative to the lesion.
3. **Conditioning.** Aggressiveness k in [0, 1] is the larger of smallness (R / min(H, W) below ``small_radius``)
   and irregularity (solidity below ``irregular_solidity`` or circularity below 0.6). Higher k skews the target
   Dice towards the low end of the bucket (Beta(1, 1 + gain k)), adds extra modes more often, shortens the warp's
   correlation length and adds roughness more often. Only lesions with R / min(H, W) < ``small_radius`` can get the
   ``small_lesion`` failure; the ``vanish`` variant gives an empty mask (Dice 0, outside the heavy range by design).
4. **Speed.** Work happens in a crop around the lesion (margin 1.25 R + 6 px) downscaled so its longest side is at
   most ``work_size``; the corrupted SDF is upsampled to the crop (bilinear) and thresholded, and the reported
   Dice/IoU are measured at the input resolution (the resolution the model trains on, when the input is resized).
5. **Soft output.** With ``soft=True`` the output is sigmoid(phi' / T), T drawn in ``temperature`` pixels.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import cv2
import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, RandomizableTransform, Transform
from monai.utils import convert_to_dst_type

from ultrarefiner.transforms.sdf_fields import MODE_BUILDERS, PhiOp, WorkCrop, dice_iou, lesion_descriptors

BUCKETS = ("perfect", "mild", "heavy")
PRIMARY_MODES = ("erosion", "dilation", "warp", "missing_part", "breakage", "holes", "fp_islands", "bridge")
MODES = PRIMARY_MODES + ("roughness", "small_lesion")


@dataclass
class FailurePolicy:
    """Configurable policy; see the module docstring for what each number does."""

    bucket_probs: tuple[float, float, float] = (0.10, 0.55, 0.35)  # perfect, mild, heavy
    mild_range: tuple[float, float] = (0.80, 0.95)
    heavy_range: tuple[float, float] = (0.40, 0.80)
    mode_weights: dict[str, float] = field(
        default_factory=lambda: {
            "erosion": 1.0,
            "dilation": 1.0,
            "warp": 1.5,
            "missing_part": 0.7,
            "breakage": 0.5,
            "holes": 0.5,
            "fp_islands": 0.7,
            "bridge": 0.5,
        }
    )
    extra_mode_prob: float = 0.3  # chance of each further primary mode (doubled at aggressiveness 1)
    max_modes: int = 3
    roughness_prob: float = 0.3  # raised by up to 0.4 for irregular lesions
    roughness_amplitude: tuple[float, float] = (0.5, 1.5)  # work pixels
    small_radius: float = 0.06  # R / min(H, W) below which a lesion is small
    small_lesion_prob: float = 0.4  # heavy draws of small lesions that become a small-lesion failure
    vanish_prob: float = 0.3  # small-lesion failures where the lesion disappears entirely
    irregular_solidity: float = 0.85
    aggressiveness_gain: float = 2.0
    corr_len: tuple[float, float] = (0.25, 0.7)  # warp correlation length, x R
    work_size: int = 256
    max_retries: int = 4
    bisect_steps: int = 14
    soft: bool = False
    temperature: tuple[float, float] = (0.5, 2.0)  # output pixels

    def __post_init__(self) -> None:
        p = np.asarray(self.bucket_probs, float)
        if p.shape != (3,) or (p < 0).any() or not math.isclose(p.sum(), 1.0, abs_tol=1e-6):
            raise ValueError(f"bucket_probs must be 3 non-negative numbers summing to 1, got {self.bucket_probs}")
        for name in ("mild_range", "heavy_range"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(f"{name} must satisfy 0 <= low < high <= 1, got {(lo, hi)}")
        unknown = set(self.mode_weights) - set(PRIMARY_MODES)
        if unknown or not any(w > 0 for w in self.mode_weights.values()):
            raise ValueError(f"mode_weights: unknown modes {sorted(unknown)} or no positive weight")

    def bucket_range(self, bucket: str) -> tuple[float, float]:
        return {"perfect": (1.0, 1.0), "mild": tuple(self.mild_range), "heavy": tuple(self.heavy_range)}[bucket]

    def as_dict(self) -> dict:
        return asdict(self)


class SimulateSegmentationFailure(Randomizable, Transform):
    """Array transform: ground-truth mask -> corrupted mask plus a record of what was done.

    Input: mask (H, W) or (1, H, W), numpy or torch (MetaTensor kept), any dtype (> 0.5 is lesion).
    Output of ``__call__``: ``(coarse, info)``; coarse has the input's shape and array type, float32, 0/1 or a
    soft probability; info has ``dice``, ``iou`` (of coarse > 0.5 against the mask), ``modes`` (list of str),
    ``bucket``, ``in_range`` and the lesion ``descriptors``.

    Args:
        policy: a :class:`FailurePolicy` (or keyword overrides of it via ``**overrides``).
        bucket: force a bucket (``perfect``/``mild``/``heavy``) instead of drawing it.
        modes: force these modes (names in :data:`MODES`) instead of drawing them; the Dice target still applies.
    """

    def __init__(
        self,
        policy: FailurePolicy | None = None,
        bucket: str | None = None,
        modes: Sequence[str] | None = None,
        **overrides,
    ) -> None:
        self.policy = replace(policy or FailurePolicy(), **overrides)
        if bucket is not None and bucket not in BUCKETS:
            raise ValueError(f"bucket must be one of {BUCKETS}, got {bucket!r}")
        unknown = set(modes or ()) - set(MODES)
        if unknown:
            raise ValueError(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
        self.bucket = bucket
        self.modes = list(modes) if modes else None

    def randomize(self, data=None) -> None:  # randomness is drawn inside __call__
        pass

    def __call__(self, mask, bucket: str | None = None, modes: Sequence[str] | None = None):
        arr = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)
        if arr.ndim == 3 and arr.shape[0] == 1:
            gt = arr[0] > 0.5
        elif arr.ndim == 2:
            gt = arr > 0.5
        else:
            raise ValueError(f"mask must have shape (H, W) or (1, H, W), got {tuple(arr.shape)}")
        out, info = self.simulate(gt, bucket, modes)
        out = out.reshape(arr.shape)
        coarse, *_ = convert_to_dst_type(out, dst=mask, dtype=np.float32 if isinstance(mask, np.ndarray) else None)
        if not isinstance(mask, np.ndarray):
            coarse = coarse.float()
        return coarse, info

    # ---- core -------------------------------------------------------------------------------------------------

    def simulate(self, gt: np.ndarray, bucket: str | None = None, modes: Sequence[str] | None = None):
        """(H, W) bool -> ((H, W) float32 coarse, info dict)."""
        p, rng = self.policy, self.R
        bucket, modes = bucket or self.bucket, modes or self.modes
        H, W = gt.shape
        if bucket is None:
            bucket = BUCKETS[int(rng.choice(3, p=np.asarray(p.bucket_probs, float)))]
        desc = lesion_descriptors(gt)
        info = {"bucket": bucket, "modes": [], "descriptors": desc.as_dict()}
        if desc.area == 0 or (bucket == "perfect" and not p.soft):
            info.update(dice=1.0, iou=1.0, in_range=True, bucket=bucket if desc.area else "empty")
            return gt.astype(np.float32), info

        # crop around the lesion, downscaled to at most work_size
        R = desc.radius
        ys, xs = np.nonzero(gt)
        m = int(math.ceil(1.25 * R + 6))
        y0, y1 = max(int(ys.min()) - m, 0), min(int(ys.max()) + m + 1, H)
        x0, x1 = max(int(xs.min()) - m, 0), min(int(xs.max()) + m + 1, W)
        crop = gt[y0:y1, x0:x1]
        ch, cw = crop.shape
        s = min(1.0, p.work_size / max(ch, cw))
        work = crop
        if s < 1.0:
            size = (max(int(round(cw * s)), 8), max(int(round(ch * s)), 8))
            work = cv2.resize(crop.astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0.5
            if not work.any():
                work, s = crop, 1.0
        small = R / min(H, W) < p.small_radius
        wdesc = lesion_descriptors(work)
        irregular = max(
            (p.irregular_solidity - wdesc.solidity) / 0.25 if wdesc.solidity < p.irregular_solidity else 0.0,
            (0.6 - wdesc.circularity) / 0.4 if wdesc.circularity < 0.6 else 0.0,
        )
        smallness = max(0.0, 1.0 - (R / min(H, W)) / p.small_radius)
        k = float(np.clip(max(smallness, irregular), 0.0, 1.0))
        ctx = WorkCrop(work, rng, wdesc.radius, k, p.corr_len)
        lo, hi = p.bucket_range(bucket)
        eps = min(0.01, (hi - lo) / 4)
        target = lo + eps + (hi - lo - 2 * eps) * rng.beta(1.0, 1.0 + p.aggressiveness_gain * k)
        info.update(aggressiveness=k, small=bool(small), target_dice=float(target))

        forced = list(modes) if modes else None
        phi_w = None
        if bucket == "perfect":  # soft map of the unchanged mask
            used, phi_w = [], ctx.phi
        elif (forced and "small_lesion" in forced) or (
            forced is None and bucket == "heavy" and small and rng.uniform() < p.small_lesion_prob
        ):
            if not small:
                raise ValueError("small_lesion failure requested for a lesion that is not small")
            if rng.uniform() < p.vanish_prob:
                info.update(modes=["small_lesion"], variant="vanish", dice=0.0, iou=0.0, in_range=lo <= 0.0)
                return np.zeros((H, W), np.float32), info
            target = lo + eps + (min(hi, lo + 0.1) - lo - eps) * rng.uniform()
            used, phi_w = self._search(ctx, ["erosion"], 0.0, target, lo, hi)
            if phi_w is None:  # a few pixels: Dice jumps past the range, keep the closest shrinkage
                used, phi_w = self._search(ctx, ["erosion"], 0.0, target, 0.0, 1.0)
            used = ["small_lesion"]
            info.update(variant="shrink", target_dice=float(target))
        else:
            for attempt in range(p.max_retries + 1):
                chosen = forced or (self._draw_modes(k) if attempt < p.max_retries else [self._fallback(ctx)])
                rough = 0.0
                if "roughness" in (forced or []) or (
                    forced is None and rng.uniform() < p.roughness_prob + 0.4 * min(irregular, 1.0)
                ):
                    rough = rng.uniform(*p.roughness_amplitude)
                used, phi_w = self._search(ctx, [mm for mm in chosen if mm != "roughness"], rough, target, lo, hi)
                if phi_w is not None or forced:
                    break
            if phi_w is None and forced:  # forced modes that cannot reach the bucket: keep the closest result
                used, phi_w = self._search(ctx, [mm for mm in chosen if mm != "roughness"], rough, target, 0, 1)
            elif phi_w is None:  # bucket out of reach (e.g. a lesion of a few pixels): closest erosion
                used, phi_w = self._search(ctx, ["erosion"], 0.0, target, 0.0, 1.0)
            if phi_w is None:
                raise ValueError(f"modes {chosen} are not applicable to this mask (lesion too thin or crop too small)")

        # back to the crop resolution, then the full image
        phi_c = phi_w if s == 1.0 else cv2.resize(phi_w / s, (cw, ch), interpolation=cv2.INTER_LINEAR)
        out = np.zeros((H, W), np.float32)
        if p.soft:
            soft = self._soft(phi_c, 1.0)
            if bucket == "perfect":  # upsampling must not move the 0.5 level: keep it exactly on the mask
                soft = np.where(crop, np.maximum(soft, 0.51), np.minimum(soft, 0.49))
            out[y0:y1, x0:x1] = soft
        else:
            out[y0:y1, x0:x1] = phi_c > 0
        dice, iou = dice_iou(out > 0.5, gt)
        info.update(modes=used, dice=float(dice), iou=float(iou), in_range=bool(lo <= dice <= hi))
        return out, info

    def _soft(self, phi: np.ndarray, scale: float) -> np.ndarray:
        t = self.R.uniform(*self.policy.temperature)
        return (1.0 / (1.0 + np.exp(-np.clip(phi * scale / t, -50, 50)))).astype(np.float32)

    def _draw_modes(self, k: float) -> list[str]:
        names = [mm for mm in PRIMARY_MODES if self.policy.mode_weights.get(mm, 0) > 0]
        w = np.array([self.policy.mode_weights[mm] for mm in names], float)
        chosen = [names[int(self.R.choice(len(names), p=w / w.sum()))]]
        extra = min(self.policy.extra_mode_prob * (1 + k), 1.0)
        while len(chosen) < self.policy.max_modes and self.R.uniform() < extra:
            mm = names[int(self.R.choice(len(names), p=w / w.sum()))]
            if mm in chosen or {mm, *chosen} >= {"erosion", "dilation"}:
                break
            chosen.append(mm)
        return chosen

    def _fallback(self, ctx: WorkCrop) -> str:
        return "erosion" if self.R.uniform() < 0.5 else "dilation"

    def _search(self, ctx: WorkCrop, modes: list[str], rough: float, target: float, lo: float, hi: float):
        """Build the modes, then bisect the strength a in [0, 1] for Dice near ``target`` within [lo, hi].

        Returns (modes used, corrupted SDF in work pixels) or (modes, None) when [lo, hi] is out of reach.
        """
        add = np.zeros_like(ctx.phi)
        ops: list[PhiOp] = []
        used = []
        for name in modes:
            built = MODE_BUILDERS[name](ctx)
            if built is None:
                continue
            term, extra = built
            if term is not None:
                add += term
            ops += extra
            used.append(name)
        if not used and not rough:
            return used, None
        base = ctx.phi + rough * ctx.field(self.R.uniform(1.0, 1.5)) if rough else ctx.phi
        if rough:
            used.append("roughness")
        if len(used) == 1 and rough:  # roughness alone has no strength to tune
            return used, (base if lo <= dice_iou(base > 0, ctx.gt)[0] <= hi else None)

        def compose(a: float) -> np.ndarray:
            phi = base + a * add
            for op in ops:
                phi = op(phi, a)
            return phi

        def dice(a: float) -> tuple[float, np.ndarray]:
            phi = compose(a)
            return dice_iou(phi > 0, ctx.gt)[0], phi

        best, best_err = None, math.inf
        a_lo, a_hi = 0.0, 1.0
        d1, phi1 = dice(1.0)
        if d1 > hi:
            return used, None
        if lo <= d1 <= hi:
            best, best_err = phi1, abs(d1 - target)
        for _ in range(self.policy.bisect_steps):
            a = 0.5 * (a_lo + a_hi)
            d, phi = dice(a)
            if lo <= d <= hi and abs(d - target) < best_err:
                best, best_err = phi, abs(d - target)
            if abs(d - target) < 0.005:
                break
            if d > target:
                a_lo = a
            else:
                a_hi = a
        return used, best


class SimulateSegmentationFailured(RandomizableTransform, MapTransform):
    """Dictionary version: reads ``keys`` (ground-truth masks, (1, H, W) or (H, W)) and adds, per key,
    ``<coarse_key>`` (float32, same shape and type), ``<coarse_key>_dice``, ``_iou``, ``_modes`` (list of str),
    ``_bucket`` and ``_in_range``. Reproducible through ``set_random_state``; picklable.

    Args:
        keys: mask key(s); usually ``"label"``.
        coarse_key: output key (or one per key).
        prob: probability of simulating at all; otherwise the output is the mask itself (bucket ``perfect``).
        policy, bucket, modes, **overrides: as in :class:`SimulateSegmentationFailure`.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        coarse_key: str | Sequence[str] = "coarse",
        prob: float = 1.0,
        policy: FailurePolicy | None = None,
        bucket: str | None = None,
        modes: Sequence[str] | None = None,
        allow_missing_keys: bool = False,
        **overrides,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.coarse_keys = [coarse_key] if isinstance(coarse_key, str) else list(coarse_key)
        if len(self.coarse_keys) != len(self.keys):
            raise ValueError(f"need one coarse_key per key: keys={self.keys}, coarse_key={self.coarse_keys}")
        self.simulator = SimulateSegmentationFailure(policy, bucket, modes, **overrides)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.simulator.set_random_state(state=self.R)  # one stream for both, so a seed fixes everything
        return self

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key, ck in self.key_iterator(d, self.coarse_keys):
            self.randomize(None)
            if self._do_transform:
                coarse, info = self.simulator(d[key])
            else:
                coarse, info = self.simulator(d[key], bucket="perfect")
            d[ck] = coarse
            d[f"{ck}_dice"], d[f"{ck}_iou"] = info["dice"], info["iou"]
            d[f"{ck}_modes"], d[f"{ck}_bucket"], d[f"{ck}_in_range"] = info["modes"], info["bucket"], info["in_range"]
        return d
