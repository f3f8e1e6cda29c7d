"""``evaluate_folders`` / ``python -m ultrarefiner evaluate``: per-image metrics of prediction folders against
labels and the paired comparison with the first folder; bad and missing files are reported, never scored."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ultrarefiner.cli import main
from ultrarefiner.engines.evaluation.folder_evaluation import evaluate_folders
from ultrarefiner.engines.evaluation.metrics import segmentation_metrics
from ultrarefiner.errors import BadInputError, BadOptionError


def _disk(h, w, cx, cy, r):
    ys, xs = np.mgrid[:h, :w]
    return ((xs - cx) ** 2 + (ys - cy) ** 2 < r * r)


def _save(folder, name, mask):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{name}.png")


@pytest.fixture()
def folders(tmp_path):
    labels, coarse, refined = tmp_path / "labels", tmp_path / "coarse", tmp_path / "run" / "masks"
    for i in range(4):
        label = _disk(40, 50, 20 + i, 18, 9)
        _save(labels, f"img{i}", label)
        _save(coarse, f"img{i}", _disk(40, 50, 26 + i, 22, 8))  # shifted and smaller
        if i != 3:
            _save(refined, f"img{i}", label if i else _disk(40, 50, 21, 18, 9))
    _save(coarse, "img3_wrong", np.zeros((10, 10), bool))
    (coarse / "img2.png").unlink()
    _save(coarse, "img2", np.zeros((30, 30), bool))  # wrong size for its label
    _save(refined, "stray", np.zeros((40, 50), bool))  # no label of this name
    return labels, coarse, refined


def test_scores_and_paired_comparison(folders, tmp_path):
    labels, coarse, refined = folders
    report = evaluate_folders(labels, {"coarse": coarse, "refined": refined}, tmp_path / "eval", n_bootstrap=200)
    assert report["n"] == 2  # img0 and img1: img2 has a wrong-size coarse mask, img3 no refined mask
    problems = {(p["file"].split("/")[-1], p["problem"].split(" ")[0]) for p in report["skipped"]}
    assert ("img2.png", "mask") in problems and ("img3.png", "missing") in problems
    assert ("stray.png", "no") in problems and ("img3_wrong.png", "no") in problems
    expected = {}
    for name in ("img0", "img1"):
        label = torch.from_numpy(np.asarray(Image.open(labels / f"{name}.png")) > 127)[None].float()
        for kind, folder in (("coarse", coarse), ("refined", refined)):
            pred = torch.from_numpy(np.asarray(Image.open(folder / f"{name}.png")) > 127)[None].float()
            expected[kind, name] = segmentation_metrics(pred, label)
    for kind in ("coarse", "refined"):
        for m in ("dice", "hd95", "nsd"):
            want = np.mean([expected[kind, n][m] for n in ("img0", "img1")])
            assert report["means"][kind][m] == pytest.approx(want)
    assert report["means"]["refined"]["dice"] > 0.95 > 0.8 > report["means"]["coarse"]["dice"]
    dice = report["comparisons"]["refined vs coarse"]["dice"]
    assert dice["n"] == 2 and dice["improved"] == 2 and dice["worsened"] == 0
    assert dice["mean_diff"] == pytest.approx(report["means"]["refined"]["dice"] - report["means"]["coarse"]["dice"])
    assert report["comparisons"]["refined vs coarse"]["hd95"]["lower_is_better"]
    rows = list(csv.DictReader(open(tmp_path / "eval" / "metrics.csv", encoding="utf-8")))
    assert [r["image"] for r in rows] == ["img0", "img1"]
    assert float(rows[1]["refined_dice"]) == 1.0
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["n"] == 2


def test_cli_names_default_and_bad_inputs(folders, tmp_path, capsys):
    labels, coarse, refined = folders
    main(["evaluate", "--labels", str(labels), "--predictions", f"{coarse},{refined}", "--metrics", "dice,nsd",
          "--output_dir", str(tmp_path / "e")])
    out = capsys.readouterr().out
    assert "run vs coarse" in out and "| dice |" in out and "hd95" not in out  # <run>/masks is named after <run>
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["metrics"] == ["dice", "nsd"] and list(summary["folders"]) == ["coarse", "run"]
    with pytest.raises(BadInputError, match="labels folder not found"):
        evaluate_folders(tmp_path / "nope", {"a": coarse})
    with pytest.raises(BadOptionError, match="unknown"):
        evaluate_folders(labels, {"a": coarse}, metrics=["dice", "f1"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInputError, match="no mask files"):
        evaluate_folders(labels, {"a": empty})


def test_two_files_of_one_stem_are_reported_not_guessed(folders):
    labels, coarse, refined = folders
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(coarse / "img1.bmp")  # img1.png's twin: which one to score?
    report = evaluate_folders(labels, {"coarse": coarse, "refined": refined}, n_bootstrap=50)
    assert report["n"] == 1  # img0 only
    ambiguous = {p["file"].split("/")[-1] for p in report["skipped"] if p["problem"].startswith("several")}
    assert ambiguous == {"img1.png", "img1.bmp"}
