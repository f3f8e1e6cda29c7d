"""Checkpoint conventions shared by the three bundles.

``<ckpt_dir>/last.pt`` holds everything needed to resume (network, optimizer, LR scheduler, trainer epoch and
iteration, best validation metric); it is rewritten atomically after every epoch, after validation.
``<ckpt_dir>/best.pt`` holds the network weights of the best validation epoch (``{"model", "epoch",
"metric", "metric_name"}``). A restarted run finds ``last.pt`` and continues from the next epoch.

Every file the bundles write describes itself: ``kind`` (the bundle: ``transunet``, ``sam_refiner``,
``ultrarefiner``), ``network_kwargs`` (what rebuilds the network) and ``model`` (its weights); ``best.pt``,
``last.pt`` and the exported ``models/model.pt`` alike, so that ``ultrarefiner.create_model`` rebuilds any of them.
``read_checkpoint`` is the one reader of these files.

Both files record the run they belong to: ``identity`` = ``{"phase", "dataset", "fold", "fingerprint"}`` (phase: the
bundle name; fingerprint: a short hash of ``network_kwargs``, what must match for the weights to mean the same) and
``settings`` (the schedule and data options of the config). A restart refuses a ``last.pt`` of another phase,
dataset, fold or network (``CheckpointMismatchError``): resuming it would continue that run and overwrite its
checkpoints. Changed ``settings`` (more epochs, another learning rate) are only logged: extending a run is normal.
Files written before identities were recorded resume with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ultrarefiner.errors import CheckpointMismatchError
from ultrarefiner.utils.io import atomic_write, read_checkpoint

if TYPE_CHECKING:  # ignite only for training: inference commands start 0.6 s sooner without it
    from ignite.engine import Engine

logger = logging.getLogger(__name__)

# scheduler attributes that a resumed run takes from its own config: torch's PolynomialLR, CosineAnnealingLR and
# MONAI's WarmupCosineSchedule (``engines.training.schedules``)
_SCHEDULE_SHAPE = ("total_iters", "T_max", "t_total", "warmup_steps", "cycles")


def save_checkpoint(path: str | os.PathLike, obj: dict) -> Path:
    """``torch.save`` through a temporary file, so a kill never leaves a half-written checkpoint."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def weights_of(obj: Any, key: str = "model") -> dict[str, torch.Tensor]:
    """The network weights of a loaded checkpoint: ``obj[key]`` of ``best.pt``/``last.pt``, or a plain state_dict."""
    return obj[key] if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict) else obj


def load_weights(path: str | os.PathLike, key: str = "model") -> dict[str, torch.Tensor]:
    """Network weights from ``best.pt``/``last.pt`` (``obj[key]``) or from a plain state_dict file."""
    return weights_of(read_checkpoint(path), key)


IDENTITY_FIELDS = ("phase", "dataset", "fold")


def _canonical(obj: Any) -> Any:
    """JSON types only (what ``torch.load(weights_only=True)`` reads back), integral floats as ints: ``--lora_alpha 4``
    and the default 4.0 are one setting."""
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_canonical(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return int(obj) if obj.is_integer() else obj
    return str(obj)  # dtypes, devices, paths


def config_fingerprint(obj: Any) -> str:
    """Short hash of a JSON-like description (e.g. ``network_kwargs``), independent of key order."""
    return hashlib.sha256(json.dumps(_canonical(obj), sort_keys=True).encode()).hexdigest()[:12]


def run_identity(phase: str | None, dataset: str | None, fold: int | str | None,
                 network_kwargs: Mapping | None = None) -> dict:
    """What a checkpoint records of its run (module docstring); None where the run does not say."""
    if fold is not None:
        try:
            fold = int(fold)
        except (TypeError, ValueError):
            fold = str(fold)
    return {"phase": phase, "dataset": None if dataset is None else str(dataset), "fold": fold,
            "fingerprint": config_fingerprint(network_kwargs) if network_kwargs else None}


def describe_identity(identity: Mapping | None) -> str:
    """``phase 'sam_refiner', dataset 'BUSI', fold 0, network fingerprint 1a2b...`` (the fields that are set)."""
    identity = identity or {}
    parts = [f"{k} {identity[k]!r}" for k in IDENTITY_FIELDS if identity.get(k) is not None]
    if identity.get("fingerprint"):
        parts.append(f"network fingerprint {identity['fingerprint']}")
    return ", ".join(parts) or "no recorded identity"


def check_identity(path: str | os.PathLike, found: Mapping | None, expected: Mapping,
                   fields: tuple[str, ...] = IDENTITY_FIELDS, hint: str = "") -> None:
    """Refuse a checkpoint whose recorded ``fields`` differ from ``expected``; a field that either side leaves unset
    (files written before identities were recorded, runs that do not say) is not compared.

    Raises:
      CheckpointMismatchError: naming ``path``, what it holds and what this run is.
    """
    if not found:
        return
    differ = [f for f in fields if found.get(f) is not None and expected.get(f) is not None
              and str(found[f]) != str(expected[f])]
    if differ:
        raise CheckpointMismatchError(
            path, f"belongs to another run ({', '.join(differ)} differ{'s' if len(differ) == 1 else ''}): the file "
                  f"holds {describe_identity(found)}; "
                  f"this run is {describe_identity(expected)}" + (f". {hint}" if hint else ""),
            dict(found), dict(expected))


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping) and obj:
        return {k: v for key, val in obj.items() for k, v in _flatten(val, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): obj}


