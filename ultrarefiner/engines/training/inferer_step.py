"""MONAI's own supervised iteration as hooks of the shared steps: ``engine.inferer`` on the network, then the loss.

Phase 1 (TransUNet) trains and validates with these, and the inference configs that run a plain network through
an inferer (``transunet``, ``sam_refiner``) evaluate with :class:`InfererEvalStep`. The forward and the loss are
``SupervisedTrainer._iteration``'s (``engine.inferer(inputs, engine.network)``, then
``engine.loss_function(pred, label).mean()``); AMP, the float32 loss, the non-finite skip and the events come from
:class:`~ultrarefiner.engines.training.step.TrainStep` / ``EvalStep`` like every other phase's.
"""

from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine
from monai.utils import CommonKeys as Keys

from ultrarefiner.engines.training.step import EvalStep, TrainStep

__all__ = ["InfererEvalStep", "InfererTrainStep"]


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
    """``prepare_batch`` output -> (inputs, targets, args, kwargs), as MONAI's engines read it."""
    return (*batch, (), {}) if len(batch) == 2 else tuple(batch)  # type: ignore[return-value]


class InfererTrainStep(TrainStep):
    def __init__(self, amp: bool = True, amp_dtype: torch.dtype = torch.bfloat16, max_grad_norm: float | None = None,
                 skip_nonfinite: bool = True, log_interval: int = 100) -> None:
        """
        ``iteration_update`` of phase 1's ``SupervisedTrainer`` (any network trained through ``engine.inferer``).

        Arguments:
          amp, amp_dtype, max_grad_norm, log_interval: see ``TrainStep``.
          skip_nonfinite: skip a step with non-finite gradients (what MONAI's GradScaler did under ``amp``); with
            SGD it reads one flag back per step.
        """
        super().__init__(amp, amp_dtype, max_grad_norm, clip_per_group=False, skip_nonfinite=skip_nonfinite,
                         log_interval=log_interval)

    def forward_and_loss(self, engine: Engine, batch: Any) -> dict[str, Any]:
        """Logits ``pred`` (B,K,S,S) of (B,C,S,S) ``image``; ``loss`` against ``label`` (B,1,S,S).

        The loader's MetaTensors enter as plain tensors: training needs no metadata, and a MetaTensor sends every
        operation of the forward pass through Python (``__torch_function__``), about 11 us more per operation on
        the host, which bounds a GPU step.
        """
        inputs, targets, args, kwargs = _unpack(batch)
        inputs, targets = inputs.as_subclass(torch.Tensor), targets.as_subclass(torch.Tensor)
        pred = engine.inferer(inputs, engine.network, *args, **kwargs)
        loss = self.compute_loss(engine, pred, targets).mean()
        return {Keys.IMAGE: inputs, Keys.LABEL: targets, Keys.PRED: pred.detach(), Keys.LOSS: loss}


class InfererEvalStep(EvalStep):
    """``iteration_update`` of a ``SupervisedEvaluator`` as MONAI's own: ``pred`` the output of ``engine.inferer``
    (e.g. TransUNet's (B,K,S,S) logits; meta data kept, for ``Invertd``), ``image``, ``label`` (None without one)."""

    def forward(self, engine: Engine, batch: Any) -> dict[str, Any]:
        inputs, targets, args, kwargs = _unpack(batch)
        return {Keys.IMAGE: inputs, Keys.LABEL: targets, Keys.PRED: engine.inferer(inputs, engine.network, *args,
                                                                                  **kwargs)}
