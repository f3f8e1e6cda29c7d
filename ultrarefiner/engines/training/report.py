"""The per-epoch console report of the original tool, as an Ignite handler.

Output (written with ``tqdm.write`` so that it does not garble Ignite's ``ProgressBar``)::

    ==============================================================================
    Experiment: transunet | Dataset: BUSI | Fold 1/5
    Train samples: 517 | Val samples: 130
    ==============================================================================
    Epoch 3/150
    [TRAIN]      Loss: 0.4312 | Dice: 0.6120 | IoU: 0.4630 | LR: 9.87e-03 | 8.3 s, 62.3 samples/s
    [VALIDATION] Dice     IoU      Precision   Recall   Accuracy   Loss     | 4.1 s, 31.7 samples/s
                 0.7012   0.5623   0.7410      0.6892   0.9512     0.3120   ★ BEST

``[TRAIN]`` loss is the mean of the iteration losses of the epoch; Dice/IoU come from the trainer's metrics
(``train_mean_dice``/``train_mean_iou``; "-" when not attached); LR is the optimizer's first group after the epoch.
The validation row reads the evaluator's metrics; ★ BEST marks an improvement of the key metric. The report works
whichever of itself and MONAI's ``ValidationHandler`` is attached first.

Each line ends with the wall time of its pass and its samples per second: Ignite's own times (the epoch's loop over
the data without its end-of-epoch handlers, so without the validation; the whole validation run), and the samples
of the batches seen (times the number of ranks in a distributed run: the samples/s of all GPUs together). They
show where an epoch's time goes, e.g. how much of a GPU run the per-epoch validation takes.
On a GPU the host runs ahead of the device, so a pass's time ends when its last kernels are queued, not run: the
train time can miss the tail of its last step, which the next pass then pays.

Neither the report nor ``BufferedLossWriter`` (the bundles' TensorBoard iteration loss) reads the loss back from the
device at every iteration: each such read is a host sync that stalls the GPU's queue. The report sums the losses on
the device and reads the sum once per epoch; the writer reads its buffered losses once per ``every`` iterations.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import torch
from ignite.engine import Engine, Events
from tqdm import tqdm

from ultrarefiner.engines.evaluation.engine_fields import field, is_item_list, output_items

VAL_COLUMNS = {
    "Dice": "val_mean_dice",
    "IoU": "val_mean_iou",
    "Precision": "val_precision",
    "Recall": "val_recall",
    "Accuracy": "val_accuracy",
    "Loss": "val_loss",
}


def _loss_of(output: Any) -> torch.Tensor | float | None:
    """Loss from a MONAI engine output: dict, list of decollated dicts, tensor or number. A tensor is returned
    detached as a 0-d tensor where it lives (reading its value on a GPU is a host sync: left to the caller)."""
    items = output_items(output)
    output = items[0] if items else None
    if isinstance(output, Mapping):
        output = field(output, None, "loss", required=False)
    if isinstance(output, torch.Tensor) and output.numel() == 1:
        return output.detach().reshape(())
    if isinstance(output, (int, float)):
        return float(output)
    return None


def _exact(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64, the precision of a Python float (MPS has none: float32): float32/bf16 values convert
    exactly, and sums of them round as Python's sums of the same floats do."""
    return t.to(torch.float32 if t.device.type == "mps" else torch.float64)


def batch_length(batch: Any) -> int | None:
    """Samples in an engine's batch: a collated dict or sequence (the first dimension of its first tensor), a
    decollated list of dicts (its length); None when it cannot be told. Reads shapes only, never values."""
    if is_item_list(batch):
        return len(batch)
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, Sequence) else [batch]
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    return None


