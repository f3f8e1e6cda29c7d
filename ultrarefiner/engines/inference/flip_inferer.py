"""The bundles' inferers: MONAI's ``Inferer`` interface over ``fast_inference``'s flip rule (``hflip``,
``flip_tta_mean``) and its TransUNet speed option (``fast_segmenter``). Apart from ``fast_inference`` because it
imports MONAI's inferers, which ``refine`` does not need."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.inferers import Inferer
from torch import nn

from ultrarefiner.engines.inference.fast_inference import (
    check_optimize,
    check_tta,
    fast_segmenter,
    flip_tta_mean,
    hflip,
)

__all__ = ["FastSegmenterInferer", "FlipTTAInferer", "tta_inferer"]


class FlipTTAInferer(Inferer):
    def __init__(self, activation: str = "sigmoid", eps: float = 1e-6) -> None:
        """
        MONAI inferer: ``network`` on the batch and on its left-right flip in one forward pass, then the mean of the
        two passes' probabilities, returned on the logit scale the bundle's postprocessing expects, so that its
        ``Activationsd`` gives back that mean probability.

        Arguments:
          activation (str): ``sigmoid`` (one-channel logits: returns ``logit(mean p)``) or ``softmax`` (class
            logits: returns ``log(mean p)``, whose softmax is ``mean p``).
          eps (float): probabilities are clamped to [eps, 1 - eps] before the logit/log (finite outputs).
        """
        if activation not in ("sigmoid", "softmax"):
            raise ValueError(f"activation must be sigmoid or softmax, got {activation!r}")
        self.activation, self.eps = activation, float(eps)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return torch.sigmoid(logits) if self.activation == "sigmoid" else torch.softmax(logits, dim=1)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        b = inputs.shape[0]
        out = network(torch.cat([inputs, hflip(inputs)]), *args, **kwargs)  # both passes in one batch
        p = flip_tta_mean(self.probabilities(out[:b]), self.probabilities(out[b:])).clamp(self.eps, 1 - self.eps)
        return torch.logit(p) if self.activation == "sigmoid" else torch.log(p)


class FastSegmenterInferer(Inferer):
    def __init__(self, inferer: Inferer, optimize: str = "auto") -> None:
        """
        MONAI inferer: ``inferer`` with the network run through ``fast_segmenter(network, inputs.device, optimize)``
        (bf16 autocast and channels_last on a CPU with native bfloat16, channels_last on CUDA; see
        ``fast_inference.resolve_optimize``). Where the option leaves the network eager (``none``, ``jit_freeze``,
        ``compile``), the network runs as given.

        The speed option lives in the inferer, not the network, so that the checkpoint still loads into the plain
        network (``CheckpointLoader``, MONAI Label's bundle tasks) and every caller of the config's ``inferer`` gets
        it. The fast forward is built on the first call for a network and device and kept; it wraps the network
        itself (its weights are converted to channels_last in place, same values), so weights loaded into that
        network later are used.

        Arguments:
          inferer: the inner inferer, called as ``inferer(inputs, fast_forward, *args, **kwargs)``.
          optimize: one of ``fast_inference.OPTIMIZE_MODES``; checked here, before any image is read.
        """
        self.inferer, self.optimize = inferer, check_optimize(optimize, "optimize")
        self._fast: tuple[nn.Module, torch.device, Callable[..., torch.Tensor]] | None = None

    def forward_for(self, network: nn.Module, device: torch.device) -> Callable[..., torch.Tensor]:
        """The fast forward of ``network`` on ``device`` (built once per network and device)."""
        if self._fast is None or self._fast[0] is not network or self._fast[1] != device:
            self._fast = (network, device, fast_segmenter(network, device, self.optimize))
        return self._fast[2]

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:
        return self.inferer(inputs, self.forward_for(network, inputs.device), *args, **kwargs)


def tta_inferer(tta: str | None, activation: str = "sigmoid", optimize: str | None = None) -> Inferer:
    """The bundles' inferer: ``SimpleInferer`` (``tta`` none) or ``FlipTTAInferer`` (``tta`` flip); with an
    ``optimize`` option (TransUNet), inside a ``FastSegmenterInferer``."""
    from monai.inferers import SimpleInferer

    inferer = FlipTTAInferer(activation) if check_tta(tta) == "flip" else SimpleInferer()
    return inferer if optimize is None else FastSegmenterInferer(inferer, optimize)
