"""Inference helpers shared by ``refine``, ``predict``, ``predict-transunet`` and the bundles' ``inference.json``.

Horizontal-flip test-time augmentation (``tta="flip"``): the image (and, for the refiner, the coarse mask it is
prompted with) is flipped left-right, predicted, and the prediction flipped back; the output is the mean of the
probabilities of the original and the flipped pass. ``hflip`` / ``flip_tta_mean`` are the whole rule;
``flip_inferer.FlipTTAInferer`` applies it inside a MONAI evaluator (the bundles; a module of its own, so that
``refine`` starts without importing MONAI's inferers, which import its handlers and MLflow).

Image-encoder speed options (``optimize``): ``channels_last`` (the convolutions run in oneDNN's native NHWC layout),
``jit_freeze`` (TorchScript trace + ``torch.jit.freeze`` + ``optimize_for_inference``: batch norms folded into the
convolutions, oneDNN-fused ops; a TinyViT's convolutional stem on row slabs, ``stem_tiling``; CPU only; one trace per
batch shape, a few seconds), ``compile`` (``torch.compile`` of a copy, with inductor's freezing on a CPU; 13-35 s of
compilation of LiteMedSAM's encoder on 2 CPU cores, per batch shape), all float32 (the same numbers up to ~1e-6
relative); ``bf16`` (CPUs with native bfloat16, avx512_bf16 or AMX: the encoder under bfloat16 autocast, embeddings
within ~5%; on BUSI's test split the same Dice as float32 for ``refine`` and ``predict``, see ``resolve_optimize``).
``auto``: ``channels_last`` on CUDA (with bf16 autocast), ``bf16`` on a CPU with native bfloat16, else ``jit_freeze``
(``compile``, which does not tile the stem, is slower than ``jit_freeze`` on 2 AVX2 cores).
``benchmarks/bench_inference.py``, batch 1, LiteMedSAM:
- one thread of a shared 2-core CPU with avx512_bf16, CPU seconds per image: none 2.14, channels_last 1.93,
  jit_freeze 1.71, compile (without freezing) 1.39, bf16 0.97;
- 2 AVX2-only cores (AMD EPYC, no native bfloat16), ``refine`` files to files on 32 BUSI test images, steady state,
  one process per option, images/s: none 0.68, channels_last 0.77, compile 0.91, jit_freeze 1.02 (encoder alone
  0.72 / 0.80 / 1.01 / 1.17). The encoder is 75 GFLOP per image (its TinyViT stages run at 256, 128 and 64 px:
  LiteMedSAM's patch embedding keeps the 256 px input); the row-tiled stem took jit_freeze's encoder from 0.99 to
  0.87 s per image (sam_refiner bundle README, "CPU speed").
Batch 8 costs ~40% more per image on the CPU (hence batch 1 there by default).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ultrarefiner.utils.amp import autocast

__all__ = ["OPTIMIZE_MODES", "TTA_MODES", "FrozenEncoder", "check_optimize", "check_tta", "default_batch_size",
           "fast_encoder", "fast_segmenter", "flip_tta_mean", "hflip", "native_bf16_cpu", "resolve_optimize",
           "same_size_batches"]

logger = logging.getLogger(__name__)

TTA_MODES = ("none", "flip")
OPTIMIZE_MODES = ("auto", "none", "channels_last", "jit_freeze", "compile", "bf16")


def check_tta(tta: str | None) -> str:
    """``None``/``"none"``/``"off"``/``False`` -> ``"none"``; ``"flip"`` -> ``"flip"``; anything else: ValueError."""
    value = "none" if tta in (None, False, "", "off", "false", "False", "null") else str(tta).strip().lower()
    if value not in TTA_MODES:
        raise ValueError(f"--tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    return value


def check_optimize(optimize: str, name: str = "--optimize") -> str:
    """An encoder speed option, stripped and lower-cased; not one of ``OPTIMIZE_MODES``: ValueError naming ``name``."""
    mode = str(optimize).strip().lower()
    if mode not in OPTIMIZE_MODES:
        raise ValueError(f"{name} must be one of {', '.join(OPTIMIZE_MODES)}, got {optimize!r}")
    return mode


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Left-right flip of the last (width) axis; its own inverse."""
    return torch.flip(x, dims=(-1,))


def flip_tta_mean(original: torch.Tensor, flipped_pass: torch.Tensor) -> torch.Tensor:
    """Mean of the original pass's probabilities and the flipped pass's, flipped back to the original frame."""
    return 0.5 * (original + hflip(flipped_pass))


