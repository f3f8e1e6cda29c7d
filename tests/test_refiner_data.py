"""Phase-2 datasets: frames, flips and cache keys, fold safety, option-B files, real_ratio mixing, shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from refiner_toy import SIZE, write_predictions, write_toy

from ultrarefiner.data.augmented import generate
from ultrarefiner.data.datalist import load_split
from ultrarefiner.data.refiner_data import (
    FoldLeakageError,
    MixedRefinerDataset,
    PredictionCoarseDataset,
    ShardCoarseDataset,
    SimulatedCoarseDataset,
    check_no_fold_leakage,
    load_encoder_image,
    read_probability,
)
from ultrarefiner.errors import BadInputError
from ultrarefiner.networks.sam_geometry import SamGeometry

SAM = SamGeometry("sam", img_size=256)
MEDSAM = SamGeometry("medsam", img_size=256)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("refiner_data")
    datalist = write_toy(root)
    return {"root": root, "datalist": datalist, "pred": write_predictions(datalist, root / "pred")}


@pytest.mark.parametrize("geometry", [SAM, MEDSAM], ids=["sam", "medsam"])
def test_encoder_frame_sample(toy, geometry):
    ds = SimulatedCoarseDataset.from_datalist(toy["datalist"], 0, geometry, flip_prob=0.0)
    assert len(ds) == 8  # 10 lesion images, 2 in fold 0; the blank normal image is dropped
    s = ds[0]
    h, w = geometry.input_size(SIZE)  # sam: (192, 256) content; medsam: squashed (256, 256)
    assert s["image"].shape == (1, 256, 256) and s["image"].dtype == torch.float32
    assert tuple(s["input_size"].tolist()) == (h, w)
    assert s["image"].max() > 1 and (s["image"][:, h:] == 0).all()  # 0-255 scale, zero padding below the content
    assert s["label"].shape == s["coarse"].shape == (1, 64, 64)
    assert tuple(s["original_size"].tolist()) == (64, 64) and tuple(s["native_size"].tolist()) == SIZE
    assert set(s["label"].unique().tolist()) <= {0.0, 1.0} and 0 <= s["coarse"].min() <= s["coarse"].max() <= 1
    lo = -(-h // 4)
    assert (s["label"][:, lo:] == 0).all() and (s["coarse"][:, lo:] == 0).all()  # nothing in SAM's padding
    pred, gt = s["coarse"] > 0.5, s["label"] > 0.5
    dice = 2 * (pred & gt).sum() / (pred.sum() + gt.sum())
    assert abs(float(dice) - float(s["input_dice"])) < 1e-6
    assert s["bucket"] in ("perfect", "mild", "heavy", "empty") and s["kind"] == "simulated"
    # the image is the exact reference resize of the native file
    ref = load_encoder_image(s["source"], False, geometry)
    assert torch.equal(s["image"][:, :h, :w], ref)


def test_native_frame_and_image_free_samples(toy):
    ds = SimulatedCoarseDataset.from_datalist(toy["datalist"], 1, SAM, frame="native", flip_prob=0.0)
    s = ds[0]
    assert s["label"].shape == s["coarse"].shape == (1, *SIZE)
    assert tuple(s["original_size"].tolist()) == SIZE and s["image"].shape == (1, 192, 256)
    lean = SimulatedCoarseDataset.from_datalist(toy["datalist"], 1, SAM, flip_prob=0.0, with_image=False)
    t = lean[0]
    assert "image" not in t and t["image_key"] == ds[0]["image_key"] and tuple(t["input_size"].tolist()) == (192, 256)


def test_flips_have_distinct_keys_and_mirror_the_image(toy):
    plain = SimulatedCoarseDataset.from_datalist(toy["datalist"], 0, MEDSAM, flip_prob=0.0)
    flipped = SimulatedCoarseDataset.from_datalist(toy["datalist"], 0, MEDSAM, flip_prob=1.0)
    a, b = plain[3], flipped[3]
    assert a["source"] == b["source"] and a["image_key"] != b["image_key"]
    assert not a["flip"] and b["flip"]
    assert torch.equal(b["image"], load_encoder_image(b["source"], True, MEDSAM))
    assert (b["image"] - a["image"].flip(-1)).abs().mean() < 2.0  # the same scan mirrored (resize of the flip)
    both = SimulatedCoarseDataset.from_datalist(toy["datalist"], 0, MEDSAM, flip_prob=0.5, samples_per_image=4)
    keys = {both[i]["image_key"] for i in range(len(both))}
    sources = both.encoder_sources()
    assert len(sources) == len({k for k, _, _ in sources}) == 2 * len(both.image_paths())
    assert keys <= {k for k, _, _ in sources} and len(keys) > len(both.image_paths())  # both flips drawn


def test_online_simulation_reproducible_per_epoch(toy):
    ds = SimulatedCoarseDataset.from_datalist(toy["datalist"], 0, SAM, seed=3, with_image=False)
    a = ds[2]["coarse"]
    assert torch.equal(a, ds[2]["coarse"])
    ds.set_epoch(1)
    assert not torch.equal(a, ds[2]["coarse"])
    ds.set_epoch(0)
    assert torch.equal(a, ds[2]["coarse"])


def test_fold_leakage_refused(toy, tmp_path):
    dl = toy["datalist"]
    with pytest.raises(FoldLeakageError, match="validation fold 0"):
        SimulatedCoarseDataset(load_split(dl, None, "trainval"), 0, SAM)
    # a fold label that lies is still caught by path against the datalist's validation split
    val = [it["image"] for it in load_split(dl, 0, "val")]
    lying = [{**it, "fold": 3} for it in load_split(dl, 0, "val")]
    with pytest.raises(FoldLeakageError):
        SimulatedCoarseDataset(lying, 0, SAM, val_images=val)
    ok = SimulatedCoarseDataset.from_datalist(dl, 0, SAM)
    assert not set(ok.image_paths()) & set(val)
    with pytest.raises(FoldLeakageError):
        check_no_fold_leakage([("a.png", 1), ("b.png", 2)], 2)
    with pytest.raises(FoldLeakageError, match="test split"):  # never, even without a held-out fold
        check_no_fold_leakage([("a.png", 1), ("t.png", -1)], None)
    # option B: training items of fold k excluded; an in-sample prediction refused
    real = PredictionCoarseDataset(toy["pred"], 0, SAM)
    assert len(real) == 8 and all(it["fold"] != 0 for it in real.items)
    meta = json.loads(toy["pred"].read_text())
    bad = tmp_path / "pred_in_sample"
    bad.mkdir()
    for e in meta["training"]:
        if e["fold"] == 1:
            e["coarse"] = e["coarse"].replace("fold_1/", "fold_2/")  # model 2 trained on fold 1
        for key in ("image", "label", "coarse"):
            e[key] = str(toy["pred"].parent / e[key])
    (bad / "datalist.json").write_text(json.dumps(meta))
    with pytest.raises(FoldLeakageError, match="out-of-fold"):
        PredictionCoarseDataset(bad, 0, SAM, check_files=False)
    # mixing datasets of different folds
    with pytest.raises(FoldLeakageError):
        MixedRefinerDataset(SimulatedCoarseDataset.from_datalist(dl, 1, SAM), real, 0.5)


def test_shards_fold_checked(toy, tmp_path):
    processed = toy["datalist"].parent.parent
    generate(processed, tmp_path / "aug", ["TOY"], 16, fold=0, shard_size=8, resolution=64, progress=False)
    generate(processed, tmp_path / "aug_all", ["TOY"], 8, fold=None, shard_size=8, resolution=64, progress=False)
    ds = ShardCoarseDataset(tmp_path / "aug" / "TOY" / "fold_0", 0, SAM, datalist=toy["datalist"], flip_prob=0.0)
    s = ds[5]
    assert s["label"].shape == s["coarse"].shape == (1, 64, 64) and s["image"].shape == (1, 256, 256)
    rec = ds.shards.records[5][1]
    assert s["bucket"] == rec["bucket"] and s["source"] == rec["image"]
    assert torch.equal(s["image"][:, :192], load_encoder_image(rec["image"], False, SAM))  # native source image
    from_shard = ShardCoarseDataset(tmp_path / "aug" / "TOY" / "fold_0", 0, SAM, image_source="shard")
    assert from_shard[5]["image_key"] != s["image_key"]  # a 64-pixel copy is another encoder input
    with pytest.raises(BadInputError, match="not fold 0"):
        ShardCoarseDataset(tmp_path / "aug_all" / "TOY", 0, SAM)  # made from all training images


def test_prediction_files_missing_or_bad(toy, tmp_path):
    import shutil

    pred = tmp_path / "pred"
    shutil.copytree(toy["pred"].parent, pred / "TOY")
    meta = json.loads((pred / "TOY" / "datalist.json").read_text())
    for e in meta["training"] + meta["testing"]:  # the copy moved: re-anchor image/label paths
        e["image"] = str(toy["pred"].parent / e["image"])
        e["label"] = str(toy["pred"].parent / e["label"])
    (pred / "TOY" / "datalist.json").write_text(json.dumps(meta))
    ds = PredictionCoarseDataset(pred, 2, SAM, dataset="TOY", flip_prob=0.0)
    s = ds[0]
    assert s["kind"] == "real" and s["coarse"].shape == (1, 64, 64) and 0.3 < float(s["input_dice"]) < 1.0
    missing = pred / "TOY" / ds.items[1]["coarse_rel"]
    missing.unlink()
    with pytest.raises(BadInputError, match=str(missing.name).replace("(", r"\(").replace(")", r"\)")):
        PredictionCoarseDataset(pred, 2, SAM, dataset="TOY")
    with pytest.raises(BadInputError) as err:  # discovered at read time when not checked up front
        PredictionCoarseDataset(pred, 2, SAM, dataset="TOY", check_files=False)[1]
    assert str(missing) in str(err.value)
    corrupt = pred / "TOY" / ds.items[2]["coarse_rel"]
    corrupt.write_bytes(b"not a png")
    with pytest.raises(BadInputError) as err:
        ds[2]
    assert str(corrupt) in str(err.value)
    npy = tmp_path / "p.npy"
    np.save(npy, np.full((5, 5), 1.5, np.float32))
    with pytest.raises(BadInputError, match="p.npy.*probabilities"):
        read_probability(npy)
    np.save(npy, np.zeros((5, 6), np.float32))
    with pytest.raises(BadInputError, match="differs from the image size"):
        read_probability(npy, (5, 5))
    with pytest.raises(BadInputError, match="no prediction datalist"):
        PredictionCoarseDataset(tmp_path / "nowhere", 0, SAM, dataset="TOY")


def test_prediction_splits(toy):
    val = PredictionCoarseDataset(toy["pred"], 3, SAM, split="val")
    assert {it["fold"] for it in val.items} == {3} and all("fold_3/" in it["coarse_rel"] for it in val.items)
    test = PredictionCoarseDataset(toy["pred"], 3, SAM, split="test", frame="native")
    assert all(it["coarse_rel"].startswith("fold_3/") for it in test.items) and test[0]["label"].shape == (1, *SIZE)
    ensemble = PredictionCoarseDataset(toy["pred"], None, SAM, split="test")
    assert all(it["coarse_rel"].startswith("ensemble/") for it in ensemble.items)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 1.0])
def test_real_ratio_mixing(toy, ratio):
    sim = SimulatedCoarseDataset.from_datalist(toy["datalist"], 0, SAM, with_image=False)
    real = PredictionCoarseDataset(toy["pred"], 0, SAM, with_image=False)
    mixed = MixedRefinerDataset(sim, real, real_ratio=ratio, length=40, seed=1)
    plan = mixed.plan()
    assert len(mixed) == len(plan) == 40
    n_real = sum(which for which, _ in plan)
    assert n_real == round(ratio * 40)
    if 0 < ratio < 1:
        # every real sample used before any repeats, and both sources spread over the epoch
        real_idx = [i for which, i in plan if which]
        assert len(set(real_idx)) == min(len(real), n_real)
        mixed.set_epoch(1)
        assert mixed.plan() != plan and sum(w for w, _ in mixed.plan()) == n_real
        kinds = {mixed[i]["kind"] for i in range(40)}
        assert kinds == {"simulated", "real"}
    assert mixed.fold == 0 and len(mixed.encoder_sources()) == 2 * 8  # 8 training images, 2 flips each


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_one_source_at_its_length_is_served_as_it_is(toy, ratio):
    """The bundle always builds a ``MixedRefinerDataset``: with one source it must give that dataset's own samples in
    its own order (what the source alone gives), not a permutation."""
    sim = SimulatedCoarseDataset.from_datalist(toy["datalist"], 0, SAM, with_image=False)
    real = PredictionCoarseDataset(toy["pred"], 0, SAM, with_image=False)
    only = real if ratio else sim
    mixed = MixedRefinerDataset(None if ratio else sim, real if ratio else None, real_ratio=ratio, seed=1)
    for epoch in (0, 3):
        mixed.set_epoch(epoch)
        assert len(mixed) == len(only) and mixed.plan() == [(int(ratio), i) for i in range(len(only))]
        for i in (0, len(only) - 1):
            a, b = mixed[i], only[i]
            assert a["image_key"] == b["image_key"] and torch.equal(a["coarse"], b["coarse"])
    assert mixed.encoder_sources() == only.encoder_sources()