def _pace(seconds: float | None, samples: int) -> str:
    """" | 8.3 s, 62.3 samples/s" (no rate when no sample was counted); "" without a time."""
    if seconds is None:
        return ""
    rate = f", {samples / seconds:.1f} samples/s" if samples and seconds > 0 else ""
    return f" | {seconds:.1f} s{rate}"


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
        loss_transform: Callable[[Any], torch.Tensor | float | None] = _loss_of,
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
          loss_transform (callable): trainer output -> iteration loss (tensor, number or None).
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
        # the epoch's loss sum: a device tensor read once, at the end of the epoch (a float if the loss is one)
        self._loss_sum: torch.Tensor | float = 0.0
        self._loss_count = 0
        self._samples = {"train": 0, "val": 0}  # of the epoch / validation run being reported
        self._ranks = 1
        self._printed_epoch = 0

    def _print(self, line: str = "") -> None:
        tqdm.write(line, file=self.stream or sys.stdout)

    def attach(self, trainer: Engine) -> None:
        """Attach to the trainer (and to ``evaluator`` if given at construction); a no-op on ranks other than 0."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_rank():
            return
        # every rank runs its share of the batches (DistributedSampler): rank 0's count times the ranks is them all
        self._ranks = torch.distributed.get_world_size() if distributed else 1
        self._trainer = trainer
        trainer.add_event_handler(Events.STARTED, self._header)
        trainer.add_event_handler(Events.EPOCH_STARTED, self._reset_loss)
        trainer.add_event_handler(Events.EPOCH_STARTED, self._reset_count, "train")
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._collect_loss)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._count, "train")
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._train_line)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.STARTED, self._train_line)
            self.evaluator.add_event_handler(Events.STARTED, self._reset_count, "val")
            self.evaluator.add_event_handler(Events.ITERATION_COMPLETED, self._count, "val")
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

    def _reset_loss(self, _: Engine) -> None:
        self._loss_sum, self._loss_count = 0.0, 0

    def _reset_count(self, _: Engine, phase: str) -> None:
        self._samples[phase] = 0

    def _count(self, engine: Engine, phase: str) -> None:
        self._samples[phase] += (batch_length(engine.state.batch) or 0) * self._ranks

    def _collect_loss(self, engine: Engine) -> None:
        loss = self.loss_transform(engine.state.output)
        if loss is None:
            return
        # summed where it lives, in the order and precision of a sum of Python floats: the same mean, no host sync
        self._loss_sum = self._loss_sum + (_exact(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss))
        self._loss_count += 1

    def _train_line(self, _: Engine) -> None:
        trainer = self._trainer
        if trainer is None or self._printed_epoch == trainer.state.epoch:
            return  # printed already (validation may run before or after this handler)
        self._printed_epoch = trainer.state.epoch
        self._print(f"Epoch {trainer.state.epoch}/{trainer.state.max_epochs}")
        metrics = trainer.state.metrics
        loss = float(self._loss_sum) / self._loss_count if self._loss_count else None
        parts = [f"Loss: {_fmt(loss)}"] + [
            f"{col}: {_fmt(metrics.get(name))}" for col, name in self.train_metrics.items()
        ]
        lr = f"{self.optimizer.param_groups[0]['lr']:.2e}" if self.optimizer is not None else "-"
        pace = _pace(trainer.state.times.get(Events.EPOCH_COMPLETED.name), self._samples["train"])
        self._print(f"[TRAIN]      {' | '.join(parts)} | LR: {lr}{pace}")

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
        pace = _pace(evaluator.state.times.get(Events.COMPLETED.name), self._samples["val"])
        self._print(f"[VALIDATION] {head}{pace[1:]}" if pace else f"[VALIDATION] {head.rstrip()}")
        self._print(f"{'':13s}{row.rstrip()}")


class BufferedLossWriter:
    """Iteration writer for MONAI's ``TensorBoardStatsHandler`` (``iteration_event_writer``): the same scalars as its
    default writer with a scalar ``output_transform`` (``tag`` at step = iteration, every iteration), but the losses
    wait on the device and are read back together, one host sync per ``every`` iterations instead of one ``.item()``
    per iteration. The rest is written when an epoch ends and when the run completes or is terminated.
    """

    def __init__(self, tag: str = "train_loss", every: int = 20,
                 output_transform: Callable[[Any], torch.Tensor | float | None] = _loss_of) -> None:
        """
        Arguments:
          tag (str): TensorBoard tag of the loss.
          every (int): iterations between two reads (and writes) of the buffered losses; 1: every iteration.
          output_transform (callable): trainer output -> scalar loss (one-element tensor or number; anything else:
            nothing written).
        """
        if int(every) < 1:
            raise ValueError(f"every must be 1 or more, got {every}")
        self.tag, self.every, self.output_transform = tag, int(every), output_transform
        self._pending: list[tuple[int, torch.Tensor | float]] = []

    def __call__(self, engine: Engine, writer: Any) -> None:
        # the handler calls this at every ITERATION_COMPLETED; the flushes at the end of an epoch or run hook in here
        # because the handler passes its writer to nothing else
        for event in (Events.EPOCH_COMPLETED, Events.COMPLETED):
            if not engine.has_event_handler(self.flush, event):
                engine.add_event_handler(event, self.flush, writer)
        loss = self.output_transform(engine.state.output)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._pending.append((engine.state.iteration, loss.detach().reshape(())))
        elif isinstance(loss, (int, float)):
            self._pending.append((engine.state.iteration, float(loss)))
        if len(self._pending) >= self.every:
            self.flush(engine, writer)

    def flush(self, _: Engine, writer: Any) -> None:
        """Read the buffered losses back (one sync) and write them."""
        if not self._pending:
            return
        tensors = [v for _, v in self._pending if isinstance(v, torch.Tensor)]
        read = iter(torch.stack([_exact(t) for t in tensors]).tolist() if tensors else [])
        for step, value in self._pending:
            writer.add_scalar(self.tag, next(read) if isinstance(value, torch.Tensor) else value, step)
        self._pending.clear()
        writer.flush()
