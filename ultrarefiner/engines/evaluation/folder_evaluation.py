"""Evaluation from prediction folders, as nnU-Net's ``evaluate_predictions`` does for its own outputs.

Every phase and command writes masks to folders (``predict-transunet``, ``refine``, ``predict``, the bundles'
inference). ``evaluate_folders`` scores one or more such folders against a folder of labels with the metric set of
the bundles (``metrics.METRIC_NAMES``: Dice, IoU, precision, recall, accuracy, HD95, NSD at native resolution), and
compares each folder with the first, image by image, with the paired bootstrap of ``comparison``: coarse vs
refined, phase-2 input vs refined, one model vs another, TTA vs none.

The building blocks are the ones the evaluators' report handlers (``SegmentationReport``, ``RefinerReport``,
``E2EReport``) call on the predictions they collect, so a handler's ``metrics.csv`` holds the values this tool
computes from the same masks written to folders: ``score_pair`` (one prediction against its label -> metric
columns), ``comparison.summarise`` / ``comparison.compare_pairs`` (summaries, paired comparisons) and
``write_csv`` / ``write_comparison_csv`` (report files, written atomically).

Files are matched by stem (``<stem>.png`` in the labels folder and in each predictions folder, or
``<stem><postfix>.png`` with a postfix such as MONAI's ``_seg``; any of ``MASK_SUFFIXES``: picture files or 2D
NIfTI), read with ``read_mask`` (lesion = above half the mask's scale, ``mask_levels``: 0/255 masks and
probability*255 maps at 0.5; 1 in a 0/1 label map; float probabilities at 0.5; 16-bit levels above 32767); labels
with ``read_labels``, which also refuses multi-class label maps and inverted masks; with a label postfix,
``<stem><postfix>_<k>.*`` files are further lesions of the label (BUSI's ``_mask_1``), merged into it.
Only images that every folder has, readable and of the label's size, are scored, so that the comparison stays
paired; the others are listed in the report's ``skipped`` with the file and the problem, never silently dropped.
"""

from __future__ import annotations

import os
import shlex
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ultrarefiner.data.imaging import (
    MASK_SUFFIXES,
    class_map_note,
    mask_parts,
    read_classes,
    read_labels,
    read_mask,
    transposed_hint,
)
from ultrarefiner.engines.evaluation.comparison import blank_labels_note, compare_pairs, summarise
from ultrarefiner.engines.evaluation.metrics import METRIC_NAMES, segmentation_metrics
from ultrarefiner.engines.inference.refine_folder import files_by_stem
from ultrarefiner.errors import BadInputError, BadOptionError
from ultrarefiner.utils.io import write_csv, write_json

__all__ = ["binary_mask", "evaluate_folders", "format_comparison", "score_folders", "score_pair", "write_csv",
           "write_comparison_csv"]

COMPARISON_COLUMNS = ("dataset", "comparison", "metric", "n", "mean_a", "mean_b", "mean_diff", "ci95_low",
                      "ci95_high", "improved", "worsened", "unchanged")


# ------------------------------------------------------------------------------------------------ one image
def binary_mask(x: Any) -> torch.Tensor:
    """A mask, probability map or one-hot pair -> bool (1, H, W) on the CPU.

    ``x``: tensor or array (H, W), (1, H, W), (1, 1, H, W) or one-hot (2, H, W) (channel 1 is the lesion); values
    > 0.5 are lesion.
    """
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().float().cpu()
    if t.ndim == 3 and t.shape[0] == 2:
        t = t[1:]
    return t.reshape(1, *t.shape[-2:]) > 0.5


def score_pair(pred: Any, label: Any, metrics: Sequence[str] = METRIC_NAMES, prefix: str = "") -> dict[str, float]:
    """Metric columns ``<prefix><metric>`` of one prediction against its label, both at the same (native) size.

    ``pred``, ``label``: anything ``binary_mask`` takes; a size mismatch raises ``ValueError``.
    """
    scores = segmentation_metrics(binary_mask(pred).float(), binary_mask(label).float(), metrics)
    return {f"{prefix}{m}": float(scores[m]) for m in metrics}


