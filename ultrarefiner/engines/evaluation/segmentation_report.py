"""Per-image evaluation at native resolution: metrics table (CSV, JSON), mean ± sd, best/worst overlays.

Attach :class:`SegmentationReport` to an evaluator whose postprocessing maps predictions back to native size
(``Invertd``) and whose batches carry the native label (``label_native``) and image (``image_native``). One handler
serves all bundles: ``pred_keys`` can name several predictions (coarse, refined), each reported with its own column
prefix. Writes, when the run completes::

    <output_dir>/metrics.csv     one row per image: image, height, width, then the metrics (``<key>_<metric>`` with
                                 several pred keys)
    <output_dir>/summary.json    n_images, mean / sd / median / n of every metric column
    <output_dir>/overlays/       the worst and best cases by the last pred key's Dice
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine

from ultrarefiner.engines.evaluation.comparison import summarise
from ultrarefiner.engines.evaluation.engine_fields import field, image_stem
from ultrarefiner.engines.evaluation.folder_evaluation import binary_mask, score_pair, write_csv
from ultrarefiner.engines.evaluation.report_handler import ReportHandler, extremes
from ultrarefiner.utils.io import PICTURE_PNG_LEVEL, write_json, write_png

__all__ = ["SegmentationReport"]

logger = logging.getLogger(__name__)


class SegmentationReport(ReportHandler):
    """Collect per-image metrics during an evaluator run and write them when it completes (module docstring).

    Arguments:
        output_dir: where ``metrics.csv``, ``summary.json`` and ``overlays/`` go.
        pred_keys: binary predictions (1, H, W) or one-hot (2, H, W) at native size, e.g. ``["pred"]`` or
          ``["coarse", "refined"]``.
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
    ) -> None:
        super().__init__(output_dir, n_overlays)
        self.pred_keys = [pred_keys] if isinstance(pred_keys, str) else list(pred_keys)
        self.label_key, self.image_key = label_key, image_key

    def column(self, key: str, metric: str) -> str:
        """Column of ``metric`` for prediction ``key``: the bare metric with one pred key, else ``<key>_<metric>``."""
        return metric if len(self.pred_keys) == 1 else f"{key}_{metric}"

    def collect(self, item: Any, batch: Any, index: int) -> None:
        label = binary_mask(field(item, batch, self.label_key, index))
        preds = {k: binary_mask(field(item, batch, k, index)) for k in self.pred_keys}
        name = image_stem(item, batch, index) or f"item_{len(self.rows)}"
        row: dict[str, Any] = {"image": name, "height": int(label.shape[-2]), "width": int(label.shape[-1])}
        for k, pred in preds.items():
            row.update(score_pair(pred, label, prefix=self.column(k, "")))
        self.rows.append(row)
        image = field(item, batch, self.image_key, index, required=False)
        if image is not None and self.n_overlays > 0:
            self._keep.append((name, np.asarray(torch.as_tensor(image).detach().float().cpu())[0], label[0].numpy(),
                               {k: p[0].numpy() for k, p in preds.items()}))

    def write(self, engine: Engine) -> None:
        write_csv(self.output_dir / "metrics.csv", self.rows)
        columns = [c for c in self.rows[0] if c not in ("image", "height", "width")]
        summary = {"n_images": len(self.rows), "metrics": summarise(self.rows, columns)}
        write_json(self.output_dir / "summary.json", summary)
        self._write_overlays()
        self.publish(engine, "test_", summary["metrics"])
        lines = [f"{k:>24s}: {v['mean']:.4f} ± {v['sd']:.4f} (n={v['n']})" for k, v in summary["metrics"].items()]
        logger.info("test metrics at native resolution\n" + "\n".join(lines))
        logger.info(f"per-image metrics: {self.output_dir / 'metrics.csv'}")

    def _write_overlays(self) -> None:
        if not self._keep or self.n_overlays <= 0:
            return
        from ultrarefiner.engines.evaluation.contours import overlay_contours

        key = self.pred_keys[-1]
        dice = {r["image"]: r[self.column(key, "dice")] for r in self.rows}
        worst, best = extremes(sorted(self._keep, key=lambda t: dice[t[0]]), self.n_overlays)
        for tag, cases in (("worst", worst), ("best", best)):
            for name, image, label, preds in cases:
                picture = overlay_contours(image, label, preds[key])
                write_png(self.output_dir / "overlays" / f"{tag}_{name}_dice{dice[name]:.3f}.png", picture,
                          PICTURE_PNG_LEVEL)
