"""``python -m ultrarefiner predict``."""

from __future__ import annotations

from pathlib import Path

from ultrarefiner.commands.args import check_range, data_workers


def predict(
    input: str,
    output_dir: str = "./predictions/ultrarefiner",
    bundle: str = "bundles/ultrarefiner",
    checkpoint: str | None = None,
    iterations: int = 0,
    quality_gate: bool = False,
    gate_threshold: float = 0.5,
    threshold: float = 0.5,
    nifti: bool = False,
    device: str = "auto",
    amp: bool = True,
    batch_size: int | None = None,
    num_workers: int | None = None,
    writers: int | None = None,
    tta: str = "none",
    optimize: str = "auto",
    exclude: str | list[str] | None = None,
) -> None:
    """Coarse (TransUNet) and refined (SAM refiner) lesion masks of one image or a folder of images.

    Writes, per image, <output_dir>/coarse/<name>.png and <output_dir>/refined/<name>.png (0/255 masks at the
    image's native size), <output_dir>/overlays/<name>.png (the image with the coarse contour in blue and the
    refined one in red) and, with --nifti, <output_dir>/nifti/<name>_{coarse,refined}.nii.gz; and
    <output_dir>/predictions.json with the refiner's predicted IoU per image. Unreadable files are skipped and
    listed under "skipped" in predictions.json; the command fails only when no image could be predicted.

    Args:
        input: an image file (PNG, JPEG, BMP, TIFF; converted to 8-bit grayscale) or a folder of them.
        output_dir: where outputs go (created; existing files are replaced atomically).
        bundle: the ultrarefiner bundle: its configs/inference.json is what runs (the inference evaluator and its
            writer transforms, with this command's options), and describes the network when the checkpoint does
            not (a plain models/model.pt).
        checkpoint: UltraRefiner weights: models/model.pt of the bundle (default) or a best.pt/last.pt of training
            (<ckpt_root>/ultrarefiner/<dataset>/fold_<k>/best.pt).
        iterations: iterative refinement: feed the refined mask back as the prompt N more times and keep, per
            image, the pass with the highest predicted IoU (default 0, off).
        quality_gate: keep the coarse mask for an image when the refiner's predicted IoU of its mask is below
            --gate_threshold (off by default; measure on your data with the bundle's evaluate.json first).
        gate_threshold: predicted-IoU threshold of the quality gate.
        threshold: probability threshold of the written masks.
        nifti: also write NIfTI (.nii.gz) masks.
        device: cpu, cuda, cuda:1 or auto.
        amp: bfloat16 autocast on CUDA.
        batch_size: images per forward pass (any sizes: TransUNet and SAM's encoder see them resized to their
            inputs; outputs are resized back per image). Default 8 on CUDA, 1 on the CPU.
        num_workers: data workers reading and resizing the images; default 2, at most the cores this process
            may use (more workers than cores only compete with the network).
        writers: threads writing the masks and overlays while the next batch is predicted (the bundle's
            `writers`); default one per core, up to 8; 0 writes in the main thread.
        tta: test-time augmentation: none (default) or flip (mean of the coarse and refined probabilities of the
            image and of its left-right flip, flipped back; twice the compute).
        optimize: SAM image-encoder speed option: auto (channels_last on CUDA; bf16 on a CPU with native
            bfloat16, else jit_freeze), none, channels_last, jit_freeze (float32 on every CPU), compile or bf16 (see
            `refine --help`). bf16 and channels_last apply to TransUNet too; the other options leave it float32.
        exclude: file-name patterns (*, ?, [abc]; any case; several separated by commas) of a folder's images to
            leave out, e.g. '*_mask*' for a BUSI class folder, where the masks lie beside the images.
    """
    import logging

    import torch

    from ultrarefiner.data.imaging import exclude_patterns
    from ultrarefiner.engines.inference.fast_inference import check_tta, resolve_optimize
    from ultrarefiner.engines.inference.ultra_predict import input_datalist, run_inference
    from ultrarefiner.hub import create_model, network_kwargs_from_bundle

    check_range(iterations, "iterations", 0, 100, integer=True)
    check_range(gate_threshold, "gate_threshold", 0.0, 1.0)
    check_range(threshold, "threshold", 0.0, 1.0)
    if batch_size is not None:
        check_range(batch_size, "batch_size", 1, 1024, integer=True)
    num_workers = data_workers(num_workers, default=2)
    if writers is not None:
        check_range(writers, "writers", 0, 64, integer=True)
    check_tta(tta)  # option errors before the model is loaded
    resolve_optimize(optimize, torch.device("cpu"))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
    ckpt = Path(checkpoint) if checkpoint else Path(bundle) / "models" / "model.pt"
    patterns = exclude_patterns(exclude)
    input_datalist(input, patterns)  # a missing input or an empty folder fails before the model is loaded
    model = create_model("ultrarefiner", ckpt, device=dev, fallback_kwargs=lambda: network_kwargs_from_bundle(bundle))
    # the bundle's inference.json evaluator, with this model and these options
    report = run_inference(bundle, {
        "network": model, "device": dev, "input_dir": str(input), "output_dir": str(output_dir),
        "iterations": int(iterations), "quality_gate": bool(quality_gate), "gate_threshold": float(gate_threshold),
        "threshold": float(threshold), "nifti": bool(nifti), "amp": bool(amp), "batch_size": batch_size,
        "num_workers": int(num_workers), "writers": None if writers is None else int(writers), "tta": tta,
        "optimize": optimize, **({"exclude": list(patterns)} if patterns else {})})  # older bundles lack it
    out = Path(output_dir).resolve()
    print(f"{report['n_images']} image(s) predicted into {out}; {report['n_skipped']} skipped")
    for s in report["skipped"]:
        print(f"  skipped {s['image']}: {s['reason']}")
    print(f"report: {out / 'predictions.json'}")