# ------------------------------------------------------------------------------------------------ files
def write_comparison_csv(path: str | os.PathLike,
                         comparisons: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]]) -> Path:
    """Atomically write ``comparisons`` {group (dataset or "all"): {pair name: {metric: paired_comparison}}} as one
    row per group, pair and metric (``COMPARISON_COLUMNS``)."""
    rows = [dict(zip(COMPARISON_COLUMNS, (group, name, m, c["n"], c["mean_a"], c["mean_b"], c["mean_diff"],
                                          c["ci95"][0], c["ci95"][1], c["improved"], c["worsened"], c["unchanged"]),
                     strict=True))
            for group, pairs in comparisons.items() for name, per_metric in pairs.items()
            for m, c in per_metric.items()]
    return write_csv(path, rows, COMPARISON_COLUMNS)


# ------------------------------------------------------------------------------------------------ folders
def _masks_by_stem(folder: Path, role: str, skipped: list[dict[str, str]], postfix: str = "") -> dict[str, Path]:
    """One mask per stem (``refine_folder.files_by_stem``, ``<stem><postfix>.*``); stems with several files are
    ambiguous: skipped."""
    if folder.exists() and not folder.is_dir():
        raise BadInputError(folder, f"{role} must be a folder")
    found = files_by_stem(folder, role, postfix)
    if not found:
        named = f" named <stem>{postfix}.*" if postfix else ""
        raise BadInputError(folder, f"{role} folder has no mask files{named} ({', '.join(MASK_SUFFIXES)})")
    for stem, files in found.items():
        if len(files) > 1:
            skipped.extend({"file": str(f), "problem": f"several files share the stem {stem!r}"} for f in files)
    return {stem: files[0] for stem, files in found.items() if len(files) == 1}


def _read(path: Path, shape: tuple[int, int], classes: Sequence[int] = ()) -> tuple[np.ndarray, str]:
    """A prediction (H, W) bool and a note when it reads as no lesion although it holds other values: of a class
    map not holding ``classes`` (``read_classes``), or, without ``classes``, of a mask whose values look like class
    indices (``class_map_note``)."""
    mask, note = read_classes(path, classes) if classes else (read_mask(path), "")
    if mask.shape != shape:
        raise BadInputError(path, f"mask is {mask.shape[0]}x{mask.shape[1]} (HxW), its label {shape[0]}x{shape[1]}"
                                  f"{transposed_hint(path, mask.shape, shape)}")
    if not classes and not mask.any():
        note = class_map_note(path, soft=True, classes_option="prediction_classes")  # a second read, blank masks only
    return mask, note


def _tail(stems: set[str]) -> str:
    """The commonest ``_<word>`` ending among (up to 200 of) ``stems``: ``_mask``, ``_seg``; "" if none."""
    tails = Counter("_" + s.rsplit("_", 1)[1] for s in sorted(stems)[:200] if "_" in s)
    return tails.most_common(1)[0][0] if tails else ""


def _postfix_hint(labels: set[str], predicted: set[str]) -> str:
    """``"; set --label_postfix _mask and --postfixes _seg"`` when stripping the names' commonest ``_<word>``
    endings would pair labels with predictions that are not paired now; "" otherwise."""
    if labels == predicted:
        return ""

    def strip(stems: set[str], postfix: str) -> set[str]:
        return {s[: len(s) - len(postfix)] for s in stems if s.endswith(postfix)} if postfix else stems

    label_tail, pred_tail = _tail(labels - predicted), _tail(predicted - labels)
    for lp, pp in ((label_tail, ""), ("", pred_tail), (label_tail, pred_tail)):
        if (lp or pp) and strip(labels, lp) & strip(predicted, pp):
            options = [f"--{o} {shlex.quote(v)}" for o, v in (("label_postfix", lp), ("postfixes", pp)) if v]
            return "; set " + " and ".join(options)
    return ""


