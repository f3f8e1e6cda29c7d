"""Toy phase-2 inputs for the refiner tests: a 5-fold datalist of phantoms and out-of-fold predictions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ultrarefiner.data.synthetic import make_phantom

SIZE = (60, 80)


def write_toy(root: Path, n_train: int = 10, seed: int = 0) -> Path:
    """``root/TOY/datalist.json``: ``n_train`` lesion images over folds 0-4 (item i in fold i % 5), one blank
    ``normal`` image and two test images. Returns the datalist path."""
    base = root / "TOY"
    (base / "images").mkdir(parents=True, exist_ok=True)
    (base / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)

    def item(name: str, fold: int, cls: str = "benign") -> dict:
        image, masks = make_phantom(rng, cls, size=SIZE)
        Image.fromarray(image).save(base / "images" / f"{name}.png")
        Image.fromarray(masks[0].astype(np.uint8) * 255).save(base / "masks" / f"{name}.png")
        return {"image": f"images/{name}.png", "label": f"masks/{name}.png", "fold": fold, "group": f"TOY/{name}",
                "dataset": "TOY", "class": cls}

    training = [item(f"tr{i:02d}", i % 5) for i in range(n_train)] + [item("normal00", 0, "normal")]
    testing = [item(f"te{i:02d}", -1) for i in range(2)]
    meta = {"name": "TOY", "datasets": ["TOY"], "n_splits": 5, "seed": 42, "training": training, "testing": testing}
    (base / "datalist.json").write_text(json.dumps(meta))
    return base / "datalist.json"


def soft_prediction(mask: np.ndarray, shift: int = 2) -> np.ndarray:
    """A plausible network output: the mask shifted and blurred, (H, W) float in [0, 1]."""
    m = np.roll(mask.astype(np.float64), shift, axis=1)
    return np.clip(ndimage.gaussian_filter(m, 1.5), 0, 1)


def write_predictions(datalist: Path, pred_root: Path, n_splits: int = 5) -> Path:
    """The ``predict-transunet`` layout (``inference/transunet_predict.py``): ``<pred_root>/TOY/fold_<k>/coarse/*.png``
    (p * 255, native size) for fold k's held-out images and the test split, ``ensemble/coarse/`` and
    ``<pred_root>/TOY/datalist.json``. Returns that datalist."""
    src = datalist.parent
    meta = json.loads(datalist.read_text())
    out = pred_root / "TOY"

    def save(rel: str, label_rel: str, shift: int) -> None:
        mask = np.asarray(Image.open(src / label_rel)) > 127
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(soft_prediction(mask, shift) * 255).astype(np.uint8)).save(path)

    training = []
    for e in meta["training"]:
        rel = f"fold_{e['fold']}/coarse/{Path(e['image']).name}"
        save(rel, e["label"], 2)
        training.append({**e, "image": os.path.relpath(src / e["image"], out),
                         "label": os.path.relpath(src / e["label"], out), "coarse": rel})
    testing = []
    for e in meta["testing"]:
        t = {**e, "image": os.path.relpath(src / e["image"], out), "label": os.path.relpath(src / e["label"], out)}
        for k in range(n_splits):
            rel = f"fold_{k}/coarse/{Path(e['image']).name}"
            save(rel, e["label"], k)
            t[f"coarse_fold_{k}"] = rel
        t["coarse"] = f"ensemble/coarse/{Path(e['image']).name}"
        save(t["coarse"], e["label"], 1)
        testing.append(t)
    result = {**{k: v for k, v in meta.items() if k not in ("training", "testing")}, "training": training,
              "testing": testing}
    (out / "datalist.json").write_text(json.dumps(result))
    return out / "datalist.json"
