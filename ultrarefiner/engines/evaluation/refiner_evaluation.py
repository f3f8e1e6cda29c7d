"""Phase-2 evaluation: does the refiner improve the coarse masks it is given, and for which input quality?

:class:`RefinerReport` is an Ignite handler for a refiner evaluator (``RefinerEvalStep``, native frame, batch
size 1). For every sample it measures the coarse mask (input) and the refined mask against the ground truth at the
image's native resolution (Dice, IoU, precision, recall, accuracy, HD95 in pixels, NSD at 2 px;
``engines.evaluation.metrics``) and writes, when the run completes::

    <output_dir>/metrics.csv     one row per sample: image, sample, dataset, kind, bucket, height, width,
                                 input_<metric>, refined_<metric>, delta_dice
    <output_dir>/buckets.csv     one row per quality bucket (perfect / mild / heavy, then "all"): n, input vs refined
    <output_dir>/buckets.json    Dice and IoU (mean, sd), HD95 and NSD means, mean Dice change, fractions
                                 improved/degraded
    <output_dir>/summary.json    n_images, mean / sd / median of every metric column, and the bucket table
    <output_dir>/overlays/       the worst and best cases by refined Dice: coarse (left) and refined (right)
                                 contours in red over the native image, ground truth in green

Buckets come from the dataset (``bucket``): the simulated failure's target bucket for simulated coarse masks, the
input Dice's bucket (``refiner_data.dice_bucket``) for TransUNet predictions. A sample counts as improved (degraded)
when its Dice rose (fell) by more than ``tolerance``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from ultrarefiner.engines.evaluation.metrics import METRIC_NAMES, segmentation_metrics
from ultrarefiner.engines.evaluation.segmentation_report import summarise
from ultrarefiner.utils.io import atomic_write, write_json, write_png

__all__ = ["BUCKET_ORDER", "NativeImaged", "RefinerReport", "bucket_table"]

logger = logging.getLogger(__name__)

BUCKET_ORDER = ("perfect", "mild", "heavy")


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
        image = read_image(_scalar(item[self.source_key]))
        if bool(_scalar(item.get(self.flip_key, False))):
            image = image[:, ::-1]
        out[self.key] = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
        return out


def _ordered_buckets(names: Sequence[str]) -> list[str]:
    known = [b for b in BUCKET_ORDER if b in names]
    return known + sorted(set(names) - set(known))


def bucket_table(rows: Sequence[Mapping[str, Any]], tolerance: float = 0.01) -> list[dict]:
    """Input-vs-refined summary per quality bucket plus an ``all`` row, from :class:`RefinerReport` rows."""

    def stats(sel: list[Mapping[str, Any]], bucket: str) -> dict:
        def col(name: str) -> np.ndarray:
            return np.array([r[name] for r in sel if math.isfinite(r[name])], float)

        def mean(name: str) -> float:
            v = col(name)
            return float(v.mean()) if len(v) else float("nan")

        def sd(name: str) -> float:
            v = col(name)
            return float(v.std(ddof=1)) if len(v) > 1 else 0.0

        delta = col("delta_dice")
        return {
            "bucket": bucket,
            "n": len(sel),
            "input_dice": mean("input_dice"),
            "input_dice_sd": sd("input_dice"),
            "refined_dice": mean("refined_dice"),
            "refined_dice_sd": sd("refined_dice"),
            "delta_dice": float(delta.mean()) if len(delta) else float("nan"),
            "input_iou": mean("input_iou"),
            "refined_iou": mean("refined_iou"),
            "input_hd95": mean("input_hd95"),
            "refined_hd95": mean("refined_hd95"),
            "input_nsd": mean("input_nsd"),
            "refined_nsd": mean("refined_nsd"),
            "improved": float((delta > tolerance).mean()) if len(delta) else float("nan"),
            "degraded": float((delta < -tolerance).mean()) if len(delta) else float("nan"),
        }

    out = [stats([r for r in rows if r["bucket"] == b], b) for b in _ordered_buckets([r["bucket"] for r in rows])]
    return out + [stats(list(rows), "all")]


def _field(item: Any, batch: Any, key: str, i: int) -> Any:
    """``key`` of sample ``i`` from the decollated output item, else from the (decollated or collated) batch."""
    if isinstance(item, Mapping) and key in item:
        return item[key]
    if isinstance(batch, (list, tuple)) and i < len(batch) and isinstance(batch[i], Mapping):
        return batch[i].get(key)
    if isinstance(batch, Mapping) and key in batch:
        value = batch[key]
        return value[i] if isinstance(value, (list, tuple, torch.Tensor)) and len(value) > i else value
    return None


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return value[0]
    return value


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


class RefinerReport:
    """Per-sample input-vs-refined metrics at native resolution and the per-bucket table (module docstring).

    Arguments:
      output_dir: where the CSV/JSON files and ``overlays/`` go.
      pred_key: refined probability (1,H,W) at native size in the engine output.
      coarse_key: coarse mask (1,H,W) given to the refiner, at the label's size.
      label_key: native ground truth (1,H,W).
      metrics: metric names (``engines.evaluation.metrics.METRIC_NAMES``; HD95 and NSD are the slow ones).
      n_overlays: worst and best cases drawn (0: none).
      tolerance: Dice change counted as improved/degraded.
      prefix: prefix of the means written to ``engine.state.metrics`` (e.g. ``test_refined_dice``).
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
    ) -> None:
        self.output_dir = Path(output_dir)
        self.pred_key, self.coarse_key, self.label_key = pred_key, coarse_key, label_key
        self.metrics = list(metrics)
        if "dice" not in self.metrics:
            self.metrics.insert(0, "dice")
        self.n_overlays, self.tolerance, self.prefix = n_overlays, tolerance, prefix
        self.rows: list[dict] = []
        self._keep: list[tuple[str, str, bool, np.ndarray, np.ndarray, np.ndarray]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear() or self._keep.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        output, batch = engine.state.output, engine.state.batch
        items = output if isinstance(output, (list, tuple)) else [output]
        for i, item in enumerate(items):
            label = torch.as_tensor(_field(item, batch, self.label_key, i)).float().cpu()
            refined = torch.as_tensor(_field(item, batch, self.pred_key, i)).float().cpu() > 0.5
            coarse = torch.as_tensor(_field(item, batch, self.coarse_key, i)).float().cpu() > 0.5
            label = label.reshape(1, *label.shape[-2:]) > 0.5
            refined, coarse = refined.reshape(label.shape), coarse.reshape(label.shape)
            source = str(_scalar(_field(item, batch, "source", i)) or f"item_{len(self.rows)}")
            row = {
                "image": Path(source).stem,
                "sample": len(self.rows),
                "dataset": str(_scalar(_field(item, batch, "dataset", i)) or ""),
                "kind": str(_scalar(_field(item, batch, "kind", i)) or ""),
                "bucket": str(_scalar(_field(item, batch, "bucket", i)) or "unknown"),
                "height": int(label.shape[-2]),
                "width": int(label.shape[-1]),
            }
            gt = label.float()
            before = segmentation_metrics(coarse.float(), gt, self.metrics)
            after = segmentation_metrics(refined.float(), gt, self.metrics)
            row.update({f"input_{k}": float(v) for k, v in before.items()})
            row.update({f"refined_{k}": float(v) for k, v in after.items()})
            row["delta_dice"] = row["refined_dice"] - row["input_dice"]
            self.rows.append(row)
            if self.n_overlays > 0:
                flip = bool(_scalar(_field(item, batch, "flip", i)) or False)
                self._keep.append((f"{row['image']}_{row['sample']}", source, flip, label[0].numpy(),
                                   coarse[0].numpy(), refined[0].numpy()))

    def _write(self, engine: Engine) -> None:
        if not self.rows:
            logger.warning("RefinerReport: no samples evaluated")
            return
        atomic_write(self.output_dir / "metrics.csv", lambda tmp: Path(tmp).write_text(_csv(self.rows)))
        table = bucket_table(self.rows, self.tolerance)
        atomic_write(self.output_dir / "buckets.csv", lambda tmp: Path(tmp).write_text(_csv(table)))
        write_json(self.output_dir / "buckets.json", table)
        cols = [c for c in self.rows[0] if c.startswith(("input_", "refined_", "delta_"))]
        summary = {"n_images": len(self.rows), "metrics": summarise(self.rows, cols), "buckets": table}
        write_json(self.output_dir / "summary.json", summary)
        self._write_overlays()
        engine.state.metrics.update({f"{self.prefix}{k}": v["mean"] for k, v in summary["metrics"].items()})
        logger.info("input vs refined Dice per quality bucket (native resolution)\n" + self.format_table(table))
        logger.info(f"per-sample metrics and buckets: {self.output_dir}/metrics.csv, buckets.csv")

    @staticmethod
    def format_table(table: Sequence[Mapping[str, Any]]) -> str:
        head = f"{'bucket':<9s}{'n':>6s}{'input Dice':>13s}{'refined Dice':>15s}{'change':>9s}{'improved':>10s}" \
               f"{'degraded':>10s}"
        lines = [head]
        for r in table:
            lines.append(f"{r['bucket']:<9s}{r['n']:>6d}{r['input_dice']:>13.4f}{r['refined_dice']:>15.4f}"
                         f"{r['delta_dice']:>+9.4f}{r['improved']:>10.1%}{r['degraded']:>10.1%}")
        return "\n".join(lines)

    def _write_overlays(self) -> None:
        if not self._keep or self.n_overlays <= 0:
            return
        from ultrarefiner.data.imaging import read_image
        from ultrarefiner.engines.evaluation.overlays import overlay_contours

        dice = {f"{r['image']}_{r['sample']}": r["refined_dice"] for r in self.rows}
        order = sorted(self._keep, key=lambda t: dice[t[0]])
        n = min(self.n_overlays, len(order))
        chosen = [("worst", t) for t in order[:n]] + [("best", t) for t in order[len(order) - n:]]
        for tag, (name, source, flip, label, coarse, refined) in chosen:
            try:
                image = read_image(source)
                image = image[:, ::-1] if flip else image
            except Exception:  # the source may be gone: draw on black
                image = np.zeros(label.shape, np.uint8)
            if image.shape != label.shape:
                image = np.zeros(label.shape, np.uint8)
            picture = np.concatenate([overlay_contours(image / 255.0, label, coarse),
                                      overlay_contours(image / 255.0, label, refined)], axis=1)
            write_png(self.output_dir / "overlays" / f"{tag}_{name}_dice{dice[name]:.3f}.png", picture)
