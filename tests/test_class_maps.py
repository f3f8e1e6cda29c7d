"""Multi-class label maps read by their class values: ``--label_classes`` / ``--prediction_classes`` of ``evaluate``
(``--mask_classes`` / ``--label_classes`` of ``refine``: tests/test_refine_command.py).

A multi-class segmenter (nnU-Net, MONAI Label) saves 0 background, 1 benign, 2 malignant. By the mask rule those
values read as no lesion (1 or 2 of 255), so such labels are refused and such predictions named, with a pointer to
these options. With them the class values say what is lesion: the map scores as its binary twin does."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from conftest import blob, save
from ultrarefiner.cli import main
from ultrarefiner.data.imaging import class_values, lesion_classes, read_classes, read_labels
from ultrarefiner.engines.evaluation.folder_evaluation import evaluate_folders, format_comparison
from ultrarefiner.errors import BadInputError, BadOptionError


def halves(left: int, right: int) -> np.ndarray:
    """(40, 48) uint8 class map: the blob's left half ``left``, its right half ``right``, 0 elsewhere."""
    out = np.zeros((40, 48), np.uint8)
    inside = blob() > 0
    out[:, :24][inside[:, :24]] = left
    out[:, 24:][inside[:, 24:]] = right
    return out


@pytest.mark.parametrize("value, expected", [("1,2", (1, 2)), ("2, 1,2", (1, 2)), (2, (2,)), ((1, 2), (1, 2)),
                                             (["3"], (3,)), (None, ()), ("", ())])
def test_class_option_values(value, expected):
    assert lesion_classes(value, "label_classes") == expected


@pytest.mark.parametrize("value, message", [("1,a", "whole numbers"), ("1.5", "whole numbers"), ("0,1", "0 is the "
                                            "background"), ("-1", "0 is the background"), (True, "expected class")])
def test_bad_class_option_values_name_the_option(value, message):
    with pytest.raises(BadOptionError, match=message) as e:
        lesion_classes(value, "prediction_classes")
    assert "--prediction_classes" in str(e.value)


def test_class_values_of_every_class_map_format(tmp_path):
    """The stored indices, not what the picture shows: a palette PNG's index (its colours may be anything), the
    values of gray, 1-bit, 16-bit and float pictures and of a 2D NIfTI (read x first), a gray map saved as RGB."""
    classes = halves(1, 2)
    gray = save(tmp_path / "gray.png", classes)
    palette = Image.fromarray(classes, "P")
    palette.putpalette([0, 0, 0, 200, 30, 30, 30, 200, 30] + [0] * 759)  # class 1 reddish, class 2 greenish
    palette.save(tmp_path / "palette.png")
    Image.fromarray(classes.astype(np.uint16) * 1000).save(tmp_path / "wide.png")  # mode I;16: 0/1000/2000
    Image.fromarray(classes.astype(np.float32)).save(tmp_path / "float.tif")
    save(tmp_path / "rgb.png", classes, "RGB")
    Image.fromarray(classes > 0).save(tmp_path / "onebit.png")
    nib.save(nib.Nifti1Image(np.ascontiguousarray(classes.T[:, :, None]), np.eye(4)), str(tmp_path / "map.nii.gz"))
    for name in ("gray.png", "palette.png", "float.tif", "rgb.png", "map.nii.gz"):
        assert np.array_equal(class_values(tmp_path / name), classes), name
    assert np.array_equal(class_values(tmp_path / "wide.png"), classes.astype(np.int64) * 1000)
    assert np.array_equal(class_values(tmp_path / "onebit.png"), (classes > 0).astype(np.uint8))
    assert np.array_equal(read_classes(gray, (1, 2))[0], blob() > 0)
    assert np.array_equal(read_classes(tmp_path / "palette.png", (2,))[0], classes == 2)
    assert read_classes(tmp_path / "wide.png", (2000,))[0].sum() == (classes == 2).sum()


