"""Refiner loss (BCE + Dice + IoU-prediction + quality-aware change penalty) and an easy-to-hard curriculum.

Total = bce_weight * BCE(selected) + dice_weight * Dice(selected) + iou_weight * MSE(iou_pred, real IoU)
        + change_penalty_weight * quality-aware change penalty.

- Selected mask: the refiner's ``masks`` (B,1,H,W) logits (soft selection over candidates while training), resized
  to the label resolution if needed.
- IoU prediction: each candidate's predicted IoU regresses to its real IoU with the ground truth (SAM's recipe:
  the hard IoU of ``logits > 0``, no gradient through the target). It is the only loss on the IoU head when the
  refiner's ``selection_grad`` is False, so it must be (and is) active.
- Change penalty: mean |sigmoid(refined) - input| per sample, weighted by the input's Dice with the ground truth
  (no gradient through the weight or the input): good inputs are kept, poor ones are free to change.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RefinerLoss", "curriculum_weights", "dice_score"]


def _resize_like(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size, mode="bilinear", align_corners=False)


def dice_score(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample Dice of (B,1,H,W) masks/probabilities in [0,1]; an empty pred and target give 1. Returns (B,)."""
    dims = tuple(range(1, pred.dim()))
    inter = (pred * target).sum(dims)
    denom = pred.sum(dims) + target.sum(dims)
    return (2 * inter + eps) / (denom + eps)


def _iou_hard(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B,K,H,W) logits vs (B,1,H,W) binary target -> (B,K) IoU of logits > 0 (empty vs empty = 1)."""
    pred = (logits > 0).to(target.dtype)
    inter = (pred * target).sum((-2, -1))
    union = pred.sum((-2, -1)) + target.sum((-2, -1)) - inter
    return (inter + eps) / (union + eps)


class RefinerLoss(nn.Module):
    def __init__(
        self,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        iou_weight: float = 1.0,
        change_penalty_weight: float = 0.1,
        smooth: float = 1e-5,
    ) -> None:
        """
        Arguments:
          bce_weight (float): weight of the binary cross-entropy on the selected mask.
          dice_weight (float): weight of the soft Dice loss on the selected mask.
          iou_weight (float): weight of the IoU-prediction MSE.
          change_penalty_weight (float): weight of the quality-aware change penalty.
          smooth (float): Dice smoothing.
        """
        super().__init__()
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.iou_weight = iou_weight
        self.change_penalty_weight = change_penalty_weight
        self.smooth = smooth

    def forward(
        self,
        outputs: Mapping[str, torch.Tensor],
        target: torch.Tensor,
        input_mask: torch.Tensor | None = None,
        sample_weights: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Arguments:
          outputs: the refiner's output dict; uses "masks" (B,1,H,W) logits, "iou_predictions" (B,K) and
            "candidate_logits" (B,K,H,W) logits (or "low_res_logits" when absent).
          target (torch.Tensor): (B,1,Ht,Wt) ground truth in {0,1} (the label resolution; predictions are resized).
          input_mask (torch.Tensor or None): (B,1,h,w) the coarse mask given to the refiner, in [0,1]; needed for
            the change penalty (skipped when None).
          sample_weights (torch.Tensor or None): (B,) per-sample weights (e.g. ``curriculum_weights``); the
            per-sample terms are averaged with them.

        Returns:
          dict with "loss" (scalar total) and the unweighted components "bce", "dice", "iou", "change",
          plus "input_dice" (B,) (no gradient; handy for logging and the curriculum).
        """
        target = target.float()
        size = tuple(target.shape[-2:])
        b = target.shape[0]
        wts = torch.ones(b, device=target.device) if sample_weights is None else sample_weights.to(target.device)
        wts = wts / wts.sum().clamp_min(1e-8)

        logits = _resize_like(outputs["masks"], size)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(1, 2, 3))
        prob = torch.sigmoid(logits)
        dims = (1, 2, 3)
        inter = (prob * target).sum(dims)
        dice = 1 - (2 * inter + self.smooth) / (prob.sum(dims) + target.sum(dims) + self.smooth)

        cand = outputs.get("candidate_logits")
        if cand is None:
            cand = outputs["low_res_logits"]
        cand = _resize_like(cand, size)
        with torch.no_grad():
            real_iou = _iou_hard(cand, target)
        iou_pred = outputs["iou_predictions"]
        iou = ((iou_pred - real_iou) ** 2).mean(dim=1)

        zero = logits.new_zeros(b)
        change = zero
        input_dice = zero.detach()
        if input_mask is not None:
            inp = _resize_like(input_mask.detach().float(), size)
            with torch.no_grad():
                input_dice = dice_score((inp > 0.5).float(), target)
            change = input_dice * (prob - inp).abs().mean(dim=dims)

        terms = {"bce": (wts * bce).sum(), "dice": (wts * dice).sum(), "iou": (wts * iou).sum(),
                 "change": (wts * change).sum()}
        total = (self.bce_weight * terms["bce"] + self.dice_weight * terms["dice"] + self.iou_weight * terms["iou"]
                 + self.change_penalty_weight * terms["change"])
        return {"loss": total, **terms, "input_dice": input_dice}


def curriculum_weights(input_dice: torch.Tensor, epoch: int, total_epochs: int, start_sharpness: float = 5.0,
                       warmup_fraction: float = 0.5) -> torch.Tensor:
    """Per-sample loss weights, easy (high input Dice) -> hard over epochs.

    weight_i = exp(-s(t) * (1 - dice_i)), normalised to mean 1, with s(t) decaying linearly from
    ``start_sharpness`` at epoch 0 to 0 at ``warmup_fraction * total_epochs`` (uniform weights afterwards).
    With s = 5, a sample with input Dice 0.2 starts at exp(-4) = 2% of the weight of a perfect one.
    Usable as ``RefinerLoss(..., sample_weights=...)`` or as ``torch.utils.data.WeightedRandomSampler`` weights.

    Arguments:
      input_dice (torch.Tensor): (N,) Dice of each sample's coarse mask with its ground truth, in [0,1].
      epoch (int): current epoch (0-based).
      total_epochs (int): planned epochs.
      start_sharpness (float): s at epoch 0 (0 disables the curriculum).
      warmup_fraction (float): fraction of training after which all samples weigh the same.

    Returns:
      torch.Tensor: (N,) weights with mean 1.
    """
    end = max(1.0, warmup_fraction * total_epochs)
    s = start_sharpness * max(0.0, 1.0 - epoch / end)
    w = torch.exp(-s * (1.0 - input_dice.float().clamp(0, 1)))
    return w / w.mean().clamp_min(1e-12)
