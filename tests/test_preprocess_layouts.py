"""Each dataset layout is read, normalised and split correctly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from PIL import Image

from ultrarefiner.data.datalist import combined_name, load_split
from ultrarefiner.data.preprocess import preprocess

ALL = ["BUSI", "BUSBRA", "BUS", "BUS_UC", "BUS_UCLM"]


@pytest.fixture
def processed(raw_trees, tmp_path):
    out = tmp_path / "processed"
    report = preprocess(raw_trees, out, ALL, n_splits=2, test_ratio=0.25, num_workers=2)
    return out, report


def _datalist(out, name):
    return json.loads((out / name / "datalist.json").read_text())


def test_counts_per_layout(processed):
    out, report = processed
    d = report["datasets"]
    assert (d["BUSI"]["found"], d["BUSI"]["blank_excluded"], d["BUSI"]["samples"]) == (11, 1, 10)
    assert d["BUSI"]["multi_mask_merged"] == 1
    assert d["BUSBRA"]["samples"] == 10 and d["BUS"]["samples"] == 6 and d["BUS_UC"]["samples"] == 6
    assert d["BUS_UCLM"]["found"] == 6 and d["BUS_UCLM"]["blank_excluded"] == 1
    assert all(not e["bad_files"] for e in d.values())
    assert json.loads((out / "preprocess_report.json").read_text())["datasets"].keys() == set(ALL)


def test_outputs_are_gray_uint8_and_binary_masks(processed):
    out, _ = processed
    for name in ALL:
        for e in _datalist(out, name)["training"] + _datalist(out, name)["testing"]:
            img = Image.open(out / name / e["image"])
            mask = np.asarray(Image.open(out / name / e["label"]))
            assert img.mode == "L" and mask.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, 255} and mask.any()
            assert mask.shape == (img.height, img.width) == (e["height"], e["width"])


def test_busi_merge_uses_luminance_not_alpha(processed):
    out, _ = processed
    entry = next(
        e
        for e in _datalist(out, "BUSI")["training"] + _datalist(out, "BUSI")["testing"]
        if e["source"].endswith("benign (6).png")
    )
    mask = np.asarray(Image.open(out / "BUSI" / entry["label"])) > 0
    # blob (r=8 disc, 197 px) OR the RGBA square 10x10: not the whole image as max-over-channels would give
    assert mask[5:15, 5:15].all() and 250 < mask.sum() < 400


def test_classes_and_patients(processed):
    out, _ = processed
    uclm = {
        e["source"].split("/")[-1]: e
        for e in _datalist(out, "BUS_UCLM")["training"] + _datalist(out, "BUS_UCLM")["testing"]
    }
    assert uclm["ALFA_000.png"]["class"] == "benign" and uclm["BETA_002.png"]["class"] == "malignant"
    assert uclm["ALFA_000.png"]["group"] == uclm["ALFA_001.png"]["group"]  # same patient prefix
    assert uclm["ALFA_000.png"]["fold"] == uclm["ALFA_001.png"]["fold"]
    bra = {
        e["source"].split("/")[-1]: e
        for e in _datalist(out, "BUSBRA")["training"] + _datalist(out, "BUSBRA")["testing"]
    }
    assert bra["bus_0001-l.png"]["group"] == bra["bus_0001-r.png"]["group"] == "BUSBRA/patient_1"
    assert bra["bus_0001-l.png"]["fold"] == bra["bus_0001-r.png"]["fold"]
    assert bra["bus_0003-s.png"]["class"] == "malignant"
    uc = _datalist(out, "BUS_UC")["training"] + _datalist(out, "BUS_UC")["testing"]
    assert {e["class"] for e in uc} == {"benign", "malignant"}


def test_official_busbra_folds(raw_trees, tmp_path):
    out = tmp_path / "off"
    preprocess(raw_trees, out, ["BUSBRA"], test_ratio=0.0, official_folds=True)
    dl = _datalist(out, "BUSBRA")
    assert dl["n_splits"] == 4  # kFold values 1..4 in the fixture, renumbered 0..3
    for e in dl["training"]:
        n = int(e["source"].split("_")[1][:4])
        assert e["fold"] == (n % 4)


def test_generic_folder_layout(raw_trees, tmp_path):
    out = tmp_path / "generic"
    report = preprocess(raw_trees, out, ["OTHER"], layout="folder", n_splits=2, test_ratio=0.2)
    assert report["datasets"]["OTHER"]["samples"] == 5
    assert (
        len(load_split(out / "OTHER" / "datalist.json", None, "trainval"))
        + len(load_split(out / "OTHER" / "datalist.json", None, "test"))
        == 5
    )


def test_busi_class_folders_directly_under_root(raw_trees, tmp_path):
    (raw_trees / "BUSI" / "Dataset_BUSI_with_GT").rename(tmp_path / "moved")
    (tmp_path / "moved").rename(raw_trees / "BUSI2")
    flat = tmp_path / "flat"
    (raw_trees / "BUSI2").rename(flat)
    (raw_trees / "BUSI").rmdir()
    flat.rename(raw_trees / "BUSI")
    report = preprocess(raw_trees, tmp_path / "o", ["BUSI"], n_splits=2)
    assert report["datasets"]["BUSI"]["samples"] == 10


def test_combined_datalist_loads_with_monai(processed):
    out, report = processed
    name = combined_name(ALL)
    assert name == "BUS_BUSBRA_BUSI_BUS_UC_BUS_UCLM" and report["combined"]["name"] == name
    items = load_decathlon_datalist(str(out / name / "datalist.json"), True, "training")
    per = sum(len(_datalist(out, n)["training"]) for n in ALL)
    assert len(items) == per
    assert all(__import__("os").path.isfile(i["image"]) and __import__("os").path.isfile(i["label"]) for i in items)
    # the combined datalist keeps each dataset's folds
    busi = {e["image"]: e["fold"] for e in _datalist(out, "BUSI")["training"]}
    comb = _datalist(out, name)["training"]
    assert all(busi[e["image"][len("../BUSI/") :]] == e["fold"] for e in comb if e["dataset"] == "BUSI")


def test_load_split_folds(processed):
    out, _ = processed
    path = out / "BUSI" / "datalist.json"
    train, val = load_split(path, 0, "train"), load_split(path, 0, "val")
    assert {d["image"] for d in train}.isdisjoint({d["image"] for d in val})
    assert len(train) + len(val) == len(load_split(path, None, "trainval"))
    with pytest.raises(ValueError, match="fold 7 does not exist"):
        load_split(path, 7, "val")
    with pytest.raises(ValueError, match="split must be one of"):
        load_split(path, 0, "dev")
