"""Failure simulation: fields, every failure mode, conditioning, reproducibility, and the mixture on real BUSI masks."""

from __future__ import annotations

import pickle
import re
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image
from scipy import ndimage

from conftest import busi_root
from ultrarefiner.transforms.failure_simulation import (
    MODES,
    FailurePolicy,
    SimulateSegmentationFailure,
    SimulateSegmentationFailured,
)
from ultrarefiner.transforms.sdf_fields import (
    autocorrelation,
    gaussian_random_field,
    lesion_descriptors,
    signed_distance,
)

EIGHT = np.ones((3, 3), bool)  # 8-connectivity


def ellipse(h=200, w=240, cy=100, cx=120, ry=40, rx=55) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def lobulated(h=200, w=240) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    theta = np.arctan2(yy - 100, xx - 120)
    radius = 45 * (1 + 0.35 * np.cos(5 * theta))
    return np.hypot(yy - 100, xx - 120) <= radius


def run(mask, modes, bucket="heavy", seed=0, **kw):
    sim = SimulateSegmentationFailure(bucket=bucket, modes=modes, **kw)
    sim.set_random_state(seed)
    out, info = sim.simulate(mask)
    return out > 0.5, info


# ---- fields and descriptors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("corr_len", [3.0, 8.0, 16.0])
def test_random_field_is_low_frequency(corr_len):
    f = gaussian_random_field((256, 256), corr_len, np.random.RandomState(1))
    assert abs(float(f.std()) - 1) < 1e-3 and abs(float(f.mean())) < 1e-3
    assert autocorrelation(f, max(1, round(corr_len / 2))) > 0.5  # white noise would give ~0 here
    assert autocorrelation(f, round(3 * corr_len)) < 0.3  # and it is not a constant either


def test_signed_distance_and_descriptors():
    m = ellipse()
    phi = signed_distance(m)
    assert np.array_equal(phi > 0, m)
    assert abs(phi[100, 120] - 40) < 1.0  # distance to the nearer (minor-axis) edge
    d = lesion_descriptors(m)
    assert abs(d.area - m.sum()) < 1 and d.circularity > 0.85 and d.solidity > 0.95
    lob = lesion_descriptors(lobulated())
    assert lob.solidity < 0.9 and lob.circularity < d.circularity


# ---- every failure mode does what it says -------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bucket", ["mild", "heavy"])
def test_erosion_and_dilation(seed, bucket):
    gt = ellipse()
    lo, hi = FailurePolicy().bucket_range(bucket)
    out, info = run(gt, ["erosion"], bucket, seed)
    assert not (out & ~gt).any() and out.sum() < gt.sum() and lo <= info["dice"] <= hi
    out, info = run(gt, ["dilation"], bucket, seed)
    assert not (gt & ~out).any() and out.sum() > gt.sum() and lo <= info["dice"] <= hi


@pytest.mark.parametrize("seed", range(4))
def test_warp_moves_the_boundary_both_ways(seed):
    gt = ellipse()
    out, info = run(gt, ["warp"], "heavy", seed)
    assert (out & ~gt).any() and (gt & ~out).any()
    assert info["modes"] == ["warp"] and 0.4 <= info["dice"] <= 0.8


@pytest.mark.parametrize("seed", range(4))
def test_missing_part_and_breakage_remove_lesion(seed):
    gt = ellipse()
    out, _ = run(gt, ["missing_part"], "heavy", seed)
    missing = gt & ~out
    assert not (out & ~gt).any() and missing.sum() > 0.2 * gt.sum()
    # the missing part is a cap: it touches the lesion's contour
    assert (missing & ~ndimage.binary_erosion(gt)).any()
    out, _ = run(gt, ["breakage"], "mild", seed)
    assert not (out & ~gt).any()
    assert ndimage.label(out, EIGHT)[1] >= 2  # a convex lesion is split into pieces


@pytest.mark.parametrize("seed", range(5))
def test_holes_strictly_inside(seed):
    gt = ellipse()
    out, info = run(gt, ["holes"], "mild", seed)
    holes = gt & ~out
    assert holes.any() and not (out & ~gt).any()
    assert signed_distance(gt)[holes].min() >= 1.0  # no hole pixel touches the contour
    assert np.array_equal(ndimage.binary_fill_holes(out), gt)  # every hole is enclosed


@pytest.mark.parametrize("seed", range(5))
def test_false_positive_islands_are_disconnected(seed):
    gt = ellipse()
    out, info = run(gt, ["fp_islands"], "mild", seed)
    assert not (gt & ~out).any() and (out & ~gt).any()
    labels, n = ndimage.label(out, EIGHT)
    lesion_ids = set(np.unique(labels[gt])) - {0}
    assert n > len(lesion_ids)  # at least one island
    islands = np.isin(labels, list(lesion_ids), invert=True) & out
    assert not (islands & ndimage.binary_dilation(gt, EIGHT)).any()


