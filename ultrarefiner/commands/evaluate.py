"""``python -m ultrarefiner evaluate``."""

from __future__ import annotations

from pathlib import Path


def evaluate(
    labels: str,
    predictions: str | list | tuple,
    output_dir: str | None = None,
    names: str | list | tuple | None = None,
    metrics: str | list | tuple | None = None,
    n_bootstrap: int = 2000,
) -> None:
    """Score folders of predicted masks against a folder of labels, and compare each folder with the first.

    Masks are matched by file stem (PNG, JPEG, BMP, TIFF; lesion = above half the mask's scale, > 127 in 8 bits, 1 in
    a 0/1 label map, p > 0.5 in a float TIFF, > 32767 in 16 bits).
    Metrics per image at native resolution: Dice, IoU, precision, recall, accuracy, HD95 (pixels) and NSD (2 px).
    Each folder after the first is compared with the first image by image: mean difference with its 95% paired
    bootstrap CI, images improved and worsened. Only images that every folder has are scored; the others are listed
    in the summary's "skipped".
    Writes <output_dir>/metrics.csv (one row per image), <output_dir>/summary.json and <output_dir>/comparison.csv
    (one row per comparison and metric), as the bundles' evaluation reports do.

    Example, coarse vs refined vs refined with flip TTA:
        python -m ultrarefiner evaluate --labels ./labels \\
            --predictions ./coarse,./refined/masks,./refined_tta/masks --names coarse,refined,tta --output_dir ./eval

    Args:
        labels: folder of ground-truth masks.
        predictions: folders of predicted masks, comma-separated; the first is the reference.
        output_dir: where metrics.csv, summary.json and comparison.csv go (default: print only).
        names: a name per folder, comma-separated (default: the folder names).
        metrics: comma-separated subset of dice,iou,precision,recall,accuracy,hd95,nsd (default: all).
        n_bootstrap: bootstrap resamples of the paired CI.
    """
    from ultrarefiner.commands.args import parse_list
    from ultrarefiner.engines.evaluation.folder_evaluation import evaluate_folders, format_comparison
    from ultrarefiner.engines.evaluation.metrics import METRIC_NAMES
    from ultrarefiner.errors import BadOptionError

    folders = parse_list(predictions, "predictions")
    labels_of = parse_list(names, "names") if names is not None else _default_names(folders)
    if len(labels_of) != len(folders):
        raise BadOptionError(f"names: {len(labels_of)} names for {len(folders)} predictions folders")
    if len(set(labels_of)) != len(labels_of):
        raise BadOptionError(f"names: give each folder its own name, got {labels_of}")
    report = evaluate_folders(labels, dict(zip(labels_of, folders, strict=True)), output_dir,
                              parse_list(metrics, "metrics") if metrics is not None else METRIC_NAMES,
                              int(n_bootstrap))
    print(format_comparison(report))
    if output_dir is not None:
        print(f"per-image metrics: {Path(output_dir).resolve() / 'metrics.csv'}")


def _default_names(folders: list[str]) -> list[str]:
    """Each folder's name, or its parent's for the generic <run>/masks of refine and predict; full paths when
    two would share a name."""
    names = [Path(f).parent.name if Path(f).name in ("masks", "predictions") else Path(f).name for f in folders]
    return names if len(set(names)) == len(names) else list(folders)