# ------------------------------------------------------------------------------------------------ encoder speed
def default_batch_size(device: torch.device) -> int:
    """8 on CUDA; 1 on the CPU, where a batch of 8 took ~40% more CPU time per image than single images (LiteMedSAM's
    encoder on 2 cores: its activations outgrow the caches)."""
    return 8 if torch.device(device).type == "cuda" else 1


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bfloat16 natively (avx512_bf16 or AMX, through oneDNN); elsewhere bf16 is emulated
    and slower than float32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_optimize(optimize: str | None, device: torch.device) -> str:
    """The encoder speed option to use on ``device``.

    ``auto``: channels_last on CUDA (where the engines add bf16 autocast); on a CPU ``bf16`` when it has native
    bfloat16 (avx512_bf16/AMX), else ``jit_freeze`` (float32). bf16 is the CPU default because it kept the masks'
    quality on BUSI's test split while running 1.7x faster on 2 cores: ``refine`` (shipped refiner, 122 TransUNet
    masks) Dice +0.0000 [95% CI -0.0006, +0.0006] against float32; ``predict`` (phase-3 model, 129 images) see the
    ultrarefiner bundle README. ``jit_freeze`` gives float32 results on any CPU.
    """
    mode = "auto" if optimize in (None, "") else check_optimize(optimize)
    if mode == "auto":
        if device.type == "cuda":
            return "channels_last"
        return "bf16" if native_bf16_cpu() else "jit_freeze"
    if mode in ("jit_freeze", "bf16") and device.type != "cpu":
        logger.info("optimize=%s is a CPU option; using channels_last on %s (bf16 there: amp)", mode, device)
        return "channels_last"
    if mode == "bf16" and not native_bf16_cpu():
        logger.warning("optimize=bf16: this CPU has no native bfloat16 (avx512_bf16/AMX), where it is slower than "
                       "float32; using jit_freeze")
        return "jit_freeze"
    return mode


class FrozenEncoder:
    """TorchScript-frozen copies of an encoder, one per input shape (a trace is specialised to its shapes; a folder
    has at most two batch shapes: the full batch and the last one).

    A TinyViT encoder (LiteMedSAM's) runs its convolutional stem on row slabs of ``tile_rows`` output rows that stay
    in the caches (``stem_tiling``; 0: whole images). The first call of each shape checks the tiled stem against the
    untiled one and, should they differ beyond float32 rounding, freezes the untiled encoder instead.

    Owned by whoever runs the encoder (``BatchRefiner``, ``UltraPredictor``), like their embedding caches: it is a
    snapshot of the weights it was built from, so build a new one after loading other weights."""

    def __init__(self, encoder: nn.Module, tile_rows: int = 32) -> None:
        # eval: a trace records the mode's ops (a batch norm in train mode would normalise by batch statistics)
        self.encoder = copy.deepcopy(encoder).eval().to(memory_format=torch.channels_last)
        self.tile_rows = tile_rows
        self.frozen: dict[tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]] = {}

    def _freeze(self, x: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor | None]:
        """The frozen encoder for ``x``'s shape, and its output for ``x`` when building it already gave that."""
        try:
            with warnings.catch_warnings():  # trace-specialisation and deprecation notices: expected here
                warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
                warnings.simplefilter("ignore", category=FutureWarning)
                try:
                    tiled = self._freeze_tiled(x)
                except Exception as e:  # e.g. a TinyViT variant the split does not fit; the untiled trace may work
                    logger.warning("row tiling failed for the image encoder (%s: %s); freezing it untiled",
                                   type(e).__name__, e)
                    tiled = None
                return tiled if tiled is not None else (_jit_freeze(self.encoder, x), None)
        except Exception as e:  # TorchScript cannot take every encoder (or a future torch): eager channels_last
            logger.warning("jit_freeze failed for the image encoder (%s: %s); running it eagerly (channels_last)",
                           type(e).__name__, e)
            return self.encoder, None

    def _freeze_tiled(self, x: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor] | None:
        """The frozen row-tiled TinyViT for ``x``'s shape and its embeddings of ``x``; None: not a TinyViT, a single
        slab, or (checked here, once) another stem output than the untiled stem's."""
        from ultrarefiner.engines.inference.stem_tiling import TiledStemEncoder, TinyViTStem, is_tiny_vit, stem_slabs

        if self.tile_rows < 1 or not is_tiny_vit(self.encoder) or x.shape[-2] % 2:
            return None
        slabs = stem_slabs(self.encoder, x.shape[-2], self.tile_rows)
        if len(slabs) < 2:
            return None
        tiled, tokens = TiledStemEncoder.build(self.encoder, x, _jit_freeze, slabs)
        # Only the stem is tiled; the tail is the same module on the same tokens either way. The eager stem once per
        # shape (0.3 s of LiteMedSAM on 2 cores; the whole eager encoder took 1.3 s); float32 rounding relative to
        # the tokens' scale.
        reference = TinyViTStem(self.encoder)(x)
        diff, scale = (tokens - reference).abs().max().item(), reference.abs().max().item()
        if diff <= 1e-4 * max(scale, 1.0):
            return tiled, tiled.tail(tokens)  # the first output, not computed twice
        logger.warning("the row-tiled image encoder differs from the untiled one (stem max |diff| %.3g of %.3g); "
                       "running it untiled", diff, scale)
        return None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        key = tuple(x.shape)
        with torch.no_grad():
            if key not in self.frozen:
                self.frozen[key], out = self._freeze(x)
                if out is not None:
                    return out
            return self.frozen[key](x)


