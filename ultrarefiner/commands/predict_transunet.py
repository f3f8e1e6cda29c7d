"""``python -m ultrarefiner predict-transunet``."""

from __future__ import annotations

import json
from pathlib import Path

from ultrarefiner.commands.args import check_range, data_workers
from ultrarefiner.utils.flags import as_flag


def predict_transunet(
    data_root: str = "./dataset/processed",
    dataset: str = "BUSI",
    checkpoint_root: str = "./checkpoints/transunet",
    output_dir: str = "./predictions/transunet",
    n_splits: int = 5,
    device: str = "auto",
    batch_size: int = 8,
    amp: bool = True,
    num_workers: int | None = None,
    optimize: str = "auto",
) -> None:
    """Out-of-fold TransUNet predictions for phase 2 option B (the refiner trained on real coarse masks).

    Every training image gets the soft prediction of the fold model that did not train on it; test images get
    each fold model's prediction and their mean. Writes soft masks (8-bit PNG, p*255, native size) under
    <output_dir>/<dataset>/fold_<k>/coarse/ and <output_dir>/<dataset>/ensemble/coarse/, and
    <output_dir>/<dataset>/datalist.json (the source datalist plus a "coarse" key per item); a combined datalist
    (e.g. BUSBRA_BUSI) puts each dataset's masks in its own coarse/<name>/ subfolder. Unreadable images or
    masks are skipped and listed in <output_dir>/<dataset>/skipped.json; the output folder is replaced only when
    every fold succeeded.

    Args:
        data_root: output_root of `preprocess`.
        dataset: dataset or combined name (a folder of data_root with a datalist.json).
        checkpoint_root: folder with <dataset>/fold_<k>/best.pt from the transunet bundle.
        output_dir: where predictions go.
        n_splits: number of folds (must match the datalist).
        device: cpu, cuda, cuda:1 or auto.
        batch_size: images per forward pass (any sizes: resized to the network input, predictions resized back).
        amp: bfloat16 autocast (CUDA only).
        num_workers: data workers reading and resizing the images; default 2, at most the cores this process
            may use (more workers than cores only compete with the network).
        optimize: TransUNet speed option: auto (channels_last on CUDA; bf16 on a CPU with native bfloat16, about
            2x faster there, else float32), bf16, channels_last, or none (float32; jit_freeze and compile also mean
            float32 eager here).
    """
    import torch

    from ultrarefiner.engines.inference.fast_inference import resolve_optimize
    from ultrarefiner.engines.inference.transunet_predict import SKIPPED_JSON, predict_out_of_fold

    check_range(n_splits, "n_splits", 2, 20, integer=True)
    check_range(batch_size, "batch_size", 1, 1024, integer=True)
    num_workers = data_workers(num_workers, default=2)
    resolve_optimize(optimize, torch.device("cpu"))  # an unknown option fails before the models are loaded
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
    path = predict_out_of_fold(
        data_root, dataset, checkpoint_root, output_dir, int(n_splits), dev, int(batch_size), as_flag(amp, "amp"),
        num_workers=int(num_workers), optimize=optimize
    )
    print(f"out-of-fold predictions: {Path(path).resolve()}")
    skipped = json.loads(Path(path).read_text(encoding="utf-8")).get("skipped", [])
    if skipped:
        print(f"{len(skipped)} image(s) skipped (listed in {(Path(path).parent / SKIPPED_JSON).resolve()}):")
        for s in skipped[:20]:
            print(f"  {s['file']}: {s['reason']}")
