"""UltraRefiner (TransUNet -> prompts -> SAM): gradients end to end, loss, optimizer groups, cache, trainer, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.engines import SupervisedTrainer
from monai.losses import DiceCELoss

from ultrarefiner.engines.training.bundle_engines import bundle_trainer
from ultrarefiner.engines.training.e2e_training import E2EPrepareBatch, E2ETrainStep, build_e2e_optimizer
from ultrarefiner.engines.training.step import clip_gradients
from ultrarefiner.losses import UltraRefinerLoss
from ultrarefiner.networks import SAMRefiner, TransUNet, UltraRefiner, build_tiny_sam
from ultrarefiner.networks.ultra_refiner import UltraRefinerExport

S, H, W = 64, 96, 128  # TransUNet input side, native SAM image size


def _images(b: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B,1,S,S) [0,1] TransUNet input, (B,1,H,W) 0-255 native image and (B,1,H,W) label of the same scene."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    label = ((((xs - 60) / 30) ** 2 + ((ys - 45) / 20) ** 2) < 1).float()[None, None].repeat(b, 1, 1, 1)
    native = (0.3 + 0.4 * label + 0.2 * torch.rand(b, 1, H, W, generator=g)).clamp(0, 1)
    small = F.interpolate(native, (S, S), mode="bilinear", align_corners=False, antialias=True)
    return small, native * 255, label


def _build(preprocessing: str = "medsam", seed: int = 0, **kwargs) -> UltraRefiner:
    """Tiny TransUNet (no dropout) + tiny SAM. The head bias is shifted so that ~25% of the pixels of the test
    image are foreground: the random network then yields a real lesion (valid points, a box), not p ~ 0.5."""
    torch.manual_seed(seed)
    cache = kwargs.pop("cache_embeddings", None)
    cache_dtype = kwargs.pop("cache_dtype", torch.float16)
    transunet = TransUNet(img_size=S, vit_depth=1, hidden_size=32, num_heads=2, mlp_dim=64, block_units=(1, 1, 1),
                          decoder_channels=(32, 16, 16, 8), dropout=0.0)
    small, _, _ = _images()
    with torch.no_grad():
        logits = transunet(small)
        margin = (logits[:, 1] - logits[:, 0]).flatten().quantile(0.75)
        transunet.segmentation_head[0].bias[1] -= margin
    refiner = SAMRefiner(build_tiny_sam(img_size=256, encoder_depth=1, seed=seed), preprocessing=preprocessing,
                         **kwargs)
    return UltraRefiner(transunet, refiner, cache_embeddings=cache, cache_dtype=cache_dtype)


def _grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("preprocessing", ["medsam", "sam"])
def test_forward_shapes_and_cache_equals_no_cache(preprocessing):
    model = _build(preprocessing, cache_embeddings=True, cache_dtype=torch.float32).eval()
    plain = UltraRefiner(model.transunet, model.refiner, cache_embeddings=False).eval()
    small, native, _ = _images()
    with torch.no_grad():
        ref = plain(small, native)
        first = model(small, native)  # misses
        second = model(small, native)  # hits
    assert model.cache_stats() == {"hits": 2, "misses": 2}
    assert ref["coarse_logits"].shape == (2, 2, S, S) and ref["coarse_probs"].shape == (2, 1, S, S)
    assert ref["masks"].shape == (2, 1, H, W)  # refined at the native resolution
    for out in (first, second):
        assert torch.allclose(out["masks"], ref["masks"], atol=1e-5)
        assert torch.allclose(out["iou_predictions"], ref["iou_predictions"], atol=1e-6)
    # default float16 storage: close, not bit-equal
    half = UltraRefiner(model.transunet, model.refiner).eval()
    with torch.no_grad():
        half(small, native)
        again = half(small, native)
    assert half.cache_stats()["hits"] == 2
    assert (again["masks"] - ref["masks"]).abs().max() < 0.05 * ref["masks"].abs().max()
    # precomputed embeddings give the same result too
    with torch.no_grad():
        emb = model.encode_image(native)
        pre = plain(small, image_embeddings=emb, original_size=(H, W))
    assert torch.allclose(pre["masks"], ref["masks"], atol=1e-5)
    # a SAM image already in the encoder frame (resized in data workers) + original_size: same result
    geometry = model.refiner.geometry
    framed = torch.stack([torch.from_numpy(geometry.resize_uint8(a)) for a in
                          native.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).round().to(torch.uint8).numpy()])
    with torch.no_grad():
        out = model(small, framed.permute(0, 3, 1, 2), original_size=(H, W))
    assert out["masks"].shape == (2, 1, H, W) and torch.allclose(out["masks"], ref["masks"], atol=1e-5)


def test_cache_follows_loaded_weights():
    """Loading other encoder weights re-keys the cache: no stale embedding is returned."""
    model = _build(cache_embeddings=True, cache_dtype=torch.float32).eval()
    small, native, _ = _images()
    with torch.no_grad():
        before = model(small, native)["masks"]
        sd = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
              for k, v in model.state_dict().items()}
        model.load_state_dict(sd)
        after = model(small, native)["masks"]
        fresh = UltraRefiner(model.transunet, model.refiner, cache_embeddings=False).eval()(small, native)["masks"]
    assert not torch.allclose(before, after)
    assert torch.allclose(after, fresh, atol=1e-5)
    # the cache is not part of the module tree: the encoder's weights appear once in the state_dict
    assert all(k.startswith(("transunet.", "refiner.")) for k in sd)
    assert len(sd) == len(model.transunet.state_dict()) + len(model.refiner.state_dict())


def test_refined_loss_alone_reaches_transunet_encoder_and_decoder():
    model = _build().train()
    small, native, label = _images()
    out = model(small, native)
    losses = UltraRefinerLoss(coarse_weight=0.0, refined_weight=1.0)(out, label)
    losses["loss"].backward()
    tu = model.transunet
    for name, part in [("resnet", tu.backbone), ("patch_embed", tu.patch_embed), ("vit", tu.blocks),
                       ("decoder", tu.decoder), ("head", tu.segmentation_head)]:
        assert _grad_norm(part) > 0, f"no gradient in TransUNet's {name}"
    assert _grad_norm(model.refiner.sam.mask_decoder) > 0
    assert all(p.grad is None for p in model.refiner.sam.image_encoder.parameters())  # frozen, cached


@pytest.mark.parametrize("prompt", ["point", "mask", "box"])
def test_coarse_gradient_flows_through_each_prompt(prompt):
    model = _build(use_point_prompt=prompt == "point", use_mask_prompt=prompt == "mask",
                   use_box_prompt=prompt == "box").train()
    small, native, label = _images()
    out = model(small, native)
    key = {"point": "point_coords", "mask": "mask_input", "box": "boxes"}[prompt]
    assert out["prompts"][key].requires_grad
    if prompt == "point":
        assert (out["prompts"]["point_labels"] == 1).all()  # a real lesion point, not SAM's "not a point"
    (grad,) = torch.autograd.grad(out["prompts"][key].sum(), out["coarse_probs"], retain_graph=True)
    assert grad.abs().sum() > 0
    UltraRefinerLoss(coarse_weight=0.0)(out, label)["loss"].backward()
    assert _grad_norm(model.transunet.blocks) > 0 and _grad_norm(model.transunet.decoder) > 0


@pytest.mark.parametrize("weights", [(0.3, 0.7), (1.0, 0.0), (2.0, 0.5)])
def test_loss_weights_combine(weights):
    torch.manual_seed(0)
    b = 2
    label = (torch.rand(b, 1, H, W) > 0.6).float()
    outputs = {"coarse_logits": torch.randn(b, 2, S, S), "masks": torch.randn(b, 1, H, W),
               "candidate_logits": torch.randn(b, 3, H, W), "iou_predictions": torch.rand(b, 3)}
    loss_fn = UltraRefinerLoss(*weights) if weights != (0.3, 0.7) else UltraRefinerLoss()
    out = loss_fn(outputs, label)
    assert torch.allclose(out["loss"], weights[0] * out["coarse"] + weights[1] * out["refined"])
    small_label = F.interpolate(label, (S, S), mode="nearest")
    phase1 = DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=0.5, lambda_dice=0.5)  # phase 1's loss
    assert torch.allclose(out["coarse"], phase1(outputs["coarse_logits"], small_label))
    bce = F.binary_cross_entropy_with_logits(outputs["masks"], label)
    prob = torch.sigmoid(outputs["masks"])
    dice = (1 - (2 * (prob * label).sum((1, 2, 3)) + 1e-5) / (prob.sum((1, 2, 3)) + label.sum((1, 2, 3)) + 1e-5))
    assert torch.allclose(out["refined_bce"], bce, atol=1e-6)
    assert torch.allclose(out["refined_dice"], dice.mean(), atol=1e-6)
    assert torch.allclose(out["refined"], bce + dice.mean(), atol=1e-6)  # iou weight 0 by default
    # a separate 224-style coarse label is used when given; the refined label is resized to the masks' size
    other = UltraRefinerLoss()(outputs, label, coarse_target=torch.zeros(b, 1, S, S))
    assert not torch.allclose(other["coarse"], out["coarse"]) and torch.allclose(other["refined"], out["refined"])
    with pytest.raises(ValueError, match="target"):
        loss_fn(outputs, label[:1])


def test_param_groups_have_two_learning_rates():
    model = _build()
    opt = build_e2e_optimizer(model)
    assert [g["name"] for g in opt.param_groups] == ["transunet", "sam"]
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-5]
    ids = [{id(p) for p in g["params"]} for g in opt.param_groups]
    assert ids[0] == {id(p) for p in model.transunet.parameters()}
    assert ids[1] == {id(p) for p in model.refiner.parameters()}  # frozen encoder included: fixed layout
    assert not ids[0] & ids[1]
    opt = build_e2e_optimizer(model, transunet_lr=3e-4, sam_lr=2e-6, optimizer="sgd", momentum=0.9)
    assert [g["lr"] for g in opt.param_groups] == [3e-4, 2e-6]


def test_iou_head_frozen_unless_trained():
    """With no IoU term and no selection gradient the IoU head only got zero gradients, on which AdamW's weight decay
    drifted it; it is frozen now (and trained when asked)."""
    model = _build()
    small, native, label = _images()
    opt = build_e2e_optimizer(model, weight_decay=0.5)
    head = model.refiner.sam.mask_decoder.iou_prediction_head
    assert not any(p.requires_grad for p in head.parameters())
    before = {k: v.clone() for k, v in head.state_dict().items()}
    out = model(small, native)
    UltraRefinerLoss()(out, label)["loss"].backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())
    model = _build()
    build_e2e_optimizer(model, train_iou_head=True)
    assert all(p.requires_grad for p in model.refiner.sam.mask_decoder.iou_prediction_head.parameters())


def test_clip_gradients_per_group():
    model = _build()
    opt = build_e2e_optimizer(model)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 10.0)
    norms = clip_gradients(opt, 1.0)
    assert set(norms) == {"transunet", "sam"} and all(float(n) > 1.0 for n in norms.values())
    for g in opt.param_groups:
        total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in g["params"] if p.grad is not None]))
        assert float(total) <= 1.0 + 1e-4


def test_trainer_iteration_and_optimizer_resume():
    model = _build()
    small, native, label = _images()
    batch = {"image": small, "sam_image": native / 255.0, "label": label, "original_size": [torch.tensor([H, H]),
                                                                                         torch.tensor([W, W])]}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prep = E2EPrepareBatch(original_size_key="original_size", sam_image_scale=255.0)

    def trainer_over(batches: list) -> SupervisedTrainer:
        """The phase-3 bundle's trainer (its loss, optimizer, step, metrics) over ``batches``, without handlers."""
        return bundle_trainer("ultrarefiner", {
            "network": model, "device": "$torch.device('cpu')", "amp": False, "epochs": 1, "epoch_length": None,
            "train#dataloader": batches, "train#prepare_batch": prep, "train#handlers": []})

    trainer = trainer_over([batch, batch])
    opt = trainer.optimizer
    assert isinstance(trainer._process_function, E2ETrainStep) and isinstance(trainer.loss_function, UltraRefinerLoss)
    trainer.run()
    out = trainer.state.output
    assert torch.isfinite(out["loss"]) and {"loss_coarse", "loss_refined", "grad_norm_transunet",
                                            "grad_norm_sam"} <= set(out)
    assert out["pred"].shape == (2, 1, H, W)
    after = model.state_dict()
    assert not torch.equal(before["transunet.pos_embed"], after["transunet.pos_embed"])
    assert not torch.equal(before["refiner.sam.mask_decoder.mask_tokens.weight"],
                           after["refiner.sam.mask_decoder.mask_tokens.weight"])
    enc = "refiner.sam.image_encoder.patch_embed.proj.weight"
    assert torch.equal(before[enc], after[enc])
    assert model.cache_stats() == {"hits": 2, "misses": 2}
    # a bf16 forward (the step autocasts on CUDA only: here an enclosing CPU autocast), cache hits included
    amp_trainer = trainer_over([batch])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp_trainer.run()
    assert torch.isfinite(amp_trainer.state.output["loss"]) and model.cache_stats()["hits"] == 4
    # resume: a fresh optimizer from the same builder accepts the saved state (same group layout)
    fresh = build_e2e_optimizer(_build())
    fresh.load_state_dict(opt.state_dict())
    assert [g["lr"] for g in fresh.param_groups] == [1e-4, 1e-5]


