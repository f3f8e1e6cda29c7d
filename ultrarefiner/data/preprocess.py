"""Raw dataset folders -> normalised PNGs, leak-free splits and MONAI decathlon datalists.

For each dataset: list (``layouts``), decode and check every pair, merge multi-masks, drop blank masks,
write ``images/<key>.png`` (8-bit grayscale) and ``masks/<key>.png`` (0/255) at native resolution, group
patients and near-duplicates, draw the test split and the folds over groups, write ``datalist.json``.
All writes are atomic, so re-running over an existing output is safe.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ultrarefiner.data.datalist import combined_name
from ultrarefiner.data.duplicates import DHASH_THRESHOLD, dhash_bits, group_samples, near_duplicate_pairs
from ultrarefiner.data.imaging import read_classes, read_image, read_label
from ultrarefiner.data.layouts import BadFile, RawSample, list_dataset
from ultrarefiner.data.splits import assign_folds, split_test
from ultrarefiner.errors import BadInputError, UltraRefinerError
from ultrarefiner.utils.io import remove_stale_temporaries, write_json, write_png

REPORT_NAME = "preprocess_report.json"


@dataclass
class _Converted:
    sample: RawSample
    hash: np.ndarray | None = None
    blank: bool = False
    bad: BadFile | None = None
    shape: tuple[int, int] | None = None
    note: str = ""  # why a blank mask is blank, when it holds values other than the label classes


def _mask_class(mask_rgb: np.ndarray) -> str:
    """BUS_UCLM colour code: red-dominant lesion pixels = malignant, green = benign."""
    lesion = mask_rgb.max(axis=-1) > 0
    if not lesion.any():
        return "normal"
    r, g = mask_rgb[..., 0][lesion].astype(np.int64).sum(), mask_rgb[..., 1][lesion].astype(np.int64).sum()
    return "malignant" if r > g else "benign"


def _convert(sample: RawSample, out_dir: Path, classes: tuple[int, ...] = ()) -> _Converted:
    """Decode, check and write one sample; never raises for bad input (returns it as ``bad``). ``classes``: the
    masks are class maps, lesion where they hold one of these values (``imaging.read_classes``)."""
    try:
        image = read_image(sample.image)
        mask = np.zeros(image.shape, dtype=bool)
        note = ""
        for m in sample.masks:
            if classes:
                part, why = read_classes(m, classes)
                note = note or (f"{m}: {why}" if why else "")
            else:
                part = read_label(m, colour_coded=sample.colour_coded, classes_option="label_classes")
            if part.shape != image.shape:
                return _Converted(
                    sample,
                    bad=BadFile(
                        str(m),
                        f"mask size {part.shape[1]}x{part.shape[0]} (WxH) differs from image size "
                        f"{image.shape[1]}x{image.shape[0]} of {sample.image}",
                    ),
                )
            mask |= part
        if sample.colour_coded and sample.class_name is None:
            from PIL import Image

            with Image.open(sample.masks[0]) as im:
                sample.class_name = _mask_class(np.asarray(im.convert("RGB")))
    except BadInputError as e:
        return _Converted(sample, bad=BadFile(e.path, e.reason))
    if not mask.any():
        return _Converted(sample, blank=True, note=note)
    write_png(out_dir / "images" / f"{sample.key}.png", image)
    write_png(out_dir / "masks" / f"{sample.key}.png", mask.astype(np.uint8) * 255)
    return _Converted(sample, hash=dhash_bits(image), shape=image.shape)


def _entry(c: _Converted, name: str, group: str, fold: int) -> dict:
    s = c.sample
    return {
        "image": f"images/{s.key}.png",
        "label": f"masks/{s.key}.png",
        "fold": fold,
        "group": group,
        "dataset": name,
        "class": s.class_name or "unknown",
        "source": s.source,
        "height": c.shape[0],
        "width": c.shape[1],
    }


@dataclass(frozen=True)
class PrepareOptions:
    """How datasets are read and split (the CLI flags of ``preprocess``)."""

    layout: str = "auto"
    test_ratio: float = 0.2
    n_splits: int = 5
    seed: int = 42
    official_folds: bool = False
    dup_threshold: int = DHASH_THRESHOLD
    num_workers: int = 4
    label_classes: tuple[int, ...] = ()  # masks that are class maps: these values are lesion (imaging.read_classes)


def preprocess_dataset(raw_root: Path, output_root: Path, name: str, opts: PrepareOptions) -> dict:
    """Prepare one dataset; returns its report entry (counts, bad files, split sizes)."""
    layout, test_ratio, n_splits, seed = opts.layout, opts.test_ratio, opts.n_splits, opts.seed
    official_folds, dup_threshold, num_workers = opts.official_folds, opts.dup_threshold, opts.num_workers
    listing = list_dataset(raw_root, name, layout)
    out_dir = output_root / name
    for sub in ("images", "masks", "."):  # temporary files of a killed run: never read, safe to drop
        remove_stale_temporaries(out_dir / sub)
    report: dict = {"found": len(listing.samples), "bad_files": [vars(b) for b in listing.bad], "notes": listing.notes}
    with ThreadPoolExecutor(max(1, num_workers)) as pool:  # PIL/zlib release the GIL while (de)coding
        converted = list(
            tqdm(
                pool.map(lambda s: _convert(s, out_dir, tuple(opts.label_classes)), listing.samples),
                total=len(listing.samples),
                desc=f"preprocess {name}",
                unit="img",
                leave=False,
                disable=None,
            )
        )
    report["bad_files"] += [vars(c.bad) for c in converted if c.bad]
    kept = [c for c in converted if c.bad is None and not c.blank]
    report["blank_excluded"] = sum(c.blank for c in converted)
    other = [c.note for c in converted if c.blank and c.note]
    if other:  # a 0/255 dataset given class values, or images of another class only: not dropped in silence
        report["notes"].append(f"{len(other)} masks hold none of the label classes "
                               f"{','.join(map(str, opts.label_classes))} and were excluded as blank, e.g. {other[0]}")
    report["multi_mask_merged"] = sum(len(c.sample.masks) > 1 for c in kept)
    report["samples"] = len(kept)
    if not kept:
        report.update(train=0, test=0, duplicate_pairs=0, duplicate_groups=0)
        return report

    pairs = near_duplicate_pairs(np.stack([c.hash for c in kept]), dup_threshold)
    links = [(i, j) for i, j, _ in pairs]
    by_patient: dict[str, int] = {}
    for i, c in enumerate(kept):
        if c.sample.patient is not None:
            links.append((by_patient.setdefault(c.sample.patient, i), i))
    root_of = group_samples(len(kept), links)
    group = []
    for r in root_of:
        first = kept[r].sample
        group.append(f"{name}/patient_{first.patient}" if first.patient is not None else f"{name}/{first.key}")
    dup_roots = group_samples(len(kept), [(i, j) for i, j, _ in pairs])
    report["duplicate_pairs"] = len(pairs)
    report["duplicate_groups"] = sum(1 for r, n in zip(*np.unique(dup_roots, return_counts=True), strict=True) if n > 1)
    report["duplicate_pair_list"] = [[kept[i].sample.source, kept[j].sample.source, d] for i, j, d in pairs]
    report["groups"] = len(set(group))

    classes = [c.sample.class_name or "unknown" for c in kept]
    is_test = split_test(group, classes, test_ratio, seed) if test_ratio > 0 else [False] * len(kept)
    train_idx = [i for i in range(len(kept)) if not is_test[i]]
    if official_folds and all(kept[i].sample.official_fold is not None for i in train_idx):
        folds = _official_folds(kept, train_idx, group, report)
    else:
        if official_folds:
            report["notes"].append("official folds requested but not available for every image: drew folds")
        try:
            fold_list = assign_folds([group[i] for i in train_idx], [classes[i] for i in train_idx], n_splits, seed)
        except ValueError as e:
            raise UltraRefinerError(f"{name}: {e}; lower --n_splits or --test_ratio") from e
        folds = dict(zip(train_idx, fold_list, strict=True))
    training = [_entry(kept[i], name, group[i], folds[i]) for i in train_idx]
    testing = [_entry(kept[i], name, group[i], -1) for i in range(len(kept)) if is_test[i]]
    n_folds = n_splits if not official_folds else max(e["fold"] for e in training) + 1
    datalist = {
        "name": name,
        "datasets": [name],
        "n_splits": n_folds,
        "seed": seed,
        "test_ratio": test_ratio,
        "training": training,
        "testing": testing,
    }
    write_json(out_dir / "datalist.json", datalist)
    report.update(
        train=len(training), test=len(testing), folds=[sum(e["fold"] == k for e in training) for k in range(n_folds)]
    )
    return report


def _official_folds(kept: list[_Converted], idx: list[int], group: list[str], report: dict) -> dict[int, int]:
    """Official folds; a group that spans folds (near-duplicates) goes whole to its first member's fold."""
    first: dict[str, int] = {}
    out, moved = {}, 0
    for i in idx:
        k = first.setdefault(group[i], kept[i].sample.official_fold)
        moved += k != kept[i].sample.official_fold
        out[i] = k
    if moved:
        report["notes"].append(f"{moved} images moved to the official fold of their near-duplicate group")
    return out


