"""Evaluation from prediction folders, as nnU-Net's ``evaluate_predictions`` does for its own outputs.

Every phase and command writes masks to folders (``predict-transunet``, ``refine``, ``predict``, the bundles'
inference). ``evaluate_folders`` scores one or more such folders against a folder of labels with the metric set of
the bundles (``metrics.METRIC_NAMES``: Dice, IoU, precision, recall, accuracy, HD95, NSD at native resolution), and
compares each folder with the first, image by image, with the paired bootstrap of ``e2e_evaluation``: coarse vs
refined, phase-2 input vs refined, one model vs another, TTA vs none.

Files are matched by stem (``<stem>.png`` in the labels folder and in each predictions folder; any of
``IMAGE_SUFFIXES``), read with ``read_mask`` (lesion = luminance > 127: 0/255 masks and probability*255 maps at 0.5).
Only images that every folder has, readable and of the label's size, are scored, so that the comparison stays
paired; the others are listed in the report's ``skipped`` with the file and the problem, never silently dropped.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ultrarefiner.data.imaging import IMAGE_SUFFIXES, read_mask
from ultrarefiner.engines.evaluation.e2e_evaluation import paired_comparison
from ultrarefiner.engines.evaluation.metrics import METRIC_NAMES, segmentation_metrics
from ultrarefiner.engines.inference.refine_folder import files_by_stem
from ultrarefiner.errors import BadInputError, BadOptionError
from ultrarefiner.utils.io import atomic_write, write_json

__all__ = ["evaluate_folders", "format_comparison"]


def _masks_by_stem(folder: Path, role: str, skipped: list[dict[str, str]]) -> dict[str, Path]:
    """One mask per stem (``refine_folder.files_by_stem``); stems with several files are ambiguous: skipped."""
    if folder.exists() and not folder.is_dir():
        raise BadInputError(folder, f"{role} must be a folder")
    found = files_by_stem(folder, role)
    if not found:
        raise BadInputError(folder, f"{role} folder has no mask files ({', '.join(IMAGE_SUFFIXES)})")
    for stem, files in found.items():
        if len(files) > 1:
            skipped.extend({"file": str(f), "problem": f"several files share the stem {stem!r}"} for f in files)
    return {stem: files[0] for stem, files in found.items() if len(files) == 1}


def _read(path: Path, shape: tuple[int, int] | None) -> np.ndarray:
    mask = read_mask(path)
    if shape is not None and mask.shape != shape:
        raise BadInputError(path, f"mask is {mask.shape[0]}x{mask.shape[1]} (HxW), its label {shape[0]}x{shape[1]}")
    return mask


def evaluate_folders(
    labels: str | os.PathLike,
    predictions: Mapping[str, str | os.PathLike],
    output_dir: str | os.PathLike | None = None,
    metrics: Sequence[str] = METRIC_NAMES,
    n_bootstrap: int = 2000,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-image metrics of each predictions folder against ``labels``, and each folder compared with the first.

    Arguments:
      labels: folder of ground-truth masks ``<stem>.png``.
      predictions: name -> folder of predicted masks, in order; the first is the reference of the comparisons.
      output_dir: where ``metrics.csv`` (one row per image, ``<name>_<metric>`` columns) and ``summary.json`` go
        (written atomically); None: nothing written.
      metrics: metric names (``METRIC_NAMES``).
      n_bootstrap, tolerance, seed: paired comparison settings (``e2e_evaluation.paired_comparison``).

    Returns:
      dict with "n" (images scored), "means" {name: {metric: mean}}, "comparisons" {"<name> vs <first>": {metric:
      paired_comparison}}, "skipped" [{"file", "problem"}], "folders" {name: path}.
    """
    if not predictions:
        raise BadOptionError("predictions: give at least one folder of masks")
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise BadOptionError(f"metrics: unknown {unknown}; choose from {', '.join(METRIC_NAMES)}")
    skipped: list[dict[str, str]] = []
    label_files = _masks_by_stem(Path(labels), "labels", skipped)
    folders = {name: Path(p) for name, p in predictions.items()}
    pred_files = {name: _masks_by_stem(folder, f"predictions '{name}'", skipped) for name, folder in folders.items()}
    rows: list[dict[str, Any]] = []
    for stem, label_path in label_files.items():
        missing = [name for name, files in pred_files.items() if stem not in files]
        if missing:
            skipped.extend({"file": str(folders[n] / f"{stem}.png"), "problem": "missing (its label exists)"}
                           for n in missing)
            continue
        try:
            label = read_mask(label_path)
            preds = {name: _read(files[stem], label.shape) for name, files in pred_files.items()}
        except BadInputError as e:
            skipped.append({"file": e.path, "problem": e.reason})
            continue
        row: dict[str, Any] = {"image": stem}
        target = torch.from_numpy(label)[None].float()
        for name, pred in preds.items():
            scores = segmentation_metrics(torch.from_numpy(pred)[None].float(), target, metrics)
            row.update({f"{name}_{m}": float(scores[m]) for m in metrics})
        rows.append(row)
    for files in pred_files.values():  # predictions without a label: reported, not scored
        skipped.extend({"file": str(p), "problem": "no label of this name"} for s, p in files.items()
                       if s not in label_files)
    names = list(folders)
    means = {n: {m: float(np.mean([r[f"{n}_{m}"] for r in rows])) if rows else float("nan") for m in metrics}
             for n in names}
    comparisons = {
        f"{n} vs {names[0]}": {m: paired_comparison([r[f"{names[0]}_{m}"] for r in rows], [r[f"{n}_{m}"] for r in rows],
                                                    m, tolerance, n_bootstrap, seed) for m in metrics}
        for n in names[1:]
    }
    report = {"n": len(rows), "labels": str(Path(labels)), "folders": {n: str(p) for n, p in folders.items()},
              "metrics": list(metrics), "means": means, "comparisons": comparisons, "skipped": skipped}
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["image", *(f"{n}_{m}" for n in names for m in metrics)])
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(out / "metrics.csv", lambda tmp: Path(tmp).write_text(buf.getvalue(), encoding="utf-8"))
        write_json(out / "summary.json", report)
    return report


def format_comparison(report: dict[str, Any]) -> str:
    """Console table: the mean of each metric per folder, then each comparison's difference with its 95% CI and
    the improved/worsened counts."""
    names = list(report["folders"])
    metrics = report["metrics"]
    lines = [f"{report['n']} images scored, {len(report['skipped'])} files skipped",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {m} | " + " | ".join(f"{report['means'][n][m]:.4f}" for n in names) + " |" for m in metrics]
    for title, per_metric in report["comparisons"].items():
        lines += ["", f"{title}: difference [95% CI], improved / worsened", "| metric | difference | improved | "
                  "worsened |", "|---|---|---|---|"]
        for m, c in per_metric.items():
            lo, hi = c["ci95"]
            lines.append(f"| {m} | {c['mean_diff']:+.4f} [{lo:+.4f}, {hi:+.4f}] | {c['improved']} | {c['worsened']} |")
    return "\n".join(lines)