def test_prepare_batch_sizes():
    small, native, label = _images()
    prep = E2EPrepareBatch(original_size_key="original_size")
    image, target, args, kwargs = prep({"image": small, "sam_image": native, "label": label,
                                        "original_size": torch.tensor([[H, W], [H, W]])})
    assert kwargs["original_size"] == (H, W) and args == () and target.shape == label.shape
    with pytest.raises(ValueError, match="share one original_size"):
        prep({"image": small, "sam_image": native, "label": label, "original_size": torch.tensor([[H, W], [W, H]])})
    with pytest.raises(KeyError, match="sam_image"):
        prep({"image": small, "label": label, "original_size": torch.tensor([[H, W], [H, W]])})
    with pytest.raises(ValueError, match="bfloat16"):
        E2ETrainStep(amp_dtype=torch.float16)


@pytest.mark.parametrize(
    "case, match",
    [
        ("tu_channels", "channels"),
        ("tu_size", "64x64"),
        ("tu_scale", r"\[0,1\]"),
        ("sam_channels", r"B,1\|3,H,W"),
        ("batch", "batch mismatch"),
        ("emb_batch", "image_embeddings"),
        ("emb_no_size", "original_size"),
        ("both", "exactly one"),
        ("none", "exactly one"),
        ("sam_frame", "encoder frame"),
    ],
)
def test_bad_inputs_raise_clear_errors(case, match):
    model = _build().eval()
    small, native, _ = _images()
    emb = torch.zeros(2, 64, 16, 16)
    args = {
        "tu_channels": (small.repeat(1, 3, 1, 1), native),
        "tu_size": (F.interpolate(small, (32, 32)), native),
        "tu_scale": (small * 255, native),
        "sam_channels": (small, native.repeat(1, 2, 1, 1)),
        "batch": (small, native[:1]),
        "emb_batch": (small, None, emb[:1], (H, W)),
        "emb_no_size": (small, None, emb),
        "both": (small, native, emb, (H, W)),
        "none": (small, None),
        "sam_frame": (small, native, None, (2 * H + 1, W)),
    }[case]
    with pytest.raises(ValueError, match=match), torch.no_grad():
        model(*args)


