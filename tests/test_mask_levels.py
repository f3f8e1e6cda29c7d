"""Masks written as 0/1 label maps (nnU-Net's and MONAI's ``SaveImage`` convention for a binary label) are read as
the masks they are, wherever UltraRefiner reads a mask: labels, coarse masks and the datasets ``preprocess`` reads.
Read by luminance (> 127) they were blank: a label without its lesion scores every prediction 0 without a word."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import blob, save, scan
from ultrarefiner.data.imaging import label_map_levels, read_mask, read_soft_mask
from ultrarefiner.data.preprocess import preprocess
from ultrarefiner.data.refiner_data import read_probability


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
    assert np.array_equal(label_map_levels(blank), blank)


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
