"""Synthetic phantoms: seeded, in the BUSI raw layout, with the lesion variety the tests rely on."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ultrarefiner.data.synthetic import make_phantom, write_busi_tree


def test_seeded_and_layout(tmp_path):
    a = write_busi_tree(tmp_path / "a", n_benign=8, n_malignant=5, n_normal=2, seed=7)
    b = write_busi_tree(tmp_path / "b", n_benign=8, n_malignant=5, n_normal=2, seed=7)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    names = {str(f) for f in files}
    assert "Dataset_BUSI_with_GT/benign/benign (4)_mask_1.png" in names  # second lesion, separate mask
    assert "Dataset_BUSI_with_GT/normal/normal (2)_mask.png" in names
    normal = np.asarray(Image.open(a / "Dataset_BUSI_with_GT/normal/normal (1)_mask.png"))
    assert not normal.any()


def test_lesions_are_hypoechoic_and_varied():
    rng = np.random.default_rng(0)
    areas = []
    for kind, tiny in [("benign", False), ("malignant", False), ("benign", True), ("malignant", True)]:
        image, masks = make_phantom(rng, kind, size=(300, 400), tiny=tiny)
        m = masks[0]
        assert m.any() and image.dtype == np.uint8 and image.shape == m.shape
        ring = np.zeros_like(m)
        ys, xs = np.nonzero(m)
        ring[max(ys.min() - 15, 0) : ys.max() + 15, max(xs.min() - 15, 0) : xs.max() + 15] = True
        assert image[m].mean() < image[ring & ~m].mean()  # darker than its surroundings
        areas.append(m.sum())
    assert areas[2] < 300 and areas[3] < 300 and areas[0] > 1000  # tiny lesions are tiny