@pytest.mark.parametrize("seed", range(5))
def test_bridge_connects_lesion_to_new_structure(seed):
    gt = ellipse()
    out, info = run(gt, ["bridge"], "mild", seed)
    assert not (gt & ~out).any()
    labels, n = ndimage.label(out, EIGHT)
    assert n == 1  # lesion, band and structure form one piece
    radius = lesion_descriptors(gt).radius
    outside = ndimage.distance_transform_edt(~gt)
    assert outside[out].max() >= 0.3 * radius  # the piece reaches a structure well away from the lesion


@pytest.mark.parametrize("seed", range(4))
def test_roughness_is_small_and_local(seed):
    gt = ellipse()
    out, info = run(gt, ["roughness"], "mild", seed)
    changed = out ^ gt
    assert changed.any() and info["modes"] == ["roughness"]
    assert np.abs(signed_distance(gt)[changed]).max() <= 8  # only near the contour
    per = lesion_descriptors(out)
    assert per.circularity < lesion_descriptors(gt).circularity  # a rougher, longer outline


def test_small_lesion_failure_only_for_small_lesions():
    small = ellipse(256, 256, 128, 128, 6, 7)  # R / 256 ~ 0.025 < small_radius
    big = ellipse()
    for seed in range(12):
        out, info = run(small, ["small_lesion"], "heavy", seed)
        assert info["modes"] == ["small_lesion"]
        assert not (out & ~small).any() and out.sum() <= 0.7 * small.sum()  # shrunk hard or gone
    with pytest.raises(ValueError, match="not small"):
        run(big, ["small_lesion"], "heavy", 0)
    sim = SimulateSegmentationFailure(bucket="heavy", small_lesion_prob=1.0, vanish_prob=1.0)
    sim.set_random_state(0)
    assert all(sim.simulate(small)[1]["modes"] == ["small_lesion"] for _ in range(10))
    assert all("small_lesion" not in sim.simulate(big)[1]["modes"] for _ in range(40))
    out, info = sim.simulate(small)
    assert not out.any() and info["dice"] == 0.0  # disappearance


def test_conditioning_on_size_and_shape():
    sim = SimulateSegmentationFailure(bucket="heavy")
    sim.set_random_state(3)
    k = {}
    for name, m in (("big", ellipse()), ("small", ellipse(256, 256, 128, 128, 7, 8)), ("lobulated", lobulated())):
        infos = [sim.simulate(m)[1] for _ in range(40)]
        k[name] = (infos[0]["aggressiveness"], np.mean([i["target_dice"] for i in infos]))
    assert k["big"][0] < k["small"][0] and k["big"][0] < k["lobulated"][0]
    assert k["small"][1] < k["big"][1] and k["lobulated"][1] < k["big"][1]  # more aggressive corruption


# ---- transform API ------------------------------------------------------------------------------------------


def test_dict_transform_reproducible_picklable_and_typed():
    gt = ellipse().astype(np.float32)[None]
    t = SimulateSegmentationFailured(keys="label", coarse_key="coarse")
    a = [t.set_random_state(7)({"label": gt}) for _ in range(1)][0]
    b = t.set_random_state(7)({"label": gt})
    assert np.array_equal(a["coarse"], b["coarse"]) and a["coarse_modes"] == b["coarse_modes"]
    assert a["coarse"].shape == gt.shape and a["coarse"].dtype == np.float32
    assert set(np.unique(a["coarse"])) <= {0.0, 1.0}
    for key in ("coarse_dice", "coarse_iou", "coarse_bucket", "coarse_in_range"):
        assert key in a
    assert isinstance(a["coarse_modes"], list)
    outs = {t({"label": gt})["coarse"].tobytes() for _ in range(6)}
    assert len(outs) > 1  # the stream advances
    t2 = pickle.loads(pickle.dumps(t.set_random_state(11)))
    t.set_random_state(11)
    assert np.array_equal(t({"label": gt})["coarse"], t2({"label": gt})["coarse"])

    meta = MetaTensor(torch.from_numpy(gt))
    out = t.set_random_state(1)({"label": meta})
    assert isinstance(out["coarse"], MetaTensor) and out["coarse"].dtype == torch.float32
    assert tuple(out["coarse"].shape) == (1, 200, 240)
    arr = t.set_random_state(1)({"label": gt[0]})["coarse"]  # (H, W) numpy in, same out
    assert arr.shape == (200, 240) and np.array_equal(arr, out["coarse"][0].numpy())
    perfect = SimulateSegmentationFailured(keys="label", prob=0.0)({"label": gt})
    assert perfect["coarse_bucket"] == "perfect" and np.array_equal(perfect["coarse"], gt)


