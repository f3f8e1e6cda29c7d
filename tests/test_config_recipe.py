"""The transunet bundle's recipe lives in its configs: transform chains, datasets and the network are ``_target_``
components, they build exactly what ``ultrarefiner.data.pipeline.get_transforms`` built before (pinned below as
``reference_chain``), and command-line overrides of single transforms take effect.

The sam_refiner bundle's network is a ``_target_`` component too (here); its datasets, chosen among option A (online
or shards), option B and a mix by the ``data_source``/``real_ratio`` options, are tested in
``test_bundle_sam_refiner.py::test_data_sources``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import (
    AsDiscreted,
    Compose,
    CopyItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    RandAdjustContrastd,
    RandFlipd,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandZoomd,
    Resized,
    ScaleIntensityd,
    ScaleIntensityRanged,
)

from conftest import BUSI_ENV
from ultrarefiner.transforms.io import CheckSameSized, LoadImageMaskd, RecordSized

REPO = Path(__file__).resolve().parents[1]
TU = REPO / "bundles" / "transunet" / "configs"
SR = REPO / "bundles" / "sam_refiner" / "configs"
IMG_SIZE = 64


def reference_chain(train: bool, keys=("image", "label"), native_keys=(), img_size: int = IMG_SIZE) -> Compose:
    """The chain ``get_transforms("transunet", train, keys, img_size, native_keys=...)`` built before the recipe moved
    into the configs (kept verbatim, so the configs are held to the published recipe), but for its first step: since
    bundle 0.1.6 ``LoadImageMaskd`` reads files by the package's rules where ``LoadImaged`` gave raw stored values."""
    keys = list(keys)
    label_keys = [k for k in keys if k != "image"]
    chain = [
        LoadImageMaskd(keys=keys[0], mask_keys=label_keys),
        EnsureChannelFirstd(keys=keys),
        RecordSized(keys=keys[0]),
        ScaleIntensityd(keys="image"),
    ]
    if label_keys:
        chain.insert(2, CheckSameSized(keys=label_keys, reference=keys[0]))
        chain += [ScaleIntensityd(keys=label_keys), AsDiscreted(keys=label_keys, threshold=0.5)]
    if native_keys:
        chain.append(CopyItemsd(keys=list(native_keys), names=[f"{k}_native" for k in native_keys]))
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    chain.append(Resized(keys=keys, spatial_size=(img_size, img_size), mode=modes, anti_aliasing=[k == "image"
                                                                                               for k in keys]))
    if train:
        chain += [
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
            RandRotated(keys=keys, range_x=math.radians(15.0), prob=0.5, mode=modes, padding_mode="zeros"),
            RandZoomd(keys=keys, prob=0.5, min_zoom=0.9, max_zoom=1.1, mode=modes, padding_mode="constant"),
            RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.8, 1.25)),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
            ScaleIntensityRanged(keys="image", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
        ]
    chain.append(EnsureTyped(keys=keys + [f"{k}_native" for k in native_keys], dtype="float32", track_meta=True))
    return Compose(chain)


def parser(configs: list[str], folder: Path = TU, **overrides) -> ConfigParser:
    p = ConfigParser()
    p.read_config([str(folder / c) for c in configs])
    p.update({"img_size": IMG_SIZE, "vit_depth": 1, **overrides})
    return p


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> list[dict]:
    """Two benign and one malignant synthetic BUSI pairs, plus two real BUSI pairs when ``$ULTRAREFINER_BUSI_ROOT``
    names the data."""
    from ultrarefiner.data.synthetic import write_busi_tree

    raw = tmp_path_factory.mktemp("recipe") / "raw"
    write_busi_tree(raw, n_benign=2, n_malignant=1, n_normal=0, seed=5, size=(90, 130))
    pairs = sorted(p for p in raw.rglob("*.png") if not p.stem.endswith("_mask"))
    out = [{"image": str(p), "label": str(p.with_name(p.stem + "_mask.png"))} for p in pairs]
    busi = Path(os.environ.get(BUSI_ENV, "")) / "Dataset_BUSI_with_GT"
    if os.environ.get(BUSI_ENV) and busi.is_dir():
        out += [{"image": str(busi / c / f"{c} (3).png"), "label": str(busi / c / f"{c} (3)_mask.png")}
                for c in ("benign", "malignant")]
    return out


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert torch.equal(a[k].as_tensor(), b[k].as_tensor()), k
            assert len(a[k].applied_operations) == len(b[k].applied_operations), k  # what Invertd undoes
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize(
    "configs, key, train, keys, native",
    [
        (["train.json"], "train#preprocessing", True, ("image", "label"), ()),
        (["train.json"], "validate#preprocessing", False, ("image", "label"), ()),
        (["train.json", "evaluate.json"], "validate#preprocessing", False, ("image", "label"), ("image", "label")),
        (["inference.json"], "preprocessing", False, ("image",), ()),
    ],
)
def test_config_chains_give_the_published_recipe(items, configs, key, train, keys, native):
    chain = parser(configs).get_parsed_content(key)
    ref = reference_chain(train, keys, native)
    assert {type(t) for t in chain.transforms} == {type(t) for t in ref.transforms}  # (one ScaleIntensityd for both)
    for seed in (0, 1, 7):
        chain.set_random_state(seed)
        ref.set_random_state(seed)
        for it in items:
            data = {k: it[k] for k in keys}
            assert_same(chain(dict(data)), ref(dict(data)))


