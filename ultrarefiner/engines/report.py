"""The per-epoch console report of the original tool, as an Ignite handler.

Output (written with ``tqdm.write`` so that it does not garble Ignite's ``ProgressBar``)::

    ==============================================================================
    Experiment: transunet | Dataset: BUSI | Fold 1/5
    Train samples: 517 | Val samples: 130
    ==============================================================================
    Epoch 3/150
    [TRAIN]      Loss: 0.4312 | Dice: 0.6120 | IoU: 0.4630 | LR: 9.87e-03
    [VALIDATION] Dice     IoU      Precision   Recall   Accuracy   Loss
                 0.7012   0.5623   0.7410      0.6892   0.9512     0.3120   ★ BEST

``[TRAIN]`` loss is the mean of the iteration losses of the epoch; Dice/IoU come from the trainer's metrics
(``train_mean_dice``/``train_mean_iou``; "-" when not attached); LR is the optimizer's first group after the epoch.
The validation row reads the evaluator's metrics; ★ BEST marks an improvement of the key metric. The report works
whichever of itself and MONAI's ``ValidationHandler`` is attached first.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import torch
from ignite.engine import Engine, Events
from tqdm import tqdm

VAL_COLUMNS = {
    "Dice": "val_mean_dice",
    "IoU": "val_mean_iou",
    "Precision": "val_precision",
    "Recall": "val_recall",
    "Accuracy": "val_accuracy",
    "Loss": "val_loss",
}


def _loss_of(output: Any) -> float | None:
    """Loss from a MONAI engine output: dict, list of decollated dicts, tensor or number."""
    if isinstance(output, (list, tuple)) and output:
        output = output[0]
    if isinstance(output, Mapping):
        output = output.get("loss")
    if isinstance(output, torch.Tensor) and output.numel() == 1:
        return float(output.detach())
    if isinstance(output, (int, float)):
        return float(output)
    return None


def _fmt(value: Any, width: int = 0) -> str:
    text = "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.4f}"
    return text.ljust(width)


class ConsoleReport:
    """Prints a run header, a ``[TRAIN]`` line per epoch and a ``[VALIDATION]`` table with a ★ BEST marker."""

    def __init__(
        self,
        experiment: str,
        dataset: str,
        fold: int,
        n_splits: int,
        n_train: int,
        n_val: int,
        evaluator: Engine | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        key_metric: str = "val_mean_dice",
        higher_is_better: bool = True,
        train_metrics: Mapping[str, str] | None = None,
        val_columns: Mapping[str, str] | None = None,
        loss_transform: Callable[[Any], float | None] = _loss_of,
        stream: TextIO | None = None,
    ) -> None:
        """
        Arguments:
          experiment (str): run name shown in the header (e.g. "transunet").
          dataset (str): dataset name.
          fold (int): 0-based fold index as in the configs; shown 1-based ("Fold 1/5").
          n_splits (int): number of folds.
          n_train (int): training samples.
          n_val (int): validation samples.
          evaluator (Engine or None): validation engine; its metrics fill the table.
          optimizer (Optimizer or None): LR source; "-" when None.
          key_metric (str): evaluator metric deciding ★ BEST.
          higher_is_better (bool): direction of the key metric.
          train_metrics (dict): column -> trainer metric name (default Dice: train_mean_dice, IoU: train_mean_iou).
          val_columns (dict): column -> evaluator metric name (default ``VAL_COLUMNS``).
          loss_transform (callable): trainer output -> iteration loss.
          stream (file or None): where to print; default sys.stdout at print time.
        """
        self.experiment, self.dataset = experiment, dataset
        self.fold, self.n_splits, self.n_train, self.n_val = fold, n_splits, n_train, n_val
        self.evaluator, self.optimizer = evaluator, optimizer
        self.key_metric, self.higher_is_better = key_metric, higher_is_better
        self.train_metrics = dict(train_metrics or {"Dice": "train_mean_dice", "IoU": "train_mean_iou"})
        self.val_columns = dict(val_columns or VAL_COLUMNS)
        self.loss_transform, self.stream = loss_transform, stream
        self.best: float | None = None
        self.best_epoch: int | None = None
        self._trainer: Engine | None = None
        self._losses: list[float] = []
        self._printed_epoch = 0

    def _print(self, line: str = "") -> None:
        tqdm.write(line, file=self.stream or sys.stdout)

    def attach(self, trainer: Engine) -> None:
        """Attach to the trainer (and to ``evaluator`` if given at construction); a no-op on ranks other than 0."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return
        self._trainer = trainer
        trainer.add_event_handler(Events.STARTED, self._header)
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda _: self._losses.clear())
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._collect_loss)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._train_line)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.STARTED, self._train_line)
            self.evaluator.add_event_handler(Events.COMPLETED, self._validation_table)

    def _header(self, engine: Engine) -> None:
        # a resumed run restores the evaluator's best before this runs (checkpoint handler attached earlier)
        if self.evaluator is not None and getattr(self.evaluator.state, "best_metric_epoch", -1) > 0:
            self.best = float(self.evaluator.state.best_metric)
            self.best_epoch = int(self.evaluator.state.best_metric_epoch)
        rule = "=" * 78
        self._print(rule)
        self._print(f"Experiment: {self.experiment} | Dataset: {self.dataset} | Fold {self.fold + 1}/{self.n_splits}")
        self._print(f"Train samples: {self.n_train} | Val samples: {self.n_val}")
        self._print(rule)

    def _collect_loss(self, engine: Engine) -> None:
        loss = self.loss_transform(engine.state.output)
        if loss is not None:
            self._losses.append(loss)

    def _train_line(self, _: Engine) -> None:
        trainer = self._trainer
        if trainer is None or self._printed_epoch == trainer.state.epoch:
            return  # printed already (validation may run before or after this handler)
        self._printed_epoch = trainer.state.epoch
        self._print(f"Epoch {trainer.state.epoch}/{trainer.state.max_epochs}")
        metrics = trainer.state.metrics
        loss = sum(self._losses) / len(self._losses) if self._losses else None
        parts = [f"Loss: {_fmt(loss)}"] + [
            f"{col}: {_fmt(metrics.get(name))}" for col, name in self.train_metrics.items()
        ]
        lr = f"{self.optimizer.param_groups[0]['lr']:.2e}" if self.optimizer is not None else "-"
        self._print(f"[TRAIN]      {' | '.join(parts)} | LR: {lr}")

    def _improved(self, value: Any) -> bool:
        if value is None or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        if self.best is None:
            return True
        return value > self.best if self.higher_is_better else value < self.best

    def _validation_table(self, evaluator: Engine) -> None:
        self._train_line(evaluator)
        metrics = evaluator.state.metrics
        widths = [max(len(c), 6) + 3 for c in self.val_columns]
        head = "".join(c.ljust(w) for c, w in zip(self.val_columns, widths, strict=True))
        row = "".join(_fmt(metrics.get(n), w) for n, w in zip(self.val_columns.values(), widths, strict=True))
        value = metrics.get(self.key_metric)
        if self._improved(value):
            self.best = float(value)
            self.best_epoch = self._trainer.state.epoch if self._trainer is not None else evaluator.state.epoch
            row += "★ BEST"
        self._print(f"[VALIDATION] {head.rstrip()}")
        self._print(f"{'':13s}{row.rstrip()}")
