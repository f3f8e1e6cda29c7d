"""The decathlon-style datalist written by ``preprocess`` and how to select a fold and split from it.

Layout of ``<output_root>/<NAME>/datalist.json``::

    {"name": "BUSI", "datasets": ["BUSI"], "n_splits": 5, "seed": 42,
     "training": [{"image": "images/benign_0001.png", "label": "masks/benign_0001.png", "fold": 3,
                   "group": "BUSI/g0012", "dataset": "BUSI", "class": "benign",
                   "source": "Dataset_BUSI_with_GT/benign/benign (1).png"}, ...],
     "testing": [... same keys, "fold": -1 ...]}

Paths are relative to the datalist's folder, so ``monai.data.load_decathlon_datalist`` resolves them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from monai.data import load_decathlon_datalist

from ultrarefiner.errors import BadInputError

SPLITS = ("train", "val", "test", "trainval")


def combined_name(datasets: Iterable[str]) -> str:
    """Name of a combined datalist: sorted dataset names joined by ``_`` (``BUS_BUSBRA_BUSI``)."""
    names = sorted(set(datasets))
    if not names:
        raise ValueError("at least one dataset name is needed")
    return "_".join(names)


def datalist_path(data_root: str | os.PathLike, dataset_name: str) -> Path:
    """``<data_root>/<dataset_name>/datalist.json``, with a clear error when it does not exist."""
    path = Path(data_root) / dataset_name / "datalist.json"
    if not path.is_file():
        known = (
            sorted(p.parent.name for p in Path(data_root).glob("*/datalist.json")) if Path(data_root).is_dir() else []
        )
        hint = f"; datalists found under {data_root}: {', '.join(known)}" if known else ""
        raise BadInputError(path, f"no datalist. Run `python -m ultrarefiner preprocess` first{hint}")
    return path


def load_split(datalist: str | os.PathLike, fold: int | None = 0, split: str = "train") -> list[dict]:
    """Items of one split with absolute paths.

    Args:
        datalist: path of a ``datalist.json``.
        fold: validation fold k; ``train`` is every training item not in fold k, ``val`` the items of fold k.
            ``None`` (or a negative value) means no validation fold: ``train`` is all training items.
        split: ``train``, ``val``, ``trainval`` (all training items) or ``test``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(datalist)
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    n_splits = int(meta.get("n_splits", 0))
    if fold is not None and fold >= 0 and n_splits and fold >= n_splits:
        raise ValueError(f"fold {fold} does not exist in {path}: it has {n_splits} folds (0..{n_splits - 1})")
    key = "testing" if split == "test" else "training"
    items = load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=key, base_dir=str(path.parent))
    if split in ("test", "trainval") or fold is None or fold < 0:
        return items
    if split == "val":
        return [d for d in items if d["fold"] == fold]
    return [d for d in items if d["fold"] != fold]
