"""End-to-end loss of ``UltraRefiner``: coarse (TransUNet) and refined (SAM) terms.

L = coarse_weight * L_coarse + refined_weight * L_refined, defaults 0.3 / 0.7.

- L_coarse: MONAI ``DiceCELoss`` (softmax, one-hot label) on TransUNet's K-class logits, against the label at the
  coarse resolution (S x S, nearest-resized from the given label when needed, as the 224 pipeline label is).
- L_refined: BCE + Dice on the refined logits (``masks``, native resolution) against the label at THAT resolution
  (the label is resized to the prediction, never the prediction to a 224 label); optionally SAM's IoU-prediction
  MSE (``RefinerLoss``), which keeps the IoU head calibrated when the mask decoder trains.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

from .refiner_loss import RefinerLoss

__all__ = ["UltraRefinerLoss"]


def _label_at(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B,1,h,w) {0,1} label -> (B,1,*size) float, nearest (the pipeline's label resize)."""
    label = label.float()
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    return F.interpolate(label, size, mode="nearest")


class UltraRefinerLoss(nn.Module):
    def __init__(
        self,
        coarse_weight: float = 0.3,
        refined_weight: float = 0.7,
        coarse_lambda_ce: float = 0.5,
        coarse_lambda_dice: float = 0.5,
        refined_bce_weight: float = 1.0,
        refined_dice_weight: float = 1.0,
        refined_iou_weight: float = 0.0,
        smooth: float = 1e-5,
    ) -> None:
        """
        Arguments:
          coarse_weight (float): weight of L_coarse (0 trains TransUNet through the refiner only).
          refined_weight (float): weight of L_refined.
          coarse_lambda_ce, coarse_lambda_dice (float): CE and Dice weights inside L_coarse (``DiceCELoss``); 0.5/0.5
            as phase 1's loss, so that L_coarse is the loss TransUNet was trained with and the 0.3/0.7 split means
            what it says (1/1 doubled L_coarse).
          refined_bce_weight, refined_dice_weight (float): BCE and Dice weights inside L_refined.
          refined_iou_weight (float): weight of SAM's IoU-prediction MSE inside L_refined (0: off).
          smooth (float): Dice smoothing of L_refined.
        """
        super().__init__()
        if coarse_weight < 0 or refined_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got coarse {coarse_weight}, refined {refined_weight}")
        self.coarse_weight = coarse_weight
        self.refined_weight = refined_weight
        self.coarse_loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=coarse_lambda_ce,
                                      lambda_dice=coarse_lambda_dice)
        self.refined_loss = RefinerLoss(refined_bce_weight, refined_dice_weight, refined_iou_weight,
                                        change_penalty_weight=0.0, smooth=smooth)

    def forward(
        self,
        outputs: Mapping[str, torch.Tensor],
        target: torch.Tensor,
        coarse_target: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Arguments:
          outputs: ``UltraRefiner`` output dict; uses "coarse_logits" (B,K,S,S), "masks" (B,1,H,W) logits,
            "iou_predictions" (B,K') and "candidate_logits" (B,K',H,W).
          target (torch.Tensor): (B,1,Ht,Wt) {0,1} label, ideally at the refined resolution (H,W); resized
            (nearest) to (H,W) for L_refined and to (S,S) for L_coarse.
          coarse_target (torch.Tensor or None): (B,1,S,S) label for L_coarse (e.g. the 224 pipeline label);
            None: derived from ``target``.

        Returns:
          dict with "loss" (scalar total), "coarse", "refined" (unweighted terms) and the components of L_refined
          "refined_bce", "refined_dice", "refined_iou".
        """
        coarse_logits = outputs["coarse_logits"].float()
        masks = outputs["masks"]
        b = coarse_logits.shape[0]
        if target.dim() != 4 or target.shape[0] != b or target.shape[1] != 1:
            raise ValueError(f"target must be (B={b},1,H,W), got {tuple(target.shape)}")
        coarse_target = target if coarse_target is None else coarse_target
        coarse = self.coarse_loss(coarse_logits, _label_at(coarse_target, tuple(coarse_logits.shape[-2:])))

        refined_outputs = {k: outputs[k].float() for k in ("masks", "iou_predictions", "candidate_logits")}
        refined = self.refined_loss(refined_outputs, _label_at(target, tuple(masks.shape[-2:])))

        total = self.coarse_weight * coarse + self.refined_weight * refined["loss"]
        return {"loss": total, "coarse": coarse, "refined": refined["loss"], "refined_bce": refined["bce"],
                "refined_dice": refined["dice"], "refined_iou": refined["iou"]}
