"""End-to-end UltraRefiner: training samples/s and peak memory, full-pipeline inference images/s, bf16 vs fp32.

    python benchmarks/bench_e2e.py                      # full size on the device present (cuda, else cpu)
    python benchmarks/bench_e2e.py --tiny --steps 5     # tiny networks (CPU smoke numbers)
    python benchmarks/bench_e2e.py --sam lite_medsam    # LiteMedSAM refiner (packaged weights, 256x256)
    python benchmarks/bench_e2e.py --profile --trace e2e_trace.json   # + torch.profiler's top operations
    python benchmarks/bench_e2e.py --compile --modes train:bf16        # the bundles' compile option, bf16 training

Run from the repository root with the package importable (installed, or PYTHONPATH=.).

Full size: TransUNet R50-ViT-B/16 at 224, SAM vit_b at 1024 (random weights: speed does not depend on them),
MedSAM preprocessing, native images of --native H W. Training: the phase-3 bundle's own ``train#trainer`` (built
from ``bundles/ultrarefiner/configs/train.json`` with ``bundle_trainer``: ``E2ETrainStep``, loss, optimizer and train
metrics as the bundle runs them; no handlers) at --batch (8), frozen encoder with WARM embedding cache (the steady
state after the first epoch; the first, cache-filling step is excluded). bf16 is the package's one AMP rule
(``ultrarefiner.utils.amp.autocast``): on CUDA only, so on a CPU the two precisions run the same float32 code.
Inference: TransUNet + SAM encoder (no cache: each image is new) + prompts + decoder, eval mode, --infer-batch images
per call. Rates use the MEDIAN step/call time, with a device sync after each (robust to other load on a shared
machine); training also reports ``pipelined_samples_per_s``: --steps more steps synced only at their end, as a
real run goes (the host queues the next step while the device finishes the last; the batch pinned on CUDA).
Each (mode, precision) runs in its own process so peak memory is its own: CUDA max_memory_allocated, or on CPU
the process's peak RSS (ru_maxrss, model included) and its growth over the post-build baseline. ``--compile``: the
bundles' ``compile`` option (``ultrarefiner.utils.compile``: TransUNet and the SAM decoder's transformer), compiled
during the warm-up steps (the compile time is printed apart: ``first_step_s``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from statistics import median

import torch
from ignite.engine import Events

from ultrarefiner.engines.training.bundle_engines import bundle_trainer
from ultrarefiner.engines.training.e2e_training import E2EPrepareBatch
from ultrarefiner.networks import SAMRefiner, TransUNet, UltraRefiner, build_sam, build_tiny_sam
from ultrarefiner.utils.amp import autocast
from ultrarefiner.utils.compile import compile_network
from ultrarefiner.utils.transfer import pins_for


def build_model(tiny: bool, image_resize: str, sam_type: str = "vit_b") -> UltraRefiner:
    """TransUNet + SAM refiner; ``sam_type`` vit_b (random init, MedSAM preprocessing at 1024) or lite_medsam
    (LiteMedSAM's packaged weights, its own preprocessing at 256); ``tiny`` ignores it."""
    torch.manual_seed(0)
    preprocessing = "medsam"
    if tiny:
        transunet = TransUNet(img_size=64, vit_depth=1, hidden_size=64, num_heads=2, mlp_dim=128,
                              block_units=(1, 1, 1), decoder_channels=(32, 16, 16, 8))
        sam = build_tiny_sam(img_size=256, encoder_depth=2)
    else:
        transunet = TransUNet()
        sam = build_sam(sam_type, "random" if sam_type == "vit_b" else "packaged")
        preprocessing = "medsam" if sam_type == "vit_b" else "litemedsam"
    refiner = SAMRefiner(sam, preprocessing=preprocessing, image_resize=image_resize)
    return UltraRefiner(transunet, refiner)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(n: int, img_size: int, native: tuple[int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, w = native
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    label = ((((xs - w / 2) / (w / 5)) ** 2 + ((ys - h / 2) / (h / 6)) ** 2) < 1).float()[None, None]
    sam_image = (0.3 + 0.4 * label + 0.2 * torch.rand(n, 1, h, w, generator=g)).clamp(0, 1) * 255
    image = torch.nn.functional.interpolate(sam_image / 255, (img_size, img_size), mode="bilinear", antialias=True)
    return {"image": image, "sam_image": sam_image.round(), "label": label.repeat(n, 1, 1, 1)}


def e2e_trainer(model: UltraRefiner, device: torch.device, amp: bool, args: argparse.Namespace,
                iterations: int | None = None):
    """The phase-3 bundle's ``train#trainer`` over ``iterations`` (--warmup + --steps) copies of one phantom batch, no
    handlers. On CUDA the batch is pinned, as the bundle's loader pins its batches there."""
    batch = make_batch(args.batch, model.transunet.img_size, tuple(args.native))
    if pins_for(device):
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return bundle_trainer("ultrarefiner", {
        "network": model, "device": device, "amp": amp, "epochs": 1, "epoch_length": None, "train#handlers": [],
        "train#dataloader": [batch] * (iterations or args.warmup + args.steps),
        "train#prepare_batch": E2EPrepareBatch(),
    })


def run_train(model: UltraRefiner, device: torch.device, amp: bool, args: argparse.Namespace) -> dict:
    """--steps steps with a device sync after each (their median: ``samples_per_s``), then --steps more synced only
    at the end, as training runs (``pipelined_samples_per_s``: the host queues the next step while the device
    finishes the last one)."""
    synced = args.warmup + args.steps
    trainer = e2e_trainer(model, device, amp, args, synced + args.steps)
    stamps: list[float] = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _stamp(engine) -> None:
        if engine.state.iteration <= synced or engine.state.iteration == engine.state.epoch_length:
            sync(device)
            stamps.append(time.perf_counter())
        if engine.state.iteration == args.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    base = rss_mb()
    start = time.perf_counter()
    trainer.run()
    step = median([b - a for a, b in zip(stamps[args.warmup - 1:synced - 1], stamps[args.warmup:synced], strict=True)])
    pipelined = (stamps[-1] - stamps[synced - 1]) / args.steps
    out = {"samples_per_s": args.batch / step, "step_ms": 1000 * step,
           "pipelined_samples_per_s": args.batch / pipelined, "pipelined_step_ms": 1000 * pipelined,
           "first_step_s": stamps[0] - start, "loss": float(trainer.state.output["loss"]), "cache": model.cache_stats()}
    return out | memory(device, base)


@torch.no_grad()
def run_infer(model: UltraRefiner, device: torch.device, amp: bool, args: argparse.Namespace) -> dict:
    model = UltraRefiner(model.transunet, model.refiner, cache_embeddings=False).eval()
    batch = make_batch(args.infer_batch, model.transunet.img_size, tuple(args.native))
    image = batch["image"].to(device)
    sam_image = batch["sam_image"].to(device) if model.refiner.geometry.image_resize == "torch" else batch["sam_image"]
    base = rss_mb()
    times = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with autocast(device, amp):
            masks = model(image, sam_image)["masks"]
        (masks > 0).float().mean().item()  # consume the result (sync)
        times.append(time.perf_counter() - start)
    call = median(times[args.warmup:])
    return {"images_per_s": args.infer_batch / call, "call_ms": 1000 * call} | memory(device, base)


def run_profile(model: UltraRefiner, device: torch.device, amp: bool, args: argparse.Namespace) -> dict:
    """torch.profiler over ``--steps`` training steps after the warm-up: the top operations by self device time
    (CUDA) or self CPU time, printed as a table; a Chrome trace with ``--trace``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    trainer = e2e_trainer(model, device, amp, args)
    prof = profile(activities=activities, record_shapes=False)

    @trainer.on(Events.ITERATION_COMPLETED(once=args.warmup))
    def _start(engine) -> None:
        sync(device)
        prof.__enter__()

    trainer.run()
    sync(device)
    prof.__exit__(None, None, None)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.profile_rows))
    if args.trace:
        prof.export_chrome_trace(args.trace)
    return {"profiled_steps": args.steps, "sorted_by": key, "trace": args.trace}


def memory(device: torch.device, base_rss: float) -> dict:
    if device.type == "cuda":
        return {"peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"peak_rss_mb": rss_mb(), "rss_growth_mb": rss_mb() - base_rss}


def worker(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args.tiny, args.image_resize, args.sam).to(device)
    if args.compile and args.worker != "infer":  # the option compiles training; inference would compile again
        compile_network(model)
    amp = args.precision == "bf16"
    result = {"train": run_train, "infer": run_infer, "profile": run_profile}[args.worker](model, device, amp, args)
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny TransUNet (64) and SAM (256) for CPU runs")
    parser.add_argument("--batch", type=int, default=8, help="training batch size")
    parser.add_argument("--infer-batch", type=int, default=1, help="images per inference call")
    parser.add_argument("--native", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="native image size (default 480 640; tiny: 96 128)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--image-resize", default="exact", choices=("exact", "torch"),
                        help="SAM/MedSAM image resize (exact: CPU reference; torch: on the device)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--sam", choices=("vit_b", "lite_medsam"), default="vit_b",
                        help="refiner: SAM vit_b (random init, 1024) or LiteMedSAM (packaged weights, 256)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile --steps training steps (bf16 on CUDA) and print the top operations")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--trace", default=None, help="Chrome trace file of the profiled steps")
    parser.add_argument("--compile", action="store_true", help="the bundles' compile option (training and profile)")
    parser.add_argument("--modes", default="train:fp32,train:bf16,infer:fp32,infer:bf16",
                        help="comma-separated mode:precision runs (default: all four)")
    parser.add_argument("--worker", choices=("train", "infer", "profile"), help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=("fp32", "bf16"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.native = args.native or ([96, 128] if args.tiny else [480, 640])
    args.warmup = max(1, args.warmup)
    if args.worker:
        worker(args)
        return

    cuda = args.device.startswith("cuda")
    name = torch.cuda.get_device_name(0) if cuda else f"cpu ({args.threads or torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; {'tiny' if args.tiny else 'full-size'} networks "
          f"(refiner {'tiny SAM' if args.tiny else args.sam}); "
          f"native {args.native[0]}x{args.native[1]}; train batch {args.batch}, infer batch {args.infer_batch}; "
          f"{args.steps} timed steps after {args.warmup} warm-up; image_resize={args.image_resize}"
          f"{'; compiled (training)' if args.compile else ''}")
    passthrough = list(sys.argv[1:])
    results: dict[tuple[str, str], dict] = {}
    runs = [tuple(r.split(":")) for r in args.modes.split(",")]
    bad = [r for r in runs if len(r) != 2 or r[0] not in ("train", "infer") or r[1] not in ("fp32", "bf16")]
    if bad:
        parser.error(f"--modes: expected mode:precision with mode train/infer and precision fp32/bf16, got {bad}")
    for mode, precision in runs:
        cmd = [sys.executable, __file__, *passthrough, "--device", args.device, "--worker", mode,
               "--precision", precision]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((s for s in proc.stdout.splitlines() if s.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"{mode} {precision}: FAILED\n{proc.stderr[-3000:]}")
            continue
        results[mode, precision] = json.loads(line[len("RESULT "):])
        print(f"{mode:5s} {precision}: {json.dumps(results[mode, precision])}")

    if args.profile:
        precision = "bf16" if cuda else "fp32"
        cmd = [sys.executable, __file__, *passthrough, "--device", args.device, "--worker", "profile",
               "--precision", precision]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        table = proc.stdout.split("RESULT ")[0]
        print(f"profile ({precision}, {args.steps} training steps):\n{table}" if proc.returncode == 0
              else f"profile: FAILED\n{proc.stderr[-3000:]}")

    mem = "peak_mem_mb" if cuda else "peak_rss_mb"
    for mode, rate in (("train", "samples_per_s"), ("infer", "images_per_s")):
        if (mode, "fp32") in results and (mode, "bf16") in results:
            fp32, bf16 = results[mode, "fp32"], results[mode, "bf16"]
            print(f"{mode}: bf16/fp32 speed x{bf16[rate] / fp32[rate]:.2f} ({bf16[rate]:.2f} vs {fp32[rate]:.2f} "
                  f"{rate.replace('_per_s', '/s')}), {mem} bf16/fp32 x{bf16[mem] / fp32[mem]:.2f} "
                  f"({bf16[mem]:.0f} vs {fp32[mem]:.0f} MB)")


if __name__ == "__main__":
    main()
