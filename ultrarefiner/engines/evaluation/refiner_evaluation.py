"""Phase-2 evaluation: does the refiner improve the coarse masks it is given, and for which input quality?

:class:`RefinerReport` is an Ignite handler for a refiner evaluator (``RefinerEvalStep``, native frame; decollated
batch-1 outputs or the per-sample outputs of an uncollated batch). For every sample it scores the coarse mask
(input) and the refined mask against the ground truth at the image's native resolution
(``folder_evaluation.score_pair``: Dice, IoU, precision, recall, accuracy, HD95 in pixels, NSD at 2 px) and writes,
when the run completes::

    <output_dir>/metrics.csv     one row per sample: image, sample, dataset, kind, bucket, height, width,
                                 input_<metric>, refined_<metric>, delta_dice
    <output_dir>/buckets.csv     one row per quality bucket (perfect / mild / heavy, then "all"): n, input vs refined
    <output_dir>/buckets.json    Dice and IoU (mean, sd), HD95 and NSD means, mean Dice change, fractions
                                 improved/degraded
    <output_dir>/summary.json    n_images, mean / sd / median of every metric column, the bucket table, and the
                                 paired comparison refined vs input ("comparisons": {"all": {"refined_vs_input"}})
    <output_dir>/comparison.csv  the paired comparison, one row per metric (``folder_evaluation``'s layout)
    <output_dir>/overlays/       the worst and best cases by refined Dice: coarse (left) and refined (right)
                                 contours in red over the native image, ground truth in green

Buckets come from the dataset (``bucket``): the simulated failure's target bucket for simulated coarse masks, the
input Dice's bucket (``refiner_data.dice_bucket``) for TransUNet predictions. A sample counts as improved (degraded)
when its Dice rose (fell) by more than ``tolerance``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine

from ultrarefiner.engines.evaluation.comparison import compare_pairs, summarise
from ultrarefiner.engines.evaluation.engine_fields import as_scalar, field
from ultrarefiner.engines.evaluation.folder_evaluation import binary_mask, score_pair, write_comparison_csv, write_csv
from ultrarefiner.engines.evaluation.metrics import METRIC_NAMES
from ultrarefiner.engines.evaluation.report_handler import ReportHandler, extremes
from ultrarefiner.utils.io import PICTURE_PNG_LEVEL, write_json, write_png

__all__ = ["BUCKET_ORDER", "NativeImaged", "RefinerReport", "bucket_table"]

logger = logging.getLogger(__name__)

BUCKET_ORDER = ("perfect", "mild", "heavy")
# columns of the bucket table: mean (and sd where named) of each
_BUCKET_MEANS = ("input_dice", "refined_dice", "delta_dice", "input_iou", "refined_iou", "input_hd95", "refined_hd95",
                 "input_nsd", "refined_nsd")
_BUCKET_SDS = ("input_dice", "refined_dice")


class NativeImaged:
    """Post-processing for a refiner evaluator's decollated items: ``key`` = the native image read from the item's
    ``source`` file (flipped when ``flip``), (1,H,W) float on the 0-255 scale, so overlays can draw the native label
    and prediction on it (the batch holds no image when embeddings come from a cache, and an encoder-frame one
    otherwise).

    Arguments:
      key: where the image goes.
      source_key, flip_key: the sample's image path and flip flag.
    """

    def __init__(self, key: str = "image", source_key: str = "source", flip_key: str = "flip") -> None:
        self.key, self.source_key, self.flip_key = key, source_key, flip_key

    def __call__(self, item: Mapping[str, Any]) -> dict:
        from ultrarefiner.data.imaging import read_image

        out = dict(item)
        image = read_image(as_scalar(item[self.source_key]))
        if bool(as_scalar(item.get(self.flip_key, False))):
            image = image[:, ::-1]
        out[self.key] = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
        return out


def _ordered_buckets(names: Sequence[str]) -> list[str]:
    known = [b for b in BUCKET_ORDER if b in names]
    return known + sorted(set(names) - set(known))


def bucket_table(rows: Sequence[Mapping[str, Any]], tolerance: float = 0.01) -> list[dict]:
    """Input-vs-refined summary per quality bucket plus an ``all`` row, from :class:`RefinerReport` rows: the means
    of ``_BUCKET_MEANS`` (``comparison.summarise``; NaN where a metric was not computed), the sd of the Dice columns
    and the fractions of samples improved / degraded by more than ``tolerance``."""

    def stats(sel: list[Mapping[str, Any]], bucket: str) -> dict:
        s = summarise(sel, _BUCKET_MEANS)
        delta = np.array([r["delta_dice"] for r in sel if np.isfinite(r["delta_dice"])], float)
        out: dict[str, Any] = {"bucket": bucket, "n": len(sel)}
        for c in _BUCKET_MEANS:
            out[c] = s[c]["mean"]
            if c in _BUCKET_SDS:
                out[f"{c}_sd"] = s[c]["sd"]
        out["improved"] = float((delta > tolerance).mean()) if len(delta) else float("nan")
        out["degraded"] = float((delta < -tolerance).mean()) if len(delta) else float("nan")
        return out

    out = [stats([r for r in rows if r["bucket"] == b], b) for b in _ordered_buckets([r["bucket"] for r in rows])]
    return out + [stats(list(rows), "all")]


def format_bucket_table(table: Sequence[Mapping[str, Any]]) -> str:
    """Console table of ``bucket_table``: n, input and refined Dice, change, fractions improved and degraded."""
    lines = [f"{'bucket':<9s}{'n':>6s}{'input Dice':>13s}{'refined Dice':>15s}{'change':>9s}{'improved':>10s}"
             f"{'degraded':>10s}"]
    for r in table:
        lines.append(f"{r['bucket']:<9s}{r['n']:>6d}{r['input_dice']:>13.4f}{r['refined_dice']:>15.4f}"
                     f"{r['delta_dice']:>+9.4f}{r['improved']:>10.1%}{r['degraded']:>10.1%}")
    return "\n".join(lines)


class RefinerReport(ReportHandler):
    """Per-sample input-vs-refined metrics at native resolution and the per-bucket table (module docstring).

    Arguments:
      output_dir: where the CSV/JSON files and ``overlays/`` go.
      pred_key: refined probability (1,H,W) at native size in the engine output.
      coarse_key: coarse mask (1,H,W) given to the refiner, at the label's size.
      label_key: native ground truth (1,H,W).
      metrics: metric names (``engines.evaluation.metrics.METRIC_NAMES``; HD95 and NSD are the slow ones).
      n_overlays: worst and best cases drawn (0: none).
      tolerance: Dice change counted as improved/degraded (buckets and paired comparison).
      prefix: prefix of the means written to ``engine.state.metrics`` (e.g. ``test_refined_dice``).
      n_bootstrap, seed: paired comparison settings (``comparison.paired_comparison``).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        pred_key: str = "pred",
        coarse_key: str = "coarse",
        label_key: str = "label",
        metrics: Sequence[str] = METRIC_NAMES,
        n_overlays: int = 4,
        tolerance: float = 0.01,
        prefix: str = "test_",
        n_bootstrap: int = 2000,
        seed: int = 0,
    ) -> None:
        super().__init__(output_dir, n_overlays)
        self.pred_key, self.coarse_key, self.label_key = pred_key, coarse_key, label_key
        self.metrics = list(metrics)
        if "dice" not in self.metrics:
            self.metrics.insert(0, "dice")
        self.tolerance, self.prefix, self.n_bootstrap, self.seed = tolerance, prefix, n_bootstrap, seed

    def _text(self, item: Any, batch: Any, key: str, index: int) -> str:
        return str(as_scalar(field(item, batch, key, index, required=False)) or "")

    def collect(self, item: Any, batch: Any, index: int) -> None:
        label = binary_mask(field(item, batch, self.label_key, index))
        refined = binary_mask(field(item, batch, self.pred_key, index))
        coarse = binary_mask(field(item, batch, self.coarse_key, index))
        source = self._text(item, batch, "source", index) or f"item_{len(self.rows)}"
        row: dict[str, Any] = {
            "image": Path(source).stem,
            "sample": len(self.rows),
            "dataset": self._text(item, batch, "dataset", index),
            "kind": self._text(item, batch, "kind", index),
            "bucket": self._text(item, batch, "bucket", index) or "unknown",
            "height": int(label.shape[-2]),
            "width": int(label.shape[-1]),
            **score_pair(coarse, label, self.metrics, prefix="input_"),
            **score_pair(refined, label, self.metrics, prefix="refined_"),
        }
        row["delta_dice"] = row["refined_dice"] - row["input_dice"]
        self.rows.append(row)
        if self.n_overlays > 0:
            flip = bool(as_scalar(field(item, batch, "flip", index, required=False)) or False)
            self._keep.append((f"{row['image']}_{row['sample']}", source, flip, label[0].numpy(), coarse[0].numpy(),
                               refined[0].numpy()))

    def write(self, engine: Engine) -> None:
        write_csv(self.output_dir / "metrics.csv", self.rows)
        table = bucket_table(self.rows, self.tolerance)
        write_csv(self.output_dir / "buckets.csv", table)
        write_json(self.output_dir / "buckets.json", table)
        columns = [c for c in self.rows[0] if c.startswith(("input_", "refined_", "delta_"))]
        comparisons = {"all": compare_pairs(self.rows, [("input", "refined")], self.metrics, self.tolerance,
                                            self.n_bootstrap, self.seed)}
        summary = {"n_images": len(self.rows), "metrics": summarise(self.rows, columns), "buckets": table,
                   "comparisons": comparisons}
        write_json(self.output_dir / "summary.json", summary)
        write_comparison_csv(self.output_dir / "comparison.csv", comparisons)
        self._write_overlays()
        self.publish(engine, self.prefix, summary["metrics"])
        logger.info("input vs refined Dice per quality bucket (native resolution)\n" + format_bucket_table(table))
        logger.info(f"per-sample metrics and buckets: {self.output_dir}/metrics.csv, buckets.csv")

    def _write_overlays(self) -> None:
        if not self._keep or self.n_overlays <= 0:
            return
        from ultrarefiner.data.imaging import read_image
        from ultrarefiner.engines.evaluation.contours import overlay_contours

        dice = {f"{r['image']}_{r['sample']}": r["refined_dice"] for r in self.rows}
        worst, best = extremes(sorted(self._keep, key=lambda t: dice[t[0]]), self.n_overlays)
        for tag, cases in (("worst", worst), ("best", best)):
            for name, source, flip, label, coarse, refined in cases:
                try:
                    image = read_image(source)
                    image = image[:, ::-1] if flip else image
                except Exception:  # the source may be gone: draw on black
                    image = np.zeros(label.shape, np.uint8)
                if image.shape != label.shape:
                    image = np.zeros(label.shape, np.uint8)
                picture = np.concatenate([overlay_contours(image / 255.0, label, coarse),
                                          overlay_contours(image / 255.0, label, refined)], axis=1)
                write_png(self.output_dir / "overlays" / f"{tag}_{name}_dice{dice[name]:.3f}.png", picture,
                          PICTURE_PNG_LEVEL)
