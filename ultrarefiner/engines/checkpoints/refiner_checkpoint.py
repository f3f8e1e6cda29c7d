"""Checkpoint format of the SAM refiner (phase 2), read by the end-to-end bundle (phase 3) and MONAI Label.

``<ckpt_root>/sam_refiner/<dataset>/fold_<k>/best.pt`` is written by ``TrainingCheckpoints`` with
``state_dict_fn=refiner_state_dict`` (and its ``identity``, ``engines.checkpoints.checkpoint``):

- frozen image encoder (the default): ``{"model": prompt encoder + mask decoder, "lora": False, "partial": True,
  "encoder": {...}}``: the encoder is not stored (it is the base weights, e.g. LiteMedSAM's packaged file), only
  its fingerprint, checked on load so that a decoder never meets an encoder it was not trained with;
- LoRA: ``{"model": lora_state_dict(refiner), "lora": True, "partial": True, ...}``: adapters, prompt encoder and
  mask decoder only (keys with the ``sam.`` prefix); the frozen image encoder is restored from the base weights;
- encoder trained (unfrozen): ``{"model": SAMRefiner.state_dict(), "lora": False, ...}``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from ultrarefiner.engines.checkpoints.checkpoint import read_checkpoint, require_phase
from ultrarefiner.errors import BadInputError
from ultrarefiner.networks.embedding_cache import weights_fingerprint
from ultrarefiner.networks.lora import has_lora, load_lora_state_dict, lora_state_dict

__all__ = [
    "as_refiner_checkpoint",
    "check_encoder",
    "apply_refiner_checkpoint",
    "encoder_record",
    "is_refiner_checkpoint",
    "load_refiner_checkpoint",
    "read_refiner_checkpoint",
    "refiner_state_dict",
]


def _frozen_encoder(refiner: torch.nn.Module) -> bool:
    return not any(p.requires_grad for p in refiner.sam.image_encoder.parameters())


def refiner_state_dict(refiner: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a refiner checkpoint stores: prompt encoder + mask decoder (+ LoRA adapters) when the image encoder is
    frozen, else everything."""
    refiner = getattr(refiner, "module", refiner)  # DDP
    return lora_state_dict(refiner) if has_lora(refiner) or _frozen_encoder(refiner) else refiner.state_dict()


def encoder_record(refiner: torch.nn.Module) -> dict:
    """What a partial checkpoint records of the frozen base encoder it was trained with (checked on load)."""
    refiner = getattr(refiner, "module", refiner)
    if not (has_lora(refiner) or _frozen_encoder(refiner)):
        return {}
    encoder = refiner.sam.image_encoder
    if has_lora(encoder):  # fingerprint the base weights, not the adapters being trained
        encoder = _base_encoder(encoder)
    return {"partial": True, "encoder": {"class": type(refiner.sam.image_encoder).__name__,
                                         "fingerprint": weights_fingerprint(encoder)}}


def _base_encoder(encoder: torch.nn.Module) -> torch.nn.Module:
    import copy

    from ultrarefiner.networks.lora import LoRALinear, _set

    base = copy.deepcopy(encoder)
    for name, m in list(base.named_modules()):
        if isinstance(m, LoRALinear):
            plain = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            plain.load_state_dict({"weight": m.weight, **({"bias": m.bias} if m.bias is not None else {})})
            _set(base, name, plain)
    return base


def as_refiner_checkpoint(obj: object, source: str | os.PathLike) -> dict:
    """A loaded refiner file as a checkpoint dict with its ``lora``/``partial`` flags (a plain state_dict is wrapped
    as ``{"model": ...}``); ``source`` names the file in errors."""
    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        obj = {"model": obj}  # a plain state_dict (e.g. the Model Zoo's fake-weights models/model.pt)
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise BadInputError(source, "not a refiner checkpoint (no 'model' state_dict)")
    obj.setdefault("lora", any(".lora_A" in k for k in obj["model"]))
    obj.setdefault("partial", obj["lora"] or not any(".image_encoder." in k for k in obj["model"]))
    return obj


def read_refiner_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint dict (``model``, ``lora``, ``network_kwargs``...), with errors that name the file."""
    obj = read_checkpoint(path, "refiner checkpoint")
    require_phase(path, obj, 2, "the SAM refiner")
    return as_refiner_checkpoint(obj, path)


def is_refiner_checkpoint(obj: object) -> bool:
    """True for a checkpoint dict of this module (a ``model`` state_dict with ``lora``/``partial`` flags), as opposed
    to a plain state_dict."""
    return isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) and ("lora" in obj or "partial" in obj)


def check_encoder(target: torch.nn.Module, obj: dict, path: str | os.PathLike) -> None:
    """A partial checkpoint's decoder was trained on one frozen encoder: refuse another one."""
    rec = obj.get("encoder") or {}
    if not rec.get("fingerprint"):
        return
    encoder = target.sam.image_encoder
    if has_lora(encoder):
        encoder = _base_encoder(encoder)
    actual = weights_fingerprint(encoder)
    if actual != rec["fingerprint"]:
        own = type(target.sam.image_encoder).__name__
        raise BadInputError(path, f"was trained with another image encoder ({rec.get('class')} weights "
                                  f"{rec['fingerprint']}) than the refiner's ({own} weights {actual}); build the "
                                  "refiner with the base weights it was trained on (model_type / sam_checkpoint)")


def load_refiner_checkpoint(refiner: torch.nn.Module, path: str | os.PathLike) -> dict:
    """Load ``best.pt``/``last.pt`` of the sam_refiner bundle into ``refiner`` (strict); returns the checkpoint.

    A LoRA checkpoint needs a refiner built with the same adapters on top of the base SAM/MedSAM weights.
    """
    return apply_refiner_checkpoint(refiner, read_refiner_checkpoint(path), path)


def apply_refiner_checkpoint(refiner: torch.nn.Module, obj: Mapping, source: str | os.PathLike = "refiner checkpoint"
                             ) -> dict:
    """``load_refiner_checkpoint`` for a checkpoint dict already in memory (``source`` names it in errors)."""
    obj = as_refiner_checkpoint(dict(obj), source)
    target = getattr(refiner, "module", refiner)
    try:
        if obj["lora"]:
            if not has_lora(target):
                raise KeyError("the checkpoint holds LoRA adapters but the refiner has none (set use_lora)")
            check_encoder(target, obj, source)
            load_lora_state_dict(target, obj["model"])
        elif obj["partial"]:
            if has_lora(target):
                raise KeyError("the checkpoint holds no LoRA adapters but the refiner has some (unset use_lora)")
            check_encoder(target, obj, source)
            load_lora_state_dict(target, obj["model"])  # prompt encoder + mask decoder, strict on those keys
        else:
            target.load_state_dict(obj["model"], strict=True)
    except (KeyError, RuntimeError) as e:
        raise BadInputError(source, f"does not match the refiner: {e}") from e
    return obj
