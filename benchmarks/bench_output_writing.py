"""Host cost of writing the outputs of ``refine`` and ``predict`` (masks, overlay PNGs, metrics), in one run:
before (PIL's default zlib level 6, written in the main thread) and now (overlays at ``PICTURE_PNG_LEVEL``, written
by ``BackgroundWrites`` threads), and each change alone.

    python benchmarks/bench_output_writing.py                                     # phantoms of BUSI-like sizes
    python benchmarks/bench_output_writing.py --images /work/run/t129/images \\
        --masks /work/run/cpu3/transunet_test_masks --labels /work/run/t129/labels --n 40

On a GPU the networks take a few milliseconds per image, so this host work sets the ceiling of images/s. ``refine``
runs its own ``_save`` (mask PNG, overlay PNG, metrics when labels are given); ``predict`` runs the ultrarefiner
bundle's ``postprocessing`` (thresholds, overlay, the three ``SaveImaged`` writers) with its ``writes`` waited on per
batch as ``PredictionReport`` does. The masks written are the coarse masks themselves (the refiner's output costs
the same to write). Per setting: images/s (wall clock, best of ``--repeats``) and CPU seconds per image of the whole
process (all threads): the core-seconds a machine with more cores spreads over its writer threads.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def refine_run(data: list[dict], out: Path, workers: int, level: int, batch: int) -> Callable[[], int]:
    from ultrarefiner.engines.inference import refine_folder as engine
    from ultrarefiner.utils.background_writes import BackgroundWrites

    def run() -> int:
        engine.PICTURE_PNG_LEVEL = level  # read by _save at call time
        writes = BackgroundWrites(workers, round_size=batch)  # as refine_folder's
        for k, s in enumerate(data):
            writes.submit(engine._save, s, s["coarse"] > 127, 0.9, out, False, "bench")
            if (k + 1) % batch == 0:
                writes.wait()
        writes.wait(0)
        return len(data)

    return run


def predict_run(data: list[dict], out: Path, workers: int, level: int, batch: int) -> Callable[[], int]:
    from monai.bundle import ConfigParser
    from monai.data import MetaTensor

    import ultrarefiner.utils.io as io

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "ultrarefiner"
    saved = io.PICTURE_PNG_LEVEL
    io.PICTURE_PNG_LEVEL = level  # the config reads it when parsed
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    # the predictor (and so its network) is not built: the writes' round is set as the config sets it
    parser.update({"bundle_root": str(bundle), "output_dir": str(out), "writers": workers,
                   "writes#round_size": 3 * batch})
    post, writes = parser.get_parsed_content("postprocessing"), parser.get_parsed_content("writes")
    io.PICTURE_PNG_LEVEL = saved
    items = []
    for s in data:
        meta = {"filename_or_obj": f"{s['stem']}.png"}
        prob = torch.from_numpy(s["coarse"].astype(np.float32) / 255.0)[None]
        items.append({"pixels": s["pixels"], "coarse": MetaTensor(prob, meta=dict(meta)),
                      "refined": MetaTensor(prob.clone(), meta=dict(meta))})

    def run() -> int:
        for k, item in enumerate(items):
            post(dict(item))
            if (k + 1) % batch == 0:
                writes.wait()  # PredictionReport, once per iteration
        writes.wait(0)
        return len(items)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", help="folder of images (default: phantoms)")
    p.add_argument("--masks", help="folder of coarse masks <stem>.png (with --images)")
    p.add_argument("--labels", help="folder of ground-truth masks: refine also computes its metrics")
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--batch", type=int, default=8, help="images per batch (refine) or iteration (predict)")
    p.add_argument("--writers", type=int, default=None, help="writer threads (default: default_writers())")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    from bench_inference import measure, phantoms

    from ultrarefiner.engines.inference.refine_folder import read_samples
    from ultrarefiner.utils.background_writes import default_writers
    from ultrarefiner.utils.io import PICTURE_PNG_LEVEL

    threads = default_writers() if args.writers is None else args.writers
    with tempfile.TemporaryDirectory(prefix="bench_output_writing_") as tmp:
        tmp = Path(tmp)
        if args.images:
            images, masks = Path(args.images), Path(args.masks or args.images)
        else:
            images, masks = phantoms(tmp / "in", args.n)
        labels = Path(args.labels) if args.labels else None
        data, _ = read_samples(images, masks, labels, limit=args.n)
        sizes = sorted(s["pixels"].size for s in data)
        print(f"{len(data)} images, median {sizes[len(sizes) // 2] / 1e3:.0f} kpixels; labels: {labels is not None}; "
              f"{threads} writer thread(s), {os.cpu_count()} core(s)")
        variants = {"before: zlib 6, main thread": (0, 6), f"zlib {PICTURE_PNG_LEVEL}, main thread":
                    (0, PICTURE_PNG_LEVEL), f"zlib 6, {threads} threads": (threads, 6),
                    f"now: zlib {PICTURE_PNG_LEVEL}, {threads} threads": (threads, PICTURE_PNG_LEVEL)}
        settings = {}
        for name, (workers, level) in variants.items():
            settings[f"refine   {name}"] = refine_run(data, tmp / "refine", workers, level, args.batch)
        for name, (workers, level) in variants.items():
            settings[f"predict  {name}"] = predict_run(data, tmp / "predict", workers, level, args.batch)
        rates = measure(settings, args.repeats)
    print(f"{'outputs of':<46s} {'images/s':>9s} {'vs before':>10s} {'CPU ms/image':>13s}")
    for k, (r, cpu) in rates.items():
        before = rates[k[:9] + "before: zlib 6, main thread"][0]
        print(f"{k:<46s} {r:9.1f} {'x' + format(r / before, '.2f'):>10s} {1000 * cpu:13.1f}")


if __name__ == "__main__":
    main()
