"""MONAI transforms/datasets: shapes, dtypes, value ranges, original size, inversion to native size."""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader, decollate_batch
from monai.transforms import Invertd

from ultrarefiner.data.pipeline import get_dataset, get_transforms
from ultrarefiner.data.preprocess import preprocess


@pytest.fixture(scope="module")
def datalist(tmp_path_factory):
    from ultrarefiner.data.synthetic import write_busi_tree

    tmp = tmp_path_factory.mktemp("pipe")
    write_busi_tree(tmp / "raw", n_benign=6, n_malignant=4, n_normal=1, seed=3, size=(120, 160))
    preprocess(tmp / "raw", tmp / "out", ["BUSI"], n_splits=2, test_ratio=0.2, num_workers=1)
    return tmp / "out" / "BUSI" / "datalist.json"


@pytest.mark.parametrize(
    "geometry,shape", [("transunet", (1, 64, 64)), ("sam", (1, 96, 96)), ("sam_square", (1, 96, 96))]
)
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_shapes_and_ranges(datalist, geometry, shape, split):
    ds = get_dataset(datalist, 0, split, geometry=geometry, img_size=64, long_side=96)
    assert len(ds) > 0
    for d in (ds[0], ds[len(ds) - 1]):
        assert d["image"].shape == shape and d["label"].shape == shape
        assert d["image"].dtype == torch.float32 and d["label"].dtype == torch.float32
        assert 0.0 <= float(d["image"].min()) and float(d["image"].max()) <= 1.0
        assert set(torch.unique(d["label"]).tolist()) <= {0.0, 1.0} and d["label"].sum() > 0
        assert d["original_size"] == (120, 160)


def test_sam_geometry_pads_bottom_right(datalist):
    d = get_dataset(datalist, 0, "val", geometry="sam", long_side=96)[0]
    # 120x160 -> 72x96, zero padding below
    assert d["image"][:, 72:, :].abs().sum() == 0 and d["image"][:, :72, :].abs().sum() > 0


def test_training_augmentation_is_random_but_seedable(datalist):
    ds = get_dataset(datalist, 0, "train", img_size=64)
    ds.transform.set_random_state(0)
    a = ds[0]["image"].clone()
    ds.transform.set_random_state(0)
    assert torch.equal(a, ds[0]["image"])
    assert any(not torch.equal(a, ds[0]["image"]) for _ in range(5))


def test_prediction_maps_back_to_native_size(datalist):
    ds = get_dataset(datalist, 0, "val", img_size=64)
    loader = DataLoader(ds, batch_size=2)
    batch = next(iter(loader))
    assert batch["image"].shape[1:] == (1, 64, 64)
    batch["pred"] = batch["label"].clone()
    inv = Invertd(keys="pred", transform=ds.transform, orig_keys="label", nearest_interp=True)
    for item in decollate_batch(batch):
        out = inv(item)
        assert tuple(out["pred"].shape[-2:]) == tuple(int(s) for s in item["original_size"])


def test_cache_modes(datalist, tmp_path):
    plain = get_dataset(datalist, 0, "val", train_augment=False)[0]["image"]
    mem = get_dataset(datalist, 0, "val", cache="memory")[0]["image"]
    disk = get_dataset(datalist, 0, "val", cache="disk", cache_dir=tmp_path / "c")[0]["image"]
    assert torch.allclose(plain, mem) and torch.allclose(plain, disk)
    assert any((tmp_path / "c").iterdir())
    with pytest.raises(ValueError, match="cache_dir"):
        get_dataset(datalist, 0, "val", cache="disk")
    with pytest.raises(ValueError, match="geometry must be"):
        get_transforms("unet")


def test_native_keys_keep_full_resolution(datalist):
    ds = get_dataset(datalist, 0, "test", img_size=64, native_keys=["image", "label"])
    d = ds[0]
    assert d["image"].shape == (1, 64, 64)
    assert d["image_native"].shape == (1, 120, 160) and d["label_native"].shape == (1, 120, 160)
    assert set(torch.unique(d["label_native"]).tolist()) == {0.0, 1.0}
