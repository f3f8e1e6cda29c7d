"""SAM/MedSAM checkpoint loading: layouts, prefixes, strictness, wrong files (synthetic vit_b files)."""

from __future__ import annotations

import pytest
import torch
from segment_anything import sam_model_registry

from ultrarefiner.errors import BadInputError
from ultrarefiner.networks.sam_refiner import SAMRefiner
from ultrarefiner.networks.sam_weights import build_sam, build_tiny_sam, load_sam_checkpoint


@pytest.fixture(scope="module")
def vit_b_files(tmp_path_factory):
    """A random-init vit_b state_dict saved in the layouts seen in the wild (fp16 to keep the files small)."""
    torch.manual_seed(0)
    sd = {k: v.half() if v.is_floating_point() else v
          for k, v in sam_model_registry["vit_b"](checkpoint=None).state_dict().items()}
    d = tmp_path_factory.mktemp("sam_ckpt")
    layouts = {
        "plain": sd,
        "model": {"model": sd, "epoch": 3},
        "state_dict_sam_prefix": {"state_dict": {f"sam.{k}": v for k, v in sd.items()}, "optimizer": {}},
        "module_prefix": {f"module.{k}": v for k, v in sd.items()},
    }
    paths = {}
    for name, obj in layouts.items():
        paths[name] = d / f"{name}.pth"
        torch.save(obj, paths[name])
    return sd, paths, d


@pytest.fixture(scope="module")
def vit_b():
    return sam_model_registry["vit_b"](checkpoint=None)


@pytest.mark.parametrize("layout", ["plain", "model", "state_dict_sam_prefix", "module_prefix"])
def test_layouts_load_strictly(vit_b_files, vit_b, layout):
    sd, paths, _ = vit_b_files
    result = load_sam_checkpoint(vit_b, paths[layout])
    assert result == {"missing_keys": [], "unexpected_keys": []}
    got = vit_b.state_dict()
    for k in ("image_encoder.blocks.3.attn.qkv.weight", "mask_decoder.iou_token.weight",
              "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"):
        assert torch.equal(got[k], sd[k].float())


def test_wrong_file_lists_keys(vit_b_files, vit_b, tmp_path):
    sd, _, _ = vit_b_files
    partial = {k: v for k, v in sd.items() if not k.startswith("mask_decoder.")}
    partial["extra.head.weight"] = torch.zeros(2)
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    with pytest.raises(BadInputError) as e:
        load_sam_checkpoint(vit_b, path)
    msg = str(e.value)
    assert str(path) in msg and "missing keys" in msg and "mask_decoder.iou_token.weight" in msg
    assert "unexpected keys" in msg and "extra.head.weight" in msg
    # strict=False on purpose: reports instead of raising
    result = load_sam_checkpoint(vit_b, path, strict=False)
    assert "mask_decoder.iou_token.weight" in result["missing_keys"]
    assert result["unexpected_keys"] == ["extra.head.weight"]


def test_wrong_model_size_and_not_a_checkpoint(vit_b, tmp_path):
    tiny = tmp_path / "tiny.pth"
    torch.save(build_tiny_sam(img_size=1024).state_dict(), tiny)
    with pytest.raises(BadInputError, match="tiny.pth"):
        load_sam_checkpoint(vit_b, tiny)  # different depth: missing keys
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(BadInputError, match="not a readable PyTorch checkpoint"):
        load_sam_checkpoint(vit_b, text)
    with pytest.raises(BadInputError, match="not found"):
        load_sam_checkpoint(vit_b, tmp_path / "missing.pth")
    meta = tmp_path / "meta.pth"
    torch.save({"epoch": 1, "config": {"lr": 0.1}}, meta)
    with pytest.raises(BadInputError, match="not a SAM checkpoint"):
        load_sam_checkpoint(vit_b, meta)


def test_shape_mismatch_is_reported(tmp_path):
    small = build_tiny_sam(img_size=256, seed=0)
    other = build_tiny_sam(img_size=256, prompt_dim=32, seed=0)  # same keys, other widths
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(BadInputError, match="shape mismatch"):
        load_sam_checkpoint(small, path)


def test_unsafe_pickle_refused(vit_b, tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": build_tiny_sam(img_size=256)}, path)  # a whole nn.Module: refused by weights_only
    with pytest.raises(BadInputError, match="not a readable PyTorch checkpoint"):
        load_sam_checkpoint(vit_b, path)


def test_build_sam_and_refiner_from_checkpoint(vit_b_files):
    sd, paths, _ = vit_b_files
    sam = build_sam("vit_b", paths["state_dict_sam_prefix"])
    assert torch.equal(sam.state_dict()["mask_decoder.iou_token.weight"], sd["mask_decoder.iou_token.weight"].float())
    with pytest.raises(ValueError, match="model_type"):
        build_sam("vit_q")
    # the refiner's config-style construction with a checkpoint on a given (tiny) model
    tiny = build_tiny_sam(img_size=256, seed=4)
    path = paths["plain"].parent / "tiny_plain.pth"
    torch.save({"model": tiny.state_dict()}, path)
    ref = SAMRefiner(build_tiny_sam(img_size=256, seed=5), checkpoint=path)
    assert torch.equal(ref.sam.mask_decoder.iou_token.weight, tiny.mask_decoder.iou_token.weight)


def test_build_sam_weight_sources(vit_b_files, tmp_path):
    """build_sam: a file loads strictly; "random"/None keep the init; "packaged" is LiteMedSAM's packaged file and ""
    the model type's default (packaged for LiteMedSAM, random for the tiny test model), both refused for a ViT SAM
    (MedSAM weights are the user's)."""
    from ultrarefiner.networks.lite_medsam import packaged_lite_medsam_path

    tiny_kwargs = {"img_size": 128, "encoder_depth": 1, "seed": 3}
    reference = build_tiny_sam(**tiny_kwargs).state_dict()
    for empty in ("", None, "random"):
        tiny = build_sam("tiny", empty, **tiny_kwargs)
        assert all(torch.equal(v, reference[k]) for k, v in tiny.state_dict().items())
    assert build_sam("tiny", "", img_size=128, encoder_depth=1).image_encoder.img_size == 128
    other = build_tiny_sam(img_size=128, encoder_depth=1, seed=4)
    torch.save(other.state_dict(), tmp_path / "tiny.pth")
    loaded = build_sam("tiny", tmp_path / "tiny.pth", **tiny_kwargs)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(ValueError, match="only valid with model_type 'tiny'"):
        build_sam("vit_b", "random", img_size=128)
    with pytest.raises(BadInputError, match="no weights ship"):
        build_sam("tiny", "packaged", **tiny_kwargs)
    for missing in ("", "packaged"):
        with pytest.raises(BadInputError, match="random"):
            build_sam("vit_b", missing)
    key = "mask_decoder.iou_token.weight"
    sd, paths, _ = vit_b_files
    assert torch.equal(build_sam("vit_b", paths["plain"]).state_dict()[key], sd[key].float())
    assert not torch.equal(build_sam("vit_b", "random").state_dict()[key], sd[key].float())
    # LiteMedSAM: empty and "packaged" mean its packaged weights; None is random
    packaged = torch.load(packaged_lite_medsam_path(), map_location="cpu", weights_only=True)
    for empty in ("", "packaged"):
        assert torch.equal(build_sam("lite_medsam", empty).state_dict()[key], packaged[key])
    assert not torch.equal(build_sam("lite_medsam", None).state_dict()[key], packaged[key])
