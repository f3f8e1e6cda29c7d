"""What the train configs add to MONAI's experiment tracking (``python -m monai.bundle run ... --tracking mlflow``).

``--tracking mlflow`` appends MONAI's ``MLFlowHandler`` to ``train#handlers`` and ``validate#handlers`` (the ids of
``monai.bundle.utils.DEFAULT_MLFLOW_SETTINGS``): per-iteration ``train_loss`` and learning rate, the trainer's and the
evaluator's epoch metrics (``engine.state.metrics``, step = epoch), ``max_epochs``/``epoch_length`` and the executed
config as an artifact. ``TrackingExtras`` (a train handler, a no-op without tracking) completes it with

- the config's key hyperparameters as run params (already logged ones are kept: MLflow refuses to change a param of
  a resumed run, so a changed value is only warned about);
- the path of ``best.pt``, its epoch and validation metric as tags (``best_checkpoint``, ``best_epoch``) and the metric
  ``best_<metric_name>``, after every epoch that has a ``best.pt``;
- the validation metrics logged when the evaluator completes instead of at its epoch end, so that the means that
  validation reports add on completion carry the epoch they belong to;
- an unwrapped iteration loss: our trainers do not decollate (batch postprocessing), so ``engine.state.output`` is a
  dict and the default ``from_engine(['loss'], first=True)`` gives a 1-tuple, which MLflow cannot log. MLflow reads
  that loss back every iteration (one host sync per step, only with tracking on); the configs' TensorBoard handler
  reads it once every 20 iterations (``report.BufferedLossWriter``).

``EpochLoss`` is the epoch mean of the training loss as a trainer metric (``train_epoch_loss``), so that the tracker's
and TensorBoard's epoch logs carry the training loss next to the epoch's Dice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from ignite.metrics import Average

from ultrarefiner.engines.training.report import _loss_of

__all__ = ["EpochLoss", "TrackingExtras", "mlflow_handlers"]

logger = logging.getLogger(__name__)


class EpochLoss(Average):
    """Mean training loss of the epoch (``engine.state.metrics[name]``); the loss is taken as ``ConsoleReport``
    takes it (dict, decollated list, tensor or number), detached, and summed on ``device`` (the configs pass the
    training device, so nothing is read back before the epoch ends)."""

    def __init__(self, output_transform: Callable = _loss_of, device: str = "cpu") -> None:
        super().__init__(output_transform=output_transform, device=device)


def mlflow_handlers(engine: Engine) -> list[Any]:
    """The ``monai.handlers.MLFlowHandler`` objects attached to ``engine`` (by ``--tracking mlflow``).

    Ignite lists no handlers publicly; its ``_event_handlers`` (event -> [(callable, args, kwargs)]) has been stable
    since 0.4. MLFlowHandler always registers its bound ``start`` on ``Events.STARTED``.
    """
    try:
        from monai.handlers import MLFlowHandler
    except ImportError:  # monai's handlers need ignite; without them no tracking handler can be attached
        return []
    entries = getattr(engine, "_event_handlers", {}).get(Events.STARTED, [])
    found = [getattr(entry[0], "__self__", None) for entry in entries]
    return [h for h in found if isinstance(h, MLFlowHandler)]


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def _unwrap_single(transform: Callable) -> Callable:
    """``transform`` whose 1-tuple results are unwrapped (``from_engine([...])`` on a non-decollated dict)."""

    def unwrapped(output: Any) -> Any:
        value = transform(output)
        return value[0] if isinstance(value, tuple) and len(value) == 1 else value

    return unwrapped


class TrackingExtras:
    """Params, the best checkpoint and a loggable iteration loss for the MLflow run of ``--tracking mlflow``.

    Attach it to the trainer before MONAI's ``MLFlowHandler`` (``train#handlers`` lists it; the tracking settings
    append theirs at the end) and after ``TrainingCheckpoints`` (so that ``best.pt`` is written when an epoch ends).
    Without an attached ``MLFlowHandler`` (no ``--tracking``, or a rank other than 0) it does nothing.
    """

    def __init__(self, params: Mapping[str, Any], ckpt_dir: str | Path, evaluator: Engine | None = None,
                 metric_name: str = "val_mean_dice") -> None:
        """
        Arguments:
          params: run params; nested mappings are flattened to dotted keys (``network.img_size``), values as text.
          ckpt_dir: the folder of ``best.pt`` (``TrainingCheckpoints``' ``ckpt_dir``).
          evaluator: the validation engine; its ``state.best_metric``/``best_metric_epoch`` describe ``best.pt``.
          metric_name: the key validation metric deciding ``best.pt``.
        """
        self.params = _flatten(params)
        self.best_path = Path(ckpt_dir) / "best.pt"
        self.evaluator = evaluator
        self.metric_name = metric_name
        self._handler: Any = None
        self._params_logged = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._log_params)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._log_best)

    def _started(self, engine: Engine) -> None:
        handlers = mlflow_handlers(engine)
        self._handler = handlers[0] if handlers else None
        for handler in handlers:
            handler.output_transform = _unwrap_single(handler.output_transform)
        for handler in mlflow_handlers(self.evaluator) if self.evaluator is not None else []:
            # validation reports (e2e_evaluation.E2EReport) add their means to state.metrics on COMPLETED, after
            # EPOCH_COMPLETED: logged there they would appear one epoch late. An evaluator runs one epoch per call.
            if self.evaluator.has_event_handler(handler.epoch_completed, Events.EPOCH_COMPLETED):
                self.evaluator.remove_event_handler(handler.epoch_completed, Events.EPOCH_COMPLETED)
                self.evaluator.add_event_handler(Events.COMPLETED, handler.epoch_completed)

    def _run_id(self) -> str | None:
        run = getattr(self._handler, "cur_run", None)
        return run.info.run_id if run is not None else None

    def _log_params(self, engine: Engine) -> None:
        run_id = self._run_id()
        if self._params_logged or run_id is None:
            return
        from mlflow.entities import Param

        client = self._handler.client
        logged = client.get_run(run_id).data.params
        changed = sorted(k for k, v in self.params.items() if k in logged and logged[k] != v)
        if changed:  # a resumed MLflow run keeps its params; MLflow refuses to change them
            logger.warning("MLflow run %s keeps its logged params %s (this run: %s)", run_id,
                           {k: logged[k] for k in changed}, {k: self.params[k] for k in changed})
        new = [Param(k, v) for k, v in self.params.items() if k not in logged]
        if new:
            client.log_batch(run_id, params=new)
        self._params_logged = True

    def _log_best(self, engine: Engine) -> None:
        run_id = self._run_id()
        if run_id is None or not self.best_path.is_file():
            return
        from mlflow.entities import Metric, RunTag

        tags = [RunTag("best_checkpoint", str(self.best_path.resolve()))]
        metrics = []
        state = getattr(self.evaluator, "state", None)
        best_epoch = getattr(state, "best_metric_epoch", -1)
        if best_epoch is not None and best_epoch > 0:
            tags.append(RunTag("best_epoch", str(int(best_epoch))))
            metrics.append(Metric(f"best_{self.metric_name}", float(state.best_metric),
                                  int(time.time() * 1000), int(engine.state.epoch)))
        self._handler.client.log_batch(run_id, metrics=metrics, tags=tags)
