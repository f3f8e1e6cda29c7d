"""Phase-3 validation and evaluation: coarse and refined masks side by side, per dataset, with a paired comparison.

- ``E2EEvalStep``: the evaluator's ``iteration_update`` (batch size 1, native frame): ``ultra_predict.refine`` on the
  batch, engine output ``pred`` (final refined probability), ``coarse``, ``refined`` (and ``iterative``/``gated``
  when enabled), ``label`` (native), ``image`` (native, [0,1]) and ``pred_iou``; fires MONAI's ``IterationEvents``
  so metrics, decollation and handlers work as with ``SupervisedEvaluator``'s own step.
- ``E2EReport``: an evaluator handler writing, when the run completes::

      metrics.csv      one row per image: image, dataset, height, width, <key>_<metric> for every prediction key
                       (dice, iou, precision, recall, accuracy, hd95 in pixels, nsd at 2 px; native resolution),
                       pred_iou
      summary.json     overall and per-dataset mean/sd/median of every column, and the paired comparisons
      comparison.csv   per dataset (and "all"), metric and pair: means, mean difference b - a with its 95% CI,
                       images improved / worsened / unchanged
      overlays/        images where refinement helped or hurt most (by Dice): ground truth green, coarse blue,
                       refined red

  Paired comparison of prediction b against a (refined vs coarse; iterative and gated also vs refined): per image
  d = m_b - m_a; mean d with a 95% percentile-bootstrap confidence interval (``n_bootstrap`` resamples of images,
  seeded); improved / worsened / unchanged counts with |d| <= ``tolerance`` as unchanged (HD95: lower is better).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from ultrarefiner.engines.evaluation.metrics import METRIC_NAMES
from ultrarefiner.engines.evaluation.segmentation_report import SegmentationReport, summarise
from ultrarefiner.engines.inference.ultra_predict import overlay_coarse_refined, refine
from ultrarefiner.utils.flags import as_flag
from ultrarefiner.utils.io import atomic_write, write_json, write_png

__all__ = ["E2EEvalStep", "E2EReport", "PRED_KEYS", "bootstrap_ci", "paired_comparison"]

logger = logging.getLogger(__name__)

PRED_KEYS = ("coarse", "refined", "iterative", "gated")
LOWER_IS_BETTER = {"hd95"}


class E2EEvalStep:
    def __init__(
        self,
        iterations: int = 0,
        quality_gate: bool = False,
        gate_threshold: float = 0.5,
        amp: bool | None = None,
        amp_dtype: torch.dtype = torch.bfloat16,
        image_key: str = "image_native",
    ) -> None:
        """
        ``iteration_update`` of a MONAI ``SupervisedEvaluator`` for ``UltraRefiner`` (module docstring).

        Uses the engine's ``prepare_batch`` (``e2e_setup.e2e_prepare_batch(train=False)``).

        Arguments:
          iterations, quality_gate, gate_threshold: see ``ultra_predict.refine``.
          amp (bool or None): autocast; None: on CUDA only.
          amp_dtype: autocast dtype.
          image_key: batch key of the native image in [0,1] put in the output as ``image`` (overlays).
        """
        self.iterations, self.gate_threshold = int(iterations), gate_threshold
        self.quality_gate = as_flag(quality_gate, "quality_gate")
        self.amp, self.amp_dtype, self.image_key = amp, amp_dtype, image_key

    def __call__(self, engine: Engine, batchdata: dict) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, label, _, kwargs = batch
        device = torch.device(engine.state.device) if engine.state.device is not None else inputs.device
        amp = device.type == "cuda" if self.amp is None else self.amp
        with torch.autocast(device.type, dtype=self.amp_dtype, enabled=amp):
            out = refine(engine.network, inputs, kwargs.get("sam_image"), kwargs.get("original_size"),
                         self.iterations, self.quality_gate, self.gate_threshold)
        image = batchdata.get(self.image_key, inputs)
        engine.state.output = {Keys.IMAGE: image, Keys.LABEL: label, Keys.PRED: out["final"],
                               "pred_iou": out["pred_iou"]}
        engine.state.output.update({k: out[k] for k in PRED_KEYS if k in out})
        if "gate" in out:
            engine.state.output["gate"] = out["gate"]
        if "best_pass" in out:
            engine.state.output["best_pass"] = out["best_pass"]
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


# ------------------------------------------------------------------------------------------------ statistics
def bootstrap_ci(diff: np.ndarray, n_bootstrap: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean of ``diff`` (NaN, NaN for fewer than 2 values)."""
    diff = np.asarray(diff, float)
    if len(diff) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n_bootstrap, len(diff)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_comparison(a: Sequence[float], b: Sequence[float], metric: str, tolerance: float = 1e-4,
                      n_bootstrap: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Per-image comparison of prediction b against a on one metric (module docstring)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    d = b[ok] - a[ok]
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    lo, hi = bootstrap_ci(d, n_bootstrap, seed=seed)
    return {
        "n": int(ok.sum()),
        "mean_a": float(a[ok].mean()) if ok.any() else float("nan"),
        "mean_b": float(b[ok].mean()) if ok.any() else float("nan"),
        "mean_diff": float(d.mean()) if len(d) else float("nan"),
        "sd_diff": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
        "ci95": [lo, hi],
        "improved": int((sign * d > tolerance).sum()),
        "worsened": int((sign * d < -tolerance).sum()),
        "unchanged": int((np.abs(d) <= tolerance).sum()),
        "lower_is_better": metric in LOWER_IS_BETTER,
    }


def _pairs(keys: Sequence[str]) -> list[tuple[str, str]]:
    pairs = [("coarse", k) for k in keys if k != "coarse"] if "coarse" in keys else []
    pairs += [("refined", k) for k in keys if k in ("iterative", "gated") and "refined" in keys]
    return pairs


def _fmt(x: float, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


# ------------------------------------------------------------------------------------------------ report
class E2EReport(SegmentationReport):
    """Per-image coarse vs refined metrics at native resolution, per dataset, with paired comparisons (module
    docstring). Attach to an evaluator using ``E2EEvalStep`` with batch size 1.

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

    def _collect(self, engine: Engine) -> None:
        from ultrarefiner.engines.evaluation.segmentation_report import _lookup

        output, batch = engine.state.output, engine.state.batch
        items = output if isinstance(output, list) else [output]
        if self.auto_keys and items:
            self.pred_keys = [k for k in PRED_KEYS if k in items[0]]
        start = len(self.rows)
        super()._collect(engine)
        for i, (item, row) in enumerate(zip(items, self.rows[start:], strict=True)):
            dataset = _lookup(item, batch, self.dataset_key, i, required=False)
            row["dataset"] = str(dataset) if dataset not in (None, "") else "all"
            for key in ("pred_iou", "gate", "best_pass"):
                value = item.get(key) if isinstance(item, dict) else None
                if value is not None:
                    row[key] = float(torch.as_tensor(value).float().reshape(-1)[0])

    def summary(self) -> dict[str, Any]:
        """The content of ``summary.json`` for the rows collected so far."""
        metric_cols = [f"{k}_{m}" for k in self.pred_keys for m in METRIC_NAMES]
        extra = [c for c in ("pred_iou", "gate", "best_pass") if any(c in r for r in self.rows)]
        datasets = sorted({r["dataset"] for r in self.rows})
        groups = {"all": self.rows, **({d: [r for r in self.rows if r["dataset"] == d] for d in datasets}
                                       if len(datasets) > 1 or datasets != ["all"] else {})}
        out: dict[str, Any] = {"n_images": len(self.rows), "pred_keys": list(self.pred_keys),
                               "metrics": summarise(self.rows, metric_cols + extra), "per_dataset": {},
                               "comparisons": {}}
        for name, rows in groups.items():
            if name != "all":
                out["per_dataset"][name] = {"n_images": len(rows), "metrics": summarise(rows, metric_cols + extra)}
            comp = {}
            for a, b in _pairs(self.pred_keys):
                comp[f"{b}_vs_{a}"] = {
                    m: paired_comparison([r[f"{a}_{m}"] for r in rows], [r[f"{b}_{m}"] for r in rows], m,
                                         self.tolerance, self.n_bootstrap, self.seed)
                    for m in METRIC_NAMES
                }
            out["comparisons"][name] = comp
        return out

    def _write(self, engine: Engine) -> None:
        if not self.rows:
            return
        fixed = ["image", "dataset", "height", "width"]
        cols = fixed + [c for c in self.rows[0] if c not in fixed]
        for r in self.rows[1:]:
            cols += [c for c in r if c not in cols]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=cols, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.output_dir / "metrics.csv", lambda tmp: Path(tmp).write_text(buf.getvalue()))
        summary = self.summary()
        write_json(self.output_dir / "summary.json", summary)
        self._write_comparison_csv(summary)
        self._write_overlays()
        for k, v in summary["metrics"].items():
            engine.state.metrics[f"{self.metric_prefix}{k}"] = v["mean"]
        logger.info(self.table(summary))
        logger.info(f"per-image metrics: {self.output_dir / 'metrics.csv'}")

    def _write_comparison_csv(self, summary: dict[str, Any]) -> None:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["dataset", "comparison", "metric", "n", "mean_a", "mean_b", "mean_diff", "ci95_low", "ci95_high",
                    "improved", "worsened", "unchanged"])
        for dataset, comps in summary["comparisons"].items():
            for name, per_metric in comps.items():
                for m, c in per_metric.items():
                    w.writerow([dataset, name, m, c["n"], c["mean_a"], c["mean_b"], c["mean_diff"], c["ci95"][0],
                                c["ci95"][1], c["improved"], c["worsened"], c["unchanged"]])
        atomic_write(self.output_dir / "comparison.csv", lambda tmp: Path(tmp).write_text(buf.getvalue()))

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
        delta = {r["image"]: r[f"{final}_dice"] - r["coarse_dice"] for r in self.rows}
        order = sorted(self._keep, key=lambda t: delta[t[0]])
        n = min(self.n_overlays, len(order))
        chosen = [("improved", t) for t in order[::-1][:n]] + [("worsened", t) for t in order[:n] if delta[t[0]] < 0]
        dice = {r["image"]: r for r in self.rows}
        for tag, (name, image, label, preds) in chosen:
            r = dice[name]
            picture = overlay_coarse_refined(image, preds["coarse"], preds[final], label)
            fname = f"{tag}_{name}_coarse{r['coarse_dice']:.3f}_{final}{r[f'{final}_dice']:.3f}.png"
            write_png(self.output_dir / "overlays" / fname, picture)
