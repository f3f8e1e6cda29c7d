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
    label_postfix: str = "",
    postfixes: str | list | tuple | None = None,
    label_classes: str | int | list | tuple | None = None,
    prediction_classes: str | int | list | tuple | None = None,
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
        labels: folder of ground-truth masks (picture files or 2D NIfTI).
        predictions: folders of predicted masks (picture files or 2D NIfTI, as MONAI's SaveImage writes them),
            comma-separated; the first is the reference.
        output_dir: where metrics.csv, summary.json and comparison.csv go (default: print only).
        names: a name per folder, comma-separated (default: the folder names).
        metrics: comma-separated subset of dice,iou,precision,recall,accuracy,hd95,nsd (default: all).
        n_bootstrap: bootstrap resamples of the paired CI.
        label_postfix: labels are named <stem><label_postfix>.* (e.g. _mask for BUSI; default none), and files
            named <stem><label_postfix>_<k>.* (BUSI's _mask_1) are further lesions, merged in.
        postfixes: the masks of each predictions folder are named <stem><postfix>.* (e.g. _seg for the outputs
            of MONAI's SaveImage and of the Model Zoo's bundles), one postfix for every folder or one per folder
            separated by commas, none for no postfix (_seg,none for the first folder only; default none).
        label_classes: the labels are multi-class label maps (0 background, 1 benign, 2 malignant, as nnU-Net
            and MONAI Label save them; grayscale, palette PNG or NIfTI), and these values, separated by commas, are
            lesion (e.g. 1,2); default none (lesion is above half the mask's scale).
        prediction_classes: the same for every predictions folder (e.g. 1,2 for a multi-class segmenter's maps;
            1,2,255 to compare such maps with 0/255 masks, which hold 255 where they are lesion).
    """
    from ultrarefiner.commands.args import check_postfix
    from ultrarefiner.data.imaging import lesion_classes
    from ultrarefiner.engines.evaluation.folder_evaluation import evaluate_folders, format_comparison
    from ultrarefiner.engines.evaluation.metrics import METRIC_NAMES
    from ultrarefiner.errors import BadOptionError, UltraRefinerError
    from ultrarefiner.utils.flags import parse_list

    folders = parse_list(predictions, "predictions")
    labels_of = parse_list(names, "names") if names is not None else _default_names(folders)
    if len(labels_of) != len(folders):
        raise BadOptionError(f"names: {len(labels_of)} names for {len(folders)} predictions folders")
    if len(set(labels_of)) != len(labels_of):
        raise BadOptionError(f"names: give each folder its own name, got {labels_of}")
    report = evaluate_folders(labels, dict(zip(labels_of, folders, strict=True)), output_dir,
                              parse_list(metrics, "metrics") if metrics is not None else METRIC_NAMES,
                              int(n_bootstrap), label_postfix=check_postfix(label_postfix, "label_postfix"),
                              postfixes=dict(zip(labels_of, _postfixes(postfixes, len(folders)), strict=True)),
                              label_classes=lesion_classes(label_classes, "label_classes"),
                              prediction_classes=lesion_classes(prediction_classes, "prediction_classes"))
    if not report["n"]:  # a table of NaN would hide why
        problems = "; ".join(f"{s['file']}: {s['problem']}" for s in report["skipped"][:3])
        raise UltraRefinerError(f"no image scored: {len(report['skipped'])} files skipped, e.g. {problems}")
    print(format_comparison(report))
    if output_dir is not None:
        print(f"per-image metrics: {Path(output_dir).resolve() / 'metrics.csv'}")


def _postfixes(value: str | list | tuple | None, n: int) -> list[str]:
    """``--postfixes``: one for all ``n`` folders, or one per folder ("none", "" or None: no postfix)."""
    from ultrarefiner.commands.args import check_postfix
    from ultrarefiner.errors import BadOptionError

    if value is None:
        return [""] * n
    items = [str(v).strip() for v in (value.split(",") if isinstance(value, str) else value)]
    items = ["" if v.lower() == "none" else v for v in items]
    if len(items) == 1:
        items *= n
    if len(items) != n:
        raise BadOptionError(f"postfixes: {len(items)} postfixes for {n} predictions folders (one for all, or one "
                             f"per folder, comma-separated)")
    return [check_postfix(v, "postfixes") for v in items]


def _default_names(folders: list[str]) -> list[str]:
    """Each folder's name, or its parent's for the generic <run>/masks of refine and predict; full paths when
    two would share a name."""
    names = [Path(f).parent.name if Path(f).name in ("masks", "predictions") else Path(f).name for f in folders]
    return names if len(set(names)) == len(names) else list(folders)