def test_files_that_are_no_class_maps_are_refused_or_named(tmp_path):
    colour = np.zeros((40, 48, 3), np.uint8)
    colour[..., 0] = blob()  # a red drawing: its colours are no indices
    save(tmp_path / "red.png", colour)
    Image.fromarray(np.where(blob() > 0, 0.8, 0.1).astype(np.float32)).save(tmp_path / "soft.tif")
    with pytest.raises(BadInputError, match="in colour: a class map stores class indices in one channel") as e:
        read_classes(tmp_path / "red.png", (1,))
    assert e.value.path == str(tmp_path / "red.png")
    with pytest.raises(BadInputError, match="not whole numbers .a probability map.") as e:
        read_classes(tmp_path / "soft.tif", (1,))
    assert e.value.path == str(tmp_path / "soft.tif")
    # a 0/255 mask given class values is read as no lesion, and the note says which values it does hold
    mask, note = read_classes(save(tmp_path / "binary.png", blob()), (1, 2))
    assert not mask.any() and note == "holds the values 0, 255, none of the classes 1, 2"
    mask, note = read_classes(save(tmp_path / "empty.png", np.zeros((40, 48), np.uint8)), (1,))
    assert not mask.any() and note == ""  # truly empty: nothing to say


def test_label_parts_are_merged_by_their_classes(tmp_path):
    """BUSI-style parts (<stem>_mask.png, <stem>_mask_1.png) as class maps: the union of their lesion classes,
    without read_label's refusal of a 0/2 map."""
    first = save(tmp_path / "a_mask.png", halves(1, 0))
    second = save(tmp_path / "a_mask_1.png", halves(0, 2))
    assert np.array_equal(read_labels([first, second], (1, 2)), blob() > 0)
    with pytest.raises(BadInputError, match="pass --label_classes with the lesion's values"):
        read_labels([first, second], classes_option="label_classes")


def test_evaluate_scores_class_maps_as_their_binary_twins(tmp_path, capsys):
    """Labels and predictions saved as class maps (benign 1, malignant 2) score as their 0/255 twins with
    --label_classes 1,2 --prediction_classes 1,2; one class only makes the other background. Without the options
    the labels are skipped with a pointer to --label_classes, and class-map predictions are named with a pointer to
    --prediction_classes; with them a 0/255 prediction is named ("none of the classes")."""
    shift = np.roll(blob(), 3, axis=1)
    for stem, k in (("benign", 1), ("malignant", 2)):
        save(tmp_path / "labels" / f"{stem}.png", (blob() > 0).astype(np.uint8) * k)
        save(tmp_path / "labels255" / f"{stem}.png", blob())
        save(tmp_path / "classes" / f"{stem}.png", (shift > 0).astype(np.uint8) * k)
        save(tmp_path / "binary" / f"{stem}.png", shift)
    twin = evaluate_folders(tmp_path / "labels255", {"binary": tmp_path / "binary"}, n_bootstrap=10)
    report = evaluate_folders(tmp_path / "labels", {"classes": tmp_path / "classes"}, tmp_path / "eval",
                              n_bootstrap=10, label_classes=(1, 2), prediction_classes=(1, 2))
    assert report["n"] == 2 and not report["skipped"] and not report["notes"]
    assert 0.5 < report["means"]["classes"]["dice"] == twin["means"]["binary"]["dice"] < 1
    assert report["means"]["classes"] == twin["means"]["binary"]
    # class maps against 0/255 masks in one run: the union of their lesion values
    both = evaluate_folders(tmp_path / "labels", {"classes": tmp_path / "classes", "binary": tmp_path / "binary"},
                            n_bootstrap=10, label_classes=(1, 2), prediction_classes=(1, 2, 255))
    assert both["means"]["classes"] == both["means"]["binary"] == twin["means"]["binary"] and not both["notes"]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["label_classes"] == summary["prediction_classes"] == [1, 2]
    # benign only: the malignant label is blank, and the console says by which rule
    benign = evaluate_folders(tmp_path / "labels", {"classes": tmp_path / "classes"}, n_bootstrap=10,
                              label_classes=(1,), prediction_classes=(1,))
    assert benign["n_blank_labels"] == 1
    assert "1 label(s) have no lesion pixel (lesion = --label_classes 1)" in format_comparison(benign)
    # without the options: the 0/2 label refused, naming the option; the class-map predictions named
    plain = evaluate_folders(tmp_path / "labels255", {"classes": tmp_path / "classes"}, n_bootstrap=10)
    assert [n["file"] for n in plain["notes"]] == [str(tmp_path / "classes" / "malignant.png")]
    assert "or pass --prediction_classes with the lesion's values; scored as no lesion" in plain["notes"][0]["problem"]
    assert "1 prediction(s) scored as no lesion hold other values:" in format_comparison(plain)
    refused = evaluate_folders(tmp_path / "labels", {"binary": tmp_path / "binary"}, n_bootstrap=10)
    assert [s["file"] for s in refused["skipped"]] == [str(tmp_path / "labels" / "malignant.png")]
    assert refused["skipped"][0]["problem"].endswith("or pass --label_classes with the lesion's values")
    # 0/255 predictions given class values: scored as empty, and named
    wrong = evaluate_folders(tmp_path / "labels", {"binary": tmp_path / "binary"}, n_bootstrap=10,
                             label_classes=(1, 2), prediction_classes=(1, 2))
    assert wrong["means"]["binary"]["dice"] == 0 and len(wrong["notes"]) == 2
    assert wrong["notes"][0]["problem"] == "holds the values 0, 255, none of the classes 1, 2; scored as no lesion"
    # the command line: the options as fire passes them, and a bad value named
    main(["evaluate", "--labels", str(tmp_path / "labels"), "--predictions", str(tmp_path / "classes"),
          "--label_classes", "1,2", "--prediction_classes", "1,2", "--n_bootstrap", "10"])
    assert f"| dice | {twin['means']['binary']['dice']:.4f} |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--labels", str(tmp_path / "labels"), "--predictions", str(tmp_path / "classes"),
              "--label_classes", "0"])
    assert e.value.code == 2 and "--label_classes: 0 is the background" in capsys.readouterr().err


