"""Low-rank adapters (LoRA) for the linears of SAM's ViT or LiteMedSAM's TinyViT image encoder.

A small self-contained module (no peft): ``LoRALinear`` subclasses ``nn.Linear`` so the frozen base weights keep
their segment-anything key names (``...attn.qkv.weight``) and a SAM checkpoint still loads before the adapters
are added; the adapters add ``lora_A``/``lora_B`` next to them. ``merge_lora`` folds the adapters back, giving
plain ``nn.Linear`` modules and a state_dict with exactly SAM's keys (for inference and export).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

__all__ = [
    "LoRALinear",
    "apply_lora",
    "count_parameters",
    "load_lora_state_dict",
    "lora_state_dict",
    "merge_lora",
]

# target name -> attribute paths inside one transformer block: segment-anything's ``Block`` (mlp.lin1/lin2) or
# TinyViT's ``TinyViTBlock`` (mlp.fc1/fc2; its first stage is convolutional and has no attention)
_TARGETS = {
    "qkv": ("attn.qkv",),
    "proj": ("attn.proj",),
    "mlp": ("mlp.lin1", "mlp.lin2", "mlp.fc1", "mlp.fc2"),
    "lin1": ("mlp.lin1", "mlp.fc1"),
    "lin2": ("mlp.lin2", "mlp.fc2"),
}


def _attention_blocks(image_encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every transformer block: ``blocks.i`` of a ViT, ``layers.j.blocks.i`` of a TinyViT."""
    if hasattr(image_encoder, "blocks"):
        return [(f"blocks.{i}", b) for i, b in enumerate(image_encoder.blocks)]
    return [(n, m) for n, m in image_encoder.named_modules() if hasattr(m, "attn") and hasattr(m.attn, "qkv")]


def _has_path(module: nn.Module, dotted: str) -> bool:
    try:
        _get(module, dotted)
    except AttributeError:
        return False
    return True