def test_soft_output_and_bad_arguments():
    gt = ellipse()
    sim = SimulateSegmentationFailure(bucket="mild", soft=True)
    sim.set_random_state(0)
    out, info = sim.simulate(gt)
    assert out.min() >= 0 and out.max() <= 1 and ((out > 0.05) & (out < 0.95)).any()
    assert 0.8 <= info["dice"] <= 0.95
    perfect = SimulateSegmentationFailure(bucket="perfect", soft=True).set_random_state(0)
    out, info = perfect.simulate(gt)
    assert np.array_equal(out > 0.5, gt) and info["dice"] == 1.0 and ((out > 0.05) & (out < 0.95)).any()
    with pytest.raises(ValueError):
        SimulateSegmentationFailure(bucket_probs=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError):
        SimulateSegmentationFailure(modes=["melt"])
    with pytest.raises(ValueError):
        SimulateSegmentationFailure(mild_range=(0.9, 0.8))
    assert set(MODES) >= {"erosion", "dilation", "holes", "fp_islands", "bridge", "small_lesion", "roughness"}


def test_large_mask_uses_a_crop():
    yy, xx = np.mgrid[0:1024, 0:1024]
    gt = ((yy - 500) / 150.0) ** 2 + ((xx - 480) / 200.0) ** 2 < 1
    sim = SimulateSegmentationFailure(bucket="heavy")
    sim.set_random_state(0)
    out, info = sim.simulate(gt)
    assert out.shape == (1024, 1024) and 0.4 <= info["dice"] <= 0.8
    assert not out[:200].any()  # nothing far from the lesion


@pytest.mark.parametrize("bucket", ["mild", "heavy"])
def test_degenerate_masks_never_crash(bucket):
    pixel, line, full = np.zeros((64, 64), bool), np.zeros((64, 64), bool), np.ones((48, 48), bool)
    pixel[30, 30] = True
    line[30, 5:60] = True
    corner = np.zeros((128, 128), bool)
    corner[:12, :12] = True
    sim = SimulateSegmentationFailure(bucket=bucket, soft=bucket == "heavy")
    sim.set_random_state(0)
    for mask in (pixel, line, full, corner, np.zeros((32, 32), bool)):
        for _ in range(10):
            out, info = sim.simulate(mask)
            assert out.shape == mask.shape and out.dtype == np.float32 and 0 <= info["dice"] <= 1
            assert info["in_range"] == (
                info["bucket"] == "empty" or (lo_hi(bucket)[0] <= info["dice"] <= lo_hi(bucket)[1])
            )


def lo_hi(bucket: str) -> tuple[float, float]:
    return FailurePolicy().bucket_range(bucket)


# ---- the mixture on real BUSI masks -------------------------------------------------------------------------


def busi_masks(long_side: int = 256) -> list[np.ndarray]:
    root = busi_root() / "Dataset_BUSI_with_GT"  # skips without the real data
    groups: dict[str, list[Path]] = defaultdict(list)
    for cls in ("benign", "malignant"):
        for f in sorted((root / cls).glob("* (*)_mask*.png")):
            groups[re.sub(r"_mask(_\d+)?\.png$", "", f.name)].append(f)
    masks = []
    for name in sorted(groups):
        m = np.logical_or.reduce([np.asarray(Image.open(f).convert("L")) > 127 for f in groups[name]])
        h, w = m.shape
        s = long_side / max(h, w)
        m = cv2.resize(m.astype(np.float32), (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA) > 0.5
        if m.any():
            masks.append(m)
    return masks


@pytest.mark.slow
def test_mixture_on_real_busi_masks():
    # masks downscaled to the training resolution (longest side 256): buckets are measured where the model trains
    masks = busi_masks()
    assert len(masks) > 500
    sim = SimulateSegmentationFailure()
    sim.set_random_state(2024)
    rng = np.random.RandomState(5)
    n = 2000
    buckets, in_range, modes = Counter(), 0, Counter()
    for i in rng.randint(len(masks), size=n):
        _, info = sim.simulate(masks[i])
        buckets[info["bucket"]] += 1
        in_range += info["in_range"]
        modes.update(info["modes"])
    for bucket, p in zip(("perfect", "mild", "heavy"), FailurePolicy().bucket_probs, strict=True):
        assert abs(buckets[bucket] / n - p) <= 0.03, buckets
    assert in_range / n >= 0.95
    assert all(modes[m] > 0 for m in MODES), modes  # every mode occurs on real masks
