"""The real BUSI dataset ($ULTRAREFINER_BUSI_ROOT, conftest.busi_root): counts, multi-mask merges and leak-free
splits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import busi_root
from ultrarefiner.data.preprocess import preprocess


@pytest.fixture(scope="module")
def busi(tmp_path_factory):
    root = busi_root()
    out = tmp_path_factory.mktemp("busi")
    report = preprocess(root.parent, out, ["BUSI"], test_ratio=0.2, n_splits=5, seed=42, num_workers=2)
    return root, out, report["datasets"]["BUSI"], json.loads((out / "BUSI" / "datalist.json").read_text())


def test_counts(busi):
    _, _, r, dl = busi
    assert r["found"] == 780
    assert r["blank_excluded"] == 133
    assert r["samples"] == 647 == len(dl["training"]) + len(dl["testing"])
    assert r["multi_mask_merged"] == 17
    assert r["bad_files"] == []


def test_duplicates_match_reference_list(busi):
    root, _, r, _ = busi
    lines = [
        ln.rstrip("\n").split("\t")
        for ln in (root / "near_duplicates_dhash.tsv").read_text().splitlines()
        if ln and not ln.startswith("#")
    ][1:]
    reference = {tuple(sorted((a, b))): int(d) for a, b, d in lines if "normal" not in a + b}
    found = {tuple(sorted((a.split("/", 1)[1], b.split("/", 1)[1]))): d for a, b, d in r["duplicate_pair_list"]}
    assert found == reference
    assert ("benign/benign (433).png", "malignant/malignant (145).png") in found


def test_no_near_duplicate_group_across_splits(busi):
    root, _, _, dl = busi
    where = {
        e["source"].split("/", 1)[1]: ("test", -1) if e["fold"] < 0 else ("train", e["fold"])
        for e in dl["training"] + dl["testing"]
    }
    lines = [
        ln.split("\t")
        for ln in (root / "near_duplicates_dhash.tsv").read_text().splitlines()
        if ln and not ln.startswith("#")
    ][1:]
    checked = 0
    for a, b, _ in lines:
        if a in where and b in where:
            assert where[a] == where[b], (a, b, where[a], where[b])
            checked += 1
    assert checked == 43
    groups = {}
    for e in dl["training"] + dl["testing"]:
        assert groups.setdefault(e["group"], e["fold"]) == e["fold"]
    folds = [sum(e["fold"] == k for e in dl["training"]) for k in range(5)]
    assert max(folds) - min(folds) <= 3 and 0.17 < len(dl["testing"]) / 647 < 0.23


def test_merged_mask_is_union(busi):
    root, out, _, dl = busi
    e = next(e for e in dl["training"] + dl["testing"] if e["source"].endswith("benign (195).png"))
    merged = np.asarray(Image.open(out / "BUSI" / e["label"])) > 0
    parts = [
        np.asarray(Image.open(root / "Dataset_BUSI_with_GT" / "benign" / f"benign (195){s}.png").convert("L")) > 127
        for s in ("_mask", "_mask_1", "_mask_2")
    ]
    assert np.array_equal(merged, parts[0] | parts[1] | parts[2])
    image = Image.open(out / "BUSI" / e["image"])
    assert (
        image.mode == "L"
        and image.size == Image.open(root / "Dataset_BUSI_with_GT" / "benign" / "benign (195).png").size
    )


def test_raw_busi_labels_are_read_with_every_lesion(busi, tmp_path):
    """``evaluate`` and ``refine --labels`` on BUSI's own folder (``--label_postfix _mask``) read ``<stem>_mask_1.png``
    and ``_mask_2.png`` into the label, as ``preprocess`` merges them: a prediction of the first lesion alone scored
    Dice 1 before."""
    from ultrarefiner.engines.evaluation.folder_evaluation import score_folders
    from ultrarefiner.engines.inference.refine_folder import read_samples

    root, out, _, dl = busi
    raw = root / "Dataset_BUSI_with_GT" / "benign"
    whole, first = tmp_path / "whole", tmp_path / "first"
    for stem in ("benign (195)", "benign (100)"):  # three lesions, two
        e = next(e for e in dl["training"] + dl["testing"] if e["source"].endswith(f"{stem}.png"))
        for folder, mask in ((whole, out / "BUSI" / e["label"]), (first, raw / f"{stem}_mask.png")):
            folder.mkdir(exist_ok=True)
            Image.fromarray(np.asarray(Image.open(mask).convert("L"))).save(folder / f"{stem}.png")
    rows, _ = score_folders(raw, {"whole": whole, "first": first}, ["dice", "recall"], label_postfix="_mask")
    scores = {r["image"]: r for r in rows}
    assert sorted(scores) == ["benign (100)", "benign (195)"]
    for r in rows:
        assert r["whole_dice"] == 1.0 and r["first_dice"] < 0.99 and r["first_recall"] < 0.99, r
    images = tmp_path / "images"
    images.mkdir()
    (images / "benign (195).png").write_bytes((raw / "benign (195).png").read_bytes())
    good, skipped = read_samples(images, whole, raw, label_postfix="_mask")
    assert not skipped and np.array_equal(good[0]["truth"], np.asarray(Image.open(whole / "benign (195).png")) > 0)
