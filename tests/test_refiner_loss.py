"""RefinerLoss components, an active IoU-prediction loss, the quality-aware change penalty and the curriculum."""

from __future__ import annotations

import torch

from ultrarefiner.losses.refiner_loss import RefinerLoss, curriculum_weights
from ultrarefiner.networks.sam_refiner import SAMRefiner
from ultrarefiner.networks.sam_weights import build_tiny_sam


def _square(h=32, w=32, a=8, b=24):
    m = torch.zeros(1, 1, h, w)
    m[..., a:b, a:b] = 1
    return m


def _outputs(mask_logits, cand_logits, iou_pred):
    return {"masks": mask_logits, "candidate_logits": cand_logits, "iou_predictions": iou_pred}


def test_components_and_total():
    gt = _square()
    good = (gt * 2 - 1) * 8
    cand = torch.cat([good, -good, torch.zeros_like(good)], dim=1)
    out = RefinerLoss()(_outputs(good, cand, torch.tensor([[1.0, 0.0, 0.25]])), gt, input_mask=gt)
    assert set(out) == {"loss", "bce", "dice", "iou", "change", "input_dice"}
    assert out["bce"] < 1e-2 and out["dice"] < 1e-2 and out["change"] < 1e-2
    # real IoUs: 1 (exact), 0 (inverted), 0.25 (all-positive zeros? logits 0 -> not > 0 -> empty -> 0)
    assert torch.isclose(out["iou"], torch.tensor((0 + 0 + 0.25**2) / 3), atol=1e-5)
    w = dict(bce_weight=2.0, dice_weight=3.0, iou_weight=4.0, change_penalty_weight=5.0)
    out2 = RefinerLoss(**w)(_outputs(-good, cand, torch.tensor([[0.5, 0.5, 0.5]])), gt, input_mask=gt)
    total = 2 * out2["bce"] + 3 * out2["dice"] + 4 * out2["iou"] + 5 * out2["change"]
    assert torch.isclose(out2["loss"], total)


def test_predictions_resized_to_label_resolution():
    gt = _square(64, 64, 16, 48)
    low = (_square() * 2 - 1) * 8  # 32x32 logits, same shape scaled
    out = RefinerLoss()(_outputs(low, low.expand(-1, 3, -1, -1), torch.ones(1, 3)), gt)
    assert out["dice"] < 0.05 and out["iou"] < 0.02


def test_change_penalty_weighted_by_input_quality():
    gt = _square()
    loss = RefinerLoss(bce_weight=0, dice_weight=0, iou_weight=0, change_penalty_weight=1)
    refined = torch.zeros(1, 1, 32, 32)  # logits 0: probability 0.5 everywhere, same change for both inputs
    cand = refined.expand(-1, 3, -1, -1)
    good_in = gt.clone()
    poor_in = torch.zeros_like(gt)
    poor_in[..., 0:6, 0:6] = 1
    g = loss(_outputs(refined, cand, torch.zeros(1, 3)), gt, input_mask=good_in)
    p = loss(_outputs(refined, cand, torch.zeros(1, 3)), gt, input_mask=poor_in)
    assert torch.isclose(g["input_dice"], torch.ones(1)) and p["input_dice"] < 0.01
    assert g["change"] > 0.4 and p["change"] < 0.01  # good inputs are preserved, poor ones free to change
    x = torch.zeros(1, 1, 32, 32, requires_grad=True)
    inp = good_in.clone().requires_grad_(True)
    loss(_outputs(x, x.expand(-1, 3, -1, -1), torch.zeros(1, 3)), gt, input_mask=inp)["loss"].backward()
    assert x.grad.abs().sum() > 0 and inp.grad is None  # no gradient into the input through the penalty


def test_iou_head_gets_gradient_through_refiner():
    torch.manual_seed(0)
    ref = SAMRefiner(build_tiny_sam(img_size=128, encoder_depth=1, seed=0), preprocessing="sam",
                     multimask_output=True).train()  # soft selection over three candidates
    img = torch.randint(0, 256, (2, 3, 48, 64)).float()
    coarse = torch.zeros(2, 1, 48, 64)
    coarse[0, :, 10:30, 10:40] = 1
    coarse[1, :, 20:40, 30:60] = 0.9
    gt = torch.zeros(2, 1, 48, 64)
    gt[:, :, 12:32, 12:44] = 1
    out = ref(img, coarse)
    # IoU term alone (segmentation terms off): the IoU head must still learn
    terms = RefinerLoss(bce_weight=0, dice_weight=0, change_penalty_weight=0)(out, gt, input_mask=coarse)
    terms["loss"].backward()
    head = ref.sam.mask_decoder.iou_prediction_head
    assert terms["iou"] > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    ref.zero_grad(set_to_none=True)
    # segmentation terms alone do not reach the IoU head (detached soft selection): the MSE is its only teacher
    out = ref(img, coarse)
    RefinerLoss(iou_weight=0)(out, gt, input_mask=coarse)["loss"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in head.parameters())


def test_sample_weights():
    gt = torch.cat([_square(), _square()])
    logits = torch.cat([(_square() * 2 - 1) * 8, -(_square() * 2 - 1) * 8])  # first right, second inverted
    cand = logits.expand(-1, 3, -1, -1)
    loss = RefinerLoss(iou_weight=0, change_penalty_weight=0)
    first_only = loss(_outputs(logits, cand, torch.ones(2, 3)), gt, sample_weights=torch.tensor([1.0, 0.0]))
    assert first_only["loss"] < 0.02


def test_curriculum_weights():
    dice = torch.tensor([0.9, 0.2, 0.6, 0.95, 0.0])
    w0 = curriculum_weights(dice, epoch=0, total_epochs=10)
    assert torch.isclose(w0.mean(), torch.tensor(1.0))
    assert torch.equal(torch.argsort(w0, descending=True), torch.argsort(dice, descending=True))
    assert w0[3] / w0[4] > 50  # easy samples dominate at first
    w_late = curriculum_weights(dice, epoch=5, total_epochs=10)
    assert torch.allclose(w_late, torch.ones(5))
    mid = curriculum_weights(dice, epoch=2, total_epochs=10)
    assert 1 < mid[3] / mid[4] < w0[3] / w0[4]


def test_curriculum_option_accepts_the_bare_flag_and_off_words():
    import pytest
    import torch

    from ultrarefiner.engines.training.refiner_training import RefinerTrainStep, parse_curriculum

    assert parse_curriculum(True) == {} and parse_curriculum("true") == {}
    assert parse_curriculum(None) is None and parse_curriculum(False) is None and parse_curriculum("false") is None
    assert parse_curriculum({"start_sharpness": 3.0}) == {"start_sharpness": 3.0}
    assert RefinerTrainStep(curriculum=True).curriculum == {}  # the original scripts' bare --curriculum
    with pytest.raises(ValueError, match="GradScaler"):
        RefinerTrainStep(amp_dtype=torch.float16)
