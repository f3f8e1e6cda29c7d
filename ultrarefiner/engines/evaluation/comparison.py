"""Summaries and paired comparisons of per-image metric rows: the statistics of every evaluation report.

Rows are dicts with one column per (prediction, metric), ``<name>_<metric>`` (``coarse_dice``, ``refined_hd95``).
Paired comparison of prediction ``b`` against ``a`` on one metric: per image d = m_b - m_a; the mean of d with a 95%
percentile-bootstrap confidence interval (``n_bootstrap`` resamples of images, seeded), and the images improved /
worsened / unchanged with |d| <= ``tolerance`` as unchanged (HD95: lower is better).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ultrarefiner.engines.evaluation.metric_names import METRIC_NAMES

__all__ = ["LOWER_IS_BETTER", "blank_labels_note", "bootstrap_ci", "compare_columns", "compare_pairs", "pair_name",
           "paired_comparison", "summarise"]

LOWER_IS_BETTER = frozenset({"hd95"})


def summarise(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> dict[str, dict[str, float | int]]:
    """Mean, sd (ddof=1), median and count of each column over the rows' finite numbers (missing/NaN skipped)."""
    out = {}
    for c in columns:
        v = np.array([r[c] for r in rows if isinstance(r.get(c), (int, float)) and math.isfinite(r[c])], float)
        out[c] = {
            "mean": float(v.mean()) if len(v) else float("nan"),
            "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "median": float(np.median(v)) if len(v) else float("nan"),
            "n": int(len(v)),
        }
    return out


def blank_labels_note(n_blank: int, table: str, classes: Sequence[int] | None = None) -> list[str]:
    """The console line naming labels without a lesion pixel (none when ``n_blank`` is 0): a folder of blank labels
    is more often a format than a truth (a 0/2 class map, inverted levels, class values that the labels do not use).
    ``table``: the CSV with ``label_area``; ``classes``: the label classes that are lesion, if given."""
    if not n_blank:
        return []
    rule = (f"--label_classes {','.join(map(str, classes))}" if classes else
            "above half the mask's scale: > 127 in 8 bits, 1 in a 0/1 label map, p > 0.5")
    return [f"{n_blank} label(s) have no lesion pixel (lesion = {rule}): label_area 0 in {table}"]


def bootstrap_ci(diff: Sequence[float], n_bootstrap: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
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
    """Prediction b against a on one metric over the images where both values are finite (module docstring)."""
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


def pair_name(a: str, b: str) -> str:
    """Name of the comparison of prediction ``b`` against ``a`` in every report: ``<b>_vs_<a>``."""
    return f"{b}_vs_{a}"


def compare_columns(rows: Sequence[Mapping[str, Any]], a: str, b: str, metrics: Sequence[str] = METRIC_NAMES,
                    tolerance: float = 1e-4, n_bootstrap: int = 2000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Metric -> ``paired_comparison`` of columns ``<b>_<metric>`` against ``<a>_<metric>`` (missing: NaN, left out)."""
    nan = float("nan")
    return {m: paired_comparison([r.get(f"{a}_{m}", nan) for r in rows], [r.get(f"{b}_{m}", nan) for r in rows], m,
                                 tolerance, n_bootstrap, seed) for m in metrics}


def compare_pairs(rows: Sequence[Mapping[str, Any]], pairs: Sequence[tuple[str, str]],
                  metrics: Sequence[str] = METRIC_NAMES, tolerance: float = 1e-4, n_bootstrap: int = 2000,
                  seed: int = 0) -> dict[str, dict[str, dict[str, Any]]]:
    """``pair_name(a, b)`` -> ``compare_columns(rows, a, b, ...)`` for each (a, b) of ``pairs``."""
    return {pair_name(a, b): compare_columns(rows, a, b, metrics, tolerance, n_bootstrap, seed) for a, b in pairs}
