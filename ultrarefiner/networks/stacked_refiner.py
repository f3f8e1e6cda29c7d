"""StackedInputRefiner: the SAM refiner behind a single-tensor interface (image and coarse mask stacked as channels).

MONAI's bundle tools (``verify_net_in_out``, ``ckpt_export``), TorchScript and the MONAI Label app call a network
with ONE tensor; ``SAMRefiner.forward`` takes keyword arguments and returns a dict. This wrapper maps one to the other
and nothing else: preprocessing, prompts and candidate selection stay the refiner's own.

Its ``state_dict`` is the wrapped refiner's (keys ``sam.*``, no extra prefix), so the bundle's ``models/model.pt``
loads into either, and the refiner stays reachable as ``.refiner``. ``load_state_dict`` also takes a whole refiner
checkpoint dict, such as the partial ``models/model.pt`` of a frozen encoder (prompt encoder + mask decoder over the
base weights), so that MONAI's ``ckpt_export`` (which hands the file's dict to ``load_state_dict``) exports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from .sam_refiner import SAMRefiner

__all__ = ["StackedInputRefiner"]

_OUTPUTS = ("logits", "probability")


class StackedInputRefiner(nn.Module):
    def __init__(self, refiner: SAMRefiner, output: str = "logits", input_scale: float = 255.0) -> None:
        """
        Arguments:
          refiner (SAMRefiner): the refiner to wrap; its sub-modules become this module's (same parameters, same
            state_dict keys), it stays available as ``self.refiner``.
          output (str): ``logits`` (default) or ``probability`` (sigmoid applied).
          input_scale (float): factor taking channel 0 to SAM's 0-255 scale. The default 255 reads channel 0 as
            8-bit intensity / 255 in [0, 1] (as the transunet bundle's input, and as MONAI's ``verify_net_in_out``
            draws it); 1.0 accepts values already on the 0-255 scale.
        """
        super().__init__()
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}")
        for name, child in refiner.named_children():  # registered without a prefix: keys stay "sam.*"
            self.add_module(name, child)
        self._refiner = (refiner,)  # a tuple: not registered a second time
        self.output = output
        self.input_scale = float(input_scale)
        self.train(refiner.training)

    @property
    def refiner(self) -> SAMRefiner:
        return self._refiner[0]

    def train(self, mode: bool = True) -> StackedInputRefiner:
        """Sets the mode of the wrapped refiner as well (its candidate selection depends on it)."""
        super().train(mode)
        self.refiner.train(mode)
        return self

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, or, given a refiner checkpoint dict (``{"model": ..., "partial"/"lora":
        ...}``), ``refiner_checkpoint.apply_refiner_checkpoint`` (strict on the keys it holds, encoder checked)."""
        from ultrarefiner.engines.checkpoints.refiner_checkpoint import apply_refiner_checkpoint, is_refiner_checkpoint

        if is_refiner_checkpoint(state_dict):
            apply_refiner_checkpoint(self, state_dict)
            return _IncompatibleKeys([], [])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Arguments:
          x (torch.Tensor): (B,2,H,W) float at the image's native resolution: channel 0 the grayscale image
            (``input_scale`` x channel 0 on the 0-255 scale), channel 1 the coarse lesion probability in [0,1].

        Returns:
          torch.Tensor: (B,1,H,W) refined lesion logits (or probability with ``output="probability"``), the
            candidate with the highest predicted IoU in eval mode.
        """
        if x.dim() != 4 or x.shape[1] != 2:
            raise ValueError(f"expected (B,2,H,W) = image and coarse mask stacked, got {tuple(x.shape)}")
        if torch.jit.is_tracing() and self.refiner.geometry.image_resize == "exact":
            raise ValueError("tracing needs image_resize='torch': the exact resize runs in numpy and would be frozen "
                             "into the trace as a constant image")
        image = x[:, :1] * self.input_scale
        masks = self.refiner(image=image, coarse=x[:, 1:2])["masks"]
        return torch.sigmoid(masks) if self.output == "probability" else masks
