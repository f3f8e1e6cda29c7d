"""The bundles' test-time-augmentation inferer: MONAI's ``Inferer`` interface over ``fast_inference``'s flip rule
(``hflip``, ``flip_tta_mean``). Apart from ``fast_inference`` because it imports MONAI's inferers, which ``refine`` does
not need."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.inferers import Inferer

from ultrarefiner.engines.inference.fast_inference import check_tta, flip_tta_mean, hflip

__all__ = ["FlipTTAInferer", "tta_inferer"]


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


def tta_inferer(tta: str | None, activation: str = "sigmoid") -> Inferer:
    """The bundles' inferer: ``SimpleInferer`` (``tta`` none) or ``FlipTTAInferer`` (``tta`` flip)."""
    from monai.inferers import SimpleInferer

    return FlipTTAInferer(activation) if check_tta(tta) == "flip" else SimpleInferer()