def write_combined(output_root: Path, names: list[str]) -> Path:
    """One datalist over several datasets, named by the sorted names joined with ``_``; same folds."""
    name = combined_name(names)
    combined: dict = {"name": name, "datasets": sorted(names), "training": [], "testing": []}
    for n in sorted(names):
        with open(output_root / n / "datalist.json", encoding="utf-8") as f:
            part = json.load(f)
        combined["n_splits"] = max(combined.get("n_splits", 0), part["n_splits"])
        combined["seed"] = part["seed"]
        for key in ("training", "testing"):
            for e in part[key]:
                combined[key].append({**e, "image": f"../{n}/{e['image']}", "label": f"../{n}/{e['label']}"})
    return write_json(output_root / name / "datalist.json", combined)


def preprocess(raw_root: str | os.PathLike, output_root: str | os.PathLike, datasets: list[str], **options) -> dict:
    """Prepare several datasets, the combined datalist and ``preprocess_report.json``; returns the report.

    ``options`` are the fields of :class:`PrepareOptions`.

    Raises UltraRefinerError only when no dataset produced a usable sample.
    """
    raw_root, output_root = Path(raw_root), Path(output_root)
    report_path = output_root / REPORT_NAME
    remove_stale_temporaries(output_root)
    report = {"datasets": {}}
    if report_path.is_file():  # keep entries of datasets prepared by earlier runs
        try:
            report = json.loads(report_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            pass
    opts = PrepareOptions(**options)
    settings = {"raw_root": str(raw_root), **{k: v for k, v in asdict(opts).items() if k != "num_workers"}}
    usable = []
    for name in datasets:
        entry = preprocess_dataset(raw_root, output_root, name, opts)
        report["datasets"][name] = {**entry, "settings": settings}
        if entry["samples"]:
            usable.append(name)
    if len(usable) > 1:
        report["combined"] = {"name": combined_name(usable), "datasets": sorted(usable)}
        write_combined(output_root, usable)
    write_json(report_path, report)
    if not usable:
        raise UltraRefinerError(f"no usable sample in {', '.join(datasets)} under {raw_root}; see {report_path}")
    return report
