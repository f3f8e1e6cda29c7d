"""Per-sample time of the failure simulator on one CPU core at 224, 256 and 1024 pixels.

    python benchmarks/bench_failure_simulation.py [--draws 200] [--soft]

Masks: real BUSI masks (../shared/data/BUSI, merged per image, squashed to S x S) when present, else synthetic
wavy ellipses of typical size (equivalent radius ~15 % of the side). Every draw uses the default mixture (10 %
unchanged samples included), as the generator does. The reference is ~150 ms per SDF sample at 1024 for a
published implementation. No torch computation is involved (MONAI, imported for the transform base classes,
pulls torch in; its threads are set to 1 too).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy/scipy load their thread pools

import argparse  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ultrarefiner.transforms.failure_simulation import SimulateSegmentationFailure  # noqa: E402

REFERENCE_MS = 150.0
BUSI = Path(__file__).resolve().parents[2] / "shared/data/BUSI/Dataset_BUSI_with_GT"


def busi_masks(limit: int = 120) -> list[np.ndarray]:
    groups: dict[str, list[Path]] = defaultdict(list)
    for cls in ("benign", "malignant"):
        for f in sorted((BUSI / cls).glob("* (*)_mask*.png")) if BUSI.is_dir() else []:
            groups[re.sub(r"_mask(_\d+)?\.png$", "", f.name)].append(f)
    names = sorted(groups)[:: max(1, len(groups) // limit)][:limit]
    masks = [np.logical_or.reduce([np.asarray(Image.open(f).convert("L")) > 127 for f in groups[n]]) for n in names]
    return [m for m in masks if m.any()]


def synthetic_masks(n: int = 40, size: int = 1024) -> list[np.ndarray]:
    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        cy, cx, r = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.08, 0.22)
        theta = np.arctan2(yy - cy, xx - cx)
        radius = r * (1 + 0.15 * np.cos(3 * theta + rng.uniform(0, 6)))
        out.append(np.hypot((yy - cy) / rng.uniform(0.7, 1.0), xx - cx) <= radius)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--soft", action="store_true")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    masks = busi_masks()
    source = f"{len(masks)} real BUSI masks" if masks else "synthetic ellipses"
    masks = masks or synthetic_masks()
    print(f"masks: {source}; {args.draws} draws per size; default mixture; soft={args.soft}; 1 thread")
    print(f"{'size':>6} {'median ms':>10} {'p90 ms':>8} {'in bucket':>10} {'vs 150 ms ref':>14}")
    for size in (224, 256, 1024):
        resized = [cv2.resize(m.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) > 0.5 for m in masks]
        resized = [m for m in resized if m.any()]
        sim = SimulateSegmentationFailure(soft=args.soft)
        sim.set_random_state(0)
        sim.simulate(resized[0])  # warm-up (FFT plans, imports)
        times, in_range = [], 0
        for i in range(args.draws):
            mask = resized[i % len(resized)]
            t0 = time.perf_counter()
            _, info = sim.simulate(mask)
            times.append(time.perf_counter() - t0)
            in_range += info["in_range"]
        med, p90 = np.median(times) * 1e3, np.percentile(times, 90) * 1e3
        print(f"{size:>6} {med:>10.2f} {p90:>8.2f} {in_range / args.draws:>10.1%} {REFERENCE_MS / med:>13.1f}x")


if __name__ == "__main__":
    main()
