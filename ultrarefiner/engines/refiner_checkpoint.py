"""Checkpoint format of the SAM refiner (phase 2), read by the end-to-end bundle (phase 3) and MONAI Label.

``<ckpt_root>/sam_finetuned/fold_<k>/best.pt`` is written by ``TrainingCheckpoints`` with
``state_dict_fn=refiner_state_dict``:

- full finetuning: ``{"model": SAMRefiner.state_dict(), "lora": False, ...}``;
- LoRA: ``{"model": lora_state_dict(refiner), "lora": True, ...}``: adapters, prompt encoder and mask decoder
  only (keys with the ``sam.`` prefix); the frozen image encoder is restored from the base SAM/MedSAM file.
"""

from __future__ import annotations

import os

import torch

from ultrarefiner.engines.checkpoint import read_checkpoint
from ultrarefiner.errors import BadInputError
from ultrarefiner.networks.lora import has_lora, load_lora_state_dict, lora_state_dict


def refiner_state_dict(refiner: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a refiner checkpoint stores: the LoRA subset when the refiner has adapters, else everything."""
    refiner = getattr(refiner, "module", refiner)  # DDP
    return lora_state_dict(refiner) if has_lora(refiner) else refiner.state_dict()


def read_refiner_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint dict (``model``, ``lora``, ``network_kwargs``...), with errors that name the file."""
    obj = read_checkpoint(path, "refiner checkpoint")
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise BadInputError(path, "not a refiner checkpoint (no 'model' state_dict)")
    obj.setdefault("lora", any(".lora_A" in k for k in obj["model"]))
    return obj


def load_refiner_checkpoint(refiner: torch.nn.Module, path: str | os.PathLike) -> dict:
    """Load ``best.pt``/``last.pt`` of the sam_refiner bundle into ``refiner`` (strict); returns the checkpoint.

    A LoRA checkpoint needs a refiner built with the same adapters on top of the base SAM/MedSAM weights.
    """
    obj = read_refiner_checkpoint(path)
    target = getattr(refiner, "module", refiner)
    try:
        if obj["lora"]:
            if not has_lora(target):
                raise KeyError("the checkpoint holds LoRA adapters but the refiner has none (set use_lora)")
            load_lora_state_dict(target, obj["model"])
        else:
            target.load_state_dict(obj["model"], strict=True)
    except (KeyError, RuntimeError) as e:
        raise BadInputError(path, f"does not match the refiner: {e}") from e
    return obj
