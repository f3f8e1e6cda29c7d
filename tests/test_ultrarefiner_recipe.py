"""bundles/ultrarefiner: the recipe written in the configs (transform chains, network_def, datasets) does what the
code factories did, and command-line overrides of its ids change it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from conftest import blob, save

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "ultrarefiner"
TU = {"img_size": 32, "num_classes": 2, "in_channels": 1, "variant": "R50-ViT-B_16", "vit_depth": 1, "hidden_size": 32,
      "num_heads": 2, "mlp_dim": 64, "block_units": [1, 1, 1], "decoder_channels": [32, 16, 16, 8]}
TINY = {"img_size": 32, **{f"network_def#transunet#{k}": v for k, v in TU.items()}, "sam_model_type": "tiny",
        "sam_def#img_size": 256, "sam_checkpoint": "", "device": "$torch.device('cpu')"}


def _items(root: Path, n: int = 3) -> list[dict]:
    """Image/label PNG pairs of different sizes (a bright blob on noise)."""
    items = []
    for i in range(n):
        h, w = 40 + 8 * i, 56 - 4 * i
        rng = np.random.default_rng(i)
        lesion = blob(h, w, cy=h // 2, cx=w // 2, r=6 + i) > 0
        image = np.clip(60 + 120 * lesion + rng.normal(0, 15, (h, w)), 0, 255).astype(np.uint8)
        items.append({"image": str(save(root / f"img{i}.png", image)),
                      "label": str(save(root / f"lab{i}.png", lesion.astype(np.uint8) * 255))})
    return items


def _parser(config: str = "train.json", **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / config))
    for k, v in {**TINY, **overrides}.items():
        parser[k] = v
    return parser


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def e2e_transforms(train: bool, img_size: int, sam_frame: str, preprocessing: str, encoder_size: int,
                   native_keys: tuple[str, ...] = ("image", "label"), frame_key: str | None = None):
    """The code factory the config chains replaced (``e2e_setup.e2e_transforms`` before the recipe moved into
    train.json, with ``data.pipeline``'s load and resize steps inlined): the reference they must equal. Since bundle
    0.1.7 validation's ``SamFramed`` also writes the encoder frame (``frame_key``)."""
    from monai.transforms import (
        AsDiscreted,
        Compose,
        CopyItemsd,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        RandAdjustContrastd,
        RandScaleIntensityd,
        RandShiftIntensityd,
        Resized,
        ScaleIntensityd,
        ScaleIntensityRanged,
    )

    from ultrarefiner.engines.training.e2e_setup import FlipWithIdd, SamFramed
    from ultrarefiner.transforms.io import CheckSameSized, RecordSized

    chain: list = [CopyItemsd(keys="image", names="sam_image"),
                   LoadImaged(keys=["image", "label"], reader="PILReader", reverse_indexing=False, image_only=True),
                   EnsureChannelFirstd(keys=["image", "label"]), CheckSameSized(keys=["label"], reference="image"),
                   RecordSized(keys="image"), ScaleIntensityd(keys="image"), ScaleIntensityd(keys=["label"]),
                   AsDiscreted(keys=["label"], threshold=0.5),
                   LoadImaged(keys="sam_image", reader="PILReader", reverse_indexing=False, image_only=True),
                   EnsureChannelFirstd(keys="sam_image"), CopyItemsd(keys="label", names="sam_label")]
    if native_keys:
        chain.append(CopyItemsd(keys=list(native_keys), names=[f"{k}_native" for k in native_keys]))
    chain += [SamFramed(sam_frame, preprocessing, encoder_size, frame_key=frame_key),
              Resized(keys=["image", "label"], spatial_size=(img_size, img_size), mode=["bilinear", "nearest"],
                      anti_aliasing=[True, False])]
    if train:
        chain += [
            FlipWithIdd(keys=["image", "label", "sam_image", "sam_label"], prob=0.5, spatial_axis=1),
            RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.8, 1.25)),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
            ScaleIntensityRanged(keys="image", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
        ]
    float_keys = ["image", "label", "sam_label"] + [f"{k}_native" for k in native_keys]
    chain += [EnsureTyped(keys=float_keys, dtype=torch.float32, track_meta=True),
              EnsureTyped(keys="sam_image", dtype=torch.uint8, track_meta=False)]
    return Compose(chain)