def differences(old: Mapping, new: Mapping) -> list[str]:
    """``key: old -> new`` for every (nested) entry that differs between two JSON-like descriptions."""
    a, b = _flatten(_canonical(old)), _flatten(_canonical(new))
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in sorted(a.keys() | b.keys())
            if k and a.get(k, "<unset>") != b.get(k, "<unset>")]


# the phase number of each bundle's runs (``identity["phase"]``)
BUNDLE_PHASES = {"transunet": 1, "sam_refiner": 2, "ultrarefiner": 3}
# what each phase's checkpoint is called in messages, and the bundle that writes it
PHASES = {
    1: "phase-1 TransUNet checkpoint (bundles/transunet)",
    2: "phase-2 SAM refiner checkpoint (bundles/sam_refiner)",
    3: "phase-3 UltraRefiner checkpoint (bundles/ultrarefiner)",
}


KIND_OF_PHASE = {phase: kind for kind, phase in BUNDLE_PHASES.items()}


def checkpoint_kind(obj: Any) -> str | None:
    """``transunet``, ``sam_refiner`` or ``ultrarefiner``: the kind of network a loaded checkpoint holds (its recorded
    ``kind``, else its training phase, :func:`checkpoint_phase`); None when it cannot be told."""
    if isinstance(obj, dict) and obj.get("kind") in BUNDLE_PHASES:
        return str(obj["kind"])
    phase = checkpoint_phase(obj)
    return None if phase is None else KIND_OF_PHASE[phase]


def checkpoint_phase(obj: Any) -> int | None:
    """1, 2 or 3: the training phase that wrote a checkpoint (``torch.load`` result), None when it cannot be told.

    Read from the stored ``network_kwargs`` (phase 3: ``transunet``/``sam``/``refiner``; phase 1: TransUNet's
    ``variant``/``vit_depth``; phase 2: the refiner's ``model_type``...), else from the weight names of a plain
    state_dict (``models/model.pt``): ``transunet.``/``refiner.`` (3), ``sam.`` only (2), TransUNet's modules (1).
    """
    if not isinstance(obj, dict):
        return None
    if obj.get("kind") in BUNDLE_PHASES:
        return BUNDLE_PHASES[obj["kind"]]  # recorded by the writer
    identity = obj.get("identity")
    if isinstance(identity, dict) and identity.get("phase") in BUNDLE_PHASES:
        return BUNDLE_PHASES[identity["phase"]]  # recorded by training
    kwargs = obj.get("network_kwargs")
    if isinstance(kwargs, dict) and kwargs:
        if {"transunet", "refiner", "sam"} & set(kwargs):
            return 3
        if {"variant", "vit_depth", "num_classes"} & set(kwargs):
            return 1
        if {"model_type", "use_mask_prompt", "box_source", "image_resize", "use_lora"} & set(kwargs):
            return 2
    weights = obj.get("model") if isinstance(obj.get("model"), dict) else obj
    roots = {str(k).split(".", 1)[0] for k, v in weights.items() if torch.is_tensor(v)}
    if not roots:
        return None
    if {"transunet", "refiner"} <= roots:
        return 3
    if roots == {"sam"} or "lora" in obj or "partial" in obj:
        return 2
    if {"segmentation_head", "decoder"} <= roots:
        return 1
    return None


