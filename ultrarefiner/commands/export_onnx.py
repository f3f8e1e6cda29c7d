"""``python -m ultrarefiner export-onnx``."""

from __future__ import annotations

from pathlib import Path

import ultrarefiner
from ultrarefiner.commands.args import check_range
from ultrarefiner.utils.flags import as_flag

_BUNDLES = Path(ultrarefiner.__file__).resolve().parents[1] / "bundles"


def export_onnx(
    kind: str,
    output_dir: str,
    checkpoint: str | None = None,
    zero_shot: bool = False,
    model_type: str | None = None,
    sam_checkpoint: str | None = None,
    batch_size: int = 2,
    opset: int | None = None,
    verify: bool = True,
    tolerance: float = 1e-3,
) -> None:
    """Export TransUNet or the SAM refiner to ONNX (dynamic batch) and check onnxruntime (CPU) against PyTorch.

    --kind transunet: <output_dir>/transunet.onnx, image (B,1,S,S) in [0,1] -> logits (B,2,S,S).
    --kind refiner: <output_dir>/refiner_image_encoder.onnx (encoder_input (B,3,S,S), the refiner's preprocessed
    image -> image_embeddings) and <output_dir>/refiner_decoder.onnx (image_embeddings + the refiner's prompts in the
    encoder frame: boxes (B,4), mask_input (B,1,L,L) -> low_res_logits, iou_predictions), as segment-anything
    exports SAM. <output_dir>/onnx_export_<kind>.json lists inputs, outputs and the largest output difference between
    onnxruntime and PyTorch; the command fails when that exceeds --tolerance.

    Args:
        kind: transunet or refiner.
        output_dir: where the .onnx files and onnx_export_<kind>.json go (created).
        checkpoint: transunet: best.pt/last.pt of the transunet bundle (network settings read from it) or a plain
            state_dict (bundle models/model.pt, default settings); for the refiner a phase-2 refiner checkpoint
            (sam_refiner best.pt or models/model.pt), by default the shipped bundles/sam_refiner/models/model.pt. For
            either kind also an ultrarefiner (phase-3) best.pt or models/model.pt, whose TransUNet or refiner is
            exported.
        zero_shot: refiner: LiteMedSAM's packaged weights, no refiner checkpoint.
        model_type: refiner: vit_b (MedSAM/SAM base) with --sam_checkpoint, zero-shot; default: LiteMedSAM.
        sam_checkpoint: refiner: a SAM/MedSAM/LiteMedSAM weights file for --model_type (e.g. medsam_vit_b.pth).
        batch_size: batch of the example inputs, at least 2 (a batch of 1 would be fixed in the graph; the graphs
            take any batch).
        opset: ONNX opset (default: torch's exporter default).
        verify: compare onnxruntime with PyTorch on example inputs.
        tolerance: largest allowed absolute difference of any output.
    """
    import json
    import logging

    from ultrarefiner.errors import UltraRefinerError
    from ultrarefiner.export.onnx import export_onnx as run_export
    from ultrarefiner.export.onnx import report_file

    if kind not in ("transunet", "refiner"):
        raise ValueError(f"--kind must be transunet or refiner, got {kind!r}")
    check_range(batch_size, "batch_size", 2, 64, integer=True)
    check_range(tolerance, "tolerance", 0.0, 1.0)
    if opset is not None:
        check_range(opset, "opset", 7, 30, integer=True)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for name in ("onnx_ir", "onnxscript"):  # one INFO line per deduplicated initializer
        logging.getLogger(name).setLevel(logging.WARNING)
    verify = as_flag(verify, "verify")
    zero_shot = as_flag(zero_shot, "zero_shot")
    if checkpoint and _is_phase3(checkpoint):  # an ultrarefiner checkpoint holds both networks
        if zero_shot or model_type or sam_checkpoint:
            raise ValueError("--zero_shot, --model_type and --sam_checkpoint are not for an ultrarefiner checkpoint")
        from ultrarefiner.hub import create_model, network_kwargs_from_bundle

        model = create_model("ultrarefiner", checkpoint,
                             fallback_kwargs=lambda: network_kwargs_from_bundle(_BUNDLES / "ultrarefiner"))
        network = model.transunet if kind == "transunet" else model.refiner
    elif kind == "transunet":
        if not checkpoint:
            raise ValueError("--kind transunet needs --checkpoint (a transunet or ultrarefiner best.pt, or model.pt)")
        if zero_shot or model_type or sam_checkpoint:
            raise ValueError("--zero_shot, --model_type and --sam_checkpoint are refiner options")
        from ultrarefiner.hub import create_model

        network = create_model("transunet", checkpoint)
    else:
        network = _refiner(checkpoint, zero_shot, model_type, sam_checkpoint)
    report = run_export(kind, network, output_dir, int(batch_size), opset, verify)
    graphs = {k: v for k, v in report.items() if isinstance(v, dict) and "file" in v}
    for name, graph in graphs.items():
        check = graph.get("verification")
        diff = f", onnxruntime vs PyTorch max abs diff {check['max_abs_diff']:.2e}" if check else ""
        print(f"{name}: {graph['file']}{diff}")
    print(f"inputs/outputs: {Path(output_dir).resolve() / report_file(kind)}")
    worst = max((g["verification"]["max_abs_diff"] for g in graphs.values() if "verification" in g), default=0.0)
    if worst > tolerance:
        raise UltraRefinerError(f"onnxruntime differs from PyTorch by {worst:.3g} > --tolerance {tolerance}: "
                                f"see {json.dumps({k: g.get('verification') for k, g in graphs.items()})}")


def _is_phase3(checkpoint: str) -> bool:
    from ultrarefiner.engines.checkpoints.checkpoint import checkpoint_kind, read_checkpoint

    return checkpoint_kind(read_checkpoint(checkpoint, mmap=True)) == "ultrarefiner"  # mmap: metadata only


def _refiner(checkpoint: str | None, zero_shot: bool, model_type: str | None, sam_checkpoint: str | None):
    from ultrarefiner.engines.inference.refine_folder import resolve_refiner
    from ultrarefiner.hub import create_model

    if model_type or sam_checkpoint:
        if checkpoint or zero_shot:
            raise ValueError("--model_type/--sam_checkpoint build a zero-shot refiner: not with --checkpoint or "
                             "--zero_shot")
        model_type = model_type or "lite_medsam"
        if model_type != "lite_medsam" and not sam_checkpoint:
            raise ValueError(f"--model_type {model_type} needs --sam_checkpoint (no weights ship for it)")
        return create_model("sam_refiner", model_type=model_type, sam_checkpoint=sam_checkpoint)
    return create_model("sam_refiner", resolve_refiner(checkpoint, zero_shot))