@pytest.mark.parametrize("split,sam_frame", [("train", "square"), ("train", "native"), ("validate", "native")])
def test_config_chains_equal_the_factory(tmp_path, split, sam_frame):
    parser = _parser(sam_frame=sam_frame)
    chain = parser.get_parsed_content(f"{split}#preprocessing")
    geometry = parser.get_parsed_content("network_def").refiner.geometry
    train = split == "train"
    reference = e2e_transforms(train=train, img_size=32, sam_frame=sam_frame if train else "native",
                               preprocessing=geometry.mode, encoder_size=geometry.img_size,
                               **({"native_keys": ()} if train else {"frame_key": "sam_frame"}))
    for seed in (0, 1, 2):
        chain.set_random_state(seed)
        reference.set_random_state(seed)
        for item in _items(tmp_path):
            _same(chain(dict(item)), reference(dict(item)))


def test_augmentation_override_by_id(tmp_path):
    """``--train#preprocessing#transforms#10#prob 1.0`` (the flip, as docs/README.md names it) flips every sample:
    the SAM image identity says so and the image is the mirror of the unflipped one."""
    items = _items(tmp_path)
    flip = "train#preprocessing#transforms#10"
    documented = {8: "SamFramed", 10: "FlipWithIdd", 11: "RandAdjustContrastd", 12: "RandScaleIntensityd",
                  13: "RandShiftIntensityd"}  # the indices docs/README.md names
    parser = _parser()
    for i, name in documented.items():
        assert parser.get(f"train#preprocessing#transforms#{i}")["_target_"].endswith(name)
        assert f"`--train#preprocessing#transforms#{i}#" in (BUNDLE / "docs" / "README.md").read_text()
    off = _parser(**{f"{flip}#prob": 0.0, "train#preprocessing#transforms#12#prob": 0.0,
                     "train#preprocessing#transforms#13#prob": 0.0, "train#preprocessing#transforms#11#prob": 0.0})
    on = _parser(**{f"{flip}#prob": 1.0, "train#preprocessing#transforms#12#prob": 0.0,
                    "train#preprocessing#transforms#13#prob": 0.0, "train#preprocessing#transforms#11#prob": 0.0})
    off_chain, on_chain = off.get_parsed_content("train#preprocessing"), on.get_parsed_content("train#preprocessing")
    for item in items:
        a, b = off_chain(dict(item)), on_chain(dict(item))
        assert not a["sam_image_id"].endswith("-flip1") and b["sam_image_id"] == a["sam_image_id"] + "-flip1"
        for key in ("image", "label", "sam_image", "sam_label"):
            assert torch.equal(torch.flip(torch.as_tensor(a[key]), dims=[-1]), torch.as_tensor(b[key])), key


def test_datasets_and_network_are_components(tmp_path):
    """``train#dataset`` is a ``CacheDataset`` that caches with ``cache memory`` only; the ``network_kwargs`` that
    checkpoints record are read back from the built ``network_def``, so an override of a leaf argument is what they
    record."""
    from monai.data import CacheDataset

    items = _items(tmp_path, n=2)
    for cache, cached in (("memory", 2), ("none", 0)):
        parser = _parser(cache=cache, num_workers=0)
        parser["train#datalist"] = items
        dataset = parser.get_parsed_content("train#dataset")
        assert isinstance(dataset, CacheDataset) and len(dataset) == 2 and dataset.cache_num == cached
    parser = _parser(**{"network_def#transunet#vit_depth": 2, "refiner_kwargs#image_resize": "torch",
                        "sam_def#encoder_depth": 2})
    net = parser.get_parsed_content("network_def")
    assert len(net.transunet.blocks) == 2 and net.refiner.geometry.image_resize == "torch"
    assert len(net.refiner.sam.image_encoder.blocks) == 2
    recorded = parser.get_parsed_content("network_kwargs")
    assert recorded["transunet"]["vit_depth"] == 2 and recorded["refiner"]["image_resize"] == "torch"
    assert recorded["transunet"] == net.transunet.network_kwargs and recorded["transunet"]["hidden_size"] == 32
    assert recorded["sam"]["model_type"] == "tiny" and recorded["sam"]["img_size"] == 256
    assert recorded["sam"]["encoder_depth"] == 2
    # the record rebuilds this network exactly: a checkpoint of it loads strictly through create_model
    from ultrarefiner.engines.checkpoints.checkpoint import save_checkpoint
    from ultrarefiner.hub import create_model

    path = tmp_path / "net.pt"
    save_checkpoint(path, {"kind": "ultrarefiner", "model": net.state_dict(), "network_kwargs": recorded})
    rebuilt = create_model("ultrarefiner", path)
    assert len(rebuilt.transunet.blocks) == 2 and len(rebuilt.refiner.sam.image_encoder.blocks) == 2