def test_cache_refused_with_trainable_encoder():
    with pytest.raises(ValueError, match="frozen SAM image encoder"):
        _build(use_lora=True, cache_embeddings=True)
    model = _build(use_lora=True)  # auto: no cache, the adapters get gradients
    assert not model.cache_embeddings
    small, native, label = _images()
    UltraRefinerLoss()(model.train()(small, native), label)["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.refiner.sam.image_encoder
               .named_parameters() if "lora" in n)


def _batch_norms(refiner: SAMRefiner) -> list[torch.nn.Module]:
    return [m for m in refiner.sam.image_encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_frozen_litemedsam_encoder_stays_in_eval_mode_while_training():
    """The trainers call ``network.train()`` every iteration. LiteMedSAM's TinyViT (the default refiner) has batch
    norms: in train mode they normalised by the batch's statistics (embeddings 110% away from the eval ones) and
    overwrote their running statistics at each cache miss. A frozen encoder now stays in eval mode: a cache miss
    under ``train()`` gives the eval embeddings and leaves every buffer as it was."""
    net = _build()
    net.refiner = SAMRefiner()  # LiteMedSAM, packaged weights, frozen encoder
    net._caches.clear()
    bns = _batch_norms(net.refiner)
    assert len(bns) == 27
    buffers = {k: v.clone() for k, v in net.refiner.sam.image_encoder.state_dict().items()}
    _, native, _ = _images()
    with torch.no_grad():
        reference = net.eval().refiner.encode_image(native)
        net.train()
        assert net.refiner.training and net.refiner.sam.mask_decoder.training
        assert not any(m.training for m in net.refiner.sam.image_encoder.modules())
        miss = net.encode_image(native, image_keys=["a", "b"])
    assert torch.allclose(miss.float(), reference, atol=2e-3, rtol=1e-3)
    after = net.refiner.sam.image_encoder.state_dict()
    assert all(torch.equal(after[k], v) for k, v in buffers.items())


def test_lora_encoder_trains_its_adapters_with_its_frozen_batch_norms_in_eval_mode():
    refiner = SAMRefiner(use_lora=True).train()
    assert refiner.encoder_trainable() and refiner.sam.image_encoder.training
    assert not any(m.training for m in _batch_norms(refiner))
    lora = [m for n, m in refiner.sam.image_encoder.named_modules() if "lora" in type(m).__name__.lower()]
    assert lora and all(m.training for m in lora)
    assert not refiner.eval().sam.image_encoder.training  # eval() still reaches everything



def test_export_interface_loads_the_bundles_self_describing_checkpoint():
    """``models/model.pt`` as phase-3 training exports it (``{"model": ..., "kind", "identity", ...}``) loads into
    ``UltraRefinerExport`` (the bundle's network_def) as it is, strictly: what ``ckpt_export`` without
    ``--key_in_ckpt`` and the Zoo's checks do. Another phase's file is refused by name."""
    src, dst = UltraRefinerExport.from_model(_build(seed=0)), UltraRefinerExport.from_model(_build(seed=1))
    weights = src.state_dict()
    assert any(not torch.equal(v, weights[k]) for k, v in dst.state_dict().items())
    dst.load_state_dict({"kind": "ultrarefiner", "model": weights, "identity": {"phase": "ultrarefiner"}, "epoch": 2})
    assert all(torch.equal(v, weights[k]) for k, v in dst.state_dict().items())
    partial = {k: v for k, v in weights.items() if not k.startswith("refiner.")}
    with pytest.raises(RuntimeError, match="Missing key"):  # still strict inside the wrapper
        dst.load_state_dict({"kind": "ultrarefiner", "model": partial})
    with pytest.raises(ValueError, match="phase-2 SAM refiner checkpoint"):
        dst.load_state_dict({"kind": "sam_refiner", "model": weights})
