"""Masks are read by what their stored values are, wherever UltraRefiner reads a mask: labels, coarse masks and the
datasets ``preprocess`` reads (``mask_levels``).

- 0/1 label maps (nnU-Net's and MONAI's ``SaveImage`` convention for a binary label): read by luminance (> 127)
  they were blank, and a label without its lesion scores every prediction 0 without a word.
- Float probabilities and 16-bit levels (MONAI's ``SaveImage`` scales probabilities by 65535): rescaled by their
  maximum as images are, a soft mask whose highest probability is 0.4 became a lesion."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import blob, save, scan
from ultrarefiner.data.imaging import mask_levels, read_label, read_mask, read_soft_mask
from ultrarefiner.data.preprocess import preprocess
from ultrarefiner.data.refiner_data import read_probability
from ultrarefiner.engines.evaluation.folder_evaluation import score_folders
from ultrarefiner.engines.inference.refine_folder import read_samples
from ultrarefiner.errors import BadInputError


@pytest.mark.parametrize("mode", [None, "RGB", "P"])
def test_a_0_1_mask_reads_as_its_0_255_twin(tmp_path, mode):
    mask = blob()
    twin = save(tmp_path / "levels255.png", mask, mode)
    levels01 = save(tmp_path / "levels01.png", mask // 255, mode)
    assert read_mask(twin).sum() > 0
    assert np.array_equal(read_mask(levels01), read_mask(twin))
    assert np.array_equal(read_soft_mask(levels01), read_soft_mask(twin))
    assert np.array_equal(read_probability(levels01), mask.astype(np.float32) / 255)


def test_other_levels_keep_their_meaning(tmp_path):
    soft = np.where(blob() > 0, 128, 127).astype(np.uint8)  # probability * 255 on both sides of 0.5
    soft[0, 0] = 1
    assert np.array_equal(read_mask(save(tmp_path / "soft.png", soft)), blob() > 0)
    assert np.array_equal(read_soft_mask(tmp_path / "soft.png"), soft)
    blank = np.zeros((8, 8), np.uint8)
    assert not read_mask(save(tmp_path / "blank.png", blank)).any()
    assert np.array_equal(mask_levels(blank), blank)


@pytest.mark.parametrize("colour", [(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0)])
def test_a_mask_drawn_in_colour_reads_as_its_white_twin(tmp_path, colour):
    """A mask drawn in a pure colour on black, RGB, RGBA or with a palette, is lesion where it is drawn (its brightest
    channel): by luminance a red drawing (76) or a blue one (29) read as blank, and a red one on a transparent
    background was refused as "dark opaque region"."""
    from ultrarefiner.transforms.io import LoadImageMaskd
    from ultrarefiner.zoo.serving import read_mask as label_prompt

    lesion = blob() > 0
    rgb = np.zeros(lesion.shape + (3,), np.uint8)
    rgb[lesion] = colour
    rgba = np.concatenate([rgb, (lesion * 255).astype(np.uint8)[..., None]], axis=-1)
    palette = Image.fromarray(lesion.astype(np.uint8), "L").convert("P")
    palette.putpalette([0, 0, 0, *colour] + [0] * 762)
    files = [save(tmp_path / "rgb.png", rgb), save(tmp_path / "rgba.png", rgba), tmp_path / "palette.png"]
    palette.save(files[-1])
    load = LoadImageMaskd("image", "label")
    image = save(tmp_path / "scan.png", scan(0, *lesion.shape))
    for f in files:
        assert np.array_equal(read_mask(f), lesion), f.name
        assert np.array_equal(label_prompt(f), lesion.astype(np.uint8)), f.name
        assert np.array_equal(load({"image": str(image), "label": str(f)})["label"].numpy() > 127, lesion), f.name
    assert np.array_equal(read_soft_mask(files[0]), lesion * np.uint8(max(colour)))


def test_preprocess_keeps_a_dataset_of_0_1_masks(tmp_path):
    raw = tmp_path / "raw" / "LEVELS01"
    for i in range(5):
        save(raw / "images" / f"case_{i}.png", scan(900 + i))
        save(raw / "masks" / f"case_{i}.png", blob() // 255)
    report = preprocess(tmp_path / "raw", tmp_path / "out", ["LEVELS01"], layout="folder", n_splits=2,
                        test_ratio=0.2)
    assert report["datasets"]["LEVELS01"]["samples"] == 5  # none excluded as blank
    written = read_mask(tmp_path / "out" / "LEVELS01" / "masks" / "case_0.png")
    assert np.array_equal(written, blob() > 0)


def soft(peak: float) -> np.ndarray:
    """(40, 48) float32 probabilities: 0.05 background, 0.3 over the blob, ``peak`` at its core."""
    p = np.where(blob() > 0, 0.3, 0.05).astype(np.float32)
    p[16:24, 20:28] = peak
    return p


def write(path, p: np.ndarray, storage: str):
    """Store probabilities ``p`` as a float TIFF or a 16-bit PNG (p * 65535, MONAI's ``SaveImage`` scale)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(p, mode="F") if storage == "float" else Image.fromarray(np.round(p * 65535).astype(np.uint16))
    img.save(path)
    assert Image.open(path).mode == ("F" if storage == "float" else "I;16")
    return path


@pytest.mark.parametrize("storage", ["float", "uint16"])
def test_soft_masks_keep_their_probabilities(tmp_path, storage):
    suffix = ".tif" if storage == "float" else ".png"
    unsure = write(tmp_path / "masks" / f"unsure{suffix}", soft(0.45), storage)  # no pixel reaches 0.5: no lesion
    assert int(read_soft_mask(unsure).max()) == round(0.45 * 255)
    assert not read_mask(unsure).any()
    sure = write(tmp_path / "masks" / f"sure{suffix}", soft(0.9), storage)
    core = soft(0.9) > 0.5
    assert np.array_equal(read_mask(sure), core)  # the 0.3 halo stays out: threshold 0.5, not 0.9 / 2
    assert np.abs(read_soft_mask(sure).astype(int) - np.round(soft(0.9) * 255)).max() <= 1
    # refine skips the unsure mask as blank, and refines the sure one
    save(tmp_path / "images" / "unsure.png", scan(1))
    save(tmp_path / "images" / "sure.png", scan(2))
    good, skipped = read_samples(tmp_path / "images", tmp_path / "masks")
    assert [s["stem"] for s in good] == ["sure"] and np.array_equal(good[0]["coarse"] > 127, core)
    assert [s["stem"] for s in skipped] == ["unsure"] and "blank coarse mask" in skipped[0]["reason"]


def test_16_bit_masks_by_their_levels(tmp_path):
    mask = blob() > 0
    for top in (1, 255, 4095, 65535):  # a label map, 8-bit levels, a 12-bit binary mask, full 16-bit
        path = save(tmp_path / f"levels{top}.png", mask.astype(np.uint16) * top)
        assert Image.open(path).mode == "I;16"
        assert np.array_equal(read_mask(path), mask), top
        assert set(np.unique(read_soft_mask(path))) == {0, 255}, top
    three = mask.astype(np.uint16) * 65535
    three[0, 0] = 1000  # more than two levels: 16-bit probabilities, 1000 / 65535 is background
    assert np.array_equal(read_mask(save(tmp_path / "three.png", three)), mask)


@pytest.mark.parametrize("values, problem", [(np.nan, "NaN or infinite"), (-3.5, "negative values"),
                                             (1000.5, "values up to 1000.5")])
def test_float_masks_with_values_that_are_no_levels_are_refused(tmp_path, values, problem):
    p = soft(0.9)
    p[0, 0] = values
    path = write(tmp_path / "bad.tif", p, "float")
    for reader in (read_mask, read_soft_mask):
        with pytest.raises(BadInputError, match=problem) as error:
            reader(path)
        assert error.value.path == str(path)


def class_map(*classes: int) -> np.ndarray:
    """(40, 48) uint8 label map: 0 background, the blob's left half ``classes[0]``, its right half ``classes[-1]``."""
    labels = np.zeros((40, 48), np.uint8)
    inside = blob() > 0
    labels[:, :24][inside[:, :24]] = classes[0]
    labels[:, 24:][inside[:, 24:]] = classes[-1]
    return labels


def test_multi_class_label_maps_are_refused_wherever_labels_are_read(tmp_path):
    """0 background, 1 benign, 2 malignant (nnU-Net / MONAI Label numbering): levels 1 and 2 of 255 read as blank, and
    a malignant case, 0/2 only, was a lesion-free label without a word. Labels now refuse such maps by name."""
    import nibabel as nib

    from ultrarefiner.transforms.io import LoadImageMaskd
    from ultrarefiner.zoo.serving import read_mask as label_prompt

    labels = tmp_path / "labels"
    files = [save(labels / "benign_malignant.png", class_map(1, 2)), save(labels / "malignant.png", class_map(2)),
             save(labels / "wide.png", class_map(1, 2).astype(np.uint16))]
    nib.save(nib.Nifti1Image(class_map(1, 2).T.astype(np.int16), np.eye(4)), str(labels / "nifti.nii.gz"))
    files.append(labels / "nifti.nii.gz")
    for f in files:
        assert not read_mask(f).any(), f.name  # what labels read as before
        with pytest.raises(BadInputError, match="multi-class label map") as error:
            read_label(f)
        assert error.value.path == str(f)
        assert ("values 0, 2," if f.name == "malignant.png" else "values 0, 1, 2,") in error.value.reason
        with pytest.raises(BadInputError, match="multi-class"):
            label_prompt(f)  # the MONAI Label label prompt
    image = save(tmp_path / "scan.png", scan(0))
    with pytest.raises(BadInputError, match="multi-class"):  # the bundles' train / evaluate chains
        LoadImageMaskd("image", "label")({"image": str(image), "label": str(files[1])})

    # batch jobs list the file and go on
    preds = tmp_path / "preds"
    for f in ("benign_malignant", "malignant", "wide", "nifti", "binary"):
        save(preds / f"{f}.png", blob())
    save(labels / "binary.png", blob())
    rows, skipped = score_folders(labels, {"model": preds})
    assert [r["image"] for r in rows] == ["binary"]
    assert sorted(s["file"] for s in skipped) == sorted(str(f) for f in files)
    assert all("multi-class" in s["problem"] for s in skipped)
    images = tmp_path / "images"
    for f in ("malignant", "binary"):
        save(images / f"{f}.png", scan(3))
    good, skipped = read_samples(images, preds, labels)  # refine --labels
    assert [s["stem"] for s in good] == ["binary"]
    assert [s["stem"] for s in skipped] == ["malignant"] and "multi-class" in skipped[0]["reason"]
    raw = tmp_path / "raw" / "CLASSES"
    for i in range(4):
        save(raw / "images" / f"case_{i}.png", scan(700 + i))
        save(raw / "masks" / f"case_{i}.png", class_map(2) if i == 0 else blob())
    report = preprocess(tmp_path / "raw", tmp_path / "out", ["CLASSES"], layout="folder", n_splits=2, test_ratio=0.0)
    bad = report["datasets"]["CLASSES"]["bad_files"]
    assert [b["file"] for b in bad] == [str(raw / "masks" / "case_0.png")] and "multi-class" in bad[0]["reason"]
    assert report["datasets"]["CLASSES"]["samples"] == 3



def test_predictions_and_coarse_masks_that_look_like_class_maps_are_reported(tmp_path):
    """A multi-class segmenter's output (0 background, 2 malignant) reads as no lesion as a prediction or a coarse
    mask too. It is not refused there, since a faint soft map (no pixel above 0.5) is a valid prediction, but it is
    not left silent: evaluate scores it as empty and lists it under "notes" (summary.json and the console), refine's
    skip reason says what the values look like. Faint soft maps (levels above 16, or no background 0) get no note."""
    from ultrarefiner.engines.evaluation.folder_evaluation import evaluate_folders, format_comparison

    labels, preds, images = tmp_path / "labels", tmp_path / "preds", tmp_path / "images"
    for stem in ("classes", "faint", "good"):
        save(labels / f"{stem}.png", blob())
        save(images / f"{stem}.png", scan(5))
    save(preds / "classes.png", class_map(2))
    save(preds / "faint.png", np.round(soft(0.45) * 255).astype(np.uint8))
    save(preds / "fainter.png", np.round(soft(0.06) * 40).astype(np.uint8))  # levels 2, 12: no background 0
    save(labels / "fainter.png", blob())
    save(images / "fainter.png", scan(5))
    save(preds / "good.png", blob())
    report = evaluate_folders(labels, {"model": preds}, tmp_path / "eval", n_bootstrap=10)
    assert report["n"] == 4 and report["skipped"] == []  # all scored: the class map as an empty prediction
    assert [n["file"] for n in report["notes"]] == [str(preds / "classes.png")]
    assert "holds only the values 0, 2, which read as no lesion: a multi-class label map?" in report["notes"][0][
        "problem"] and report["notes"][0]["problem"].endswith("scored as no lesion")
    assert "1 prediction(s) scored as no lesion hold other values:" in format_comparison(report)
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["notes"] == report["notes"]
    good, skipped = read_samples(images, preds)  # refine: the predictions as coarse masks
    assert [s["stem"] for s in good] == ["good"]
    reasons = {s["stem"]: s["reason"] for s in skipped}
    assert reasons["classes"].startswith("blank coarse mask: holds only the values 0, 2, which read as no lesion")
    assert reasons["faint"] == reasons["fainter"] == "blank coarse mask: no pixel above 0.5, nothing to refine"

def test_labels_that_are_no_class_maps_read_as_before(tmp_path):
    inside = blob() > 0
    for name, values in [("blank", np.zeros((40, 48), np.uint8)), ("binary01", blob() // 255),
                         ("binary255", blob()), ("one_class_of_255", class_map(1, 255))]:
        path = save(tmp_path / f"{name}.png", values)
        assert np.array_equal(read_label(path), read_mask(path)), name
    assert np.array_equal(read_label(tmp_path / "binary01.png"), inside)
    # a soft label whose probability never reaches 0.5: many levels, not class indices; no lesion, as before
    faint = np.round(np.linspace(0, 100, 40 * 48)).astype(np.uint8).reshape(40, 48)
    assert not read_label(save(tmp_path / "faint.png", faint)).any()


def test_an_inverted_label_is_refused_and_large_lesions_are_not(tmp_path):
    """Lesion black on white read as a lesion that frames the whole image: refused by name, where labels are read.
    Lesions that touch three sides, or cover the whole image, are labels like any other."""
    from ultrarefiner.zoo.serving import read_mask as label_prompt

    inverted = save(tmp_path / "inverted.png", 255 - blob())
    assert read_mask(inverted).mean() > 0.8  # what it read as before
    for reader in (read_label, label_prompt):
        with pytest.raises(BadInputError, match="inverted mask") as error:
            reader(inverted)
        assert error.value.path == str(inverted)
    three_sides = np.zeros((40, 48), np.uint8)
    three_sides[:, 5:] = 255
    everything = np.full((40, 48), 255, np.uint8)
    for name, values in (("three_sides", three_sides), ("everything", everything)):
        assert np.array_equal(read_label(save(tmp_path / f"{name}.png", values)), values > 0), name
