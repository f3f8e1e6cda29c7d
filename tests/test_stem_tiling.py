"""Row-tiled TinyViT stems (``stem_tiling``, used by ``fast_inference.FrozenEncoder`` on a CPU) give the encoder's
own embeddings: the slabs keep each stem output row once with enough halo, the tiled encoder equals the whole one,
and a tiling that differs is caught and replaced by the untiled encoder. On the real LiteMedSAM encoder (packaged
weights). No timings are asserted here (benchmarks/bench_inference.py measures them)."""

from __future__ import annotations

import logging

import pytest
import torch

from ultrarefiner.engines.inference import stem_tiling as tiling
from ultrarefiner.engines.inference.fast_inference import FrozenEncoder
from ultrarefiner.engines.inference.stem_tiling import (
    TiledStemEncoder,
    TinyViTStem,
    TinyViTTail,
    is_tiny_vit,
    row_slabs,
    stem_halo,
    stem_slabs,
)
from ultrarefiner.networks.lite_medsam import build_lite_medsam
from ultrarefiner.networks.sam_weights import build_tiny_sam


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding, relative to the activations' scale (LiteMedSAM's stem reaches ~1e3)."""
    return (a - b).abs().max().item() <= 1e-5 * max(b.abs().max().item(), 1.0)


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    return build_lite_medsam("packaged").image_encoder.eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    # LiteMedSAM's input: 256x256, normalised; smooth structure plus noise so that every slab boundary carries signal
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 256), torch.linspace(-1, 1, 256), indexing="ij")
    base = torch.exp(-((yy - 0.2) ** 2 + (xx + 0.1) ** 2) * 6)
    return (base + 0.3 * torch.randn(3, 256, 256, generator=g))[None]


@pytest.mark.parametrize(("height", "halo", "rows"), [(256, 4, 32), (256, 4, 48), (64, 2, 7), (10, 4, 1), (8, 0, 8)])
def test_row_slabs_keep_each_output_row_once_with_its_halo(height, halo, rows):
    slabs = row_slabs(height, halo, rows)
    kept = [s.start // 2 + s.keep + i for s in slabs for i in range(s.rows)]
    assert kept == list(range(height // 2))  # every output row once, in order
    for s in slabs:
        first, last = s.start // 2 + s.keep, s.start // 2 + s.keep + s.rows  # output rows [first, last)
        assert 0 <= s.start < s.end <= height and s.start % 2 == 0 and s.rows <= rows
        assert s.start == 0 or s.start <= 2 * first - halo  # the halo above, unless the image ends there
        assert s.end == height or s.end >= 2 * last + halo
    with pytest.raises(ValueError, match="multiples"):
        row_slabs(255, 4, 32)


def test_stem_halo_counts_the_three_by_three_convolutions(encoder):
    # two MBConv blocks and the patch merging each hold one 3x3 depthwise convolution: 3 rows, rounded up to 4
    assert stem_halo(TinyViTStem(encoder)) == 4


def test_tiled_stem_gives_the_whole_image_stem_and_needs_its_halo(encoder, image, monkeypatch):
    eager = lambda module, example: module  # noqa: E731 - the modules themselves, unfrozen
    with torch.no_grad():
        whole = TinyViTStem(encoder)(image)
        tiled, tokens = TiledStemEncoder.build(encoder, image, eager, stem_slabs(encoder, 256, 32))
        assert len(tiled.slabs) == 4 and _close(tiled.tokens(image), whole) and torch.equal(tokens, tiled.tokens(image))
        assert _close(tiled(image), encoder(image))
        monkeypatch.setattr(tiling, "stem_halo", lambda stem, stride=2: 0)  # no halo: the slab edges are wrong
        bare, _ = TiledStemEncoder.build(encoder, image, eager, stem_slabs(encoder, 256, 32))
        assert not _close(bare.tokens(image), whole)


def test_tail_is_the_rest_of_the_encoder(encoder, image):
    with torch.no_grad():
        assert _close(TinyViTTail(encoder)(TinyViTStem(encoder)(image)), encoder(image))


def test_frozen_encoder_tiles_lite_medsam_and_keeps_its_embeddings(encoder, image, monkeypatch):
    frozen = FrozenEncoder(encoder)
    runs = []
    monkeypatch.setattr(TiledStemEncoder, "__call__", lambda self, x: runs.append(x) or self.tail(self.tokens(x)))
    with torch.no_grad():
        out, reference = frozen(image), encoder(image)
        assert not runs  # the first output comes from building and checking it, not from one more run
        again = frozen(image)
    tiled = frozen.frozen[tuple(image.shape)]
    assert isinstance(tiled, TiledStemEncoder) and len(tiled.slabs) == 4 and sorted(tiled.stems) == [68, 72]
    assert out.shape == (1, 256, 64, 64) and _close(out, reference) and len(runs) == 1 and _close(again, out)


def test_a_blocked_copy_that_differs_falls_back_to_the_plain_one(encoder, image, monkeypatch, caplog):
    monkeypatch.setattr(tiling, "stem_halo", lambda stem, stride=2: 0)  # a broken tiling, caught on first use
    frozen = FrozenEncoder(encoder)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        out = frozen(image)
    assert "differs from the untiled one" in caplog.text
    assert not isinstance(frozen.frozen[tuple(image.shape)], TiledStemEncoder)
    with torch.no_grad():
        assert _close(out, encoder(image))


def test_only_tiny_vit_encoders_are_tiled(encoder, image):
    vit = build_tiny_sam(img_size=64, seed=0).image_encoder.eval()
    assert is_tiny_vit(encoder) and not is_tiny_vit(vit)
    x = torch.randn(1, 3, 64, 64)
    assert FrozenEncoder(vit)._freeze_tiled(x) is None
    assert FrozenEncoder(encoder, tile_rows=0)._freeze_tiled(image) is None
    assert FrozenEncoder(encoder, tile_rows=128)._freeze_tiled(image) is None  # one slab: nothing to gain


def test_a_tiling_that_fails_falls_back_to_the_untiled_trace(encoder, image, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no such layer")

    monkeypatch.setattr(tiling.TiledStemEncoder, "build", broken)
    frozen = FrozenEncoder(encoder)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        out = frozen(image)
    assert "row tiling failed" in caplog.text and "running it eagerly" not in caplog.text
    assert isinstance(frozen.frozen[tuple(image.shape)], torch.jit.ScriptModule)  # the untiled trace, not eager
    with torch.no_grad():
        assert _close(out, encoder(image))
