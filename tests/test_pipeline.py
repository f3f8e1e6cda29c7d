"""The deterministic MONAI chain of code outside the bundles: shapes, dtypes, value ranges, original size, inversion
to native size; ``predict-transunet``'s input equals the transunet bundle's inference preprocessing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset, decollate_batch
from monai.transforms import Compose, Invertd

from ultrarefiner.data.datalist import load_split
from ultrarefiner.data.pipeline import load_transforms, resize_transforms
from ultrarefiner.data.preprocess import preprocess

REPO = Path(__file__).resolve().parents[1]


def chain(keys=("image", "label"), img_size: int = 64) -> Compose:
    return Compose([*load_transforms(keys), *resize_transforms(keys, img_size)])


@pytest.fixture(scope="module")
def datalist(tmp_path_factory):
    from ultrarefiner.data.synthetic import write_busi_tree

    tmp = tmp_path_factory.mktemp("pipe")
    write_busi_tree(tmp / "raw", n_benign=6, n_malignant=4, n_normal=1, seed=3, size=(120, 160))
    preprocess(tmp / "raw", tmp / "out", ["BUSI"], n_splits=2, test_ratio=0.2, num_workers=1)
    return tmp / "out" / "BUSI" / "datalist.json"


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_shapes_and_ranges(datalist, split):
    ds = Dataset(load_split(datalist, 0, split), chain(img_size=64))
    assert len(ds) > 0
    for d in (ds[0], ds[len(ds) - 1]):
        assert d["image"].shape == (1, 64, 64) and d["label"].shape == (1, 64, 64)
        assert d["image"].dtype == torch.float32 and d["label"].dtype == torch.float32
        assert 0.0 <= float(d["image"].min()) and float(d["image"].max()) <= 1.0
        assert set(torch.unique(d["label"]).tolist()) <= {0.0, 1.0} and d["label"].sum() > 0
        assert d["original_size"] == (120, 160)


def test_prediction_maps_back_to_native_size(datalist):
    tf = chain(img_size=64)
    batch = next(iter(DataLoader(Dataset(load_split(datalist, 0, "val"), tf), batch_size=2)))
    assert batch["image"].shape[1:] == (1, 64, 64)
    batch["pred"] = batch["label"].clone()
    inv = Invertd(keys="pred", transform=tf, orig_keys="label", nearest_interp=True)
    for item in decollate_batch(batch):
        out = inv(item)
        assert tuple(out["pred"].shape[-2:]) == tuple(int(s) for s in item["original_size"])


def test_masks_of_another_size_are_refused(datalist, tmp_path):
    from PIL import Image

    from ultrarefiner.errors import BadInputError

    item = load_split(datalist, 0, "val")[0]
    Image.open(item["label"]).resize((50, 40)).save(tmp_path / "small.png")
    with pytest.raises(Exception) as err:
        chain()({"image": item["image"], "label": str(tmp_path / "small.png")})
    assert isinstance(err.value, BadInputError) or isinstance(err.value.__cause__, BadInputError)


def test_predict_transunet_input_is_the_bundle_preprocessing(datalist):
    """``predict_probabilities`` reads images with this module; the bundle's inference.json with its config list."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "transunet" / "configs" / "inference.json"))
    parser["img_size"] = 64
    bundle = parser.get_parsed_content("preprocessing")
    ours = chain(keys=["image"], img_size=64)
    for it in load_split(datalist, 0, "test"):
        a, b = ours({"image": it["image"]}), bundle({"image": it["image"]})
        assert sorted(a) == sorted(b) and a["original_size"] == b["original_size"]
        assert a["image"].dtype == b["image"].dtype and torch.equal(a["image"].as_tensor(), b["image"].as_tensor())
