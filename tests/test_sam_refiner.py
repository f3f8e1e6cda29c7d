"""SAMRefiner: fidelity to SamPredictor (sam mode) and to MedSAM's recipe (medsam mode), batching, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything import SamPredictor

from ultrarefiner.networks.sam_geometry import SamGeometry, medsam_resize_uint8
from ultrarefiner.networks.sam_refiner import SAMRefiner
from ultrarefiner.networks.sam_weights import build_tiny_sam


@pytest.fixture(scope="module")
def sam1024():
    return build_tiny_sam(img_size=1024, encoder_depth=2, seed=0)


@pytest.fixture(scope="module")
def sam256():
    return build_tiny_sam(img_size=256, encoder_depth=2, seed=1)


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return base


def _ellipse(h, w, cx, cy, rx, ry):
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return ((((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2) < 1).float()[None, None]


def _as_tensor(img):
    return torch.from_numpy(img).permute(2, 0, 1)[None]


@pytest.mark.parametrize("size", [(150, 200), (210, 120)])
def test_sam_mode_matches_predictor(sam1024, size):
    h, w = size
    img = _image(h, w)
    coarse = _ellipse(h, w, w * 0.45, h * 0.5, w * 0.2, h * 0.25)  # hard mask
    ref = SAMRefiner(sam1024, preprocessing="sam", use_point_prompt=True, use_negative_point=True,
                     multimask_output=True).eval()
    with torch.no_grad():
        out = ref(_as_tensor(img), coarse)
    pr = out["prompts"]
    predictor = SamPredictor(sam1024)
    predictor.set_image(img)
    masks, ious, low = predictor.predict(
        point_coords=pr["point_coords"][0].numpy(), point_labels=pr["point_labels"][0].numpy(),
        box=pr["boxes"][0].numpy(), mask_input=pr["mask_input"][0].numpy(), multimask_output=True,
        return_logits=True,
    )
    assert out["low_res_logits"].shape == (1, 3, 256, 256)
    assert np.abs(out["low_res_logits"][0].numpy() - low).max() < 1e-4
    assert np.abs(out["iou_predictions"][0].numpy() - ious).max() < 1e-4
    assert np.abs(out["candidate_logits"][0].numpy() - masks).max() < 1e-4
    assert out["masks"].shape == (1, 1, h, w)
    # the image the encoder saw is the predictor's own
    x = ref.preprocess_image(_as_tensor(img))
    assert torch.allclose(x, sam1024.preprocess(_predictor_input(predictor, img)), atol=1e-6)


def _predictor_input(predictor, img):
    t = torch.as_tensor(predictor.transform.apply_image(img)).permute(2, 0, 1).contiguous()[None]
    return t.float()


def _medsam_recipe(sam, img_np, box_np):
    """MedSAM_Inference.py (bowang-lab/MedSAM), re-stated: returns (low_res_logits, medsam_seg, encoder input)."""
    try:
        from skimage import transform

        def resize(a):
            return transform.resize(a, (1024, 1024), order=3, preserve_range=True, anti_aliasing=True).astype(np.uint8)
    except ImportError:  # skimage is not a dependency: the package's scipy re-statement of that call

        def resize(a):
            return medsam_resize_uint8(a, 1024)

    H, W, _ = img_np.shape
    img_1024 = resize(img_np)
    img_1024 = (img_1024 - img_1024.min()) / np.clip(img_1024.max() - img_1024.min(), a_min=1e-8, a_max=None)
    img_1024_tensor = torch.tensor(img_1024).float().permute(2, 0, 1).unsqueeze(0)
    box_1024 = box_np / np.array([W, H, W, H]) * 1024
    with torch.no_grad():
        image_embedding = sam.image_encoder(img_1024_tensor)
        box_torch = torch.as_tensor(box_1024, dtype=torch.float)
        if len(box_torch.shape) == 2:
            box_torch = box_torch[:, None, :]
        sparse, dense = sam.prompt_encoder(points=None, boxes=box_torch, masks=None)
        low_res_logits, _ = sam.mask_decoder(
            image_embeddings=image_embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
        )
        low_res_pred = F.interpolate(torch.sigmoid(low_res_logits), size=(H, W), mode="bilinear", align_corners=False)
    seg = (low_res_pred.squeeze().numpy() > 0.5).astype(np.uint8)
    return low_res_logits, seg, img_1024_tensor


def test_medsam_mode_matches_recipe(sam1024):
    h, w = 120, 180
    img = _image(h, w, seed=3)
    img[..., 1] //= 2  # not every channel spans 0..255: min-max is over the whole image
    coarse = torch.zeros(1, 1, h, w)
    coarse[..., 30:80, 50:130] = 1
    ref = SAMRefiner(sam1024, preprocessing="medsam", use_point_prompt=False, use_mask_prompt=False,
                     box_mode="tight", multimask_output=False).eval()
    with torch.no_grad():
        out = ref(_as_tensor(img), coarse)
    box = out["prompts"]["boxes"].numpy()
    assert box.tolist() == [[50.0, 30.0, 129.0, 79.0]]
    low, seg, x_ref = _medsam_recipe(sam1024, img, box)
    assert torch.allclose(ref.preprocess_image(_as_tensor(img)), x_ref, atol=1e-6)
    assert out["low_res_logits"].shape == (1, 1, 256, 256)
    assert (out["low_res_logits"] - low).abs().max() < 1e-4
    ours = (out["masks"][0, 0] > 0).numpy().astype(np.uint8)  # sigmoid/interpolate order differs only at edges
    assert (ours == seg).mean() > 0.99


def _assert_skimage_equivalent(img: np.ndarray, size: int) -> None:
    """The separable re-statement equals MedSAM's skimage call up to float summation order: uint8 truncation may
    differ by one grey level on a tiny fraction of pixels, never more."""
    from skimage import transform

    ref = transform.resize(img, (size, size), order=3, preserve_range=True, anti_aliasing=True).astype(np.uint8)
    out = medsam_resize_uint8(img, size)
    assert out.shape == ref.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_medsam_resize_restatement():
    rng = np.random.default_rng(5)
    _assert_skimage_equivalent(_image(37, 53, seed=5), 128)  # upsampling, 3 channels
    _assert_skimage_equivalent(_image(300, 200, seed=6), 128)  # downsampling: Gaussian anti-aliasing first
    _assert_skimage_equivalent(rng.integers(0, 256, (1, 9, 1), dtype=np.uint8), 16)  # a one-pixel axis
    flat = np.full((64, 64, 1), 37, np.uint8)
    assert (medsam_resize_uint8(flat, 64) == 37).all()  # every factor 1: the input unchanged, as scipy
    smooth = np.kron(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20, np.ones((8, 8), np.uint8))[..., None]
    up = medsam_resize_uint8(smooth, 64)  # 24x32 -> 64x64 keeps the block layout (no shift or transpose)
    assert up[5, 5, 0] == 0 and up[60, 60, 0] == 220 and up[5, 60, 0] == 60


def test_medsam_resize_real_busi_images():
    from conftest import busi_root

    files = sorted((busi_root() / "Dataset_BUSI_with_GT" / "benign").glob("benign (1*).png"))[:3]
    assert files
    for f in files:
        _assert_skimage_equivalent(np.asarray(Image.open(f).convert("L"))[..., None], 1024)


def test_torch_resize_close_to_exact(sam256):
    img = _as_tensor(_image(100, 140, seed=7))
    for mode in ("sam", "medsam"):
        exact = SamGeometry(mode, 256, image_resize="exact").preprocess_image(img)
        fast = SamGeometry(mode, 256, image_resize="torch").preprocess_image(img)
        assert exact.shape == fast.shape == (1, 3, 256, 256)
        assert (exact - fast).abs().mean() < 0.1 * exact.abs().mean()


def test_batched_decoder_equals_per_sample(sam256):
    b, h, w = 3, 96, 128
    img = torch.stack([_as_tensor(_image(h, w, seed=s))[0] for s in range(b)])
    coarse = torch.cat([_ellipse(h, w, 30 + 25 * i, 50, 15 + 5 * i, 20) for i in range(b)]) * 0.9 + 0.05
    kw = dict(preprocessing="sam", use_point_prompt=True, use_negative_point=True, multimask_output=True)
    batched = SAMRefiner(sam256, batched_decoder=True, **kw).eval()
    looped = SAMRefiner(sam256, batched_decoder=False, **kw).eval()
    with torch.no_grad():
        a = batched(img, coarse)
        c = looped(img, coarse)
        singles = [looped(img[i : i + 1], coarse[i : i + 1]) for i in range(b)]
    assert torch.allclose(a["low_res_logits"], c["low_res_logits"], atol=1e-5)
    assert torch.allclose(a["iou_predictions"], c["iou_predictions"], atol=1e-6)
    for i in range(b):
        assert torch.allclose(a["low_res_logits"][i], singles[i]["low_res_logits"][0], atol=1e-5)
    assert not torch.allclose(a["low_res_logits"][0], a["low_res_logits"][1])  # prompts differ per sample


def test_cached_embeddings_match_image_path(sam256):
    h, w = 90, 120
    img = _as_tensor(_image(h, w, seed=2))
    coarse = _ellipse(h, w, 60, 45, 25, 20)
    ref = SAMRefiner(sam256, preprocessing="medsam").eval()
    with torch.no_grad():
        direct = ref(image=img, coarse=coarse)
        emb = ref.encode_image(img)
        cached = ref(image_embeddings=emb, coarse=coarse, original_size=(h, w))
    assert emb.shape == (1, 64, 16, 16)
    for k in ("low_res_logits", "iou_predictions", "masks"):
        assert torch.allclose(direct[k], cached[k], atol=1e-6)
    with pytest.raises(ValueError):
        ref(image_embeddings=emb, coarse=coarse)


def test_coarse_at_lower_resolution_than_image(sam256):
    h, w = 120, 160
    img = _as_tensor(_image(h, w))
    full = _ellipse(h, w, 80, 60, 40, 30)
    half = F.interpolate(full, size=(60, 80), mode="area")
    ref = SAMRefiner(sam256, preprocessing="sam", use_point_prompt=True).eval()
    with torch.no_grad():
        a = ref(img, full)["prompts"]
        b = ref(img, half)["prompts"]
    assert (a["point_coords"] - b["point_coords"]).abs().max() < 2.0
    assert (a["boxes"] - b["boxes"]).abs().max() < 2.0
    assert b["mask_input"].shape == (1, 1, 64, 64)


@pytest.mark.parametrize("which", ["point", "mask", "box", "negative"])
def test_gradient_reaches_coarse_mask_through_each_prompt(sam256, which):
    h, w = 80, 100
    img = _as_tensor(_image(h, w, seed=4))
    coarse = (_ellipse(h, w, 50, 40, 25, 18) * 0.8 + 0.1).requires_grad_(True)
    ref = SAMRefiner(sam256, preprocessing="sam", use_point_prompt=which == "point",
                     use_negative_point=which == "negative", use_box_prompt=which == "box",
                     use_mask_prompt=which == "mask").train()
    out = ref(img, coarse)
    out["masks"].sigmoid().mean().backward()
    assert coarse.grad is not None and coarse.grad.abs().sum() > 0
    enc_grads = [p.grad for p in sam256.image_encoder.parameters()]
    assert all(g is None for g in enc_grads)  # frozen encoder
    sam256.zero_grad(set_to_none=True)


def test_outputs_selection_and_freezing(sam256):
    h, w = 64, 96
    img = _as_tensor(_image(h, w, seed=6)).expand(2, -1, -1, -1)
    coarse = torch.cat([_ellipse(h, w, 40, 30, 15, 12), torch.zeros(1, 1, h, w)])  # second one empty
    ref = SAMRefiner(sam256, preprocessing="medsam", use_point_prompt=True, use_negative_point=True,
                     multimask_output=True, freeze_prompt_encoder=True)
    ref.train()
    out = ref(img, coarse)
    assert out["low_res_logits"].shape == (2, 3, 64, 64) and out["iou_predictions"].shape == (2, 3)
    assert out["candidate_logits"].shape == (2, 3, h, w) and out["masks"].shape == (2, 1, h, w)
    assert out["low_res_masks"].shape == (2, 1, 64, 64)
    wts = out["selection_weights"]
    assert torch.allclose(wts.sum(1), torch.ones(2)) and (wts > 0).all() and not wts.requires_grad
    assert out["prompts"]["point_labels"][1].tolist() == [-1.0, -1.0]
    ref.eval()
    with torch.no_grad():
        out = ref(img, coarse)
    best = out["iou_predictions"].argmax(1)
    assert torch.allclose(out["masks"][:, 0], out["candidate_logits"][torch.arange(2), best])
    assert not any(p.requires_grad for p in ref.sam.prompt_encoder.parameters())
    assert all(p.requires_grad for p in ref.sam.mask_decoder.parameters())
    counts = ref.parameter_counts()
    assert counts["trainable"] == sum(p.numel() for p in ref.sam.mask_decoder.parameters())
    ref.sam.prompt_encoder.requires_grad_(True)  # shared fixture


def test_grayscale_image_and_lora_refiner():
    sam = build_tiny_sam(img_size=256, encoder_depth=2, seed=2)
    ref = SAMRefiner(sam, preprocessing="medsam", use_lora=True, lora_rank=2,
                     lora_target_modules=("qkv", "proj")).train()
    counts = ref.parameter_counts()
    assert counts["lora"] > 0 and counts["trainable/sam.image_encoder"] == counts["lora"]
    img = torch.randint(0, 256, (1, 1, 50, 70)).float()
    out = ref(img, _ellipse(50, 70, 35, 25, 12, 10))
    out["masks"].mean().backward()
    lora_grads = [p.grad for n, p in ref.named_parameters() if "lora_A" in n]
    assert lora_grads and all(g is not None for g in lora_grads)


@pytest.mark.parametrize("mode", ["sam", "medsam"])
def test_pre_resized_image_path(sam256, mode):
    h, w = 70, 110
    img = _image(h, w, seed=8)
    coarse = _ellipse(h, w, 55, 35, 20, 15)
    ref = SAMRefiner(sam256, preprocessing=mode).eval()
    small = ref.geometry.resize_uint8(img)
    assert small.shape == ((163, 256, 3) if mode == "sam" else (256, 256, 3))
    with torch.no_grad():
        a = ref(_as_tensor(img), coarse)
        b = ref(_as_tensor(small), coarse, original_size=(h, w))
    assert torch.allclose(a["masks"], b["masks"], atol=1e-6)
    with pytest.raises(ValueError, match="encoder frame"):
        ref(_as_tensor(small[:100, :100]), coarse, original_size=(h, w))


def test_cached_embeddings_refused_with_trainable_encoder():
    ref = SAMRefiner(build_tiny_sam(img_size=128, encoder_depth=1), use_lora=True).train()
    emb = torch.zeros(1, 64, 8, 8)
    with pytest.raises(ValueError, match="no gradient"):
        ref(image_embeddings=emb, coarse=torch.zeros(1, 1, 32, 32), original_size=(32, 32))
    ref.eval()
    with torch.no_grad():
        assert ref(image_embeddings=emb, coarse=torch.zeros(1, 1, 32, 32), original_size=(32, 32))["masks"].shape == (
            1, 1, 32, 32)


def test_box_from_coarser_mask_covers_the_lesion_pixels(sam256):
    ref = SAMRefiner(sam256, preprocessing="sam", use_point_prompt=False, use_mask_prompt=False)
    coarse = torch.zeros(1, 1, 50, 50)
    coarse[..., 10:20, 5:15] = 1  # image pixels 20..39 (rows), 10..29 (cols) at 100x100
    boxes = ref.make_prompts(coarse, (100, 100))["boxes"]
    assert boxes.tolist() == [[10.0, 20.0, 29.0, 39.0]]


@pytest.mark.parametrize("mode", ["sam", "medsam"])
def test_mask_prompt_frame_lines_up_with_the_image(mode):
    geo = SamGeometry(mode, 1024)
    h, w = 300, 500  # sam: content 614x1024 in the encoder frame, 153.5 x 256 at low res
    full = torch.ones(1, 1, h, w)
    low = geo.mask_prompt_frame(full, (h, w))
    assert low.shape == (1, 1, 256, 256)
    if mode == "sam":
        assert low[0, 0, :153].min() == 1 and low[0, 0, 154:].max() == 0 and low[0, 0, 153, 0] == 0.5
    else:
        assert torch.allclose(low, torch.ones_like(low))
    m = _ellipse(h, w, 200, 150, 90, 60)
    back = geo.postprocess_masks(geo.mask_prompt_frame(m, (h, w)) - 0.5, (h, w)) > 0  # round trip
    assert (back.float() == m).float().mean() > 0.995


def test_no_prompt_at_all_and_unit_scale_image_refused(sam256):
    ref = SAMRefiner(sam256, use_point_prompt=False, use_box_prompt=False, use_mask_prompt=False).eval()
    img = _as_tensor(_image(40, 60)).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = ref(img, torch.zeros(2, 1, 40, 60))
    assert out["masks"].shape == (2, 1, 40, 60)
    with pytest.raises(ValueError, match="0-255"):
        ref(img.float() / 255, torch.zeros(2, 1, 40, 60))


@pytest.mark.parametrize("mode, k", [("sam", 3), ("medsam", 1)])
def test_default_prompts_and_outputs_follow_the_preprocessing(sam256, mode, k):
    """Defaults: box (of the largest component) + mask prompts, no points; single-mask output for MedSAM-style
    weights, three candidates for Meta's SAM."""
    h, w = 60, 80
    coarse = _ellipse(h, w, 25, 30, 12, 10) + _ellipse(h, w, 70, 10, 3, 3)  # lesion + a stray blob
    ref = SAMRefiner(sam256, preprocessing=mode).eval()
    assert ref.multimask_output is (k == 3)
    with torch.no_grad():
        out = ref(_as_tensor(_image(h, w)), coarse)
    assert out["prompts"]["point_coords"] is None and out["prompts"]["point_labels"] is None
    assert out["prompts"]["mask_input"] is not None
    assert out["low_res_logits"].shape[1] == k and out["iou_predictions"].shape == (1, k)
    assert out["prompts"]["boxes"].tolist() == [[14.0, 21.0, 36.0, 39.0]]  # the stray blob is left out
    with pytest.raises(ValueError, match="litemedsam"):
        SAMRefiner(sam256, preprocessing="litemedsam")


