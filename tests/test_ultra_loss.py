"""Phase-3 loss: L_coarse is phase 1's loss (DiceCE 0.5/0.5), so the 0.3/0.7 split means what it says."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from monai.losses import DiceCELoss

from ultrarefiner.losses import UltraRefinerLoss


def test_coarse_term_is_the_phase1_loss():
    cfg = json.loads((Path(__file__).resolve().parents[1] / "bundles/transunet/configs/train.json").read_text())
    phase1 = {k: v for k, v in cfg["loss"].items() if k != "_target_"}
    assert cfg["loss"]["_target_"] == "DiceCELoss"
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 16, 16)
    label = (torch.rand(2, 1, 16, 16) > 0.5).float()
    loss = UltraRefinerLoss()
    expected = DiceCELoss(**phase1)(logits, label)
    assert torch.allclose(loss.coarse_loss(logits, label), expected)
    assert not torch.allclose(DiceCELoss(to_onehot_y=True, softmax=True)(logits, label), expected)  # 1/1 differs
