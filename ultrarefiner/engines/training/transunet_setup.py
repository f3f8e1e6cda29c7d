"""Building the phase-1 network from a bundle config: optional ImageNet-21k initialisation."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def init_network(network: torch.nn.Module, pretrained_npz: str | os.PathLike | None = None) -> torch.nn.Module:
    """Load the Google R50+ViT-B_16 / ViT-B_16 npz into ``network`` when a path is given; returns ``network``.

    An empty path means random initialisation (logged, since results are then far below published ones).
    """
    if pretrained_npz:
        from ultrarefiner.networks.transunet_weights import load_pretrained_npz

        load_pretrained_npz(network, pretrained_npz)
        logger.info(f"encoder initialised from {pretrained_npz}")
    else:
        logger.warning("no --pretrained_npz given: TransUNet starts from random initialisation")
    return network
