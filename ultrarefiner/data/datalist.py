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
import numbers
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from monai.data import load_decathlon_datalist

from ultrarefiner.errors import BadInputError, BadOptionError

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


def folder_images(input_dir: str | os.PathLike, exclude: str | Iterable[str] | None = None) -> list[Path]:
    """The image files of ``input_dir`` (``imaging.folder_image_files``: any of ``IMAGE_SUFFIXES``, as ``refine``
    reads), sorted, hidden files and those matching the file-name patterns ``exclude`` left out.

    Raises:
        BadInputError: the folder does not exist, is not a folder, holds no matching file, or holds two images of one
            stem (``a.png``, ``a.jpg``: their outputs ``<stem>_seg.png`` would overwrite each other; a bundle run
            has no report of skipped images, where ``refine`` skips and lists them).
    """
    from ultrarefiner.data.imaging import folder_image_files

    folder = Path(input_dir)
    files = folder_image_files(folder, "input", exclude)
    stems = Counter(f.stem for f in files)
    shared = sorted(f.name for f in files if stems[f.stem] > 1)
    if shared:
        raise BadInputError(folder, f"images {', '.join(shared)} share a stem: their outputs would overwrite each "
                                    f"other; keep one of each")
    return files


def image_datalist(input_dir: str | os.PathLike,
                   exclude: str | Iterable[str] | None = None) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` of :func:`folder_images`, for the bundles' ``inference.json``."""
    return [{"image": str(f)} for f in folder_images(input_dir, exclude)]


def check_fold(fold: object, n_splits: int, datalist: str | os.PathLike) -> int | None:
    """``fold`` as an int in ``0..n_splits-1`` (``n_splits`` 0: unknown, only ``>= 0`` is checked), or None.

    Raises:
        BadOptionError: (a ValueError) naming the datalist and the valid folds.
    """
    if fold is None:
        return None
    valid = f"0..{n_splits - 1}" if n_splits else "0 or more"
    if isinstance(fold, bool) or not isinstance(fold, numbers.Integral) or fold < 0 or (n_splits and fold >= n_splits):
        raise BadOptionError(f"fold {fold!r} does not exist in {datalist}: it has "
                         f"{f'{n_splits} folds' if n_splits else 'folds'} ({valid}); set --fold to one of them")
    return int(fold)


def check_datalist_fold(datalist: str | os.PathLike, fold: object) -> int | None:
    """:func:`check_fold` against the ``n_splits`` of a ``datalist.json``: the first entry of a training config's
    ``initialize``, so that a wrong ``--fold`` stops the run before it creates ``fold_<k>/`` or builds anything."""
    path = Path(datalist)
    with open(path, encoding="utf-8") as f:
        n_splits = int(json.load(f).get("n_splits", 0))
    return check_fold(fold, n_splits, path)


def load_split(datalist: str | os.PathLike, fold: int | None = 0, split: str = "train") -> list[dict]:
    """Items of one split with absolute paths.

    Args:
        datalist: path of a ``datalist.json``.
        fold: validation fold k in 0..n_splits-1; ``train`` is every training item not in fold k, ``val`` the
            items of fold k. ``None`` means no validation fold: ``train`` is all training items.
        split: ``train``, ``val``, ``trainval`` (all training items) or ``test``.

    Raises:
        ValueError: an unknown split, or a fold outside 0..n_splits-1 (a negative fold would silently validate on
            training images), before anything is loaded.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(datalist)
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    n_splits = int(meta.get("n_splits", 0))
    check_fold(fold, n_splits, path)
    key = "testing" if split == "test" else "training"
    items = load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=key, base_dir=str(path.parent))
    if split in ("test", "trainval") or fold is None:
        return items
    if split == "val":
        return [d for d in items if d["fold"] == fold]
    return [d for d in items if d["fold"] != fold]
