"""Checkpoint conventions shared by the three bundles.

``<ckpt_dir>/last.pt`` holds everything needed to resume (network, optimizer, LR scheduler, trainer epoch and
iteration, best validation metric); it is rewritten atomically after every epoch, after validation.
``<ckpt_dir>/best.pt`` holds the network weights of the best validation epoch (``{"model", "epoch",
"metric", "metric_name"}``). A restarted run finds ``last.pt`` and continues from the next epoch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from ultrarefiner.utils.io import atomic_write

logger = logging.getLogger(__name__)


def save_checkpoint(path: str | os.PathLike, obj: dict) -> Path:
    """``torch.save`` through a temporary file, so a kill never leaves a half-written checkpoint."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load`` (CPU, ``weights_only``) with errors that name the file: missing or unreadable."""
    from ultrarefiner.errors import BadInputError

    if not Path(path).is_file():
        raise BadInputError(path, f"{what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadInputError(path, f"not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e


def load_weights(path: str | os.PathLike, key: str = "model") -> dict[str, torch.Tensor]:
    """Network weights from ``best.pt``/``last.pt`` (``obj[key]``) or from a plain state_dict file."""
    obj = read_checkpoint(path)
    return obj[key] if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict) else obj


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


class TrainingCheckpoints:
    """Resume from ``last.pt`` at start; save ``best.pt`` on improvement and ``last.pt`` after every epoch.

    Arguments:
        ckpt_dir: folder of ``last.pt`` and ``best.pt``.
        network, optimizer, lr_scheduler: the objects whose state is saved and restored.
        evaluator: the validation engine; its ``state.metrics[metric_name]`` decides ``best.pt``.
        metric_name: key metric (higher is better).
        resume: load ``last.pt`` when it exists.
        network_kwargs: constructor arguments of the network, stored in both files so tools can rebuild it.
        state_dict_fn: network -> the weights ``best.pt`` stores (default ``state_dict()``; the refiner stores only
            LoRA adapters + decoder when it has adapters, see ``refiner_checkpoint``).
        extra: more entries for ``best.pt`` (e.g. ``{"lora": true}``).
    Attach it to the trainer after the ``ValidationHandler`` so that ``last.pt`` includes the epoch's validation.
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        evaluator: Engine | None = None,
        lr_scheduler: Any = None,
        metric_name: str = "val_mean_dice",
        resume: bool = True,
        network_kwargs: dict | None = None,
        state_dict_fn: Any = None,
        extra: dict | None = None,
    ):
        self.ckpt_dir = Path(ckpt_dir)
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.evaluator, self.metric_name, self.resume = evaluator, metric_name, resume
        self.best_metric, self.best_epoch = -float("inf"), -1
        self.trainer: Engine | None = None
        self.network_kwargs = dict(network_kwargs or {})
        self.state_dict_fn = state_dict_fn or (lambda m: m.state_dict())
        self.extra = dict(extra or {})

    @property
    def last_path(self) -> Path:
        return self.ckpt_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.ckpt_dir / "best.pt"

    def attach(self, trainer: Engine) -> None:
        self.trainer = trainer
        trainer.add_event_handler(Events.STARTED, self._load)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._save_last)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._maybe_save_best)

    def _state(self) -> dict:
        unwrapped = getattr(self.network, "module", self.network)  # DDP / DataParallel
        state = {
            "model": unwrapped.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "trainer": self.trainer.state_dict(),
            "epoch": self.trainer.state.epoch,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "network_kwargs": self.network_kwargs,
        }
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        return state

    def _remove_stale_temporaries(self) -> None:
        """A kill during ``atomic_write`` leaves its temporary file (the checkpoint itself stays whole): drop it."""
        if _is_main_process() and self.ckpt_dir.is_dir():
            for name in ("last.pt", "best.pt"):
                for tmp in self.ckpt_dir.glob(f".{name}.*.tmp"):
                    tmp.unlink(missing_ok=True)

    def _load(self, engine: Engine) -> None:
        self._remove_stale_temporaries()
        if not (self.resume and self.last_path.is_file()):
            return
        state = torch.load(self.last_path, map_location="cpu", weights_only=False)
        getattr(self.network, "module", self.network).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            # the schedule length comes from this run's config (a resumed run may extend the epochs)
            keys = [k for k in ("total_iters", "T_max") if hasattr(self.lr_scheduler, k)]
            length = {k: getattr(self.lr_scheduler, k) for k in keys}
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            for k, v in length.items():
                setattr(self.lr_scheduler, k, v)
            if hasattr(self.lr_scheduler, "_get_closed_form_lr"):
                # chainable schedulers multiply the current LR, which is 0 at the end of a finished schedule: take
                # the closed form of this run's schedule at the current step (equal to it when nothing changed)
                for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler._get_closed_form_lr(), strict=True):
                    group["lr"] = lr
                self.lr_scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        # the restarted run's own max_epochs wins (a schedule may be extended or shortened on restart)
        max_epochs = engine.state.max_epochs
        engine.load_state_dict(state["trainer"])
        engine.state.max_epochs = max_epochs
        self.best_metric, self.best_epoch = state["best_metric"], state["best_epoch"]
        if self.evaluator is not None:
            self.evaluator.state.best_metric, self.evaluator.state.best_metric_epoch = self.best_metric, self.best_epoch
        logger.info(f"resumed from {self.last_path} at epoch {engine.state.epoch} (best {self.best_metric:.4f})")

    def _maybe_save_best(self, evaluator: Engine) -> None:
        value = float(evaluator.state.metrics.get(self.metric_name, float("nan")))
        if value > self.best_metric:  # every rank tracks the best; only rank 0 writes
            epoch = self.trainer.state.epoch if self.trainer is not None else evaluator.state.epoch
            self.best_metric, self.best_epoch = value, epoch
            if not _is_main_process():
                return
            unwrapped = getattr(self.network, "module", self.network)
            best = {"model": self.state_dict_fn(unwrapped), "epoch": epoch, "metric": value,
                    "metric_name": self.metric_name}
            save_checkpoint(self.best_path, {**best, "network_kwargs": self.network_kwargs, **self.extra})

    def _save_last(self, engine: Engine) -> None:
        if _is_main_process():
            save_checkpoint(self.last_path, self._state())


def export_best(ckpt_dir: str | os.PathLike, dst: str | os.PathLike) -> Path | None:
    """Copy the weights of ``<ckpt_dir>/best.pt`` to ``dst`` as a plain state_dict (the bundle's ``models/model.pt``).

    Returns None (and logs) when no ``best.pt`` exists, e.g. when no validation ran.
    """
    best = Path(ckpt_dir) / "best.pt"
    if not best.is_file():
        logger.warning(f"{best} not found: nothing exported to {dst}")
        return None
    if not _is_main_process():
        return None
    return save_checkpoint(dst, load_weights(best))
