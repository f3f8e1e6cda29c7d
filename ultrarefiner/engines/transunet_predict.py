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
from tqdm import tqdm

from ultrarefiner.data.datalist import datalist_path
from ultrarefiner.data.pipeline import get_transforms
from ultrarefiner.engines.checkpoint import load_weights, read_checkpoint
from ultrarefiner.errors import BadInputError
from ultrarefiner.utils.io import write_json, write_png

logger = logging.getLogger(__name__)


def load_transunet(ckpt: str | os.PathLike, device: torch.device | str = "cpu", **overrides) -> torch.nn.Module:
    """Rebuild the network from the ``network_kwargs`` stored in ``best.pt``/``last.pt`` and load its weights."""
    from ultrarefiner.networks import TransUNet

    obj = read_checkpoint(ckpt)
    kwargs = {**(obj.get("network_kwargs") or {}), **overrides} if isinstance(obj, dict) else overrides
    model = TransUNet(**kwargs)
    model.load_state_dict(load_weights(ckpt))
    return model.to(device).eval()


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
) -> list[np.ndarray]:
    """Foreground probability (H, W) float32 in [0, 1] at each item's native size, in ``items`` order."""
    transform = get_transforms("transunet", train=False, keys=("image",), img_size=img_size)
    loader = DataLoader(Dataset(items, transform), batch_size=batch_size, num_workers=num_workers)
    device = torch.device(device)
    out: list[np.ndarray] = []
    for batch in tqdm(loader, desc=desc, leave=False, disable=None):
        x = batch["image"].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            logits = model(x)
        prob = torch.softmax(logits.float(), dim=1)[:, 1:2]
        heights, widths = batch["original_size"]
        for p, h, w in zip(prob, heights.tolist(), widths.tolist(), strict=True):
            native = F.interpolate(p[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            out.append(native.clamp(0, 1).cpu().numpy())
    return out


def _save_prob(path: Path, prob: np.ndarray) -> None:
    write_png(path, np.round(prob * 255).astype(np.uint8))


def write_overlays(folder: Path, entries: list[dict], probs: list[np.ndarray], n: int = 8) -> None:
    """Overlay PNGs (ground truth green, prediction > 0.5 red) of the first ``n`` entries, for a quick look."""
    from PIL import Image

    from ultrarefiner.engines.overlays import overlay_contours

    for e, p in list(zip(entries, probs, strict=True))[:n]:
        image = np.asarray(Image.open(e["image"]).convert("L"), np.float32) / 255.0
        label = np.asarray(Image.open(e["label"]).convert("L")) > 127
        write_png(folder / f"{Path(e['image']).stem}.png", overlay_contours(image, label, p > 0.5))


def predict_out_of_fold(
    data_root: str | os.PathLike,
    dataset: str,
    checkpoint_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    n_splits: int = 5,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    amp: bool = True,
) -> Path:
    """Write ``<output_dir>/<dataset>/fold_<k>/coarse/*.png`` and ``<output_dir>/<dataset>/datalist.json``.

    ``fold_<k>`` holds model k's predictions of its held-out fold and of the test split, and ``overlays/`` of
    a few held-out images; ``ensemble`` holds the mean of the fold models on the test split. Returns the
    datalist path.
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
    training, testing = meta["training"], meta["testing"]
    ensemble = [np.zeros((e["height"], e["width"]), np.float32) for e in testing]
    new_training, new_testing = [], [dict(e) for e in testing]
    for k, ckpt in enumerate(ckpts):
        model = load_transunet(ckpt, device)
        img_size = model.img_size if hasattr(model, "img_size") else 224
        held_out = [e for e in training if e["fold"] == k]
        probs = predict_probabilities(
            model, [absolute(e) for e in held_out + testing], img_size, device, batch_size, amp, desc=f"fold {k}"
        )
        write_overlays(out / f"fold_{k}" / "overlays", [absolute(e) for e in held_out], probs[: len(held_out)])
        for e, p in zip(held_out, probs[: len(held_out)], strict=True):
            rel = f"fold_{k}/coarse/{Path(e['image']).name}"
            _save_prob(out / rel, p)
            new_training.append(
                {
                    **e,
                    "image": os.path.relpath(src.parent / e["image"], out),
                    "label": os.path.relpath(src.parent / e["label"], out),
                    "coarse": rel,
                }
            )
        for i, p in enumerate(probs[len(held_out) :]):
            rel = f"fold_{k}/coarse/{Path(testing[i]['image']).name}"
            _save_prob(out / rel, p)
            new_testing[i][f"coarse_fold_{k}"] = rel
            ensemble[i] += p / n_splits
    for i, e in enumerate(new_testing):
        rel = f"ensemble/coarse/{Path(e['image']).name}"
        _save_prob(out / rel, ensemble[i])
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
    }
    return write_json(out / "datalist.json", result)
