"""ATen operations dispatched by one training step of phase 2 and of phase 3, and by one batched ``refine`` and
``predict`` call, by part: the host's load on a GPU.

    python benchmarks/count_step_ops.py                 # full-size networks (random SAM vit_b), a few minutes on CPU
    python benchmarks/count_step_ops.py --tiny          # tiny networks, seconds
    python benchmarks/count_step_ops.py --phases infer  # refine and predict: one image vs 8 images of 8 sizes

A fast GPU runs these steps faster than the host can launch their kernels (bf16 gained 8% on an H200), so the number
of operations per step, not their arithmetic, sets samples/s there. The count does not depend on the device, so it is
taken here on the CPU, with a ``TorchDispatchMode`` around the second step of each bundle's own trainer (the first
fills the embedding cache), and with the component labelling on its device path (the H + W max-pool loop that a GPU
without CUDA graphs runs; on a CPU scipy labels in one call). Views (``view``, ``t``, ``detach``, ...) are counted:
they launch no kernel but cost the host a dispatch each.

Inference (``infer``): ``refine``'s ``BatchRefiner`` (LiteMedSAM with its packaged weights, or ``--sam vit_b``) and
``predict``'s ``UltraPredictor`` (TransUNet R50-ViT-B/16 + the same SAM) on phantoms of 8 (``--images``) different
BUSI image sizes (BUSI has 639 sizes among its 780 images, so a batch rarely shares one), their second call
counted: operations per batch of 1 and of 8, and per image. The prompts and the mask decoder run once per batch,
whatever the sizes; before, they ran once per image size, which made a batch of 8 BUSI images cost about 8 times
the host work of one.

Phase 3: the ultrarefiner bundle's trainer (TransUNet R50-ViT-B/16 at 224, SAM vit_b, box and mask prompts) on one
phantom batch (``bench_e2e``). Phase 2: the sam_refiner bundle's trainer (LiteMedSAM, packaged weights) on simulated
coarse masks of phantoms with a filled embedding cache (``bench_refiner_cache``).
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import default_collate

import ultrarefiner.networks.labelling as labelling
from ultrarefiner.engines.training import step as train_step


class PartCounter(TorchDispatchMode):
    """Counts dispatched ATen operations under the part named by ``self.part``."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: Counter[str] = Counter()
        self.ops: Counter[str] = Counter()
        self.part = "rest of the forward (decoder, glue)"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.parts[self.part] += 1
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def tag(self, owner: Any, name: str, part: str) -> None:
        """Counts what ``owner.name(...)`` dispatches under ``part`` (the innermost tagged call wins)."""
        inner: Callable = getattr(owner, name)

        def tagged(*args, **kwargs):
            outer, self.part = self.part, part
            try:
                return inner(*args, **kwargs)
            finally:
                self.part = outer

        setattr(owner, name, tagged)


def count_second_iteration(trainer, counter: PartCounter) -> None:
    trainer.add_event_handler(Events.ITERATION_STARTED(once=2), lambda _: counter.__enter__())
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=2), lambda _: counter.__exit__(None, None, None))
    trainer.run()


def tag_common(counter: PartCounter, prompts: torch.nn.Module) -> None:
    counter.tag(prompts, "forward", "prompts (without the labelling)")
    counter.tag(labelling, "propagate_labels", "component labelling loop")
    counter.tag(torch.Tensor, "backward", "backward (all)")
    counter.tag(train_step.TrainStep, "compute_loss", "loss")
    counter.tag(train_step.TrainStep, "_optimizer_step", "clipping and optimizer")


def phase3(args: argparse.Namespace) -> PartCounter:
    import bench_e2e

    model = bench_e2e.build_model(args.tiny, "exact", "vit_b")
    counter = PartCounter()
    tag_common(counter, model.refiner.prompt_generator)
    counter.tag(model.transunet, "forward", "TransUNet forward")
    run = argparse.Namespace(batch=args.batch, native=[96, 128] if args.tiny else [480, 640], warmup=1, steps=1)
    count_second_iteration(bench_e2e.e2e_trainer(model, torch.device("cpu"), False, run), counter)
    return counter


def phase2(args: argparse.Namespace) -> PartCounter:
    from bench_refiner_cache import write_items

    from ultrarefiner.data.refiner_data import SimulatedCoarseDataset
    from ultrarefiner.engines.training.bundle_engines import bundle_trainer
    from ultrarefiner.engines.training.refiner_training import precompute_embeddings
    from ultrarefiner.networks import SAMRefiner, build_sam, build_tiny_sam
    from ultrarefiner.networks.embedding_cache import EmbeddingCache

    sam = build_tiny_sam(img_size=256) if args.tiny else build_sam("lite_medsam", "packaged")
    refiner = SAMRefiner(sam, preprocessing="medsam" if args.tiny else "litemedsam")
    counter = PartCounter()
    tag_common(counter, refiner.prompt_generator)
    with tempfile.TemporaryDirectory() as tmp:
        items = write_items(Path(tmp), 2, (360, 480))
        ds = SimulatedCoarseDataset(items, 0, refiner.geometry, samples_per_image=2 * args.batch)
        batches = [default_collate([ds[(j * args.batch + i) % len(ds)] for i in range(args.batch)]) for j in range(2)]
        keys = {k for b in batches for k in b["image_key"]}
        cache = EmbeddingCache(refiner.sam.image_encoder)
        precompute_embeddings(refiner, cache, [(k, s, f) for k, s, f in ds.encoder_sources() if k in keys],
                              batch_size=args.batch, amp=False)
        trainer = bundle_trainer("sam_refiner", {
            "network": refiner, "cache": cache, "device": torch.device("cpu"), "amp": False, "epochs": 1,
            "epoch_length": 2, "train#dataloader": batches, "train#handlers": []})
        count_second_iteration(trainer, counter)
    return counter


