"""StackedInputRefiner: the SAM refiner behind a single-tensor interface (image and coarse mask stacked as channels).

MONAI's bundle tools (``verify_net_in_out``, ``ckpt_export``), TorchScript and the MONAI Label app call a network
with ONE tensor; ``SAMRefiner.forward`` takes keyword arguments and returns a dict. This wrapper maps one to the other
and nothing else: preprocessing, prompts and candidate selection stay the refiner's own.

Its ``state_dict`` is the wrapped refiner's (keys ``sam.*``, no extra prefix), so the bundle's ``models/model.pt``
loads into either, and the refiner stays reachable as ``.refiner``. ``load_state_dict`` also takes a whole refiner
checkpoint dict, such as the partial ``models/model.pt`` of a frozen encoder (prompt encoder + mask decoder over the
base weights), so that MONAI's ``ckpt_export`` (which hands the file's dict to ``load_state_dict``) exports it.

``optimize`` (the sam_refiner bundle's ``inference.json``): in eval mode the SAM image encoder runs through
``fast_inference.fast_encoder`` (on a CPU without native bfloat16 ``jit_freeze``: TorchScript-frozen, LiteMedSAM's
stem on row slabs; the bundle's inference on BUSI's 129 test images, 2 AVX2 cores: 170.7 s at batch 4 eager, 136.2 s
at batch 1, the same masks), the prompts and the decoder as without it. A frozen encoder is a snapshot of the
weights: ``train()`` and ``load_state_dict`` drop it, so the next eval-mode call freezes the current weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from .sam_refiner import SAMRefiner

__all__ = ["StackedInputRefiner"]

_OUTPUTS = ("logits", "probability")


class _EncoderSnapshots(dict):
    """device -> fast encoder. Not carried by a copy of the network (``copy.deepcopy``, pickling), which may be
    given other weights: the copy freezes its own."""

    def __deepcopy__(self, memo: dict) -> _EncoderSnapshots:
        return _EncoderSnapshots()

    def __reduce__(self) -> tuple:
        return _EncoderSnapshots, ()


class StackedInputRefiner(nn.Module):
    def __init__(self, refiner: SAMRefiner, output: str = "logits", input_scale: float = 255.0,
                 optimize: str | None = None) -> None:
        """
        Arguments:
          refiner (SAMRefiner): the refiner to wrap; its sub-modules become this module's (same parameters, same
            state_dict keys), it stays available as ``self.refiner``.
          output (str): ``logits`` (default) or ``probability`` (sigmoid applied).
          input_scale (float): factor taking channel 0 to SAM's 0-255 scale. The default 255 reads channel 0 as
            8-bit intensity / 255 in [0, 1] (as the transunet bundle's input, and as MONAI's ``verify_net_in_out``
            draws it); 1.0 accepts values already on the 0-255 scale.
          optimize (str or None): image-encoder speed option for eval mode (``fast_inference.OPTIMIZE_MODES``:
            auto, none, channels_last, jit_freeze, compile, bf16); None: the encoder as it is (training, export).
        """
        super().__init__()
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}")
        if optimize is not None:  # None is "off" here (training, export), not resolve_optimize's "auto"
            from ultrarefiner.engines.inference.fast_inference import check_optimize

            check_optimize(optimize, name="optimize (or None)")
        self.optimize = optimize
        self._fast = _EncoderSnapshots()
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
        if mode:  # the weights may change from here on: a frozen encoder would keep the old ones
            self._fast.clear()
        return self

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, or, given a refiner checkpoint dict (``{"model": ..., "partial"/"lora":
        ...}``), ``refiner_checkpoint.apply_refiner_checkpoint`` (strict on the keys it holds, encoder checked)."""
        from ultrarefiner.engines.checkpoints.refiner_checkpoint import apply_refiner_checkpoint, is_refiner_checkpoint

        self._fast.clear()
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
        encoder = self._fast_encoder(x.device)
        if encoder is None:
            masks = self.refiner(image=image, coarse=x[:, 1:2])["masks"]
        else:
            embeddings = encoder(self.refiner.preprocess_image(image).to(x.device))
            masks = self.refiner(coarse=x[:, 1:2], image_embeddings=embeddings, original_size=x.shape[-2:])["masks"]
        return torch.sigmoid(masks) if self.output == "probability" else masks

    def _fast_encoder(self, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``fast_encoder`` of the refiner's image encoder on ``device``, built on first use; None (the plain
        encoder) without ``optimize``, in training mode, while tracing or exporting, or for a trainable encoder."""
        if (self.optimize is None or self.training or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
                or self.refiner.encoder_trainable()):
            return None
        if device not in self._fast:
            from ultrarefiner.engines.inference.fast_inference import fast_encoder

            self._fast[device] = fast_encoder(self.refiner.sam.image_encoder, device, self.optimize)
        return self._fast[device]
