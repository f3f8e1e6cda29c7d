"""Out-of-fold TransUNet predictions (phase 2 option B): each training image predicted by the model that did not
train on it, test images by every fold model and their mean; bad checkpoints refused with the file named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ultrarefiner.cli import main
from ultrarefiner.engines.checkpoints.checkpoint import save_checkpoint
from ultrarefiner.engines.inference.transunet_predict import predict_probabilities
from ultrarefiner.errors import BadInputError
from ultrarefiner.networks import TransUNet

KWARGS = {"img_size": 32, "num_classes": 2, "in_channels": 1, "variant": "R50-ViT-B_16", "vit_depth": 1}


@pytest.fixture(scope="module")
def fold_models(tmp_path_factory):
    from ultrarefiner.data.preprocess import preprocess
    from ultrarefiner.data.synthetic import write_busi_tree

    tmp = tmp_path_factory.mktemp("oof")
    write_busi_tree(tmp / "raw", n_benign=5, n_malignant=3, n_normal=0, seed=3, size=(72, 88))
    preprocess(tmp / "raw", tmp / "processed", ["BUSI"], n_splits=2, test_ratio=0.25, num_workers=1)
    models = []
    for k in range(2):
        torch.manual_seed(100 + k)  # distinct weights per fold, so a mix-up shows
        model = TransUNet(**KWARGS).eval()
        save_checkpoint(tmp / "ckpt" / "BUSI" / f"fold_{k}" / "best.pt", {"model": model.state_dict(),
                                                                          "network_kwargs": KWARGS})
        models.append(model)
    return tmp, models


def _prob(path) -> np.ndarray:
    return np.asarray(Image.open(path), np.float32) / 255.0


def test_out_of_fold_assignment_and_ensemble(fold_models):
    tmp, models = fold_models
    main(["predict-transunet", "--data_root", str(tmp / "processed"), "--dataset", "BUSI", "--checkpoint_root",
          str(tmp / "ckpt"), "--output_dir", str(tmp / "pred"), "--n_splits", "2", "--device", "cpu"])
    out = tmp / "pred" / "BUSI"
    dl = json.loads((out / "datalist.json").read_text())
    src = json.loads((tmp / "processed" / "BUSI" / "datalist.json").read_text())
    assert len(dl["training"]) == len(src["training"]) and len(dl["testing"]) == len(src["testing"])
    for e in dl["training"]:
        # written by the model of its own (held-out) fold
        assert e["coarse"].startswith(f"fold_{e['fold']}/")
        item = {"image": str(out / e["image"])}
        expected = predict_probabilities(models[e["fold"]], [item], 32, amp=False)[0]
        other = predict_probabilities(models[1 - e["fold"]], [item], 32, amp=False)[0]
        got = _prob(out / e["coarse"])
        assert got.shape == (e["height"], e["width"])
        assert np.abs(got - expected).max() <= 1 / 255 + 1e-6
        assert np.abs(got - other).max() > 2 / 255  # not the model that trained on it
    for e in dl["testing"]:
        folds = [_prob(out / e[f"coarse_fold_{k}"]) for k in range(2)]
        assert np.abs(_prob(out / e["coarse"]) - np.mean(folds, 0)).max() <= 1.5 / 255
    assert list((out / "fold_0" / "overlays").glob("*.png"))


def test_missing_fold_checkpoint_is_named(fold_models, tmp_path):
    tmp, _ = fold_models
    import shutil

    from ultrarefiner.engines.inference.transunet_predict import predict_out_of_fold

    (tmp_path / "ckpt" / "BUSI" / "fold_0").mkdir(parents=True)
    shutil.copy(tmp / "ckpt" / "BUSI" / "fold_0" / "best.pt", tmp_path / "ckpt" / "BUSI" / "fold_0" / "best.pt")
    with pytest.raises(BadInputError, match="fold_1"):
        predict_out_of_fold(tmp / "processed", "BUSI", tmp_path / "ckpt", tmp_path / "o", n_splits=2)


def test_corrupt_checkpoint_is_named(fold_models, tmp_path):
    tmp, _ = fold_models
    bad = tmp_path / "ckpt" / "BUSI"
    for k in range(2):
        (bad / f"fold_{k}").mkdir(parents=True)
        (bad / f"fold_{k}" / "best.pt").write_bytes(b"not a checkpoint")
    from ultrarefiner.engines.inference.transunet_predict import predict_out_of_fold

    with pytest.raises(BadInputError, match="best.pt"):
        predict_out_of_fold(tmp / "processed", "BUSI", tmp_path / "ckpt", tmp_path / "o", n_splits=2)


def test_combined_datalist_keeps_each_datasets_masks(fold_models, tmp_path):
    """Two datasets with the same file names in one combined datalist: each image's coarse mask is its own (a
    per-dataset subfolder), not the other dataset's written over it."""
    import shutil

    from ultrarefiner.data.preprocess import write_combined

    tmp, models = fold_models
    processed = tmp_path / "processed"
    shutil.copytree(tmp / "processed" / "BUSI", processed / "BUSI")
    shutil.copytree(tmp / "processed" / "BUSI", processed / "BUSX")
    dl = json.loads((processed / "BUSX" / "datalist.json").read_text())
    for e in dl["training"] + dl["testing"]:
        e["dataset"] = "BUSX"
        path = processed / "BUSX" / e["image"]
        Image.fromarray(np.asarray(Image.open(path))[:, ::-1].copy()).save(path)  # other pixels, same name
    (processed / "BUSX" / "datalist.json").write_text(json.dumps(dl))
    name = json.loads(write_combined(processed, ["BUSI", "BUSX"]).read_text())["name"]
    for k in range(2):
        shutil.copytree(tmp / "ckpt" / "BUSI" / f"fold_{k}", tmp_path / "ckpt" / name / f"fold_{k}")
    main(["predict-transunet", "--data_root", str(processed), "--dataset", name, "--checkpoint_root",
          str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "pred"), "--n_splits", "2", "--device", "cpu"])
    out = tmp_path / "pred" / name
    combined = json.loads((out / "datalist.json").read_text())
    entries = combined["training"] + combined["testing"]
    assert len({e["coarse"] for e in entries}) == len(entries) == 2 * (len(dl["training"]) + len(dl["testing"]))
    for e in combined["training"]:
        assert f"/coarse/{e['dataset']}/" in e["coarse"]
        expected = predict_probabilities(models[e["fold"]], [{"image": str(out / e["image"])}], 32, amp=False)[0]
        assert np.abs(_prob(out / e["coarse"]) - expected).max() <= 1 / 255 + 1e-6
