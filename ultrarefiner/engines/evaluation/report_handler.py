"""The Ignite side of the evaluation reports: collect one row per sample while an evaluator runs, write at the end.

A report handler is a thin adapter over ``folder_evaluation``: per decollated sample it reads the predictions,
label and extra columns with ``engine_fields.field`` and scores them with ``folder_evaluation.score_pair``; when the
run completes it summarises and compares the rows (``comparison``) and writes the files (``write_csv``,
``write_comparison_csv``, ``write_json``). Subclasses say which fields make a row (``collect``) and which files to
write (``write``).
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ignite.engine import Engine, Events

from ultrarefiner.engines.evaluation.engine_fields import output_items

__all__ = ["ReportHandler", "extremes"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def extremes(ordered: Sequence[T], n: int) -> tuple[list[T], list[T]]:
    """The first and the last ``n`` items of ``ordered`` (at most ``len(ordered)`` each): worst and best cases."""
    n = min(max(n, 0), len(ordered))
    return list(ordered[:n]), list(ordered[len(ordered) - n:])


class ReportHandler(ABC):
    """Collect ``rows`` (one dict per sample) at every ITERATION_COMPLETED, ``write`` them at COMPLETED.

    Arguments:
      output_dir: where the report files go.
      n_overlays: how many best and worst cases get an overlay picture (0: none).
    """

    def __init__(self, output_dir: str | os.PathLike, n_overlays: int = 4) -> None:
        self.output_dir = Path(output_dir)
        self.n_overlays = n_overlays
        self.rows: list[dict[str, Any]] = []
        self._keep: list[Any] = []  # what the overlays of the chosen cases need, per sample

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._complete)

    def _reset(self, _: Engine) -> None:
        self.rows.clear()
        self._keep.clear()

    def _collect(self, engine: Engine) -> None:
        batch = engine.state.batch
        for i, item in enumerate(output_items(engine.state.output)):
            self.collect(item, batch, i)

    def _complete(self, engine: Engine) -> None:
        if not self.rows:
            logger.warning(f"{type(self).__name__}: no samples evaluated")
            return
        self.write(engine)

    @staticmethod
    def publish(engine: Engine, prefix: str, summary: Mapping[str, Mapping[str, float]]) -> None:
        """Each column's mean as ``engine.state.metrics[<prefix><column>]`` (e.g. ``test_refined_dice``)."""
        engine.state.metrics.update({f"{prefix}{k}": v["mean"] for k, v in summary.items()})

    @abstractmethod
    def collect(self, item: Any, batch: Any, index: int) -> None:
        """Append the row of sample ``index`` (output ``item``, engine ``batch``) to ``rows``."""

    @abstractmethod
    def write(self, engine: Engine) -> None:
        """Write the report files of ``rows`` (at least one row)."""
