"""``python -m ultrarefiner preprocess``."""

from __future__ import annotations

from pathlib import Path

from ultrarefiner.commands.args import check_range
from ultrarefiner.data.duplicates import DHASH_THRESHOLD
from ultrarefiner.data.layouts import KNOWN_DATASETS
from ultrarefiner.errors import BadInputError
from ultrarefiner.utils.flags import as_flag, parse_list

LAYOUTS = ("auto", "folder")


def preprocess(
    raw_root: str,
    output_root: str = "./dataset/processed",
    datasets: str | None = None,
    layout: str = "auto",
    test_ratio: float = 0.2,
    n_splits: int = 5,
    seed: int = 42,
    official_folds: bool = False,
    dup_threshold: int = DHASH_THRESHOLD,
    num_workers: int = 4,
    label_classes: str | int | list | tuple | None = None,
) -> None:
    """Prepare raw datasets: grayscale PNGs, 0/255 masks, leak-free test split and K folds, MONAI datalists.

    Reads R/<NAME>/ in each dataset's distributed layout (BUSI, BUSBRA, BUS, BUS_UC, BUS_UCLM), or any
    images/ + masks/ folder with --layout folder. Writes O/<NAME>/{images,masks}/*.png, O/<NAME>/datalist.json,
    a combined datalist O/<sorted names joined by _>/datalist.json when several datasets are given, and
    O/preprocess_report.json (counts, duplicate groups, bad files with reasons). Bad files are reported and
    skipped; the command fails only when nothing usable is left. Re-running over an existing output is safe.

    Args:
        raw_root: folder holding one sub-folder per dataset (R/BUSI/Dataset_BUSI_with_GT/...).
        output_root: where processed data goes.
        datasets: comma-separated names, e.g. BUSI,BUSBRA (default: every known dataset found under raw_root;
            with --layout folder, any folder names).
        layout: auto (each dataset's own layout) or folder (images/ and masks/ with equal stems).
        test_ratio: fraction of each class held out as test set, drawn over patient/near-duplicate groups.
        n_splits: number of cross-validation folds over the remaining groups.
        seed: split seed; the same seed gives the same split whatever the file-system order.
        official_folds: use BUSBRA's official patient-level folds (5-fold-cv.csv) instead of drawing folds.
        dup_threshold: max Hamming distance (of 256 bits) between difference hashes of near-duplicates.
        num_workers: threads that decode and write images.
        label_classes: the masks are multi-class label maps (0 background, 1 benign, 2 malignant, as nnU-Net and
            MONAI Label save them; grayscale, palette PNG or NIfTI), and these values, separated by commas, are
            lesion (e.g. 1,2), written as 255; default none (lesion is above half the mask's scale, and a class map
            is refused as a bad file). A mask holding none of them is blank, excluded as a lesion-free image.
    """
    from ultrarefiner.data.imaging import lesion_classes
    from ultrarefiner.data.preprocess import preprocess as run

    root = Path(raw_root)
    if not root.is_dir():
        raise BadInputError(root, "raw_root is not a folder")
    if layout not in LAYOUTS:
        raise ValueError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    check_range(test_ratio, "test_ratio", 0.0, 0.9)
    check_range(n_splits, "n_splits", 2, 20, integer=True)
    check_range(seed, "seed", 0, 2**32 - 1, integer=True)
    check_range(dup_threshold, "dup_threshold", 0, 128, integer=True)
    check_range(num_workers, "num_workers", 1, 256, integer=True)
    names = parse_list(datasets, "datasets", None if layout == "folder" else KNOWN_DATASETS)
    if not names:
        names = [n for n in KNOWN_DATASETS if (root / n).is_dir()]
        if not names:
            raise BadInputError(root, f"no dataset folder found (expected one of {', '.join(KNOWN_DATASETS)})")
    options = dict(
        layout=layout,
        test_ratio=test_ratio,
        n_splits=int(n_splits),
        seed=int(seed),
        official_folds=as_flag(official_folds, "official_folds"),
        dup_threshold=int(dup_threshold),
        num_workers=int(num_workers),
        label_classes=lesion_classes(label_classes, "label_classes"),
    )
    report = run(root, output_root, names, **options)
    print(format_report(report, names))
    print(f"\nDatalists and report written under {Path(output_root).resolve()}")


def format_report(report: dict, names: list[str]) -> str:
    """A console table of the per-dataset counts."""
    cols = ("found", "blank_excluded", "multi_mask_merged", "samples", "duplicate_groups", "groups", "train", "test")
    head = ["dataset", "found", "blank", "merged", "samples", "dup.groups", "groups", "train", "test", "bad"]
    rows = [head]
    for n in names:
        e = report["datasets"][n]
        rows.append([n] + [str(e.get(c, 0)) for c in cols] + [str(len(e["bad_files"]))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    for n in names:
        e = report["datasets"][n]
        if e.get("folds"):
            lines.append(f"{n} folds: {e['folds']}")
        for b in e["bad_files"]:
            lines.append(f"{n} skipped {b['file']}: {b['reason']}")
        for note in e.get("notes", []):
            lines.append(f"{n} note: {note}")
    if "combined" in report:
        lines.append(f"combined datalist: {report['combined']['name']}")
    return "\n".join(lines)
