"""TransUNet (Chen et al. 2021): R50+ViT-B/16 hybrid encoder with a cascaded-upsampler decoder.

Design choice: compatible with the original TransUNet code, built from timm modules.

The ImageNet-21k npz was trained with Google's hybrid (timm's ``vit_base_r50_s16_224``: SAME padding, 32-group
projection GroupNorm, class token). The original TransUNet code (Beckschen/TransUNet,
``vit_seg_modeling.py`` + ``vit_seg_modeling_resnet_skip.py``) loads that npz into a slightly different encoder, and
every published TransUNet number and every checkpoint trained with that code uses this variant. We compute what
TransUNet's encoder computes, so that (a) results are comparable with the paper and the original tool, and
(b) its ``.pth`` checkpoints load (``transunet_weights.load_transunet_checkpoint``). The differences from the
npz's own network (timm-faithful) are, all on TransUNet's side:

1. root 7x7/2 conv padding 3 and max-pool 3x3/2 padding 0 (timm: SAME padding); the stage-1 feature
   (55x55 at 224) is zero-padded bottom/right to img_size/4 for the skip, as in TransUNet's ``ResNetV2.forward``;
2. stride-2 3x3 convs symmetric padding 1 (timm: SAME);
3. weight-standardisation epsilon 1e-5 (timm hybrid: 1e-8);
4. GroupNorm epsilon 1e-6 in root and bottlenecks, 1e-5 in the projection (timm: 1e-5 everywhere);
5. projection (shortcut) GroupNorm with one group per channel (timm: 32 groups);
6. no class token (its position embedding is dropped at load time); dropout 0.1 on embeddings and MLPs,
   none on attention output (TransUNet's config).

Modules reused from timm: ``StdConv2d``, ``GroupNormAct``, ResNetV2 ``Bottleneck``/``DownsampleConv``, the ViT
``Block`` (fused qkv Linear; loaders concatenate TransUNet's separate query/key/value), ``resample_abs_pos_embed``
(bilinear, used at load time; TransUNet used ``scipy.ndimage.zoom(order=1)``, which aligns corners -- a small
initialisation-only difference when img_size != 224). The decoder is hand-written (``transunet_decoder.py``).
Input is not normalised, as in TransUNet (images in [0, 1]; grayscale repeated to 3 channels). Random
initialisation uses PyTorch/timm defaults (TransUNet: xavier MLP weights); the npz overwrites the encoder anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import GroupNormAct, StdConv2d
from timm.models.resnetv2 import Bottleneck, DownsampleConv
from timm.models.vision_transformer import Block
from torch import nn

from .transunet_decoder import DecoderCup, SegmentationHead

VARIANTS = ("R50-ViT-B_16", "ViT-B_16")

# TransUNet's StdConv2d: (w - mean) / sqrt(var + 1e-5); its GroupNorms use eps=1e-6 except the projection one.
_conv = partial(StdConv2d, eps=1e-5)
_norm = partial(GroupNormAct, num_groups=32, eps=1e-6)


def _projection(in_chs: int, out_chs: int, stride: int = 1, conv_layer=None, **kwargs) -> DownsampleConv:
    """Shortcut 1x1 conv + per-channel GroupNorm(cout, cout) with default eps, as TransUNet's ``gn_proj``."""
    return DownsampleConv(
        in_chs,
        out_chs,
        stride=stride,
        preact=False,
        conv_layer=conv_layer,
        norm_layer=partial(GroupNormAct, num_groups=out_chs, eps=1e-5),
    )


class ResNetSkip(nn.Module):
    """ResNet-50 (v2 weights, post-activation bottlenecks) trunk of the hybrid: root + 3 stages, with skips."""

    def __init__(self, block_units: Sequence[int] = (3, 4, 9), width: int = 64) -> None:
        """
        Arguments:
          block_units (tuple of int): bottlenecks per stage.
          width (int): root width; stage i outputs width * 4 * 2**i channels.
        """
        super().__init__()
        self.root = nn.Sequential()
        self.root.add_module("conv", _conv(3, width, kernel_size=7, stride=2, padding=3))
        self.root.add_module("norm", _norm(width))
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0)
        self.stages = nn.ModuleList()
        in_chs = width
        for i, depth in enumerate(block_units):
            out_chs = width * 4 * 2**i
            stage = nn.Sequential()
            for j in range(depth):
                stage.add_module(
                    str(j),
                    Bottleneck(
                        in_chs if j == 0 else out_chs,
                        out_chs,
                        stride=2 if (j == 0 and i > 0) else 1,
                        conv_layer=_conv,
                        norm_layer=_norm,
                        proj_layer=_projection if j == 0 else None,
                    ),
                )
            self.stages.append(stage)
            in_chs = out_chs
        self.out_channels = in_chs
        self.skip_channels = [width * 4 * 2 ** (len(block_units) - 2 - i) for i in range(len(block_units) - 1)]
        self.skip_channels.append(width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """
        Arguments:
          x (torch.Tensor): (B, 3, H, W), H and W multiples of 16.

        Returns:
          (torch.Tensor): last-stage feature (B, 1024, H/16, W/16).
          (list of torch.Tensor): skips coarse to fine: (B, 512, H/8, W/8), (B, 256, H/4, W/4), (B, 64, H/2, W/2).
        """
        height, width = x.shape[-2:]
        x = self.root(x)
        skips = [x]
        x = self.pool(x)
        for i, stage in enumerate(self.stages[:-1]):
            x = stage(x)
            # padding-0 max-pool gives 55x55 at 224: TransUNet zero-pads the skip (not x) to H/4 bottom/right
            h, w = height // (4 * 2**i), width // (4 * 2**i)
            skips.append(F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2])) if x.shape[-2:] != (h, w) else x)
        x = self.stages[-1](x)
        return x, skips[::-1]


