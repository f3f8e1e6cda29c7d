"""Phase-3 validation throughput (images/s) at batch 1 and at batch N in one run, on the device present: the
ultrarefiner bundle's ``validate#evaluator`` (the one ``evaluate.json`` also runs), with its metrics and its
native-resolution report, over images of different native sizes.

    python benchmarks/bench_validation.py                                     # phantoms, LiteMedSAM, CPU or GPU
    python benchmarks/bench_validation.py --datalist /work/run/processed/BUSI/datalist.json --n 48  # fold 0
    python benchmarks/bench_validation.py --sam vit_b --batches 1,8,32         # on a GPU

- batch 1: the evaluator as the bundle ran it up to 0.1.6: MONAI's collate, one image per iteration, decollate.
- batch N: what it runs now: uncollated batches (``no_collation``) of N native images of any sizes; one encoder,
  TransUNet and decoder pass per batch (``E2EEvalStep``).

Each setting runs twice on a fresh network: ``miss`` (the embedding cache is empty: the first validation of a run, and
``evaluate.json``, which does not cache) and ``hit`` (every embedding cached: each later validation of a training
run). The networks have random weights (TransUNet R50-ViT-B/16 at 224 px; LiteMedSAM's packaged weights, or a random
vit_b), which cost the same time as trained ones. The CPU seconds per image of this process are printed with the
wall clock (data workers excluded). Rates are best-of ``--repeats``, settings run round-robin.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def phantom_items(folder: Path, n: int, seed: int = 0) -> list[dict]:
    """``n`` BUSI-like phantoms (300-480 x 380-620) with their lesion labels, as datalist items."""
    from ultrarefiner.data.synthetic import make_phantom
    from ultrarefiner.utils.io import write_png

    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        image, masks = make_phantom(rng, "benign" if i % 2 else "malignant")
        items.append({"image": str(write_png(folder / f"p{i:03d}.png", image)),
                      "label": str(write_png(folder / f"p{i:03d}_mask.png", masks[0].astype(np.uint8) * 255)),
                      "dataset": "phantom"})
    return items


def build_network(sam: str, device: torch.device) -> torch.nn.Module:
    from ultrarefiner.engines.training.e2e_setup import build_ultrarefiner

    torch.manual_seed(0)
    kwargs = {"transunet": {"img_size": 224, "num_classes": 2, "in_channels": 1, "variant": "R50-ViT-B_16"},
              "sam": {"model_type": sam}, "refiner": {"preprocessing": "litemedsam" if sam == "lite_medsam"
                                                      else "medsam"}}
    return build_ultrarefiner(kwargs, cache_embeddings=True).to(device).eval()


def evaluator(network: torch.nn.Module, items: list[dict], batch: int, device: torch.device, out: Path,
              workers: int, amp: bool):
    from ultrarefiner.engines.training.bundle_engines import bundle_evaluator

    overrides = {"device": f"$torch.device('{device}')", "amp": amp, "num_workers": workers, "cache": "memory",
                 "network_def": network, "network": network, "validate#datalist": items, "output_dir": str(out),
                 "val_batch_size": batch}
    if batch == 1:  # the evaluator of bundle 0.1.6: collated batch 1, decollated outputs
        overrides.update({"validate#evaluator#decollate": True,
                          "validate#dataloader#collate_fn": "$monai.data.utils.list_data_collate"})
    return bundle_evaluator("ultrarefiner", overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sam", choices=("lite_medsam", "vit_b"), default="lite_medsam")
    parser.add_argument("--datalist", type=Path, default=None, help="a preprocessed datalist (default: phantoms)")
    parser.add_argument("--n", type=int, default=24, help="images validated per pass")
    parser.add_argument("--batches", default="1,8", help="validation batch sizes, comma-separated")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--no-amp", action="store_true", help="float32 on a GPU (default: bf16 autocast)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.datalist:  # fold 0's validation images, as the bundle validates them
            from ultrarefiner.data.datalist import load_split

            items = load_split(str(args.datalist), 0, "val")[: args.n]
        else:
            items = phantom_items(tmp / "data", args.n)
        # the cache persists in the data set (cache="memory"): each setting keeps its evaluator and network
        setups = {}
        for b in batches:
            network = build_network(args.sam, device)
            setups[b] = (network, evaluator(network, items, b, device, tmp / f"out{b}", args.workers,
                                            not args.no_amp))
        best: dict[tuple[int, str], tuple[float, float]] = {}
        for r in range(args.repeats):
            for b, (network, ev) in setups.items():
                for state in ("miss", "hit"):
                    if state == "miss":
                        network.refresh_cache()  # empties the cache
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    wall, cpu = time.perf_counter(), time.process_time()
                    ev.run()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                    n = len(items)
                    old = best.get((b, state), (0.0, float("inf")))
                    best[(b, state)] = (max(old[0], n / wall), min(old[1], cpu / n))
                    print(f"  repeat {r}, batch {b}, {state}: {n / wall:.2f} images/s, {cpu / n:.3f} CPU s/image",
                          file=sys.stderr, flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    amp = not args.no_amp and device.type == "cuda"
    print(f"phase-3 validation, {args.sam}, {len(items)} images, {name}, amp={amp}")
    print(f"{'batch':>6s} {'cache':>6s} {'images/s':>10s} {'CPU s/image':>12s} {'vs batch ' + str(batches[0]):>12s}")
    for (b, state), (rate, cpu) in best.items():
        ratio = rate / best[(batches[0], state)][0]
        print(f"{b:>6d} {state:>6s} {rate:>10.2f} {cpu:>12.3f} {ratio:>11.2f}x")


if __name__ == "__main__":
    main()
