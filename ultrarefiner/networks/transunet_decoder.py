"""TransUNet's cascaded upsampler (CUP) decoder and segmentation head.

Written to match ``DecoderCup``/``DecoderBlock``/``SegmentationHead`` of Beckschen/TransUNet
(``networks/vit_seg_modeling.py``) module for module, so that the state-dict keys below ``decoder.`` and
``segmentation_head.`` are the original ones (``decoder.conv_more.0.weight``, ``decoder.blocks.0.conv1.1.running_mean``,
``segmentation_head.0.weight``, ...). Upsampling is bilinear with ``align_corners=True``, as ``nn.UpsamplingBilinear2d``
in the original.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Conv2dReLU(nn.Sequential):
    """3x3 convolution (no bias) -> BatchNorm -> ReLU; children 0/1/2 as in TransUNet."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        """
        Arguments:
          in_channels (int): input channels.
          out_channels (int): output channels.
        """
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DecoderBlock(nn.Module):
    """Upsample x2, concatenate the skip feature (if any), two Conv2dReLU."""

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int = 0) -> None:
        """
        Arguments:
          in_channels (int): channels of the incoming (coarser) feature.
          out_channels (int): output channels.
          skip_channels (int): channels of the skip feature concatenated after upsampling; 0 for none.
        """
        super().__init__()
        self.skip_channels = skip_channels
        self.conv1 = Conv2dReLU(in_channels + skip_channels, out_channels)
        self.conv2 = Conv2dReLU(out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """
        Arguments:
          x (torch.Tensor): (B, in_channels, h, w).
          skip (torch.Tensor or None): (B, skip_channels, 2h, 2w).

        Returns:
          (torch.Tensor): (B, out_channels, 2h, 2w).
        """
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class DecoderCup(nn.Module):
    """Cascaded upsampler: ``conv_more`` (hidden -> head channels) then one DecoderBlock per skip level."""

    def __init__(
        self,
        hidden_size: int = 768,
        head_channels: int = 512,
        decoder_channels: Sequence[int] = (256, 128, 64, 16),
        skip_channels: Sequence[int] = (512, 256, 64, 0),
    ) -> None:
        """
        Arguments:
          hidden_size (int): transformer width (channels of the token grid).
          head_channels (int): output channels of ``conv_more``.
          decoder_channels (tuple of int): output channels of the decoder blocks, coarse to fine.
          skip_channels (tuple of int): channels of the skip feature each block receives; 0 for none.
        """
        super().__init__()
        if len(decoder_channels) != len(skip_channels):
            raise ValueError(f"decoder_channels {decoder_channels} and skip_channels {skip_channels} differ in length")
        self.conv_more = Conv2dReLU(hidden_size, head_channels)
        in_channels = [head_channels, *decoder_channels[:-1]]
        self.blocks = nn.ModuleList(
            DecoderBlock(i, o, s) for i, o, s in zip(in_channels, decoder_channels, skip_channels, strict=True)
        )

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """
        Arguments:
          x (torch.Tensor): token grid (B, hidden_size, h, w).
          skips (list of torch.Tensor): skip features, coarse to fine; blocks with skip_channels 0 get none.

        Returns:
          (torch.Tensor): (B, decoder_channels[-1], h * 2**len(blocks), w * 2**len(blocks)).
        """
        x = self.conv_more(x)
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if block.skip_channels else None)
        return x


class SegmentationHead(nn.Sequential):
    """3x3 convolution to class logits; child 0 as in TransUNet (its child 1 is an identity upsampling)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        """
        Arguments:
          in_channels (int): channels of the last decoder block.
          num_classes (int): output channels (logits).
        """
        super().__init__(nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=1), nn.Identity())
