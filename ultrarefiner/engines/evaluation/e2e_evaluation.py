"""Phase-3 validation and evaluation: coarse and refined masks side by side, per dataset, with a paired comparison.

- The evaluator's step is ``engines.training.e2e_training.E2EEvalStep`` (native frame; per-item outputs): output
  ``pred`` (final refined probability), ``coarse``, ``refined`` (and ``iterative``/``gated`` when enabled),
  ``label`` (native), ``image`` (native, [0,1]) and ``pred_iou``.
- ``E2EReport``: an evaluator handler (a ``SegmentationReport`` with one column set per prediction key) writing,
  when the run completes::

      metrics.csv      one row per image: image, dataset, height, width, <key>_<metric> for every prediction key
                       (dice, iou, precision, recall, accuracy, hd95 in pixels, nsd at 2 px; native resolution),
                       pred_iou
      summary.json     overall and per-dataset mean/sd/median of every column, and the paired comparisons
      comparison.csv   per dataset (and "all"), metric and pair: means, mean difference b - a with its 95% CI,
                       images improved / worsened / unchanged
      overlays/        images where refinement helped or hurt most (by Dice): ground truth green, coarse blue,
                       refined red

  Paired comparison of prediction b against a (refined vs coarse; iterative and gated also vs refined):
  ``comparison.paired_comparison`` (bootstrap CI of the mean difference; HD95: lower is better).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine

from ultrarefiner.engines.evaluation.comparison import compare_pairs, summarise
from ultrarefiner.engines.evaluation.engine_fields import as_scalar, field
from ultrarefiner.engines.evaluation.folder_evaluation import write_comparison_csv, write_csv
from ultrarefiner.engines.evaluation.metrics import METRIC_NAMES
from ultrarefiner.engines.evaluation.report_handler import extremes
from ultrarefiner.engines.evaluation.segmentation_report import SegmentationReport
from ultrarefiner.engines.inference.ultra_predict import overlay_coarse_refined
from ultrarefiner.utils.io import PICTURE_PNG_LEVEL, write_json, write_png

__all__ = ["E2EReport", "PRED_KEYS"]

logger = logging.getLogger(__name__)

PRED_KEYS = ("coarse", "refined", "iterative", "gated")
EXTRA_COLUMNS = ("pred_iou", "gate", "best_pass")  # per-image values of the step's output, reported as they are


def _pairs(keys: Sequence[str]) -> list[tuple[str, str]]:
    pairs = [("coarse", k) for k in keys if k != "coarse"] if "coarse" in keys else []
    pairs += [("refined", k) for k in keys if k in ("iterative", "gated") and "refined" in keys]
    return pairs


def _fmt(x: float, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


class E2EReport(SegmentationReport):
    """Per-image coarse vs refined metrics at native resolution, per dataset, with paired comparisons (module
    docstring). Attach to an evaluator using ``e2e_training.E2EEvalStep`` (decollated batch-1 outputs, or the
    per-item outputs of its uncollated batches).

    Arguments:
        output_dir: where ``metrics.csv``, ``summary.json``, ``comparison.csv`` and ``overlays/`` go.
        pred_keys: prediction keys to report; None: those of ``PRED_KEYS`` present in the engine output.
        label_key, image_key: native label and image in the output or batch.
        dataset_key: batch key naming each image's dataset (datalist "dataset"); missing: "all".
        metric_prefix: engine metrics set at completion: ``<prefix><key>_<metric>`` (means), e.g. ``test_refined_dice``.
        n_overlays: overlays of the most improved and of the most worsened images (by Dice).
        n_bootstrap, tolerance, seed: paired comparison settings.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        pred_keys: Sequence[str] | None = None,
        label_key: str = "label",
        image_key: str = "image",
        dataset_key: str = "dataset",
        metric_prefix: str = "test_",
        n_overlays: int = 4,
        n_bootstrap: int = 2000,
        tolerance: float = 1e-4,
        seed: int = 0,
    ) -> None:
        super().__init__(output_dir, list(pred_keys or ["coarse", "refined"]), label_key, image_key, n_overlays)
        self.auto_keys = pred_keys is None
        self.dataset_key, self.metric_prefix = dataset_key, metric_prefix
        self.n_bootstrap, self.tolerance, self.seed = n_bootstrap, tolerance, seed

    def column(self, key: str, metric: str) -> str:
        return f"{key}_{metric}"

    def collect(self, item: Any, batch: Any, index: int) -> None:
        if self.auto_keys and isinstance(item, Mapping):
            self.pred_keys = [k for k in PRED_KEYS if k in item]
        super().collect(item, batch, index)
        row = self.rows[-1]
        dataset = as_scalar(field(item, batch, self.dataset_key, index, required=False))
        row = {"image": row.pop("image"), "dataset": str(dataset) if dataset not in (None, "") else "all", **row}
        for key in EXTRA_COLUMNS:  # the step's own outputs: from the output item only
            value = field(item, None, key, index, required=False)
            if value is not None:
                row[key] = float(torch.as_tensor(value).float().reshape(-1)[0])
        self.rows[-1] = row

    def summary(self) -> dict[str, Any]:
        """The content of ``summary.json`` for the rows collected so far."""
        columns = [self.column(k, m) for k in self.pred_keys for m in METRIC_NAMES]
        columns += [c for c in EXTRA_COLUMNS if any(c in r for r in self.rows)]
        datasets = sorted({r["dataset"] for r in self.rows})
        groups = {"all": self.rows, **({d: [r for r in self.rows if r["dataset"] == d] for d in datasets}
                                       if datasets != ["all"] else {})}
        pairs = _pairs(self.pred_keys)
        return {
            "n_images": len(self.rows), "pred_keys": list(self.pred_keys), "metrics": summarise(self.rows, columns),
            "per_dataset": {d: {"n_images": len(rows), "metrics": summarise(rows, columns)}
                            for d, rows in groups.items() if d != "all"},
            "comparisons": {d: compare_pairs(rows, pairs, METRIC_NAMES, self.tolerance, self.n_bootstrap, self.seed)
                            for d, rows in groups.items()},
        }

    def write(self, engine: Engine) -> None:
        write_csv(self.output_dir / "metrics.csv", self.rows)
        summary = self.summary()
        write_json(self.output_dir / "summary.json", summary)
        write_comparison_csv(self.output_dir / "comparison.csv", summary["comparisons"])
        self._write_overlays()
        self.publish(engine, self.metric_prefix, summary["metrics"])
        logger.info(self.table(summary))
        logger.info(f"per-image metrics: {self.output_dir / 'metrics.csv'}")

    def table(self, summary: dict[str, Any] | None = None) -> str:
        """Console table: per dataset, every metric's mean ± sd per prediction key, and refined - coarse with its
        95% CI and improved/worsened/unchanged counts."""
        summary = summary or self.summary()
        keys = summary["pred_keys"]
        lines = [f"coarse vs refined at native resolution ({summary['n_images']} images)"]
        sections = [("all", summary["metrics"], summary["n_images"])]
        sections += [(d, v["metrics"], v["n_images"]) for d, v in summary["per_dataset"].items()]
        head = f"{'metric':<10s}" + "".join(f"{k:^20s}" for k in keys)
        for name, metrics, n in sections:
            comps = summary["comparisons"].get(name, {})
            main = comps.get("refined_vs_coarse")
            lines.append(f"[{name}] n={n}")
            lines.append(head + ("  refined-coarse [95% CI]          improved/worsened/unchanged" if main else ""))
            for m in METRIC_NAMES:
                row = f"{m:<10s}"
                for k in keys:
                    s = metrics.get(f"{k}_{m}", {})
                    row += f"{_fmt(s.get('mean')):>10s} ± {_fmt(s.get('sd')):<7s}"
                if main:
                    c = main[m]
                    row += (f"  {_fmt(c['mean_diff'], True)} [{_fmt(c['ci95'][0], True)}, {_fmt(c['ci95'][1], True)}]"
                            f"   {c['improved']}/{c['worsened']}/{c['unchanged']}")
                lines.append(row)
        return "\n".join(lines)

    def _write_overlays(self) -> None:
        if not self._keep or self.n_overlays <= 0 or "coarse" not in self.pred_keys:
            return
        final = self.pred_keys[-1]
        rows = {r["image"]: r for r in self.rows}
        delta = {name: r[f"{final}_dice"] - r["coarse_dice"] for name, r in rows.items()}
        worsened, improved = extremes(sorted(self._keep, key=lambda t: delta[t[0]]), self.n_overlays)
        chosen = [("improved", t) for t in improved[::-1]] + [("worsened", t) for t in worsened if delta[t[0]] < 0]
        for tag, (name, image, label, preds) in chosen:
            r = rows[name]
            picture = overlay_coarse_refined(image, preds["coarse"], preds[final], label)
            fname = f"{tag}_{name}_coarse{r['coarse_dice']:.3f}_{final}{r[f'{final}_dice']:.3f}.png"
            write_png(self.output_dir / "overlays" / fname, picture, PICTURE_PNG_LEVEL)