class TransUNet(nn.Module):
    """TransUNet for 2D segmentation: (B, in_channels, H, W) in [0, 1] -> logits (B, num_classes, H, W)."""

    def __init__(
        self,
        img_size: int = 224,
        num_classes: int = 2,
        in_channels: int = 1,
        variant: str = "R50-ViT-B_16",
        vit_depth: int = 12,
        hidden_size: int = 768,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        n_skip: int = 3,
        decoder_channels: Sequence[int] = (256, 128, 64, 16),
        block_units: Sequence[int] = (3, 4, 9),
    ) -> None:
        """
        Arguments:
          img_size (int): input height and width, a multiple of 16 (the token grid is img_size / 16).
          num_classes (int): output channels (logits), background included.
          in_channels (int): 1 (grayscale, repeated to RGB inside) or 3.
          variant (str): "R50-ViT-B_16" (hybrid, default) or "ViT-B_16" (16x16 patches, no skips).
          vit_depth (int): number of transformer blocks (12 in ViT-B; fewer for quick tests).
          hidden_size (int): transformer width.
          num_heads (int): attention heads.
          mlp_dim (int): hidden width of the transformer MLPs.
          dropout (float): dropout on embeddings and in the MLPs (TransUNet: 0.1).
          attention_dropout (float): dropout on attention weights and attention output (TransUNet: 0.0).
          n_skip (int): number of skip connections used by the decoder (0-3; forced to 0 for ViT-B_16).
          decoder_channels (tuple of int): decoder block widths, coarse to fine.
          block_units (tuple of int): bottlenecks per ResNet stage (hybrid only).
        """
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if img_size % 16:
            raise ValueError(f"img_size must be a multiple of 16, got {img_size}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        self.img_size, self.num_classes, self.in_channels, self.variant = img_size, num_classes, in_channels, variant
        # the constructor arguments, defaults included (sequences as lists): what checkpoints record, read from the
        # network itself so that the record cannot drift from what was built
        self.network_kwargs: dict[str, Any] = {
            "img_size": img_size, "num_classes": num_classes, "in_channels": in_channels, "variant": variant,
            "vit_depth": vit_depth, "hidden_size": hidden_size, "num_heads": num_heads, "mlp_dim": mlp_dim,
            "dropout": dropout, "attention_dropout": attention_dropout, "n_skip": n_skip,
            "decoder_channels": list(decoder_channels), "block_units": list(block_units)}
        self.grid_size = (img_size // 16, img_size // 16)

        if variant == "R50-ViT-B_16":
            self.backbone: ResNetSkip | None = ResNetSkip(block_units)
            self.patch_embed = nn.Conv2d(self.backbone.out_channels, hidden_size, kernel_size=1)
            skip_channels = list(self.backbone.skip_channels) + [0] * (len(decoder_channels) - 3)
            skip_channels = [c if i < n_skip else 0 for i, c in enumerate(skip_channels)]
        else:
            self.backbone = None
            self.patch_embed = nn.Conv2d(3, hidden_size, kernel_size=16, stride=16)
            skip_channels = [0] * len(decoder_channels)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], hidden_size))
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList()
        for _ in range(vit_depth):
            block = Block(
                hidden_size,
                num_heads,
                mlp_ratio=mlp_dim / hidden_size,
                qkv_bias=True,
                proj_drop=dropout,
                attn_drop=attention_dropout,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
            )
            block.attn.proj_drop = nn.Dropout(attention_dropout)  # TransUNet: MLP dropout only
            self.blocks.append(block)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.decoder = DecoderCup(hidden_size, 512, decoder_channels, skip_channels)
        self.segmentation_head = SegmentationHead(decoder_channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Arguments:
          x (torch.Tensor): (B, in_channels, img_size, img_size), intensities in [0, 1].

        Returns:
          (torch.Tensor): logits (B, num_classes, img_size, img_size).
        """
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected input of {self.img_size}x{self.img_size}, got {tuple(x.shape[-2:])}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        skips: list[torch.Tensor] = []
        if self.backbone is not None:
            x, skips = self.backbone(x)
        x = self.patch_embed(x)  # (B, hidden, h, w)
        b, c, h, w = x.shape
        tokens = self.pos_drop(x.flatten(2).transpose(1, 2) + self.pos_embed)  # (B, h*w, hidden)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        grid = tokens.transpose(1, 2).reshape(b, c, h, w)
        return self.segmentation_head(self.decoder(grid, skips))