BUSI_SIZES = [(465, 557), (470, 562), (469, 564), (587, 775), (467, 556), (468, 560), (471, 557), (467, 558)]


def _phantom(h: int, w: int, seed: int) -> tuple:
    """(image, coarse 0/255) uint8 (H, W): a bright ellipse on noise; the coarse mask a shifted, smaller ellipse."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[:h, :w]
    fg = ((xs - w / 2) / (w / 5)) ** 2 + ((ys - h / 2) / (h / 6)) ** 2 < 1
    image = np.clip(70 + 110 * fg + rng.normal(0, 15, (h, w)), 0, 255).astype(np.uint8)
    coarse = ((xs - w / 2 - 9) / (w / 6)) ** 2 + ((ys - h / 2) / (h / 7)) ** 2 < 1
    return image, coarse.astype(np.uint8) * 255


def infer(args: argparse.Namespace) -> dict[str, tuple[PartCounter, PartCounter]]:
    """{"refine": (one image, 8 sizes), "predict": (one image, 8 sizes)}: each call counted on its second run."""
    import bench_e2e

    from ultrarefiner.engines.inference.refine_folder import BatchRefiner, encoder_frame
    from ultrarefiner.engines.inference.ultra_predict import UltraPredictor
    from ultrarefiner.networks import SAMRefiner, UltraRefiner, build_sam, build_tiny_sam

    sizes = [(h // 4, w // 4) for h, w in BUSI_SIZES] if args.tiny else BUSI_SIZES
    sizes = sizes[: args.images]
    scenes = [_phantom(h, w, i) for i, (h, w) in enumerate(sizes)]
    if args.tiny:
        refiner = SAMRefiner(build_tiny_sam(img_size=64), checkpoint=None)
    elif args.sam == "vit_b":
        refiner = SAMRefiner(build_sam("vit_b", "random"), preprocessing="medsam")
    else:
        refiner = SAMRefiner()  # LiteMedSAM, packaged weights
    refiner.eval()
    runner = BatchRefiner(refiner, torch.device("cpu"), optimize="none")
    samples = [{"pixels": im, "coarse": c, "frame": encoder_frame(refiner.geometry, im)} for im, c in scenes]
    built = bench_e2e.build_model(args.tiny, "exact", args.sam)
    model = UltraRefiner(built.transunet, built.refiner, cache_embeddings=False).eval()
    predictor = UltraPredictor(model, "cpu", optimize="none")
    inputs = [predictor.dataset.sample(im) for im, _ in scenes]

    def counted(net, call, batch) -> PartCounter:
        counter = PartCounter()
        counter.part = "glue, resizes, outputs"
        tag_common(counter, net.prompt_generator)
        counter.tag(net.sam.image_encoder, "forward", "SAM image encoder")
        counter.tag(net, "decode", "prompt encoder and mask decoder")
        if net is model.refiner:
            counter.tag(model.transunet, "forward", "TransUNet forward")
        call(batch)  # first call: lazy state
        with counter:
            call(batch)
        return counter

    return {"refine": tuple(counted(refiner, runner.probabilities, samples[:n]) for n in (1, len(samples))),
            "predict": tuple(counted(model.refiner, predictor.predict_batch, inputs[:n]) for n in (1, len(inputs)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny networks (seconds instead of minutes)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--phases", default="3,2,infer", help="comma-separated: 2, 3, infer")
    parser.add_argument("--top", type=int, default=8, help="most frequent operators listed")
    parser.add_argument("--sam", choices=("lite_medsam", "vit_b"), default="lite_medsam",
                        help="infer: the refiner's SAM (vit_b: random weights, MedSAM preprocessing at 1024)")
    parser.add_argument("--images", type=int, default=len(BUSI_SIZES), choices=range(2, len(BUSI_SIZES) + 1),
                        metavar=f"2..{len(BUSI_SIZES)}", help="infer: images (of as many sizes) in the batch; vit_b "
                        "on a CPU needs about 1.6 GB of memory per image")
    args = parser.parse_args()
    labelling._label_on_host = lambda fg: False  # the device path: the loop a GPU runs without CUDA graphs
    for phase in args.phases.split(","):
        if phase.strip() == "infer":
            for name, (one, many) in infer(args).items():
                n1, n8 = sum(one.parts.values()), sum(many.parts.values())
                print(f"{name} ({'tiny' if args.tiny else 'full-size, ' + args.sam}): 1 image {n1} ATen operations; "
                      f"{args.images} images of {args.images} sizes {n8} ({n8 / args.images:.0f} per "
                      f"image, x{n1 * args.images / n8:.1f} fewer than one call per image)")
                for part, n in many.parts.most_common():
                    print(f"  {part:40s} {n:6d}  {100 * n / n8:5.1f}%")
            continue
        counter = {"3": phase3, "2": phase2}[phase.strip()](args)
        total = sum(counter.parts.values())
        print(f"phase {phase} training step ({'tiny' if args.tiny else 'full-size'}, batch {args.batch}): "
              f"{total} ATen operations")
        for part, n in counter.parts.most_common():
            print(f"  {part:40s} {n:6d}  {100 * n / total:5.1f}%")
        print("  most frequent: " + ", ".join(f"{op} {n}" for op, n in counter.ops.most_common(args.top)))
        loop = counter.parts["component labelling loop"]
        print(f"  with CUDA graphs the labelling loop is one replay: {total - loop + 1} operations "
              f"(x{total / (total - loop + 1):.2f} fewer)")


if __name__ == "__main__":
    main()
