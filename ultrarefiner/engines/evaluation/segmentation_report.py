"""Per-image evaluation at native resolution: metrics table (CSV, JSON), mean ± sd, best/worst overlays.

Attach :class:`SegmentationReport` to an evaluator whose postprocessing maps predictions back to native size
(``Invertd``) and whose batches carry the native label (``label_native``) and image (``image_native``), with
batch size 1. One handler serves all bundles: ``pred_keys`` can name several predictions (coarse, refined),
each reported with its own column prefix.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

from ultrarefiner.utils.io import atomic_write, write_json, write_png

logger = logging.getLogger(__name__)


def _name(batch: dict | list, i: int) -> str:
    """Stem of the image file of item ``i`` (decollated list of dicts or collated dict), ``item_<i>`` if unknown."""
    item = batch[i] if isinstance(batch, list) else batch
    image = item.get("image")
    paths = getattr(image, "meta", {}).get("filename_or_obj") if image is not None else None
    if paths is None:
        paths = (item.get("image_meta_dict") or {}).get("filename_or_obj")
    if isinstance(paths, (list, tuple)):
        paths = paths[i] if not isinstance(batch, list) else paths[0]
    return Path(str(paths)).stem if paths is not None else f"item_{i}"


def _lookup(item: dict, batch: dict, key: str, i: int, required: bool = True):
    """``key`` from the decollated output item, else from the batch (postprocessing keeps input keys there)."""
    if key in item:
        return item[key]
    if isinstance(batch, list) and i < len(batch) and key in batch[i]:
        return batch[i][key]
    if isinstance(batch, dict) and key in batch:
        return batch[key][i]
    if required:
        raise KeyError(f"SegmentationReport: '{key}' is neither in the engine output nor in the batch")
    return None


def summarise(rows: list[dict], keys: list[str]) -> dict:
    """Mean, sd, median and count of each metric column (NaN-free values only)."""
    out = {}
    for k in keys:
        vals = np.array([r[k] for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])], float)
        out[k] = {
            "mean": float(vals.mean()) if len(vals) else float("nan"),
            "sd": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
            "median": float(np.median(vals)) if len(vals) else float("nan"),
            "n": int(len(vals)),
        }
    return out


class SegmentationReport:
    """Collect per-image metrics during an evaluator run and write them when it completes.

    Arguments:
        output_dir: where ``metrics.csv``, ``summary.json`` and ``overlays/`` go.
        pred_keys: binary predictions (1, H, W) at native size, e.g. ``["pred"]`` or ``["coarse", "refined"]``.
        label_key: native-size label (1, H, W).
        image_key: native-size image (1, H, W) in [0, 1], for overlays.
        n_overlays: how many best and worst cases (by the last pred key's Dice) get an overlay PNG.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        pred_keys: list[str] | str = "pred",
        label_key: str = "label_native",
        image_key: str = "image_native",
        n_overlays: int = 4,
    ):
        self.output_dir = Path(output_dir)
        self.pred_keys = [pred_keys] if isinstance(pred_keys, str) else list(pred_keys)
        self.label_key, self.image_key, self.n_overlays = label_key, image_key, n_overlays
        self.rows: list[dict] = []
        self._keep: list[tuple[str, np.ndarray, np.ndarray, dict[str, np.ndarray]]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear() or self._keep.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        from ultrarefiner.engines.evaluation.metrics import segmentation_metrics

        batch = engine.state.batch
        output = engine.state.output
        items = output if isinstance(output, list) else [output]
        for i, item in enumerate(items):
            label = torch.as_tensor(_lookup(item, batch, self.label_key, i))
            row = {"image": _name(batch, i), "height": int(label.shape[-2]), "width": int(label.shape[-1])}
            preds = {}
            for k in self.pred_keys:
                pred = torch.as_tensor(item[k]).float()
                pred = pred[1:2] if pred.shape[0] == 2 else pred  # one-hot -> foreground
                preds[k] = (pred > 0.5).float()
                m = segmentation_metrics(preds[k], (label > 0.5).float())
                prefix = "" if len(self.pred_keys) == 1 else f"{k}_"
                row.update({f"{prefix}{n}": float(v) for n, v in m.items()})
            self.rows.append(row)
            image = _lookup(item, batch, self.image_key, i, required=False)
            if image is not None:
                self._keep.append(
                    (
                        row["image"],
                        np.asarray(torch.as_tensor(image).cpu())[0],
                        np.asarray(label.cpu())[0] > 0.5,
                        {k: np.asarray(p.cpu())[0] > 0.5 for k, p in preds.items()},
                    )
                )

    def _write(self, engine: Engine) -> None:
        if not self.rows:
            return
        cols = list(self.rows[0])
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=cols)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.output_dir / "metrics.csv", lambda tmp: Path(tmp).write_text(buf.getvalue()))
        metric_cols = [c for c in cols if c not in ("image", "height", "width")]
        summary = {"n_images": len(self.rows), "metrics": summarise(self.rows, metric_cols)}
        write_json(self.output_dir / "summary.json", summary)
        self._write_overlays()
        engine.state.metrics.update({f"test_{k}": v["mean"] for k, v in summary["metrics"].items()})
        lines = [f"{k:>24s}: {v['mean']:.4f} ± {v['sd']:.4f} (n={v['n']})" for k, v in summary["metrics"].items()]
        logger.info("test metrics at native resolution\n" + "\n".join(lines))
        logger.info(f"per-image metrics: {self.output_dir / 'metrics.csv'}")

    def _write_overlays(self) -> None:
        if not self._keep or self.n_overlays <= 0:
            return
        from ultrarefiner.engines.evaluation.overlays import overlay_contours

        key = self.pred_keys[-1]
        dice_col = "dice" if len(self.pred_keys) == 1 else f"{key}_dice"
        dice = {r["image"]: r[dice_col] for r in self.rows}
        order = sorted(self._keep, key=lambda t: dice[t[0]])
        chosen = [("worst", t) for t in order[: self.n_overlays]] + [("best", t) for t in order[-self.n_overlays :]]
        for tag, (name, image, label, preds) in chosen:
            picture = overlay_contours(image, label, preds[key])
            write_png(self.output_dir / "overlays" / f"{tag}_{name}_dice{dice[name]:.3f}.png", picture)
