"""Inference throughput (images/s) at batch 1 and batch 8 in one run, on the device present: the SAM image encoder
alone, ``refine`` end to end (LiteMedSAM refiner) and the full pipeline (``predict``: TransUNet + refiner).

    python benchmarks/bench_inference.py                                         # phantoms, CPU or GPU
    python benchmarks/bench_inference.py --images /work/run/t129/images --masks COARSE_DIR --n 16
    python benchmarks/bench_inference.py --optimize none,channels_last,jit_freeze,compile --sections encoder

``refine`` is timed files to files: ``refine_folder`` reading the images and coarse masks with data workers,
refining, writing masks, overlays and the report; the refiner is built once beforehand, and so are the
``jit_freeze`` and ``compile`` encoders (one-offs of a few seconds, 35 s for compile, printed separately), so the
figures are the steady state of a large folder. ``predict`` likewise
times the ultrarefiner bundle's inference evaluator (``ultra_predict.run_inference``: coarse + refined masks,
overlays, predictions.json); without ``--checkpoint`` its TransUNet (R50-ViT-B/16, the bundle's inference network)
has random weights, which cost the same time. Each setting
runs one warm-up pass first (it also builds jit_freeze's frozen encoder for the batch shape); the settings are
measured round-robin, ``--repeats`` times, and the best run is reported, which damps the noise of a shared machine
(say so when quoting numbers: other jobs on the same cores slow every setting, unevenly). The CPU seconds per image
of this process are printed too: on a loaded machine they compare settings better than the wall clock (run with
``OMP_NUM_THREADS=1`` there, so that no thread spins waiting for a descheduled sibling).

Without ``--images`` the inputs are phantoms of BUSI-like sizes (300-480 x 380-620; coarse mask = the lesion mask).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def phantoms(folder: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """``n`` phantom images and their lesion masks (the coarse masks) under ``folder``/{images,masks}."""
    from ultrarefiner.data.synthetic import make_phantom
    from ultrarefiner.utils.io import write_png

    rng = np.random.default_rng(seed)
    for i in range(n):
        image, masks = make_phantom(rng, "benign" if i % 2 else "malignant")
        write_png(folder / "images" / f"p{i:03d}.png", image)
        write_png(folder / "masks" / f"p{i:03d}.png", masks[0].astype(np.uint8) * 255)
    return folder / "images", folder / "masks"


def subset(images: Path, masks: Path, n: int, folder: Path) -> tuple[Path, Path]:
    """Symlinks to the first ``n`` images (sorted) that have a coarse mask of the same name."""
    picked = [p for p in sorted(images.iterdir()) if (masks / f"{p.stem}.png").is_file()][:n]
    for sub, src in (("images", None), ("masks", masks)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for p in picked:
            target = p if src is None else src / f"{p.stem}.png"
            (folder / sub / target.name).symlink_to(target.resolve())
    return folder / "images", folder / "masks"


def build_encoders_once() -> None:
    """``refine_folder`` and ``predict`` build their encoder for each call; ``jit_freeze`` and ``compile`` return
    snapshots (a trace or compilation of a copy: a few seconds, 35 s for compile) that do not follow the module.
    Here each is built once per (encoder, device, mode), in the warm-up pass, so that the timed runs are the steady
    state of a large folder; the build is printed instead."""
    from ultrarefiner.engines.inference import fast_inference

    real, built = fast_inference.fast_encoder, {}

    def once(encoder: torch.nn.Module, device: torch.device, optimize: str | None = "auto") -> Callable:
        mode = fast_inference.resolve_optimize(optimize, device)
        if mode not in ("jit_freeze", "compile"):
            return real(encoder, device, optimize)
        key = (id(encoder), str(device), mode)
        if key not in built:
            built[key] = real(encoder, device, optimize)
            x = torch.rand(1, 3, encoder.img_size, encoder.img_size, device=device)
            t = time.perf_counter()
            with torch.no_grad():
                built[key](x)  # the trace (and its check) or the compilation, for batch 1
            print(f"  {mode} encoder built in {time.perf_counter() - t:.1f} s (one-off per folder, not in the "
                  "rates)", file=sys.stderr, flush=True)
        return built[key]

    fast_inference.fast_encoder = once


def measure(settings: dict[str, Callable[[], int]], repeats: int) -> dict[str, tuple[float, float]]:
    """Warm up every setting once, then time them round-robin ``repeats`` times; per setting the best images/s (wall
    clock) and the least CPU seconds per image of this process (data workers excluded; with other jobs on the cores
    it moves less than the wall clock, since time spent waiting for a core is not counted)."""
    for run in settings.values():
        run()
    best = {k: (0.0, float("inf")) for k in settings}
    for _ in range(repeats):
        for k, run in settings.items():
            wall, cpu = time.perf_counter(), time.process_time()
            n = run()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[k] = (max(best[k][0], n / wall), min(best[k][1], cpu / n))
            print(f"  {k}: {n / wall:.3f} images/s, {cpu / n:.3f} CPU s/image", file=sys.stderr, flush=True)
    return best


def encoder_settings(encoder: torch.nn.Module, device: torch.device, modes: list[str], batches: list[int],
                     amp: bool) -> dict[str, Callable[[], int]]:
    from ultrarefiner.engines.inference.fast_inference import fast_encoder
    from ultrarefiner.utils.amp import autocast

    out = {}
    for mode in modes:
        fn = fast_encoder(encoder, device, mode)
        for b in batches:
            x = torch.rand(b, 3, encoder.img_size, encoder.img_size, device=device)

            def run(fn=fn, x=x) -> int:
                with torch.no_grad(), autocast(device, amp):
                    fn(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return x.shape[0]

            out[f"encoder  {mode:<13s} batch {b}"] = run
        if mode == "channels_last":  # converted in place: back to the default for the next mode
            encoder.to(memory_format=torch.contiguous_format)
    return out


def refine_settings(refiner: torch.nn.Module, images: Path, masks: Path, out: Path, device: torch.device,
                    modes: list[str], batches: list[int], workers: int, amp: bool, tta: str
                    ) -> dict[str, Callable[[], int]]:
    from ultrarefiner.engines.inference import refine_folder as engine

    engine.create_model = lambda *_, **__: refiner  # built once, outside the timings
    n = len(list(images.iterdir()))
    out_settings = {}
    for mode in modes:
        for b in batches:
            def run(mode=mode, b=b) -> int:
                shutil.rmtree(out, ignore_errors=True)  # a fresh folder: nothing resumed
                engine.refine_folder(images, masks, out, zero_shot=True, batch_size=b, device=device, amp=amp,
                                     num_workers=workers, tta=tta, optimize=mode)
                refiner.sam.image_encoder.to(memory_format=torch.contiguous_format)
                return n

            out_settings[f"refine   {mode:<13s} batch {b}"] = run
    return out_settings


def predict_settings(model: torch.nn.Module, images: Path, out: Path, device: torch.device, modes: list[str],
                     batches: list[int], workers: int, amp: bool, tta: str) -> dict[str, Callable[[], int]]:
    from ultrarefiner.engines.inference.ultra_predict import run_inference

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "ultrarefiner"
    n = len(list(images.iterdir()))
    out_settings = {}
    for mode in modes:
        for b in batches:
            def run(mode=mode, b=b) -> int:
                shutil.rmtree(out, ignore_errors=True)
                run_inference(bundle, {"network": model, "device": device, "input_dir": str(images),
                                       "output_dir": str(out), "amp": amp, "batch_size": b, "num_workers": workers,
                                       "tta": tta, "optimize": mode})
                for net in (model.refiner.sam.image_encoder, model.transunet):  # channels_last converts in place
                    net.to(memory_format=torch.contiguous_format)
                return n

            out_settings[f"predict  {mode:<13s} batch {b}"] = run
    return out_settings


def pipeline_model(checkpoint: str | None, device: torch.device) -> torch.nn.Module:
    from monai.bundle import ConfigParser

    from ultrarefiner.engines.training.e2e_setup import build_ultrarefiner
    from ultrarefiner.hub import create_model, network_kwargs_from_bundle

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "ultrarefiner"
    if checkpoint:
        return create_model("ultrarefiner", checkpoint, device=device,
                            fallback_kwargs=lambda: network_kwargs_from_bundle(bundle))
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    return build_ultrarefiner(parser.get_parsed_content("network_kwargs"), cache_embeddings=False).to(device).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", help="folder of images (default: phantoms)")
    p.add_argument("--masks", help="folder of coarse masks <stem>.png (with --images)")
    p.add_argument("--n", type=int, default=8, help="images per timed run (a multiple of every batch size)")
    p.add_argument("--batch_sizes", default="1,8")
    p.add_argument("--optimize", default="none,auto", help="encoder options, comma-separated (fast_inference)")
    p.add_argument("--sections", default="encoder,refine,predict")
    p.add_argument("--checkpoint", help="phase-3 checkpoint for predict (default: random TransUNet weights)")
    p.add_argument("--device", default="auto")
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tta", default="none")
    p.add_argument("--no_amp", action="store_true", help="no bf16 autocast on CUDA")
    args = p.parse_args()

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    amp = device.type == "cuda" and not args.no_amp
    batches = [int(b) for b in args.batch_sizes.split(",")]
    from ultrarefiner.engines.inference.fast_inference import resolve_optimize

    modes = list(dict.fromkeys(resolve_optimize(m.strip(), device) for m in args.optimize.split(",")))
    sections = set(args.sections.split(","))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; bf16 autocast: {amp}; tta: {args.tta}; n = {args.n}")

    from ultrarefiner.engines.inference.refine_folder import DEFAULT_REFINER
    from ultrarefiner.hub import create_model

    t = time.perf_counter()
    refiner = create_model("sam_refiner", DEFAULT_REFINER, device=device)
    print(f"refiner built in {time.perf_counter() - t:.1f} s (one-off, not in the rates)")
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        tmp = Path(tmp)
        if args.images:
            images, masks = subset(Path(args.images), Path(args.masks or args.images), args.n, tmp / "in")
        else:
            images, masks = phantoms(tmp / "in", args.n)
        settings: dict[str, Callable[[], int]] = {}
        build_encoders_once()
        if "encoder" in sections:
            settings |= encoder_settings(refiner.sam.image_encoder, device, modes, batches, amp)
        if "refine" in sections:
            settings |= refine_settings(refiner, images, masks, tmp / "refined", device, modes, batches,
                                        args.num_workers, amp, args.tta)
        if "predict" in sections:
            model = pipeline_model(args.checkpoint, device)
            settings |= predict_settings(model, images, tmp / "predicted", device, modes, batches,
                                         args.num_workers, amp, args.tta)
        rates = measure(settings, args.repeats)
    print(f"{'setting':<36s} {'images/s':>9s} {'vs batch ' + str(batches[0]):>11s} {'CPU s/image':>12s}")
    for k, (r, cpu) in rates.items():
        first = rates[k.rsplit(" batch ", 1)[0] + f" batch {batches[0]}"][0]
        print(f"{k:<36s} {r:9.3f} {'x' + format(r / first, '.2f'):>11s} {cpu:12.3f}")


if __name__ == "__main__":
    main()