# Module prefixes whose weights a LoRA checkpoint keeps besides the adapters.
_TRAINABLE_PREFIXES = ("prompt_encoder.", "mask_decoder.")


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int = 4, alpha: float = 4.0,
                 dropout: float = 0.0) -> None:
        """
        A linear layer ``y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T`` with a frozen ``W, b``.

        Arguments:
          in_features (int): input size.
          out_features (int): output size.
          bias (bool): whether the base layer has a bias.
          rank (int): adapter rank r (> 0).
          alpha (float): scaling numerator; the update is scaled by alpha / rank.
          dropout (float): dropout on the adapter input only.
        """
        super().__init__(in_features, out_features, bias=bias)
        if rank <= 0:
            raise ValueError(f"LoRA rank must be > 0, got {rank}")
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))  # zero: the adapted layer starts equal to the base
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @classmethod
    def from_linear(cls, base: nn.Linear, rank: int, alpha: float, dropout: float) -> LoRALinear:
        layer = cls(base.in_features, base.out_features, bias=base.bias is not None, rank=rank, alpha=alpha,
                    dropout=dropout)
        layer.to(device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(base.weight)
            if base.bias is not None:
                layer.bias.copy_(base.bias)
        return layer

    def delta_weight(self) -> torch.Tensor:
        """(out_features, in_features) update folded in by ``merge``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        out = super().forward(x)
        return out + (self.lora_dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the adapter folded into the weight."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        layer.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.weight + self.delta_weight())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for name in dotted.split("."):
        module = getattr(module, name)
    return module


def _set(module: nn.Module, dotted: str, value: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(_get(module, parent) if parent else module, name, value)


def apply_lora(image_encoder: nn.Module, rank: int = 4, alpha: float = 4.0, dropout: float = 0.0,
               target_modules: Iterable[str] = ("qkv",), freeze_base: bool = True) -> list[str]:
    """Replaces the chosen linears of every ViT block with ``LoRALinear`` (in place).

    Arguments:
      image_encoder: segment-anything ``ImageEncoderViT`` (``.blocks`` of ``Block``) or LiteMedSAM's ``TinyViT``
        (its attention stages' ``TinyViTBlock``).
      rank, alpha, dropout: adapter settings (see ``LoRALinear``).
      target_modules: any of ``qkv``, ``proj``, ``mlp`` (= ``lin1`` + ``lin2``), ``lin1``, ``lin2``.
      freeze_base: freeze every non-adapter parameter of the encoder, so that only adapters train there.

    Returns:
      the dotted names (relative to ``image_encoder``) of the adapted linears.
    """
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    unknown = [t for t in targets if t not in _TARGETS]
    if unknown or not targets:
        raise ValueError(f"lora_target_modules {targets!r}: choose from {sorted(_TARGETS)}")
    paths = sorted({p for t in targets for p in _TARGETS[t]})
    if freeze_base:
        image_encoder.requires_grad_(False)
    adapted, matched = [], False
    for block_name, block in _attention_blocks(image_encoder):
        for path in paths:
            if not _has_path(block, path):
                continue  # the other encoder family's name (lin1 vs fc1)
            matched = True
            layer = _get(block, path)
            if isinstance(layer, LoRALinear):
                continue  # already adapted: applying twice is a no-op
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"{block_name}.{path} is {type(layer).__name__}, not nn.Linear")
            _set(block, path, LoRALinear.from_linear(layer, rank, alpha, dropout))
            adapted.append(f"{block_name}.{path}")
    if not matched:
        raise ValueError(f"no linear layer matches lora_target_modules {targets!r} in {type(image_encoder).__name__}")
    return adapted


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every ``LoRALinear`` in ``model`` into a plain ``nn.Linear`` (in place); returns ``model``.

    Afterwards the state_dict has exactly segment-anything's keys, so it can be saved as a SAM checkpoint.
    Merged layers keep their base layer's ``requires_grad`` (False when frozen).
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            merged = module.merged()
            merged.requires_grad_(module.weight.requires_grad)
            _set(model, name, merged)
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights a LoRA checkpoint needs: adapters plus prompt encoder and mask decoder.

    Keys are ``model``'s own (a ``Sam``: ``image_encoder.blocks.0.attn.qkv.lora_A``, ``prompt_encoder.*``,
    ``mask_decoder.*``; a wrapper such as ``SAMRefiner`` adds its ``sam.`` prefix). The frozen encoder is left
    out: restore it from the base SAM/MedSAM file, then ``load_lora_state_dict``.
    """
    out = {}
    for k, v in model.state_dict().items():
        bare = k[4:] if k.startswith("sam.") else k
        if k.endswith((".lora_A", ".lora_B")) or bare.startswith(_TRAINABLE_PREFIXES):
            out[k] = v.detach().clone()
    return out


def load_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Loads a ``lora_state_dict`` into a model that already has adapters (strict on the adapter keys)."""
    own = lora_state_dict(model)
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise KeyError(f"LoRA state_dict mismatch: missing {missing[:10]}, unexpected {unexpected[:10]}")
    model.load_state_dict(dict(state_dict), strict=False)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts for logging: total, trainable, LoRA adapters, and trainable per top-level child.

    Returns:
      {"total": n, "trainable": n, "lora": n, "trainable/<child>": n, ...}.
    """
    counts = {"total": 0, "trainable": 0, "lora": 0}
    for name, p in model.named_parameters():
        counts["total"] += p.numel()
        if name.endswith((".lora_A", ".lora_B")):
            counts["lora"] += p.numel()
        if p.requires_grad:
            counts["trainable"] += p.numel()
            parts = name.split(".")
            child = ".".join(parts[:2]) if parts[0] == "sam" and len(parts) > 1 else parts[0]
            counts[f"trainable/{child}"] = counts.get(f"trainable/{child}", 0) + p.numel()
    return counts