def score_folders(labels: str | os.PathLike, predictions: Mapping[str, str | os.PathLike],
                  metrics: Sequence[str] = METRIC_NAMES, label_postfix: str = "",
                  postfixes: Mapping[str, str] | None = None, notes: list[dict[str, str]] | None = None,
                  label_classes: Sequence[int] = (),
                  prediction_classes: Sequence[int] = ()) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Rows {image, height, width, label_area, <name>_<metric>...} of the images every predictions folder has, and
    the files skipped [{file, problem}] (module docstring). Labels are named ``<stem><label_postfix>.*``, the masks
    of predictions folder ``name`` ``<stem><postfixes[name]>.*``. ``notes`` (when given) receives {file, problem} of
    each scored prediction that reads as no lesion although it holds other non-zero values (``_read``): scored as
    empty, but not without a word. ``label_classes``, ``prediction_classes``: the labels, the predictions are class
    maps, lesion where they hold one of these values (``imaging.read_classes``); empty: the mask rule."""
    postfixes = {name: (postfixes or {}).get(name, "") for name in predictions}
    skipped: list[dict[str, str]] = []
    label_files = _masks_by_stem(Path(labels), "labels", skipped, label_postfix)
    label_parts = mask_parts(labels, label_postfix)  # BUSI's <stem>_mask_1.png: a further lesion of the label
    folders = {name: Path(p) for name, p in predictions.items()}
    pred_files = {name: _masks_by_stem(folder, f"predictions '{name}'", skipped, postfixes[name])
                  for name, folder in folders.items()}
    hints = {name: _postfix_hint(set(label_files), set(files)) for name, files in pred_files.items()}
    rows: list[dict[str, Any]] = []
    for stem, label_path in label_files.items():
        missing = [name for name, files in pred_files.items() if stem not in files]
        if missing:
            skipped.extend({"file": str(folders[n] / f"{stem}{postfixes[n]}.png"),
                            "problem": f"missing (its label exists){hints[n]}"} for n in missing)
            continue
        try:
            label = read_labels([label_path, *label_parts.get(stem, [])], label_classes, "label_classes")
            preds = {name: _read(files[stem], label.shape, prediction_classes) for name, files in pred_files.items()}
        except BadInputError as e:
            skipped.append({"file": e.path, "problem": e.reason})
            continue
        row: dict[str, Any] = {"image": stem, "height": label.shape[0], "width": label.shape[1],
                               "label_area": int(label.sum())}
        for name, (pred, note) in preds.items():
            row.update(score_pair(pred, label, metrics, prefix=f"{name}_"))
            if note and notes is not None:
                notes.append({"file": str(pred_files[name][stem]), "problem": f"{note}; scored as no lesion"})
        rows.append(row)
    for name, files in pred_files.items():  # predictions without a label: reported, not scored
        skipped.extend({"file": str(p), "problem": f"no label of this name{hints[name]}"}
                       for s, p in files.items() if s not in label_files)
    return rows, skipped


def evaluate_folders(
    labels: str | os.PathLike,
    predictions: Mapping[str, str | os.PathLike],
    output_dir: str | os.PathLike | None = None,
    metrics: Sequence[str] = METRIC_NAMES,
    n_bootstrap: int = 2000,
    tolerance: float = 1e-4,
    seed: int = 0,
    label_postfix: str = "",
    postfixes: Mapping[str, str] | None = None,
    label_classes: Sequence[int] = (),
    prediction_classes: Sequence[int] = (),
) -> dict[str, Any]:
    """Per-image metrics of each predictions folder against ``labels``, and each folder compared with the first.

    Arguments:
      labels: folder of ground-truth masks ``<stem>.png``.
      predictions: name -> folder of predicted masks, in order; the first is the reference of the comparisons.
      output_dir: where ``metrics.csv`` (one row per image: image, height, width, label_area, ``<name>_<metric>``
        columns), ``summary.json`` (the returned report) and ``comparison.csv`` (one row per comparison and metric) go,
        written atomically; None: nothing written.
      metrics: metric names (``METRIC_NAMES``).
      n_bootstrap, tolerance, seed: paired comparison settings (``comparison.paired_comparison``).
      label_postfix, postfixes: labels are named ``<stem><label_postfix>.*``, the masks of predictions folder
        ``name`` ``<stem><postfixes[name]>.*`` (``_seg`` for MONAI's ``SaveImage``, ``_mask`` for BUSI).
      label_classes, prediction_classes: the labels, the predictions are class maps (0 background, 1 benign, 2
        malignant, as nnU-Net and MONAI Label write them); lesion where they hold one of these values. Empty: lesion
        is above half the mask's scale (``read_mask``).

    Returns:
      dict with "n" (images scored), "n_blank_labels" (of those, labels without a lesion pixel), "means" {name:
      {metric: mean}}, "columns" {<name>_<metric>: mean, sd, median, n}, "comparisons" {"<name>_vs_<first>":
      {metric: paired_comparison}}, "skipped" [{"file", "problem"}], "notes" [{"file", "problem"}] (scored predictions
      that read as no lesion although they hold other values), "folders" {name: path}, "labels", "metrics",
      "label_classes", "prediction_classes".
    """
    if not predictions:
        raise BadOptionError("predictions: give at least one folder of masks")
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise BadOptionError(f"metrics: unknown {unknown}; choose from {', '.join(METRIC_NAMES)}")
    postfixes = {name: (postfixes or {}).get(name, "") for name in predictions}
    notes: list[dict[str, str]] = []
    rows, skipped = score_folders(labels, predictions, metrics, label_postfix, postfixes, notes, label_classes,
                                  prediction_classes)
    names = list(predictions)
    columns = summarise(rows, [f"{n}_{m}" for n in names for m in metrics])
    report = {
        "n": len(rows), "n_blank_labels": sum(r["label_area"] == 0 for r in rows), "labels": str(Path(labels)),
        "folders": {n: str(Path(p)) for n, p in predictions.items()},
        "label_postfix": label_postfix, "postfixes": postfixes,
        "label_classes": list(label_classes), "prediction_classes": list(prediction_classes),
        "metrics": list(metrics), "means": {n: {m: columns[f"{n}_{m}"]["mean"] for m in metrics} for n in names},
        "columns": columns,
        "comparisons": compare_pairs(rows, [(names[0], n) for n in names[1:]], metrics, tolerance, n_bootstrap, seed),
        "skipped": skipped,
        "notes": notes,
    }
    if output_dir is not None:
        out = Path(output_dir)
        write_csv(out / "metrics.csv", rows, ["image", "height", "width", "label_area", *columns])
        write_json(out / "summary.json", report)
        write_comparison_csv(out / "comparison.csv", {"all": report["comparisons"]})
    return report


def _notes_lines(notes: Sequence[dict[str, str]]) -> list[str]:
    """Console lines of the report's notes (up to 10 files)."""
    if not notes:
        return []
    return [f"{len(notes)} prediction(s) scored as no lesion hold other values:",
            *(f"  {n['file']}: {n['problem']}" for n in notes[:10]),
            *([f"  ... and {len(notes) - 10} more (summary.json)"] if len(notes) > 10 else [])]


def format_comparison(report: dict[str, Any]) -> str:
    """Console table: the mean of each metric per folder, then each comparison's difference with its 95% CI and
    the improved/worsened counts."""
    names = list(report["folders"])
    metrics = report["metrics"]
    skipped = report["skipped"]
    lines = [f"{report['n']} images scored, {len(skipped)} files skipped",
             *(f"  {s['file']}: {s['problem']}" for s in skipped[:10]),
             *([f"  ... and {len(skipped) - 10} more (summary.json)"] if len(skipped) > 10 else []),
             *_notes_lines(report.get("notes", [])),
             *blank_labels_note(report.get("n_blank_labels", 0), "metrics.csv", report.get("label_classes")),
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {m} | " + " | ".join(f"{report['means'][n][m]:.4f}" for n in names) + " |" for m in metrics]
    for title, per_metric in report["comparisons"].items():
        lines += ["", f"{title}: difference [95% CI], improved / worsened", "| metric | difference | improved | "
                  "worsened |", "|---|---|---|---|"]
        for m, c in per_metric.items():
            lo, hi = c["ci95"]
            lines.append(f"| {m} | {c['mean_diff']:+.4f} [{lo:+.4f}, {hi:+.4f}] | {c['improved']} | {c['worsened']} |")
    return "\n".join(lines)