def test_components_prompt_one_prompt_set_per_lesion(sam256):
    """box_source="components": each lesion gets its own box and mask prompt, decoded in one batch and merged by
    the maximum; with one lesion (or none) it is exactly the largest-component rule."""
    h, w = 60, 80
    two = _ellipse(h, w, 20, 20, 10, 8) + _ellipse(h, w, 60, 42, 12, 10)
    one = _ellipse(h, w, 40, 30, 12, 10)
    coarse = torch.cat([two, one, torch.zeros(1, 1, h, w)])
    img = _as_tensor(_image(h, w)).expand(3, -1, -1, -1)
    comp = SAMRefiner(sam256, box_source="components", max_components=3).eval()
    largest = SAMRefiner(sam256, box_source="largest").eval()
    with torch.no_grad():
        emb = comp.encode_image(img)
        out = comp(image_embeddings=emb, coarse=coarse, original_size=(h, w))
        ref = largest(image_embeddings=emb, coarse=coarse, original_size=(h, w))
        # the smaller lesion alone, as the second slot sees it
        small = comp(image_embeddings=emb[:1], coarse=_ellipse(h, w, 20, 20, 10, 8), original_size=(h, w))
    assert out["masks"].shape == (3, 1, h, w) and out["iou_predictions"].shape == ref["iou_predictions"].shape
    assert out["prompts"]["component_valid"].tolist() == [[True, True, False], [True, False, False],
                                                          [True, False, False]]
    boxes = out["prompts"]["component_boxes"]
    assert boxes[0, 0].tolist() == ref["prompts"]["boxes"][0].tolist()  # slot 0: the largest lesion's box
    assert boxes[0, 1].tolist() == small["prompts"]["boxes"][0].tolist()  # slot 1: the other lesion's box
    # merged = maximum of the two lesions' refined low-res logits, then SAM's upsampling
    both = torch.maximum(_one(comp, emb[:1], two, 0, h, w), _one(comp, emb[:1], two, 1, h, w))
    assert torch.allclose(out["low_res_masks"][:1], both, atol=1e-5)
    assert torch.allclose(out["masks"][:1], comp.geometry.postprocess_masks(both, (h, w)), atol=1e-5)
    assert torch.allclose(_one(comp, emb[:1], two, 1, h, w), small["low_res_masks"], atol=1e-5)
    for i in (1, 2):  # one lesion, and an empty mask (the whole-image box): same as one prompt set
        assert torch.allclose(out["masks"][i], ref["masks"][i], atol=1e-4)
        assert torch.allclose(out["iou_predictions"][i], ref["iou_predictions"][i], atol=1e-5)
    # gradient reaches the coarse mask at both lesions
    comp.train()
    p = (coarse[:1] * 0.9 + 0.05).requires_grad_(True)
    comp(image_embeddings=emb[:1], coarse=p, original_size=(h, w))["masks"].sum().backward()
    assert p.grad[..., 12:28, 10:30].abs().sum() > 0 and p.grad[..., 32:52, 48:72].abs().sum() > 0


def _one(refiner, emb, coarse, slot, h, w):
    """The selected low-res logits (1,1,L,L) of one component slot decoded alone (its cut mask as the prompt)."""
    from ultrarefiner.networks.prompts import component_masks

    comps, _ = component_masks(coarse, refiner.max_components, refiner.min_component)
    part = coarse * comps[:, slot : slot + 1]
    low, iou = refiner.decode(emb, refiner.make_prompts(part, (h, w), box_source="whole"), (h, w))
    return (refiner.selection_weights(iou)[:, :, None, None] * low).sum(1, keepdim=True)
