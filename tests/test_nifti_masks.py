"""Coarse masks, predictions and labels saved as 2D NIfTI, as MONAI's ``SaveImage`` writes them by default
(``<out>/<stem>/<stem>_seg.nii.gz``), are read by ``refine``, ``evaluate`` and the sam_refiner bundle's inference as
their PNG twins.

Before, both listed picture files only: a folder of MONAI NIfTI predictions was "no mask files", and a ``.nii.gz``
file's stem kept its ``.nii``."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import EnsureChannelFirst, LoadImage, SaveImage

from conftest import save, scan
from ultrarefiner.data.imaging import file_stem, read_mask, read_soft_mask
from ultrarefiner.engines.evaluation.folder_evaluation import evaluate_folders
from ultrarefiner.engines.inference.refine_folder import _write_nifti, read_samples
from ultrarefiner.errors import BadInputError

H, W = 36, 52  # not square: a transposed read would not fit


def lesion(seed: int) -> np.ndarray:
    """(H, W) bool: a rectangle off the diagonal, so a transpose or a flip would move it."""
    m = np.zeros((H, W), bool)
    m[4 + seed : 14 + seed, 20 : 44 - seed] = True
    return m


def monai_save(png: Path, out: Path, postfix: str = "seg") -> Path:
    """``png`` as a MONAI pipeline with default settings saves it: ``LoadImage`` (PILReader, x first) then
    ``SaveImage`` (NIfTI, a folder per image, ``_seg``)."""
    data = EnsureChannelFirst()(LoadImage(image_only=True)(str(png)))
    SaveImage(output_dir=str(out), output_postfix=postfix, print_log=False)(data)
    return out / png.stem / f"{png.stem}_{postfix}.nii.gz"


def test_monai_saveimage_niftis_read_as_their_pngs(tmp_path):
    for seed in range(2):
        png = save(tmp_path / f"case{seed}.png", lesion(seed).astype(np.uint8) * 255)
        nii = monai_save(png, tmp_path / "nifti")
        assert nii.is_file() and file_stem(nii) == f"case{seed}_seg"
        assert np.array_equal(read_mask(nii), lesion(seed)) and np.array_equal(read_soft_mask(nii), read_soft_mask(png))
    prob = np.where(lesion(0), 0.8, 0.3).astype(np.float32)  # float probabilities, x first, a trailing slice axis
    nib.save(nib.Nifti1Image(prob.T[:, :, None], np.eye(4)), str(tmp_path / "prob.nii"))
    assert np.array_equal(read_mask(tmp_path / "prob.nii"), lesion(0))
    expected = np.round(prob.astype(np.float64) * 255).astype(np.uint8)
    assert np.array_equal(read_soft_mask(tmp_path / "prob.nii"), expected)


def test_refine_reads_monai_nifti_coarse_masks_and_labels(tmp_path):
    """``--mask_postfix _seg`` over MONAI's default output folder; labels written by ``refine --nifti``."""
    images, coarse, labels = tmp_path / "images", tmp_path / "coarse", tmp_path / "labels"
    for seed in range(3):
        save(images / f"case{seed}.png", scan(seed, H, W))
        monai_save(save(tmp_path / "png" / f"case{seed}.png", lesion(seed).astype(np.uint8) * 255), coarse)
        labels.mkdir(exist_ok=True)
        _write_nifti(labels / f"case{seed}.nii.gz", lesion(seed))
    samples, skipped = read_samples(images, coarse, labels, mask_postfix="_seg")
    assert skipped == [] and [s["stem"] for s in samples] == ["case0", "case1", "case2"]
    for seed, s in enumerate(samples):
        assert np.array_equal(s["coarse"], lesion(seed).astype(np.uint8) * 255)
        assert np.array_equal(s["truth"], lesion(seed))


def test_bad_niftis_are_skipped_with_the_reason(tmp_path):
    images, coarse = tmp_path / "images", tmp_path / "coarse"
    for stem in ("rowfirst", "volume", "broken", "good"):
        save(images / f"{stem}.png", scan(len(stem), H, W))
    coarse.mkdir()
    nib.save(nib.Nifti1Image(lesion(0).astype(np.uint8), np.eye(4)), str(coarse / "rowfirst.nii.gz"))  # (H, W)
    nib.save(nib.Nifti1Image(np.zeros((W, H, 3), np.uint8), np.eye(4)), str(coarse / "volume.nii.gz"))
    (coarse / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    _write_nifti(coarse / "good.nii.gz", lesion(1))
    samples, skipped = read_samples(images, coarse)
    assert [s["stem"] for s in samples] == ["good"]
    reasons = {s["stem"]: (Path(s["file"]).name, s["reason"]) for s in skipped}
    assert reasons["rowfirst"][0] == "rowfirst.nii.gz" and "saved row first" in reasons["rowfirst"][1]
    assert reasons["volume"] == ("volume.nii.gz", f"NIfTI of shape ({W}, {H}, 3): a mask must be one 2D slice")
    assert reasons["broken"][0] == "broken.nii.gz" and reasons["broken"][1].startswith("unreadable NIfTI")
    with pytest.raises(BadInputError, match="file not found"):
        read_mask(coarse / "missing.nii.gz")


def test_evaluate_scores_nifti_predictions_against_png_labels(tmp_path):
    labels, preds = tmp_path / "labels", tmp_path / "preds"
    for seed in range(3):
        png = save(labels / f"case{seed}.png", lesion(seed).astype(np.uint8) * 255)
        monai_save(png, preds)
    report = evaluate_folders(labels, {"monai": preds}, postfixes={"monai": "_seg"}, n_bootstrap=10)
    assert report["n"] == 3 and report["skipped"] == []
    assert report["means"]["monai"]["dice"] == pytest.approx(1.0)


def test_sam_refiner_bundle_reads_nifti_coarse_masks(tmp_path):
    """The bundle's inference pairs each image with MONAI's default NIfTI output (``<stem>/<stem>_seg.nii.gz``) and
    reads it as its PNG twin (``LoadSoftMaskd``); with both a NIfTI and a PNG of one stem the pair is ambiguous."""
    from monai.bundle import ConfigParser

    from bundle_utils import REPO
    from ultrarefiner.engines.training.refiner_setup import inference_datalist

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "sam_refiner" / "configs" / "inference.json"))
    preprocessing = parser.get_parsed_content("preprocessing")
    save(tmp_path / "images" / "case0.png", scan(0, H, W))
    png = save(tmp_path / "png" / "case0_seg.png", np.where(lesion(0), 204, 51).astype(np.uint8))  # soft, p x 255
    nii = monai_save(save(tmp_path / "png" / "case0.png", np.asarray(read_soft_mask(png))), tmp_path / "coarse")
    (item,) = inference_datalist(tmp_path / "images", tmp_path / "coarse", "_seg")
    assert item["coarse"] == str(nii)
    stacked = preprocessing(item)["image"]
    expected = preprocessing({"image": item["image"], "coarse": str(png)})["image"]
    assert stacked.shape == (2, H, W) and torch.equal(stacked, expected)
    save(tmp_path / "coarse" / "case0" / "case0_seg.png", lesion(0).astype(np.uint8) * 255)  # SaveImage's PNG too
    with pytest.raises(BadInputError, match="ambiguous: case0_seg.nii.gz, case0_seg.png"):
        inference_datalist(tmp_path / "images", tmp_path / "coarse", "_seg")
