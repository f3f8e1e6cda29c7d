"""``evaluate_folders`` / ``python -m ultrarefiner evaluate``: per-image metrics of prediction folders against
labels and the paired comparison with the first folder; bad and missing files are reported, never scored. The
evaluators' report handlers are adapters over the same functions: their rows equal the folder tool's on the same
masks, and they read fields with the one output-or-batch lookup."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor, list_data_collate
from PIL import Image

from ultrarefiner.cli import main
from ultrarefiner.engines.evaluation.e2e_evaluation import E2EReport
from ultrarefiner.engines.evaluation.engine_fields import field, image_stem
from ultrarefiner.engines.evaluation.folder_evaluation import evaluate_folders, score_folders, score_pair
from ultrarefiner.engines.evaluation.metrics import METRIC_NAMES, segmentation_metrics
from ultrarefiner.engines.evaluation.refiner_evaluation import RefinerReport
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
    dice = report["comparisons"]["refined_vs_coarse"]["dice"]
    assert dice["n"] == 2 and dice["improved"] == 2 and dice["worsened"] == 0
    assert dice["mean_diff"] == pytest.approx(report["means"]["refined"]["dice"] - report["means"]["coarse"]["dice"])
    assert report["comparisons"]["refined_vs_coarse"]["hd95"]["lower_is_better"]
    rows = list(csv.DictReader(open(tmp_path / "eval" / "metrics.csv", encoding="utf-8")))
    assert [r["image"] for r in rows] == ["img0", "img1"]
    assert float(rows[1]["refined_dice"]) == 1.0 and (rows[0]["height"], rows[0]["width"]) == ("40", "50")
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["n"] == 2
    comparison = list(csv.DictReader(open(tmp_path / "eval" / "comparison.csv", encoding="utf-8")))
    assert [(r["dataset"], r["comparison"], r["metric"]) for r in comparison][:2] == [
        ("all", "refined_vs_coarse", "dice"), ("all", "refined_vs_coarse", "iou")]
    assert float(comparison[0]["mean_diff"]) == pytest.approx(dice["mean_diff"]) and comparison[0]["improved"] == "2"


def test_cli_names_default_and_bad_inputs(folders, tmp_path, capsys):
    labels, coarse, refined = folders
    main(["evaluate", "--labels", str(labels), "--predictions", f"{coarse},{refined}", "--metrics", "dice,nsd",
          "--output_dir", str(tmp_path / "e")])
    out = capsys.readouterr().out
    assert "run_vs_coarse" in out and "| dice |" in out and "hd95" not in out  # <run>/masks is named after <run>
    assert "2 images scored, 4 files skipped" in out and f"{refined / 'img3.png'}: missing (its label exists)" in out
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


def test_0_1_labels_score_as_0_255_and_blank_labels_are_counted(folders, tmp_path, capsys):
    """Labels written as 0/1 label maps (nnU-Net, MONAI's SaveImage) score as their 0/255 twins (read by luminance
    they were blank: every Dice 0); a label that stays blank is counted and named on the console, and a class-index
    map (lesion = 2), which read as blank, is skipped with its reason."""
    labels, coarse, _ = folders
    levels01 = tmp_path / "labels01"
    levels01.mkdir()
    for f in labels.glob("*.png"):
        Image.fromarray(np.asarray(Image.open(f)) // 255).save(levels01 / f.name)
    want = evaluate_folders(labels, {"coarse": coarse}, n_bootstrap=50)
    got = evaluate_folders(levels01, {"coarse": coarse}, n_bootstrap=50)
    assert want["n"] == 3 and want["means"]["coarse"]["dice"] > 0.4
    assert got["columns"] == want["columns"] and got["n_blank_labels"] == want["n_blank_labels"] == 0
    Image.fromarray(np.asarray(Image.open(labels / "img0.png")) * 0).save(levels01 / "img0.png")
    Image.fromarray(np.asarray(Image.open(labels / "img1.png")) // 255 * 2).save(levels01 / "img1.png")
    main(["evaluate", "--labels", str(levels01), "--predictions", str(coarse), "--output_dir", str(tmp_path / "e")])
    out = capsys.readouterr().out
    assert "1 label(s) have no lesion pixel" in out
    assert f"{levels01 / 'img1.png'}: label holds only the values 0, 2, which read as no lesion" in out
    rows = list(csv.DictReader(open(tmp_path / "e" / "metrics.csv", encoding="utf-8")))
    areas = {r["image"]: int(r["label_area"]) for r in rows}
    assert sorted(areas) == ["img0", "img3"] and areas["img0"] == 0 < areas["img3"]  # img2: its coarse mask's size


def test_postfixes_match_monai_and_busi_names(folders, tmp_path, capsys):
    """Labels named <stem>_mask.png (BUSI) and predictions <stem>_seg.png (MONAI's SaveImage) are matched with
    --label_postfix and --postfixes (one per folder, none for no postfix); without them the skipped files say which
    option to set."""
    labels, coarse, refined = folders
    renamed = {labels: tmp_path / "labels_mask", coarse: tmp_path / "coarse_seg"}
    for folder, target in renamed.items():
        target.mkdir()
        for f in folder.iterdir():
            f.rename(target / f"{f.stem}{'_mask' if folder is labels else '_seg'}.png")
    reference = evaluate_folders(tmp_path / "labels_mask", {"coarse": tmp_path / "coarse_seg", "refined": refined},
                                 n_bootstrap=50, label_postfix="_mask", postfixes={"coarse": "_seg"})
    assert reference["n"] == 2 and reference["postfixes"] == {"coarse": "_seg", "refined": ""}
    main(["evaluate", "--labels", str(tmp_path / "labels_mask"), "--predictions",
          f"{tmp_path / 'coarse_seg'},{refined}", "--label_postfix", "_mask", "--postfixes", "_seg,none",
          "--names", "coarse,refined", "--output_dir", str(tmp_path / "eval"), "--n_bootstrap", "50"])
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["n"] == 2 and summary["means"] == reference["means"]
    blind = evaluate_folders(tmp_path / "labels_mask", {"coarse": tmp_path / "coarse_seg"}, n_bootstrap=50)
    assert blind["n"] == 0
    problems = " ".join(p["problem"] for p in blind["skipped"])
    assert "set --label_postfix _mask and --postfixes _seg" in problems
    with pytest.raises(SystemExit) as error:  # no table of NaN: the error says why nothing was scored
        main(["evaluate", "--labels", str(tmp_path / "labels_mask"), "--predictions", str(tmp_path / "coarse_seg")])
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert "no image scored" in err and "set --label_postfix _mask and --postfixes _seg" in err
    with pytest.raises(SystemExit):
        main(["evaluate", "--labels", str(tmp_path / "labels_mask"), "--predictions", f"{coarse},{refined}",
              "--postfixes", "_a,_b,_c"])
    assert "3 postfixes for 2 predictions folders" in capsys.readouterr().err


def test_two_files_of_one_stem_are_reported_not_guessed(folders):
    labels, coarse, refined = folders
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(coarse / "img1.bmp")  # img1.png's twin: which one to score?
    report = evaluate_folders(labels, {"coarse": coarse, "refined": refined}, n_bootstrap=50)
    assert report["n"] == 1  # img0 only
    ambiguous = {p["file"].split("/")[-1] for p in report["skipped"] if p["problem"].startswith("several")}
    assert ambiguous == {"img1.png", "img1.bmp"}


def test_score_pair_takes_every_mask_layout():
    label, pred = _disk(40, 50, 20, 18, 9), _disk(40, 50, 24, 18, 9)
    want = {f"x_{m}": float(v) for m, v in segmentation_metrics(torch.from_numpy(pred)[None].float(),
                                                                torch.from_numpy(label)[None].float()).items()}
    prob = torch.from_numpy(np.where(pred, 0.7, 0.2).astype(np.float32))
    one_hot = torch.stack([1 - prob, prob])
    for layout in (pred, prob, prob[None, None], one_hot):
        assert score_pair(layout, label, prefix="x_") == want
    assert list(score_pair(pred, label, ["hd95", "dice"])) == ["hd95", "dice"]
    with pytest.raises(ValueError, match="differ in shape"):
        score_pair(pred[:30], label)
# ------------------------------------------------------------------------------------------------ engine fields
def test_field_from_output_then_batch_and_a_clear_error():
    item = {"pred": 1, "label": 2}
    decollated = [{"dataset": "BUSI", "label": 9}, {"dataset": "UDIAT"}]
    collated = {"dataset": ["BUSI", "UDIAT"], "bucket": torch.tensor([3, 4]), "flag": True}
    assert field(item, decollated, "label", 1) == 2  # the output item wins
    assert field(item, decollated, "dataset", 1) == "UDIAT"
    assert field(item, collated, "dataset", 1) == "UDIAT" and int(field(item, collated, "bucket", 0)) == 3
    assert field(item, collated, "flag", 1) is True  # not batched: as is
    assert field(item, decollated, "kind", 0, required=False) is None
    with pytest.raises(KeyError, match=r"'kind' is neither in the engine output \(keys: \['label', 'pred'\]\) nor in "
                                       r"the batch \(keys: \['dataset', 'label'\]\)"):
        field(item, decollated, "kind", 0)
    with pytest.raises(KeyError, match="'kind'"):
        field(None, collated, "kind", 0)


def test_image_stem_from_metadata_of_batch_or_output():
    batch = list_data_collate([{"image": MetaTensor(torch.rand(1, 4, 4), meta={"filename_or_obj": f"/x/a{i}.png"})}
                               for i in range(2)])
    assert image_stem({"image": torch.rand(1, 4, 4)}, batch, 1) == "a1"  # a plain output tensor: the batch's name
    assert image_stem({}, [{"image_meta_dict": {"filename_or_obj": "/x/z.png"}}], 0) == "z"
    assert image_stem({"image": MetaTensor(torch.rand(1, 4, 4), meta={"filename_or_obj": "/y/o.png"})}, None) == "o"
    assert image_stem({}, {}, 0) is None


# ------------------------------------------------------------------------------------------------ report handlers
def _cases(n=4, h=40, w=50):
    """Per image: label, coarse probability, refined probability (away from 0.5) and a name; one empty coarse."""
    out = []
    for i in range(n):
        label = _disk(h, w, 20 + 2 * i, 18, 9)
        coarse = np.zeros((h, w), bool) if i == 2 else _disk(h, w, 27 + i, 22, 7 + i % 2)
        refined = _disk(h, w, 20 + 2 * i + (i % 3), 18, 9 - i % 2)
        prob = lambda m: torch.from_numpy(np.where(m, 0.9, 0.1).astype(np.float32))[None]  # noqa: E731
        out.append({"name": f"img{i}", "label": torch.from_numpy(label)[None].float(), "coarse": prob(coarse),
                    "refined": prob(refined)})
    return out


def _run(handler, outputs, batches):
    engine = Engine(lambda e, b: [outputs[b[0]["index"]]])
    handler.attach(engine)
    engine.run([[{"index": i, **b}] for i, b in enumerate(batches)])
    return engine


def _folders(cases, root, names):
    """The cases' label and predictions written as 0/255 masks, as the commands write them."""
    for c in cases:
        _save(root / "labels", c["name"], c["label"][0].numpy() > 0.5)
        for name, key in names.items():
            _save(root / name, c["name"], c[key][0].numpy() > 0.5)
    return {name: root / name for name in names}


def _csv_rows(path):
    return {r["image"]: r for r in csv.DictReader(open(path, encoding="utf-8"))}


def _assert_same_rows(handler_csv, folder_csv, columns):
    got, want = _csv_rows(handler_csv), _csv_rows(folder_csv)
    assert sorted(got) == sorted(want) and len(got) == 4
    for image, row in want.items():
        assert {c: got[image][c] for c in columns} == {c: row[c] for c in columns}, image


def test_e2e_report_rows_equal_evaluate_folders(tmp_path):
    cases = _cases()
    outputs = [{"coarse": c["coarse"], "refined": c["refined"], "pred": c["refined"], "label": c["label"],
                "pred_iou": torch.tensor([0.8]),
                "image": MetaTensor(torch.rand(1, 40, 50), meta={"filename_or_obj": f"/data/{c['name']}.png"})}
               for c in cases]
    handler = E2EReport(tmp_path / "report", n_bootstrap=300)
    engine = _run(handler, outputs, [{"dataset": "BUSI"}] * len(cases))
    folders = _folders(cases, tmp_path, {"coarse": "coarse", "refined": "refined"})
    report = evaluate_folders(tmp_path / "labels", folders, tmp_path / "eval", n_bootstrap=300)
    columns = ["image", "height", "width"] + [f"{k}_{m}" for k in ("coarse", "refined") for m in METRIC_NAMES]
    _assert_same_rows(tmp_path / "report" / "metrics.csv", tmp_path / "eval" / "metrics.csv", columns)
    header = (tmp_path / "report" / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("image,dataset,height,width,coarse_dice") and header.endswith("pred_iou")
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["comparisons"]["all"]["refined_vs_coarse"] == report["comparisons"]["refined_vs_coarse"]
    assert summary["metrics"]["refined_dice"] == report["columns"]["refined_dice"]
    assert engine.state.metrics["test_refined_dice"] == report["means"]["refined"]["dice"]
    assert summary["per_dataset"]["BUSI"]["n_images"] == 4
    assert (tmp_path / "report" / "comparison.csv").read_text().splitlines()[1].startswith("all,refined_vs_coarse,dice")


def test_refiner_report_rows_equal_evaluate_folders(tmp_path):
    cases = _cases()
    outputs = [{"pred": c["refined"], "coarse": c["coarse"], "label": c["label"]} for c in cases]
    batches = [{"source": f"/gone/{c['name']}.png", "dataset": "BUSI", "kind": "sim", "bucket": b, "flip": False}
               for c, b in zip(cases, ["heavy", "mild", "heavy", "perfect"], strict=True)]
    handler = RefinerReport(tmp_path / "report", n_overlays=1, n_bootstrap=300)
    engine = _run(handler, outputs, batches)
    folders = _folders(cases, tmp_path, {"input": "coarse", "refined": "refined"})
    report = evaluate_folders(tmp_path / "labels", folders, tmp_path / "eval", n_bootstrap=300, tolerance=0.01)
    columns = ["image", "height", "width"] + [f"{k}_{m}" for k in ("input", "refined") for m in METRIC_NAMES]
    _assert_same_rows(tmp_path / "report" / "metrics.csv", tmp_path / "eval" / "metrics.csv", columns)
    rows = _csv_rows(tmp_path / "report" / "metrics.csv")
    assert rows["img2"]["bucket"] == "heavy" and rows["img1"]["sample"] == "1" and rows["img0"]["kind"] == "sim"
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["comparisons"]["all"]["refined_vs_input"] == report["comparisons"]["refined_vs_input"]
    buckets = json.loads((tmp_path / "report" / "buckets.json").read_text())
    assert [b["bucket"] for b in buckets] == ["perfect", "mild", "heavy", "all"] and [b["n"] for b in buckets] == [
        1, 1, 2, 4]
    assert buckets[-1]["refined_dice"] == pytest.approx(report["means"]["refined"]["dice"])
    assert buckets[-1]["improved"] == report["comparisons"]["refined_vs_input"]["dice"]["improved"] / 4
    assert engine.state.metrics["test_delta_dice"] == pytest.approx(
        report["means"]["refined"]["dice"] - report["means"]["input"]["dice"])
    assert len(list((tmp_path / "report" / "overlays").glob("*.png"))) == 2  # worst and best, on black


def test_further_lesions_of_a_label_are_merged_with_a_postfix_only(tmp_path):
    """With a label postfix, ``<stem><postfix>_<k>.*`` (BUSI's ``_mask_1``) are further lesions of ``<stem>``'s label;
    a part of another size is skipped naming it. Without a postfix ``a_1.png`` is the label of an image ``a_1``."""
    left, right = _disk(40, 50, 12, 20, 6), _disk(40, 50, 38, 20, 6)
    labels, preds = tmp_path / "labels", tmp_path / "preds"
    _save(labels, "a_mask", left)
    _save(labels, "a_mask_1", right)
    _save(labels, "b_mask", left)
    _save(labels, "b_mask_1", np.zeros((10, 10), bool))
    _save(preds, "a", left | right)
    _save(preds, "b", left)
    rows, skipped = score_folders(labels, {"p": preds}, ["dice"], label_postfix="_mask")
    assert [(r["image"], r["p_dice"], r["label_area"]) for r in rows] == [("a", 1.0, int((left | right).sum()))]
    assert [s["file"] for s in skipped] == [str(labels / "b_mask_1.png")] and "label part is 10x10" in skipped[0][
        "problem"]
    plain, plain_preds = tmp_path / "plain", tmp_path / "plain_preds"
    _save(plain, "a", left)
    _save(plain, "a_1", right)
    for name, mask in (("a", left), ("a_1", right)):
        _save(plain_preds, name, mask)
    rows, skipped = score_folders(plain, {"p": plain_preds}, ["dice"])
    assert [(r["image"], r["p_dice"]) for r in rows] == [("a", 1.0), ("a_1", 1.0)] and not skipped
