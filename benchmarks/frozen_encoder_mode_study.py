"""What the frozen LiteMedSAM encoder's train mode did to refinement (the bug fixed in ultrarefiner bundle 0.1.8).

Before the fix the trainers' ``network.train()`` also put the frozen image encoder in train mode. LiteMedSAM's TinyViT
has 27 batch norms: in train mode they normalise by the batch's statistics and overwrite their running ones. This
script refines the same coarse masks with the shipped phase-2 refiner three ways, in one run:

- ``eval``: the encoder in eval mode (phase 2's cached embeddings, inference, and phase 3 since the fix);
- ``train``: the encoder in train mode, batches of ``--batch`` images (what phase 3 cached for its training images);
- ``eval_after_drift``: eval mode again, after the ``train`` pass overwrote the running statistics.

Coarse masks: each ground-truth mask eroded or dilated by 3-11 pixels (seeded). Prompts and decoding as ``refine``.

    python benchmarks/frozen_encoder_mode_study.py --images TEST/images --labels TEST/masks --n 32
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def main() -> None:
    from ultrarefiner.engines.inference import refine_folder as engine
    from ultrarefiner.hub import create_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True, help="folder of images <stem>.png")
    ap.add_argument("--labels", required=True, help="folder of ground-truth masks <stem>.png")
    ap.add_argument("--n", type=int, default=32, help="images (the first n by name)")
    ap.add_argument("--batch", type=int, default=4, help="images per train-mode batch (phase 3's batch size)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device = torch.device("cpu")
    refiner = create_model("sam_refiner", engine.resolve_refiners(None, False)[0], device=device).eval()
    samples, labels = [], []
    for f in sorted(Path(args.images).glob("*.png"))[: args.n]:
        image = np.asarray(Image.open(f).convert("L"))
        label = np.asarray(Image.open(Path(args.labels) / f.name).convert("L")) > 0
        op = ndimage.binary_erosion if rng.random() < 0.5 else ndimage.binary_dilation
        coarse = op(label, iterations=int(rng.integers(3, 12)))
        samples.append({"pixels": image, "coarse": coarse.astype(np.uint8) * 255,
                        "frame": engine.encoder_frame(refiner.geometry, image)})
        labels.append((label, coarse))
    print(f"{len(samples)} images; input (coarse) Dice {np.mean([dice(c, lab) for lab, c in labels]):.4f}")
    encoder = refiner.sam.image_encoder
    for mode in ("eval", "train", "eval_after_drift"):
        runner = engine.BatchRefiner(refiner, device, False, "none", "none")  # the encoder module itself
        scores = []
        for i in range(0, len(samples), args.batch):
            encoder.train(mode == "train")  # set on the encoder itself: SAMRefiner.train() now keeps it in eval
            probs, _ = runner.probabilities(samples[i:i + args.batch])
            encoder.eval()
            truth = [lab for lab, _ in labels[i:i + args.batch]]
            scores += [dice(p.squeeze().numpy() > 0.5, lab) for p, lab in zip(probs, truth, strict=True)]
        print(f"{mode:18s} refined Dice {np.mean(scores):.4f}")


if __name__ == "__main__":
    main()
