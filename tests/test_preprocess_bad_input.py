"""Bad files are reported by name and reason and skipped; re-runs are safe; splits are deterministic."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import blob, save, scan
from ultrarefiner.data.preprocess import preprocess
from ultrarefiner.errors import UltraRefinerError


@pytest.fixture
def bad_tree(tmp_path):
    root = tmp_path / "raw" / "BUS"
    for i in range(1, 6):
        save(root / "original" / f"{i:06d}.png", scan(i))
        save(root / "GT" / f"{i:06d}.png", blob())
    good = (root / "original" / "000001.png").read_bytes()
    (root / "original" / "000002.png").write_bytes(good[: len(good) // 2])  # truncated
    (root / "original" / "000003.png").write_bytes(b"not an image at all")  # unreadable
    save(root / "GT" / "000004.png", blob(h=30, w=30, cy=15, cx=15))  # size mismatch
    save(root / "original" / "000007.png", scan(7))  # image without mask
    save(root / "GT" / "000009.png", blob())  # mask without image
    return tmp_path / "raw"


def test_bad_files_are_reported_and_skipped(bad_tree, tmp_path):
    report = preprocess(bad_tree, tmp_path / "out", ["BUS"], n_splits=2, test_ratio=0.0)
    entry = report["datasets"]["BUS"]
    reasons = {
        pathlib.Path(b["file"]).name + ":" + pathlib.Path(b["file"]).parent.name: b["reason"]
        for b in entry["bad_files"]
    }
    assert "truncated" in reasons["000002.png:original"] or "unreadable" in reasons["000002.png:original"]
    assert "unreadable image" in reasons["000003.png:original"]
    assert "differs from image size" in reasons["000004.png:GT"]
    assert reasons["000007.png:original"] == "image without mask"
    assert reasons["000009.png:GT"] == "mask without image"
    assert entry["samples"] == 2  # 000001 and 000005
    saved = json.loads((tmp_path / "out" / "preprocess_report.json").read_text())
    assert len(saved["datasets"]["BUS"]["bad_files"]) == 5


def test_exit_code_nonzero_only_when_nothing_usable(bad_tree, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "ultrarefiner",
        "preprocess",
        "--raw_root",
        str(bad_tree),
        "--output_root",
        str(tmp_path / "o"),
        "--datasets",
        "BUS",
        "--n_splits",
        "2",
        "--test_ratio",
        "0",
    ]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "skipped" in ok.stdout and "mask without image" in ok.stdout
    for f in (bad_tree / "BUS" / "original").glob("00000[15].png"):
        f.write_bytes(b"garbage")
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "no usable sample" in bad.stderr and "Traceback" not in bad.stderr


def test_missing_dataset_folder_is_reported(raw_trees, tmp_path):
    report = preprocess(raw_trees, tmp_path / "o", ["BUS", "BUS_UC"], n_splits=2)
    raw_trees_bus = raw_trees / "BUS"
    assert report["datasets"]["BUS"]["samples"] == 6
    (tmp_path / "empty").mkdir()
    with pytest.raises(UltraRefinerError, match="no usable sample"):
        preprocess(tmp_path / "empty", tmp_path / "o2", ["BUSI"])
    assert (
        json.loads((tmp_path / "o2" / "preprocess_report.json").read_text())["datasets"]["BUSI"]["bad_files"][0][
            "reason"
        ]
        == "dataset folder not found"
    )
    assert raw_trees_bus.is_dir()


def test_rerun_is_idempotent_and_atomic(raw_trees, tmp_path, monkeypatch):
    out = tmp_path / "o"
    preprocess(raw_trees, out, ["BUSI"], n_splits=2)
    first = (out / "BUSI" / "datalist.json").read_bytes()
    pngs = {p: p.read_bytes() for p in (out / "BUSI").rglob("*.png")}
    preprocess(raw_trees, out, ["BUS"], n_splits=2)  # another dataset keeps BUSI's report entry
    assert set(json.loads((out / "preprocess_report.json").read_text())["datasets"]) == {"BUSI", "BUS"}

    # a crash while writing leaves the previous files whole and no temporary file behind
    import ultrarefiner.utils.io as uio

    real_replace = uio.os.replace
    calls = {"n": 0}

    def failing_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated kill")
        real_replace(src, dst)

    monkeypatch.setattr(uio.os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        preprocess(raw_trees, out, ["BUSI"], n_splits=2, num_workers=1)
    monkeypatch.setattr(uio.os, "replace", real_replace)
    assert not list(out.rglob("*.tmp"))
    assert (out / "BUSI" / "datalist.json").read_bytes() == first
    assert all(p.read_bytes() == b for p, b in pngs.items())
    preprocess(raw_trees, out, ["BUSI"], n_splits=2)
    assert (out / "BUSI" / "datalist.json").read_bytes() == first


def test_split_ignores_listing_order(raw_trees, tmp_path, monkeypatch):
    preprocess(raw_trees, tmp_path / "a", ["BUSI", "BUS_UCLM"], n_splits=2)
    real_iterdir = pathlib.Path.iterdir
    rng = np.random.default_rng(1)

    def shuffled(self):
        items = list(real_iterdir(self))
        return iter([items[i] for i in rng.permutation(len(items))])

    monkeypatch.setattr(pathlib.Path, "iterdir", shuffled)
    preprocess(raw_trees, tmp_path / "b", ["BUS_UCLM", "BUSI"], n_splits=2)
    for name in ("BUSI", "BUS_UCLM", "BUSI_BUS_UCLM"):
        assert (tmp_path / "a" / name / "datalist.json").read_bytes() == (
            tmp_path / "b" / name / "datalist.json"
        ).read_bytes()


def test_seed_changes_split(raw_trees, tmp_path):
    a = preprocess(raw_trees, tmp_path / "a", ["BUSI"], n_splits=2, seed=1)
    b = preprocess(raw_trees, tmp_path / "b", ["BUSI"], n_splits=2, seed=2)
    la = json.loads((tmp_path / "a" / "BUSI" / "datalist.json").read_text())["training"]
    lb = json.loads((tmp_path / "b" / "BUSI" / "datalist.json").read_text())["training"]
    assert a["datasets"]["BUSI"]["samples"] == b["datasets"]["BUSI"]["samples"]
    assert [e["image"] for e in la] != [e["image"] for e in lb] or [e["fold"] for e in la] != [e["fold"] for e in lb]