def test_augmentation_changes_from_the_command_line(items):
    """``--train#preprocessing#transforms#<i>#prob``: all random transforms off gives the validation chain's
    output; the flip alone at probability 1 gives it mirrored."""
    from ultrarefiner.utils.options import unknown_options

    transforms = parser(["train.json"]).get_parsed_content("train#preprocessing").transforms
    rand = {i: type(t).__name__ for i, t in enumerate(transforms) if type(t).__name__.startswith("Rand")}
    assert list(rand.values()) == ["RandFlipd", "RandRotated", "RandZoomd", "RandAdjustContrastd",
                                   "RandScaleIntensityd", "RandShiftIntensityd"]
    off = {f"train#preprocessing#transforms#{i}#prob": 0.0 for i in rand}
    assert unknown_options({k: "0.0" for k in off}, [str(TU / "train.json")], None) == []  # accepted by the check
    val = parser(["train.json"]).get_parsed_content("validate#preprocessing")
    no_aug = parser(["train.json"], **off).get_parsed_content("train#preprocessing")
    flip = {**off, f"train#preprocessing#transforms#{min(rand)}#prob": 1.0}
    flipped = parser(["train.json"], **flip).get_parsed_content("train#preprocessing")
    default = parser(["train.json"]).get_parsed_content("train#preprocessing")
    default_differs = False
    for seed in range(3):
        for chain in (no_aug, flipped, default):
            chain.set_random_state(seed)
        for it in items:
            ref = val(dict(it))
            assert torch.equal(no_aug(dict(it))["image"], ref["image"])
            out = flipped(dict(it))
            assert torch.equal(out["image"], torch.flip(ref["image"], dims=[-1]))
            assert torch.equal(out["label"], torch.flip(ref["label"], dims=[-1]))
            default_differs |= not torch.equal(default(dict(it))["image"], ref["image"])
    assert default_differs  # the unmodified recipe does augment


def test_datasets_and_network_are_components(items):
    from monai.data import CacheDataset

    from ultrarefiner.networks import TransUNet

    p = parser(["train.json"], **{"train#datalist": items, "validate#datalist": items, "cache": "none",
                                  "num_workers": 0})
    ds = p.get_parsed_content("train#dataset")
    assert isinstance(ds, CacheDataset) and ds.cache_num == 0 and len(ds) == len(items)
    assert ds[0]["image"].shape == (1, IMG_SIZE, IMG_SIZE)
    p = parser(["train.json"], **{"validate#datalist": items, "cache": "memory", "num_workers": 0})
    assert p.get_parsed_content("validate#dataset").cache_num == len(items)
    # the checkpoints' record follows the network, also when network_def itself is overridden
    p = parser(["train.json"], **{"network_def#vit_depth": 2})
    assert isinstance(p.get_parsed_content("network_def"), TransUNet)
    assert p.get_parsed_content("network_kwargs") == {"img_size": IMG_SIZE, "num_classes": 2, "in_channels": 1,
                                                      "variant": "R50-ViT-B_16", "vit_depth": 2}


def test_native_copies_are_untouched_by_resizing(items):
    d = parser(["train.json", "evaluate.json"]).get_parsed_content("validate#preprocessing")(dict(items[0]))
    assert d["image"].shape == (1, IMG_SIZE, IMG_SIZE) and d["image_native"].shape == (1, 90, 130)
    assert set(np.unique(d["label_native"].numpy()).tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("config", ["train.json", "inference.json"])
def test_sam_refiner_network_is_components(config):
    """``sam_def`` > ``SAMRefiner`` > ``StackedInputRefiner``; ``refiner_kwargs`` (the checkpoints' record) is read
    back from ``network_def``, so an override of either the option or the component reaches both."""
    from ultrarefiner.networks import SAMRefiner, StackedInputRefiner

    p = ConfigParser()
    p.read_config(str(SR / config))
    p.update({"model_type": "tiny", "sam_checkpoint": "", "sam_def#img_size": 64, "box_source": "components",
              "network_def#refiner#multimask_output": True})
    net = p.get_parsed_content("network_def")
    assert isinstance(net, StackedInputRefiner) and isinstance(net.refiner, SAMRefiner)
    assert net.refiner.sam.image_encoder.img_size == 64
    assert net.refiner.prompt_generator.box_source == "components" and net.refiner.multimask_output is True
    kwargs = p.get_parsed_content("refiner_kwargs")
    assert kwargs["box_source"] == "components" and kwargs["multimask_output"] is True