def _jit_freeze(module: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """TorchScript trace of ``module`` (eval mode) on ``example``, frozen and optimised for inference (oneDNN)."""
    traced = torch.jit.trace(module, example, check_trace=False)
    return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))


def fast_encoder(encoder: nn.Module, device: torch.device, optimize: str | None = "auto") -> Callable:
    """A callable to use instead of ``encoder(x)`` for inference, (B,3,S,S) float -> embeddings (see module docs).

    The encoder must be in eval mode and on ``device``. ``channels_last`` converts ``encoder``'s weights in place
    (same values; its other users see the same numbers); ``jit_freeze`` returns a ``FrozenEncoder`` over a copy
    (its traces belong to the caller, which keeps it while the weights are unchanged); ``compile`` wraps it.
    """
    mode = resolve_optimize(optimize, device)
    if mode == "none":
        return encoder
    if mode == "compile":
        # inductor's freezing (CPU): the weights become constants, so batch norms fold and the GEMMs take prepacked
        # oneDNN weights (without it compile is slower than jit_freeze). Folded constants would go stale while the
        # others follow the module: compile a copy, a whole snapshot like jit_freeze's.
        cpu = device.type == "cpu"
        return torch.compile(copy.deepcopy(encoder) if cpu else encoder, dynamic=False, options={"freezing": cpu})
    cl = torch.channels_last
    if mode == "channels_last":
        encoder.to(memory_format=cl)
        return lambda x: encoder(x.contiguous(memory_format=cl))
    if mode == "bf16":
        encoder.to(memory_format=cl)

        def bf16(x: torch.Tensor) -> torch.Tensor:
            with autocast("cpu", cpu=True):
                return encoder(x.contiguous(memory_format=cl)).float()

        return bf16
    return FrozenEncoder(encoder)


def fast_segmenter(network: nn.Module, device: torch.device, optimize: str | None = "auto") -> Callable:
    """TransUNet's forward for inference, (B,1,S,S) -> logits, under the encoder's ``optimize`` option.

    ``bf16`` (CPUs with native bfloat16) and ``channels_last`` apply as to the encoder (``fast_encoder``; the
    weights are converted to channels_last in place). The float32 CPU options leave TransUNet eager: ``jit_freeze``
    measured 1.11x for ``predict-transunet`` and nothing within ``predict`` (R50-ViT-B/16, 2 cores with
    avx512_bf16, ``benchmarks/transunet_cpu_modes_study.py``), not worth a frozen copy of 105M parameters; bf16 ran
    ``predict-transunet`` 2.1x faster with the same Dice on BUSI's test split (the transunet bundle README)."""
    mode = resolve_optimize(optimize, device)
    return fast_encoder(network, device, mode) if mode in ("bf16", "channels_last") else network


# ------------------------------------------------------------------------------------------------ bundles
def same_size_batches(datalist: Sequence[dict], batch_size: int, key: str = "image") -> list[list[int]]:
    """Index batches of ``datalist`` items whose ``key`` images have one size (read from the headers), for a
    ``DataLoader(batch_sampler=...)`` of a network that takes one native size per batch (the sam_refiner bundle).
    Sizes in ascending order, input order within a size; an unreadable header gets a batch of its own (its loader
    then reports the file)."""
    from ultrarefiner.data.imaging import image_size
    from ultrarefiner.errors import BadInputError

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    groups: dict[tuple[int, int], list[int]] = {}
    alone: list[list[int]] = []
    for i, item in enumerate(datalist):
        try:
            groups.setdefault(image_size(item[key]), []).append(i)
        except BadInputError:
            alone.append([i])
    return [idx[k : k + batch_size] for _, idx in sorted(groups.items())
            for k in range(0, len(idx), batch_size)] + alone


def __getattr__(name: str) -> Any:
    """``FlipTTAInferer`` and ``tta_inferer`` moved to ``flip_inferer``; bundle configs name them here."""
    if name in ("FlipTTAInferer", "tta_inferer"):
        from ultrarefiner.engines.inference import flip_inferer

        return getattr(flip_inferer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
