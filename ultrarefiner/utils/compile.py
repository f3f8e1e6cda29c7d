"""The bundles' ``compile`` option: ``torch.compile``, in place, of the parts a training step runs with autograd.

A GPU training step of these networks is bound by the host's launch rate (bf16 gained 8% on an H200): every
operator is dispatched from Python, forward and backward. Compiling fuses them into fewer kernels. What is compiled:

- every ``TransUNet`` (phase 1; the coarse network of phase 3): half of a phase-3 step's operations (1,038 forward and
  1,535 backward of 5,241 at full size, counted on a CPU);
- every SAM mask decoder's ``TwoWayTransformer`` (segment-anything's, and LiteMedSAM's copy of it; phases 2 and 3).

Not compiled: the frozen image encoder (its embeddings are cached), the prompts (a 256-step labelling loop takes
minutes to compile; on CUDA it already runs as one CUDA graph, see ``networks.labelling``) and the losses.

``nn.Module.compile`` works in place: the state dict keeps its keys (no ``_orig_mod.`` prefix), so checkpoints,
resume and the bundles' exports are unchanged. Compilation happens at the first call of each part and again for
each new input shape or mode (training, evaluation): a few minutes in all, before the first iterations. Off by
default: it pays only over long GPU runs.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .flags import as_flag

__all__ = ["COMPILED_PARTS", "compile_network", "compiled_parts"]

COMPILED_PARTS = ("TransUNet", "TwoWayTransformer")  # class names: LiteMedSAM vendors its own TwoWayTransformer


def compiled_parts(network: nn.Module) -> list[nn.Module]:
    """The submodules (or the network itself) that ``compile_network`` compiles, outermost first."""
    return [m for m in network.modules() if type(m).__name__ in COMPILED_PARTS]


def compile_network(network: nn.Module, enabled: Any = True, compile_kwargs: dict | None = None) -> nn.Module:
    """Compiles ``network``'s TransUNet and SAM decoder transformer in place when ``enabled``; returns ``network``.

    Arguments:
      network: a TransUNet, SAMRefiner or UltraRefiner (or a DistributedDataParallel holding one).
      enabled: the bundle's ``compile`` flag (bool, or "true"/"false" from the command line).
      compile_kwargs: passed to ``torch.compile`` (e.g. ``{"mode": "max-autotune"}``); ``dynamic`` defaults to
        False (a training run sees one or two batch shapes).
    """
    if not as_flag(enabled, "compile"):
        return network
    parts = compiled_parts(network)
    if not parts:
        raise ValueError(f"compile: {type(network).__name__} holds no TransUNet or SAM mask decoder to compile")
    kwargs = {"dynamic": False, **(compile_kwargs or {})}
    for part in parts:
        part.compile(**kwargs)
    return network
