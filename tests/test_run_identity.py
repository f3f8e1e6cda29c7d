"""Runs of one phase on two datasets (or folds) never share checkpoints: every phase writes to
``<ckpt_root>/<bundle>/<dataset>/fold_<k>``, every checkpoint records its phase, dataset, fold and network
fingerprint, and resume refuses a ``last.pt`` of another run with a message naming the file and both identities."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser

from ultrarefiner.engines.checkpoints.checkpoint import (
    TrainingCheckpoints,
    config_fingerprint,
    export_best,
    run_identity,
)
from ultrarefiner.errors import BadInputError, CheckpointMismatchError

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
NET = {"k": 1}


def _config(bundle: str, **ids) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
    for k, v in ids.items():
        parser[k] = v
    return parser


@pytest.mark.parametrize("bundle", ["transunet", "sam_refiner", "ultrarefiner"])
def test_output_dir_names_the_bundle_dataset_and_fold(bundle, tmp_path):
    dirs = {name: _config(bundle, ckpt_root=str(tmp_path), dataset_name=name, fold=3).get_parsed_content("output_dir")
            for name in ("BUSI", "BUSBRA")}
    assert {k: Path(v) for k, v in dirs.items()} == {name: tmp_path / bundle / name / "fold_3" for name in dirs}


@pytest.mark.parametrize("bundle", ["transunet", "sam_refiner", "ultrarefiner"])
def test_training_checkpoints_record_the_bundle_dataset_and_fold(bundle):
    parser = _config(bundle)
    handler = next(h for h in parser["train"]["handlers"] if h["_target_"].endswith("TrainingCheckpoints"))
    assert (handler["phase"], handler["dataset"], handler["fold"]) == (bundle, "@dataset_name", "@fold")
    assert handler["settings"]["epochs"] == "@epochs"


def test_phase3_defaults_follow_the_phase1_and_phase2_paths(tmp_path):
    parser = _config("ultrarefiner", ckpt_root=str(tmp_path), dataset_name="BUSBRA", fold=2)
    assert Path(parser.get_parsed_content("transunet_ckpt")) == tmp_path / "transunet" / "BUSBRA" / "fold_2" / "best.pt"
    assert Path(parser.get_parsed_content("refiner_ckpt")) == tmp_path / "sam_refiner" / "BUSBRA" / "fold_2" / "best.pt"
    # the paths phase 1 and phase 2 write to, with the same dataset and fold
    for bundle in ("transunet", "sam_refiner"):
        out = _config(bundle, ckpt_root=str(tmp_path), dataset_name="BUSBRA", fold=2).get_parsed_content("output_dir")
        assert Path(out) / "best.pt" == Path(parser.get_parsed_content(
            "transunet_ckpt" if bundle == "transunet" else "refiner_ckpt"))


def _train(ckpt_dir: Path, epochs: int = 1, phase: str = "sam_refiner", dataset: str = "BUSI", fold: int = 0,
           network_kwargs: dict | None = None, settings: dict | None = None) -> Engine:
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)

    def step(engine, batch):
        opt.zero_grad()
        loss = net(batch).pow(2).mean()
        loss.backward()
        opt.step()
        return loss.item()

    trainer, evaluator = Engine(step), Engine(lambda e, b: None)
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_mean_dice=0.5))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run([0]))
    TrainingCheckpoints(ckpt_dir, net, opt, evaluator, network_kwargs=network_kwargs or NET, phase=phase,
                        dataset=dataset, fold=fold, settings=settings or {"epochs": epochs}).attach(trainer)
    trainer.run([torch.ones(4, 2)] * 2, max_epochs=epochs)
    return trainer


def test_checkpoints_record_their_run(tmp_path):
    _train(tmp_path, settings={"epochs": 1, "learning_rate": 0.01})
    expected = {"phase": "sam_refiner", "dataset": "BUSI", "fold": 0, "fingerprint": config_fingerprint(NET)}
    for name in ("last.pt", "best.pt"):
        obj = torch.load(tmp_path / name, weights_only=True)  # identity and settings are plain JSON types
        assert obj["identity"] == expected
        assert obj["settings"] == {"optimizer": "SGD", "epochs": 1, "learning_rate": 0.01}
    # the fingerprint is of what must match: key order and 4 vs 4.0 (a CLI override) do not change it
    assert config_fingerprint({"a": 4, "b": [1, 2]}) == config_fingerprint({"b": (1, 2), "a": 4.0})
    assert config_fingerprint({"a": 4}) != config_fingerprint({"a": 5})
    assert run_identity("transunet", "BUSI", "2")["fold"] == 2  # a fold given as text on the command line


@pytest.mark.parametrize("other", [{"dataset": "BUSBRA"}, {"fold": 1}, {"phase": "ultrarefiner"}],
                         ids=["dataset", "fold", "phase"])
def test_resume_refuses_another_runs_checkpoint(tmp_path, other):
    _train(tmp_path)
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(CheckpointMismatchError) as e:
        _train(tmp_path, epochs=2, **other)
    msg = str(e.value)
    (field, value), = other.items()
    assert str(tmp_path / "last.pt") in msg and f"{field} differ" in msg
    # both identities: what the file holds, what this run is
    assert "the file holds phase 'sam_refiner', dataset 'BUSI', fold 0" in msg
    assert "this run is " in msg and f"{field} {value!r}" in msg.split("this run is ", 1)[1]
    assert "--resume False" in msg and isinstance(e.value, BadInputError)
    assert e.value.found["dataset"] == "BUSI" and e.value.expected[field] == value
    assert (tmp_path / "last.pt").read_bytes() == before  # nothing overwritten


def test_resume_refuses_other_network_settings(tmp_path):
    _train(tmp_path, network_kwargs={"vit_depth": 12, "img_size": 224})
    with pytest.raises(CheckpointMismatchError, match=r"vit_depth: 12 -> 2") as e:
        _train(tmp_path, epochs=2, network_kwargs={"vit_depth": 2, "img_size": 224})
    assert "network fingerprint" in str(e.value)


def test_matching_checkpoint_resumes_and_changed_settings_are_logged(tmp_path, caplog):
    _train(tmp_path, settings={"epochs": 1, "learning_rate": 0.01})
    with caplog.at_level(logging.INFO, logger="ultrarefiner.engines.checkpoints.checkpoint"):
        trainer = _train(tmp_path, epochs=3, settings={"epochs": 3, "learning_rate": 0.01})
    assert trainer.state.epoch == 3  # resumed at epoch 1, ran two more
    assert torch.load(tmp_path / "last.pt", weights_only=True)["settings"]["epochs"] == 3
    text = caplog.text
    assert "resumed from" in text and "dataset 'BUSI', fold 0" in text
    assert "epochs: 1 -> 3" in text and "learning_rate" not in text.split("changed since the checkpoint", 1)[1]


def test_checkpoint_without_identity_resumes_with_a_warning(tmp_path, caplog):
    _train(tmp_path)
    old = torch.load(tmp_path / "last.pt", weights_only=False)
    for k in ("identity", "settings"):
        old.pop(k)  # as written before identities were recorded
    torch.save(old, tmp_path / "last.pt")
    with caplog.at_level(logging.INFO, logger="ultrarefiner.engines.checkpoints.checkpoint"):
        trainer = _train(tmp_path, epochs=2, dataset="BUSBRA")
    assert trainer.state.epoch == 2 and "records no run identity" in caplog.text


def test_export_best_writes_a_self_describing_file_and_logs_the_run(tmp_path, caplog):
    _train(tmp_path)
    with caplog.at_level(logging.INFO, logger="ultrarefiner.engines.checkpoints.checkpoint"):
        export_best(tmp_path, tmp_path / "model.pt")
    exported = torch.load(tmp_path / "model.pt", weights_only=True)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert exported["kind"] == best["kind"] == "sam_refiner"
    assert exported["network_kwargs"] == NET and exported["identity"] == best["identity"]
    assert set(exported["model"]) == {"weight", "bias"}
    assert all(torch.equal(v, best["model"][k]) for k, v in exported["model"].items())
    assert not {"settings", "optimizer"} & set(exported)
    assert "phase 'sam_refiner', dataset 'BUSI', fold 0" in caplog.text


def test_out_of_fold_predictions_refuse_another_folds_model(tmp_path):
    from ultrarefiner.engines.checkpoints.checkpoint import save_checkpoint
    from ultrarefiner.hub import create_model
    from ultrarefiner.networks import TransUNet

    kwargs = {"img_size": 32, "num_classes": 2, "in_channels": 1, "vit_depth": 1, "hidden_size": 32, "num_heads": 2,
              "mlp_dim": 64, "block_units": [1, 1, 1], "decoder_channels": [32, 16, 16, 8]}
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"model": TransUNet(**kwargs).state_dict(), "network_kwargs": kwargs,
                           "identity": run_identity("transunet", "BUSI", 1, kwargs)})
    assert create_model("transunet", path, identity=run_identity("transunet", "BUSI", 1)) is not None
    with pytest.raises(CheckpointMismatchError, match="fold differ"):
        create_model("transunet", path, identity=run_identity("transunet", "BUSI", 0))


def test_shipped_refiner_without_identity_is_accepted_by_phase3():
    from ultrarefiner.engines.checkpoints.refiner_checkpoint import read_refiner_checkpoint
    from ultrarefiner.engines.training.initialisation import _check_source

    model = BUNDLES / "sam_refiner" / "models" / "model.pt"
    obj = read_refiner_checkpoint(model)
    assert "identity" not in obj  # written before identities were recorded (its SHA-256 is pinned)
    _check_source(model, obj, "sam_refiner", "BUSI", 0, "refiner_ckpt")  # no error: nothing to compare