def phase_problem(obj: Any, phase: int, user: str) -> str | None:
    """``"is a <its phase>; <user> needs a <phase>"`` when checkpoint ``obj`` was written by another training phase;
    None when it fits, or when its phase cannot be told (the strict weight loading that follows reports that)."""
    found = checkpoint_phase(obj)
    return None if found is None or found == phase else f"is a {PHASES[found]}; {user} needs a {PHASES[phase]}"


def require_phase(path: str | os.PathLike, obj: Any, phase: int, user: str) -> None:
    """Refuse a checkpoint written by another training phase (``phase_problem``), naming the file."""
    from ultrarefiner.errors import BadInputError

    problem = phase_problem(obj, phase, user)
    if problem is not None:
        raise BadInputError(path, problem)


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def _closed_form_lr(scheduler: Any) -> list[float] | None:
    """The rates of ``scheduler`` at its ``last_epoch`` computed from the base rates, or None where it has no closed
    form (e.g. ``MultiplicativeLR``)."""
    if hasattr(scheduler, "_get_closed_form_lr"):
        return scheduler._get_closed_form_lr()
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # its get_lr is base rate x factor(step)
        return scheduler.get_lr()
    return None


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
        phase, dataset, fold: the run's identity (module docstring): phase is the bundle name (``transunet``,
            ``sam_refiner``, ``ultrarefiner``); None: not recorded, not checked.
        settings: the config's schedule and data options, recorded and compared on resume (differences logged).
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
        phase: str | None = None,
        dataset: str | None = None,
        fold: int | None = None,
        settings: dict | None = None,
    ):
        self.ckpt_dir = Path(ckpt_dir)
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.evaluator, self.metric_name, self.resume = evaluator, metric_name, resume
        self.best_metric, self.best_epoch = -float("inf"), -1
        self.trainer: Engine | None = None
        self.network_kwargs = dict(network_kwargs or {})
        self.state_dict_fn = state_dict_fn or (lambda m: m.state_dict())
        self.extra = dict(extra or {})
        self.identity = run_identity(phase, dataset, fold, self.network_kwargs)
        self.kind = {"kind": phase} if phase in BUNDLE_PHASES else {}  # what create_model rebuilds
        self.settings = _canonical({"optimizer": type(optimizer).__name__, **(settings or {})})

    @property
    def last_path(self) -> Path:
        return self.ckpt_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.ckpt_dir / "best.pt"

    def attach(self, trainer: Engine) -> None:
        from ignite.engine import Events

        self.trainer = trainer
        trainer.add_event_handler(Events.STARTED, self._load)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._save_last)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._maybe_save_best)

    def _state(self) -> dict:
        unwrapped = getattr(self.network, "module", self.network)  # DDP / DataParallel
        state = {
            **self.kind,
            "model": unwrapped.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "trainer": self.trainer.state_dict(),
            "epoch": self.trainer.state.epoch,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "network_kwargs": self.network_kwargs,
            "identity": self.identity,
            "settings": self.settings,
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
        state = read_checkpoint(self.last_path, "last checkpoint")
        self._check_resumable(state)
        getattr(self.network, "module", self.network).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            # the schedule's length and shape come from this run's config (a resumed run may extend the epochs);
            # its position and base rates from the file
            keys = [k for k in _SCHEDULE_SHAPE if hasattr(self.lr_scheduler, k)]
            length = {k: getattr(self.lr_scheduler, k) for k in keys}
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            for k, v in length.items():
                setattr(self.lr_scheduler, k, v)
            # chainable schedulers multiply the current LR, which is 0 at the end of a finished schedule: take the
            # closed form of this run's schedule at the current step (equal to it when nothing changed)
            self._set_lr(_closed_form_lr(self.lr_scheduler))
        # the restarted run's own max_epochs wins (a schedule may be extended or shortened on restart)
        max_epochs = engine.state.max_epochs
        engine.load_state_dict(state["trainer"])
        engine.state.max_epochs = max_epochs
        if self.lr_scheduler is not None and "lr_scheduler" not in state:
            self._schedule_from(engine.state.iteration)
        self.best_metric, self.best_epoch = state["best_metric"], state["best_epoch"]
        if self.evaluator is not None:
            self.evaluator.state.best_metric, self.evaluator.state.best_metric_epoch = self.best_metric, self.best_epoch
        logger.info(f"resumed from {self.last_path} ({describe_identity(state.get('identity'))}) at epoch "
                    f"{engine.state.epoch} (best {self.best_metric:.4f})")

    def _schedule_from(self, iteration: int) -> None:
        """Put this run's schedule at ``iteration`` when the file has none (a run started without a scheduler)."""
        self.lr_scheduler.last_epoch = iteration
        lrs = _closed_form_lr(self.lr_scheduler)
        if lrs is None:
            self.lr_scheduler.last_epoch = 0
            logger.warning(f"{self.last_path} holds no learning-rate schedule and {type(self.lr_scheduler).__name__} "
                           f"has no closed form: the schedule starts from its beginning at iteration {iteration}")
            return
        self._set_lr(lrs)
        logger.warning(f"{self.last_path} holds no learning-rate schedule (written without one): this run's schedule "
                       f"continues from iteration {iteration}")

    def _set_lr(self, lrs: list[float] | None) -> None:
        if lrs is None:
            return
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self.lr_scheduler._last_lr = list(lrs)

    def _check_resumable(self, state: dict) -> None:
        """Only this run's own ``last.pt`` resumes: same phase, dataset, fold and network (module docstring)."""
        found = state.get("identity")
        if not found:
            logger.warning(f"{self.last_path} records no run identity (written by an older version): resuming it as "
                           f"{describe_identity(self.identity)} without checking that it belongs to this run")
            return
        hint = ("Resuming it would continue that run and overwrite its checkpoints: give this run its own folder "
                "(--ckpt_root or --output_dir), or pass --resume False to start over in this one")
        check_identity(self.last_path, found, self.identity, hint=hint)
        fingerprint = found.get("fingerprint")
        if fingerprint and self.identity["fingerprint"] and fingerprint != self.identity["fingerprint"]:
            changed = "; ".join(differences(state.get("network_kwargs") or {}, self.network_kwargs))
            raise CheckpointMismatchError(
                self.last_path, f"was trained with other network settings (file -> this run: "
                                f"{changed or 'network_kwargs differ'}): "
                                f"the file holds {describe_identity(found)}; this run is "
                                f"{describe_identity(self.identity)}. {hint}", found, self.identity)
        changed = differences(state.get("settings") or {}, self.settings)
        if state.get("settings") is not None and changed:
            logger.warning(f"{self.last_path}: resuming with this run's settings, changed since the checkpoint: "
                           + "; ".join(changed))

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
            save_checkpoint(self.best_path, {**self.kind, **best, "network_kwargs": self.network_kwargs,
                                             "identity": self.identity, "settings": self.settings, **self.extra})

    def _save_last(self, engine: Engine) -> None:
        if _is_main_process():
            save_checkpoint(self.last_path, self._state())


# what an exported models/model.pt keeps of best.pt: the weights and what describes them (no optimizer, no settings)
EXPORTED_KEYS = ("kind", "model", "network_kwargs", "identity", "epoch", "metric", "metric_name")


def export_best(ckpt_dir: str | os.PathLike, dst: str | os.PathLike) -> Path | None:
    """Write the weights of ``<ckpt_dir>/best.pt`` to ``dst`` (the bundle's ``models/model.pt``) as a self-describing
    file: ``{"kind", "model", "network_kwargs", "identity", "epoch", "metric", "metric_name"}``, which
    ``ultrarefiner.create_model`` rebuilds and MONAI's ``CheckpointLoader`` (``load_dict={"model": net}``) loads.

    Returns None (and logs) when no ``best.pt`` exists, e.g. when no validation ran.
    """
    best = Path(ckpt_dir) / "best.pt"
    if not best.is_file():
        logger.warning(f"{best} not found: nothing exported to {dst}")
        return None
    if not _is_main_process():
        return None
    obj = read_checkpoint(best)
    if not (isinstance(obj, dict) and isinstance(obj.get("model"), dict)):
        obj = {"model": obj}  # a plain state_dict
    kind = checkpoint_kind(obj)
    exported = {**({"kind": kind} if kind else {}), **{k: obj[k] for k in EXPORTED_KEYS if k in obj and k != "kind"}}
    logger.info(f"best weights of {best} ({describe_identity(obj.get('identity'))}) exported to {dst}")
    return save_checkpoint(dst, exported)
