"""TransUNet on a CPU in float32 (eager, ``jit_freeze``) and in bfloat16 (``bf16``): speed and mask quality, one run.

``predict`` and ``predict-transunet`` run TransUNet through ``fast_inference.fast_segmenter`` with the
``optimize`` option: ``bf16`` (``auto`` on a CPU with native bfloat16) or float32 eager (``none``; ``jit_freeze``
too). ``frozen`` here is what ``jit_freeze`` would be, a frozen TorchScript trace (``FrozenEncoder``), measured to
decide whether TransUNet should get one. This script predicts the same images with a trained TransUNet checkpoint
in each mode (``transunet_predict.predict_probabilities``, the code of ``predict-transunet``), then prints:

- images/s per mode (the best of ``--repeats`` round-robin passes, after a warm-up that builds the traces);
- per mode, Dice of the 0.5-thresholded mask against the labels;
- per mode against float32 eager: the paired Dice difference with its bootstrap 95% CI, the images whose mask
  changed, the changed pixels, and the largest probability difference.

    python benchmarks/transunet_cpu_modes_study.py --checkpoint CKPT/transunet/BUSI/fold_0/best.pt \\
        --datalist DATA/BUSI/datalist.json --split test
"""

from __future__ import annotations

import argparse
import time
from unittest.mock import patch

import numpy as np
import torch


def main() -> None:
    from ultrarefiner.data.datalist import load_split
    from ultrarefiner.data.imaging import read_label
    from ultrarefiner.engines.evaluation.comparison import paired_comparison
    from ultrarefiner.engines.inference import fast_inference
    from ultrarefiner.engines.inference.fast_inference import FrozenEncoder, native_bf16_cpu
    from ultrarefiner.engines.inference.transunet_predict import predict_probabilities
    from ultrarefiner.hub import create_model
    from ultrarefiner.transforms.sdf_fields import dice_iou

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="transunet best.pt or models/model.pt")
    ap.add_argument("--datalist", required=True, help="datalist.json of preprocess")
    ap.add_argument("--split", default="test", help="test, val or train (of --fold)")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--n", type=int, default=0, help="first n images only (0: all)")
    ap.add_argument("--modes", default="none,frozen,bf16", help="optimize options, and frozen")
    ap.add_argument("--batch_size", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per mode")
    args = ap.parse_args()

    items = load_split(args.datalist, args.fold, args.split)
    items = items[: args.n] if args.n else items
    labels = [read_label(it["label"]) for it in items]
    model = create_model("transunet", args.checkpoint, device="cpu").eval()
    size = getattr(model, "img_size", 224)
    modes = [m.strip() for m in args.modes.split(",")]
    print(f"{len(items)} images ({args.split} of fold {args.fold}); CPU, {torch.get_num_threads()} threads, native "
          f"bfloat16: {native_bf16_cpu()}; torch {torch.__version__}; batch {args.batch_size}")

    frozen = FrozenEncoder(model)  # one trace per batch shape, kept across passes

    def run(mode: str) -> list[np.ndarray]:
        if mode != "frozen":
            return predict_probabilities(model, items, size, "cpu", args.batch_size, amp=False, optimize=mode)
        with patch.object(fast_inference, "fast_segmenter", lambda *_: frozen):
            return predict_probabilities(model, items, size, "cpu", args.batch_size, amp=False)

    probs, rate = {}, {m: 0.0 for m in modes}
    for m in modes:  # warm-up: each mode's first pass (builds the frozen traces) also gives its probabilities
        probs[m] = run(m)
        model.to(memory_format=torch.contiguous_format)  # bf16 converts the weights to channels_last in place
    for _ in range(args.repeats):
        for m in modes:
            t = time.perf_counter()
            run(m)
            rate[m] = max(rate[m], len(items) / (time.perf_counter() - t))
            model.to(memory_format=torch.contiguous_format)
    ref = modes[0]
    scores = {m: [dice_iou(p > 0.5, lab)[0] for p, lab in zip(probs[m], labels, strict=True)] for m in modes}
    print(f"{'mode':<12s} {'images/s':>9s} {'x ' + ref:>10s} {'Dice':>7s}  vs {ref}: Dice diff [95% CI], "
          "images changed, pixels changed, max |p diff|")
    for m in modes:
        c = paired_comparison(scores[ref], scores[m], "dice")
        changed = [int(((p > 0.5) != (q > 0.5)).sum()) for p, q in zip(probs[ref], probs[m], strict=True)]
        pdiff = max(float(np.abs(p - q).max()) for p, q in zip(probs[ref], probs[m], strict=True))
        print(f"{m:<12s} {rate[m]:9.3f} {rate[m] / rate[ref]:10.2f} {np.mean(scores[m]):7.4f}  "
              f"{c['mean_diff']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}], "
              f"{sum(n > 0 for n in changed)}/{len(items)}, {sum(changed)}, {pdiff:.4f}")


if __name__ == "__main__":
    main()