def test_preprocess_writes_class_maps_as_0_255_masks(tmp_path, capsys):
    """preprocess --label_classes 1,2 takes a folder-layout dataset of class maps (nnU-Net, MONAI Label): each mask
    written as 0/255 where it holds a lesion class, recorded in the report's settings. A mask holding only other
    values (0/255 here, or another class) is excluded as blank and noted, not dropped in silence. Without the option
    the class maps are refused as bad files, and the reason names it."""
    from conftest import scan
    from ultrarefiner.data.preprocess import preprocess

    raw = tmp_path / "raw" / "CLASSES"
    for i in range(8):
        save(raw / "images" / f"case_{i}.png", scan(700 + i))
        save(raw / "masks" / f"case_{i}.png", blob() if i >= 5 else halves(1 + i % 2, 2))
    report = preprocess(tmp_path / "raw", tmp_path / "out", ["CLASSES"], layout="folder", n_splits=2,
                        test_ratio=0.0, label_classes=(1, 2))
    entry = report["datasets"]["CLASSES"]
    assert entry["samples"] == 5 and entry["blank_excluded"] == 3 and not entry["bad_files"]
    assert entry["settings"]["label_classes"] == (1, 2)
    assert entry["notes"] == [f"3 masks hold none of the label classes 1,2 and were excluded as blank, e.g. "
                              f"{raw / 'masks' / 'case_5.png'}: holds the values 0, 255, none of the classes 1, 2"]
    for i in range(5):
        written = np.asarray(Image.open(tmp_path / "out" / "CLASSES" / "masks" / f"case_{i}.png"))
        assert np.array_equal(written, blob()), i
    saved = json.loads((tmp_path / "out" / "preprocess_report.json").read_text())
    assert saved["datasets"]["CLASSES"]["settings"]["label_classes"] == [1, 2]
    # only class 2 is lesion: case_1 and case_3 (class 1 on the left) keep the right half
    only2 = preprocess(tmp_path / "raw", tmp_path / "out2", ["CLASSES"], layout="folder", n_splits=2,
                       test_ratio=0.0, label_classes=(2,))
    assert only2["datasets"]["CLASSES"]["samples"] == 5
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out2" / "CLASSES" / "masks" / "case_0.png")) > 0,
                          halves(0, 2) > 0)
    # the command line, without the option: refused, naming it
    main(["preprocess", "--raw_root", str(tmp_path / "raw"), "--output_root", str(tmp_path / "out3"), "--datasets",
          "CLASSES", "--layout", "folder", "--n_splits", "2", "--test_ratio", "0"])
    out = capsys.readouterr().out
    assert "case_1.png: label holds only the values 0, 2" in out and "or pass --label_classes with the lesion's" in out
    assert json.loads((tmp_path / "out3" / "preprocess_report.json").read_text())["datasets"]["CLASSES"][
        "samples"] == 3  # the 0/255 masks
