"""Phase-2 training throughput (samples/s) with and without the embedding cache, measured in the same run.

    python benchmarks/bench_refiner_cache.py --model tiny --batch 4 --steps 10             # CPU smoke
    python benchmarks/bench_refiner_cache.py --model vit_b --batch 8 --steps 20 --amp      # GPU

Both modes run the phase-2 bundle's own ``train#trainer`` (``bundles/sam_refiner/configs/train.json`` through
``bundle_trainer``: ``RefinerTrainStep`` with prompts, decoder with grad, RefinerLoss, clipping, AdamW, the train
metrics; no handlers) of identical refiners on the same pre-collated batches of phantom images (already resized into the
encoder frame, as data workers deliver them), so the numbers compare the GPU/CPU work of a step, not data loading.
Without the cache the frozen encoder runs every step; with it every (image, flip) was encoded once beforehand
(``precompute_embeddings``, timed separately as the one-off cost), so the timed steps are the steady state of
epochs >= 2. Also printed: the data-worker cost per sample with the image loaded and resized (needed without a
cache) and without it (``with_image=False``, enough with a filled cache). ``vit_b`` uses a random init (same cost
as MedSAM weights).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events
from PIL import Image
from torch.utils.data import default_collate

from ultrarefiner.data.refiner_data import SimulatedCoarseDataset
from ultrarefiner.data.synthetic import make_phantom
from ultrarefiner.engines.training.bundle_engines import bundle_trainer
from ultrarefiner.engines.training.refiner_training import precompute_embeddings
from ultrarefiner.networks.embedding_cache import EmbeddingCache
from ultrarefiner.networks.sam_refiner import SAMRefiner
from ultrarefiner.networks.sam_weights import build_sam, build_tiny_sam


def write_items(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[dict]:
    """``n`` phantom images with lesions, as training datalist items (fold 1, so fold 0's refiner may use them)."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        image, masks = make_phantom(rng, "benign" if i % 2 else "malignant", size=size)
        img, lab = folder / f"img{i}.png", folder / f"lab{i}.png"
        Image.fromarray(image).save(img)
        Image.fromarray(masks[0].astype(np.uint8) * 255).save(lab)
        items.append({"image": str(img), "label": str(lab), "fold": 1, "dataset": "PHANTOM", "class": "benign"})
    return items


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(refiner: SAMRefiner, batches: list[dict], device: torch.device, warmup: int, amp: bool,
                  cache: EmbeddingCache | None) -> tuple[float, float]:
    """Seconds per step after ``warmup`` steps, and the last loss."""
    stamps: list[float] = []
    losses: list[float] = []
    trainer = bundle_trainer("sam_refiner", {
        "network": refiner, "cache": cache, "device": device, "amp": amp, "grad_clip": 1.0, "epochs": 1,
        "epoch_length": len(batches), "train#dataloader": batches, "train#handlers": [],
    })

    @trainer.on(Events.ITERATION_COMPLETED)
    def _(engine) -> None:
        sync(device)
        stamps.append(time.perf_counter())
        losses.append(float(engine.state.output["loss"]))

    sync(device)
    start = time.perf_counter()
    trainer.run()
    stamps = [start] + stamps
    timed = stamps[warmup:]
    return (timed[-1] - timed[0]) / max(len(timed) - 1, 1), losses[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "vit_b"), default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps per mode")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    parser.add_argument("--images", type=int, default=8, help="distinct phantom images")
    parser.add_argument("--size", type=int, nargs=2, default=(360, 480), metavar=("H", "W"))
    parser.add_argument("--preprocessing", choices=("sam", "medsam"), default="medsam")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(0)
    sam = build_tiny_sam(img_size=1024) if args.model == "tiny" else build_sam("vit_b", "random")
    base = SAMRefiner(sam, preprocessing=args.preprocessing).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; model {args.model} (random init), {args.preprocessing} preprocessing, batch {args.batch}, "
          f"amp {args.amp and device.type == 'cuda'}, {args.steps} timed + {args.warmup} warm-up steps per mode")

    with tempfile.TemporaryDirectory() as tmp:
        items = write_items(Path(tmp), args.images, tuple(args.size))
        ds = SimulatedCoarseDataset(items, 0, base.geometry, samples_per_image=8)
        lean = SimulatedCoarseDataset(items, 0, base.geometry, samples_per_image=8, with_image=False)
        n_steps = args.steps + args.warmup
        t0 = time.perf_counter()
        samples = [ds[i % len(ds)] for i in range(n_steps * args.batch)]
        t_full = (time.perf_counter() - t0) / len(samples)
        t0 = time.perf_counter()
        for i in range(len(samples)):
            lean[i % len(lean)]
        t_lean = (time.perf_counter() - t0) / len(samples)
        batches = [default_collate(samples[i * args.batch : (i + 1) * args.batch]) for i in range(n_steps)]
        keys = {k for b in batches for k in b["image_key"]}

        plain = copy.deepcopy(base)
        s_plain, loss_plain = time_training(plain, batches, device, args.warmup, args.amp, None)
        del plain
        cached = copy.deepcopy(base)
        cache = EmbeddingCache(cached.sam.image_encoder, store_device=device)
        sync(device)
        t0 = time.perf_counter()
        n_enc = precompute_embeddings(cached, cache, [(k, s, f) for k, s, f in ds.encoder_sources() if k in keys],
                                      batch_size=args.batch, amp=args.amp)
        sync(device)
        t_pre = time.perf_counter() - t0
        s_cached, loss_cached = time_training(cached, batches, device, args.warmup, args.amp, cache)

    b = args.batch
    print(f"data worker per sample (1 process): image loaded+resized {1e3 * t_full:.1f} ms, "
          f"image-free (cached) {1e3 * t_lean:.1f} ms")
    print(f"one-off cache fill: {n_enc} (image, flip) embeddings in {t_pre:.2f} s ({t_pre / max(n_enc, 1):.3f} s each)")
    print(f"without cache: {b / s_plain:8.2f} samples/s ({1e3 * s_plain:.1f} ms/step, last loss {loss_plain:.4f})")
    print(f"with cache:    {b / s_cached:8.2f} samples/s ({1e3 * s_cached:.1f} ms/step, last loss {loss_cached:.4f})")
    print(f"speed-up with cache: {s_plain / s_cached:.1f}x")


if __name__ == "__main__":
    main()
