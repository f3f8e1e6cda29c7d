"""TransUNet inference at native resolution, and out-of-fold predictions for phase 2 (option B).

Every training image gets the soft prediction of the fold model that did not train on it; test images get
each fold model's prediction and their mean (the ensemble). Soft foreground probabilities are stored as
8-bit PNGs (p * 255) at the image's native size, next to a datalist with a ``coarse`` key.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import DataLoader, Dataset
from monai.transforms import Compose
from tqdm import tqdm

from ultrarefiner.data.datalist import datalist_path
from ultrarefiner.data.imaging import read_image, read_label
from ultrarefiner.data.pipeline import load_transforms, resize_transforms
from ultrarefiner.engines.checkpoints.checkpoint import run_identity
from ultrarefiner.errors import BadInputError, UltraRefinerError
from ultrarefiner.hub import create_model
from ultrarefiner.utils.amp import autocast
from ultrarefiner.utils.io import PICTURE_PNG_LEVEL, staged_folder, write_json, write_png
from ultrarefiner.utils.transfer import to_host

logger = logging.getLogger(__name__)


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module,
    items: list[dict],
    img_size: int,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    amp: bool = True,
    num_workers: int = 0,
    desc: str = "predict",
    optimize: str | None = "auto",
) -> list[np.ndarray]:
    """Foreground probability (H, W) float32 in [0, 1] at each item's native size, in ``items`` order.

    Every image is resized to the network input in the data workers, so a batch mixes native sizes; each
    probability is resized back to its own image. On CUDA: bfloat16 autocast (``amp``) and channels_last inputs
    (the ResNet stem's convolutions). ``optimize``: the network's speed option (``fast_inference.fast_segmenter``;
    ``auto``: channels_last on CUDA, on a CPU bf16 where it has native bfloat16, else float32 eager)."""
    from ultrarefiner.engines.inference.fast_inference import fast_segmenter

    # the deterministic part of the transunet bundle's inference preprocessing
    transform = Compose([*load_transforms(["image"]), *resize_transforms(["image"], img_size)])
    device = torch.device(device)
    loader = DataLoader(Dataset(items, transform), batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    forward = fast_segmenter(model.eval(), device, optimize)
    out: list[np.ndarray] = []
    for batch in tqdm(loader, desc=desc, leave=False, disable=None):
        x = batch["image"].to(device, non_blocking=True)
        with autocast(device, amp):
            logits = forward(x)
        prob = torch.softmax(logits.float(), dim=1)[:, 1:2]
        heights, widths = batch["original_size"]
        natives = [F.interpolate(p[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
                   for p, h, w in zip(prob, heights.tolist(), widths.tolist(), strict=True)]
        out += to_host(natives)  # the batch in one copy (one host sync), not one per image
    return out


def coarse_name(folder: str, entry: dict, dataset: str) -> str:
    """``<folder>/coarse/<file name>`` of an entry's coarse mask; in a combined datalist (``BUSBRA_BUSI``) each
    dataset gets its own subfolder, ``<folder>/coarse/<entry's dataset>/<file name>``: two datasets may both have a
    ``benign_0001.png`` and must not overwrite each other's mask."""
    own = entry.get("dataset")
    sub = f"{own}/" if own and own != dataset else ""
    return f"{folder}/coarse/{sub}{Path(entry['image']).name}"


def _save_prob(path: Path, prob: np.ndarray) -> None:
    write_png(path, np.round(prob * 255).astype(np.uint8))


def write_overlays(folder: Path, entries: list[dict], probs: list[np.ndarray], n: int = 8) -> None:
    """Overlay PNGs (ground truth green, prediction > 0.5 red) of the first ``n`` entries, for a quick look."""
    from ultrarefiner.engines.evaluation.overlays import overlay_contours

    for e, p in list(zip(entries, probs, strict=True))[:n]:
        image = read_image(e["image"]).astype(np.float32) / 255.0
        label = read_label(e["label"])
        write_png(folder / f"{Path(e['image']).stem}.png", overlay_contours(image, label, p > 0.5), PICTURE_PNG_LEVEL)


SKIPPED_JSON = "skipped.json"


def _bad_reason(entry: dict, root: Path) -> dict | None:
    """{"image", "file", "reason"} when a datalist item's image or mask cannot be used, else None."""
    image_path, label_path = root / entry["image"], root / entry["label"]
    try:
        image = read_image(image_path)
        label = read_label(label_path)
    except BadInputError as e:
        return {"image": str(image_path), "file": e.path, "reason": e.reason}
    if label.shape != image.shape:
        (h, w), (lh, lw) = image.shape, label.shape
        return {"image": str(image_path), "file": str(label_path),
                "reason": f"mask size {lw}x{lh} (WxH) differs from the size {w}x{h} of {image_path}"}
    return None


def predict_out_of_fold(
    data_root: str | os.PathLike,
    dataset: str,
    checkpoint_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    n_splits: int = 5,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    amp: bool = True,
    num_workers: int = 2,
    optimize: str | None = "auto",
) -> Path:
    """Write ``<output_dir>/<dataset>/fold_<k>/coarse/*.png`` and ``<output_dir>/<dataset>/datalist.json``.

    ``fold_<k>`` holds model k's predictions of its held-out fold and of the test split, and ``overlays/`` of
    a few held-out images; ``ensemble`` holds the mean of the fold models on the test split. Returns the
    datalist path. ``batch_size`` images per forward pass, read and resized by ``num_workers`` data workers;
    ``optimize``: the network's speed option (``predict_probabilities``).

    Images or masks that cannot be read (or differ in size) are left out of the new datalist and listed, with the
    reason, in ``skipped.json`` (and the datalist's ``skipped``). The folder is built next to its destination and
    put in place at the end: a failed run leaves no partial output and keeps an earlier one whole.
    """
    src = datalist_path(data_root, dataset)
    meta = json.loads(src.read_text(encoding="utf-8"))
    if meta["n_splits"] != n_splits:
        raise ValueError(f"{src} has {meta['n_splits']} folds, --n_splits is {n_splits}")
    ckpts = [Path(checkpoint_root) / dataset / f"fold_{k}" / "best.pt" for k in range(n_splits)]
    missing = [str(c) for c in ckpts if not c.is_file()]
    if missing:
        raise BadInputError(missing[0], f"checkpoint not found ({len(missing)} of {n_splits} folds missing)")
    out = Path(output_dir) / dataset
    absolute = lambda e: {**e, "image": str(src.parent / e["image"]), "label": str(src.parent / e["label"])}  # noqa: E731
    skipped = []
    for e in meta["training"] + meta["testing"]:  # one bad file must not abort the folds half-way (no file named)
        bad = _bad_reason(e, src.parent)
        if bad is not None:
            logger.warning(f"skipped {bad['file']}: {bad['reason']}")
            skipped.append(bad)
    bad_images = {os.path.relpath(b["image"], src.parent) for b in skipped}
    training = [e for e in meta["training"] if os.path.normpath(e["image"]) not in bad_images]
    testing = [e for e in meta["testing"] if os.path.normpath(e["image"]) not in bad_images]
    if not training and not testing:
        raise UltraRefinerError(f"no usable image in {src} ({len(skipped)} skipped: "
                                f"{'; '.join(b['file'] + ': ' + b['reason'] for b in skipped[:3])})")
    ensemble = [np.zeros((e["height"], e["width"]), np.float32) for e in testing]
    new_training, new_testing = [], [dict(e) for e in testing]
    with staged_folder(out) as stage:  # paths in the datalist are relative to ``out``: same parent as ``stage``
        for k, ckpt in enumerate(ckpts):
            # out-of-fold predictions need model k of this dataset for fold k: a file of another run is refused
            model = create_model("transunet", ckpt, device=device, identity=run_identity("transunet", dataset, k))
            img_size = model.img_size if hasattr(model, "img_size") else 224
            held_out = [e for e in training if e["fold"] == k]
            probs = predict_probabilities(
                model, [absolute(e) for e in held_out + testing], img_size, device, batch_size, amp, num_workers,
                desc=f"fold {k}", optimize=optimize,
            )
            write_overlays(stage / f"fold_{k}" / "overlays", [absolute(e) for e in held_out], probs[: len(held_out)])
            for e, p in zip(held_out, probs[: len(held_out)], strict=True):
                rel = coarse_name(f"fold_{k}", e, dataset)
                _save_prob(stage / rel, p)
                new_training.append(
                    {
                        **e,
                        "image": os.path.relpath(src.parent / e["image"], out),
                        "label": os.path.relpath(src.parent / e["label"], out),
                        "coarse": rel,
                    }
                )
            for i, p in enumerate(probs[len(held_out) :]):
                rel = coarse_name(f"fold_{k}", testing[i], dataset)
                _save_prob(stage / rel, p)
                new_testing[i][f"coarse_fold_{k}"] = rel
                ensemble[i] += p / n_splits
        for i, e in enumerate(new_testing):
            rel = coarse_name("ensemble", e, dataset)
            _save_prob(stage / rel, ensemble[i])
            e.update(
                image=os.path.relpath(src.parent / e["image"], out),
                label=os.path.relpath(src.parent / e["label"], out),
                coarse=rel,
            )
        order = {e["image"]: i for i, e in enumerate(training)}
        new_training.sort(key=lambda e: order[os.path.relpath(out / e["image"], src.parent)])
        result = {
            **{k: v for k, v in meta.items() if k not in ("training", "testing")},
            "source_datalist": str(src),
            "checkpoints": [str(c) for c in ckpts],
            "training": new_training,
            "testing": new_testing,
            "skipped": skipped,
        }
        write_json(stage / SKIPPED_JSON, skipped)
        write_json(stage / "datalist.json", result)
    return out / "datalist.json"
