"""``python -m monai.bundle run ... --tracking mlflow`` (MONAI's default MLflow settings) on the three train configs.

Each bundle trains 2 tiny epochs on phantoms with tracking on; the local store (MONAI's default: a SQLite file under
the run's ``output_dir``, or ``--tracking_uri``) is read back with mlflow's client: the config's hyperparameters as
params, per-epoch training loss and validation Dice, per-iteration loss, the best checkpoint's path, epoch and metric,
and the executed config as an artifact.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from mlflow import MlflowClient
from monai.utils import path_to_sqlite_uri
from test_bundle_ultrarefiner import TINY as UR_TINY
from test_bundle_ultrarefiner import write_phase1, write_phase2

from bundle_utils import assert_ok, bundle_cmd, phantom_overrides, preprocessed_phantoms
from ultrarefiner.engines.training.tracking import EpochLoss, TrackingExtras

EPOCHS = 2
TU_TINY = {"img_size": 32, "vit_depth": 1, "batch_size": 2, "num_workers": 0, "cache": "none", "epoch_length": 2}
SR_TINY = {"sam_def": "$ultrarefiner.networks.build_tiny_sam(img_size=64)", "sam_checkpoint": "", "batch_size": 2,
           "num_workers": 0, "epoch_length": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = preprocessed_phantoms(tmp_path_factory.mktemp("mlflow"), n_benign=4, n_malignant=3)
    write_phase1(root / "ckpt")  # phase 3 starts from phase-1/phase-2 checkpoints
    write_phase2(root / "ckpt")
    return root


def only_run(store: Path, experiment: str = "monai_experiment"):
    client = MlflowClient(tracking_uri=path_to_sqlite_uri(str(store)))
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {store}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def steps(client: MlflowClient, run, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


def values(client: MlflowClient, run, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}


def check_run(client: MlflowClient, run, fold_dir: Path, params: dict[str, str], iterations: int) -> None:
    """What every tracked train run logs: params, per-epoch loss/Dice, per-iteration loss, best checkpoint."""
    assert run.info.status == "FINISHED"
    logged = run.data.params
    assert {k: logged.get(k) for k in params} == params
    assert logged["epochs"] == str(EPOCHS) and logged["dataset_name"] == "BUSI" and logged["fold"] == "0"
    epochs = list(range(1, EPOCHS + 1))
    assert steps(client, run, "train_epoch_loss") == epochs  # mean training loss of each epoch
    assert steps(client, run, "val_mean_dice") == epochs  # validation Dice of each epoch
    assert steps(client, run, "train_mean_dice") == epochs
    assert steps(client, run, "train_loss") == list(range(1, iterations + 1))  # every iteration
    loss = values(client, run, "train_loss")
    epoch_loss = values(client, run, "train_epoch_loss")
    per_epoch = iterations // EPOCHS
    for e in epochs:  # the epoch loss is the mean of that epoch's iteration losses
        mean = sum(loss[i] for i in range((e - 1) * per_epoch + 1, e * per_epoch + 1)) / per_epoch
        assert epoch_loss[e] == pytest.approx(mean, rel=1e-5)

    best_path = fold_dir / "best.pt"
    assert run.data.tags["best_checkpoint"] == str(best_path.resolve()) and best_path.is_file()
    best = torch.load(best_path, weights_only=False)
    assert run.data.tags["best_epoch"] == str(best["epoch"])
    dice = values(client, run, "val_mean_dice")
    assert dice[best["epoch"]] == pytest.approx(best["metric"], abs=1e-6) == max(dice.values())
    assert values(client, run, "best_val_mean_dice")[EPOCHS] == pytest.approx(best["metric"], abs=1e-6)
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert any(a.startswith("config_") and a.endswith(".json") for a in artifacts), artifacts


def test_transunet_default_store_under_output_dir(data):
    res = bundle_cmd("run", "transunet", ["train.json"],
                     {**phantom_overrides(data, TU_TINY, ckpt_root=str(data / "tu")), "epochs": EPOCHS,
                      "tracking": "mlflow"})
    assert_ok(res)
    fold_dir = data / "tu" / "transunet" / "BUSI" / "fold_0"
    client, run = only_run(fold_dir / "mlruns.db")  # DEFAULT_MLFLOW_SETTINGS: <output_dir>/mlruns.db
    check_run(client, run, fold_dir, {"phase": "transunet", "network.img_size": "32", "network.vit_depth": "1",
                                      "batch_size": "2", "learning_rate": "0.01", "momentum": "0.9"},
              iterations=EPOCHS * 2)


def test_sam_refiner_with_tracking_uri_experiment_and_run_name(data, tmp_path):
    store = tmp_path / "store" / "mlruns.db"
    res = bundle_cmd("run", "sam_refiner", ["train.json"],
                     {**phantom_overrides(data, SR_TINY, ckpt_root=str(data / "sr")), "epochs": EPOCHS,
                      "tracking": "mlflow", "tracking_uri": path_to_sqlite_uri(str(store)),
                      "experiment_name": "refiner_runs", "run_name": "fold0_tiny"})
    assert_ok(res)
    client, run = only_run(store, "refiner_runs")
    assert run.info.run_name == "fold0_tiny"
    check_run(client, run, data / "sr" / "sam_refiner" / "BUSI" / "fold_0",
              {"phase": "sam_refiner", "model_type": "lite_medsam", "learning_rate": "0.0001",
               "change_penalty_weight": "0.1", "data_source": "simulated", "refiner.use_mask_prompt": "True"},
              iterations=EPOCHS * 2)
    assert steps(client, run, "val_input_dice") == [1, 2]


def test_ultrarefiner_end_to_end(data):
    res = bundle_cmd("run", "ultrarefiner", ["train.json"],
                     {**phantom_overrides(data, UR_TINY), "epochs": EPOCHS, "tracking": "mlflow"})
    assert_ok(res)
    fold_dir = data / "ckpt" / "ultrarefiner" / "BUSI" / "fold_0"
    client, run = only_run(fold_dir / "mlruns.db")
    check_run(client, run, fold_dir, {"phase": "ultrarefiner", "network.sam.model_type": "tiny",
                                      "network.transunet.hidden_size": "32", "transunet_lr": "0.0001",
                                      "sam_lr": "1e-05", "refined_weight": "0.7"},
              iterations=EPOCHS * 2)
    # the validation report's means (added when the evaluator completes) carry their own epoch, not the next one
    assert values(client, run, "val_refined_dice") == pytest.approx(values(client, run, "val_mean_dice"), abs=1e-6)


def test_extras_do_nothing_without_tracking(tmp_path):
    """No MLFlowHandler attached (no --tracking): the handler is inert; EpochLoss is the epoch mean of the loss."""
    losses = iter([1.0, 3.0, 2.0, 6.0])
    trainer = Engine(lambda engine, batch: {"loss": torch.tensor(next(losses))})
    EpochLoss().attach(trainer, "train_epoch_loss")
    TrackingExtras({"a": {"b": 1}}, tmp_path).attach(trainer)
    seen = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(e.state.metrics["train_epoch_loss"]))
    trainer.run([0, 1], max_epochs=2)
    assert seen == [2.0, 4.0]
    assert not list(tmp_path.iterdir())
