"""One model hub: ``create_model(kind, checkpoint)`` turns any file the package writes into a ready network.

Every file the bundles write describes itself (``engines.checkpoints.checkpoint``): ``kind`` (``transunet``,
``sam_refiner``, ``ultrarefiner``), ``network_kwargs`` and ``model`` (the weights): training ``best.pt``/``last.pt``
and the exported ``models/model.pt`` of each bundle, the shipped ``bundles/sam_refiner/models/model.pt`` included.
``create_model`` reads the file once (``read_checkpoint``), refuses a file of another kind, rebuilds the network from
the recorded ``network_kwargs`` and loads the weights strictly. Files that record no ``network_kwargs`` (a plain
state_dict such as the Model Zoo's fake weights, the original TransUNet ``.pth``) load with the kwargs given
explicitly (``**overrides`` or ``fallback_kwargs``), and are refused with a message naming the file otherwise.

What each kind returns (eval mode, on ``device``)::

    transunet      TransUNet(**network_kwargs)                      (B,1,S,S) -> logits (B,C,S,S)
    sam_refiner    SAMRefiner(sam=build_sam(model_type, base, **sam_kwargs), ...)
                                                                    image (B,1|3,H,W) + coarse (B,1,H,W) -> dict
    ultrarefiner   UltraRefiner(TransUNet, SAMRefiner)               (no embedding cache unless asked)

``sam_refiner`` without a checkpoint is the zero-shot refiner: LiteMedSAM's packaged weights (or ``model_type`` /
``sam_checkpoint``), no finetuned decoder. A plain SAM/MedSAM/LiteMedSAM weights file (keys ``image_encoder.*``...)
is a zero-shot refiner over those base weights.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ultrarefiner.engines.checkpoints.checkpoint import (
    BUNDLE_PHASES,
    _canonical,
    check_identity,
    checkpoint_kind,
    read_checkpoint,
    require_phase,
    weights_of,
)
from ultrarefiner.errors import BadInputError

__all__ = ["KINDS", "REFINER_ARCH_KEYS", "create_model", "network_kwargs_from_bundle"]

logger = logging.getLogger(__name__)

KINDS = tuple(BUNDLE_PHASES)  # ("transunet", "sam_refiner", "ultrarefiner")
# what of a refiner's network_kwargs fixes the meaning of its weights (the rest, prompts and freeze flags, are
# inference choices or training-only); image_resize may be overridden (``torch`` for tracing)
REFINER_ARCH_KEYS = ("model_type", "preprocessing", "image_resize", "use_lora", "lora_rank", "lora_alpha",
                     "lora_target_modules")
_REFINER_FREE = ("image_resize",)
_SAM_ROOTS = {"image_encoder", "prompt_encoder", "mask_decoder"}


def create_model(
    kind: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    identity: Mapping[str, Any] | None = None,
    sam_checkpoint: str | os.PathLike | None = None,
    fallback_kwargs: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
    **overrides: Any,
) -> nn.Module:
    """A ready network of ``kind`` with the weights of ``checkpoint`` (module docstring).

    Arguments:
      kind: ``transunet``, ``sam_refiner`` or ``ultrarefiner``.
      checkpoint: ``best.pt``/``last.pt`` of training or an exported ``models/model.pt``; ``sam_refiner`` also takes
        None (zero-shot LiteMedSAM) or a plain SAM/MedSAM/LiteMedSAM weights file.
      device: where the network goes.
      identity: the run the file must come from where it records one (``checkpoint.run_identity``: phase, dataset,
        fold), e.g. out-of-fold predictions need fold k's model.
      sam_checkpoint: base SAM weights under a refiner file that stores only its decoder or LoRA adapters
        (``build_sam``'s ``checkpoint``; default: LiteMedSAM's packaged weights, none for ``vit_*``).
      fallback_kwargs: ``network_kwargs`` for a file that records none, or a function returning them (called only
        then), e.g. ``lambda: network_kwargs_from_bundle("bundles/ultrarefiner")``.
      overrides: network kwargs over the recorded ones; an architecture kwarg that differs from the file's is
        refused (its weights do not fit). ``ultrarefiner``: ``transunet``/``sam``/``refiner`` dicts merge into those
        sections, other keys go to ``UltraRefiner`` (``cache_embeddings``, ...). ``sam_refiner``: ``sam_kwargs``
        (``build_tiny_sam`` arguments with ``model_type="tiny"``), merged key by key with the recorded ones
        (``networks.sam_record``: a file of a tiny-SAM refiner rebuilds without them).

    Raises:
      ValueError: unknown ``kind``, or no checkpoint for a kind that needs one.
      BadInputError: missing/unreadable file, a file of another kind, overrides that contradict it, no kwargs, or
        weights that do not fit (the message names the file).
      CheckpointMismatchError: the file records another run than ``identity``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose from {list(KINDS)}")
    if checkpoint is None:
        if kind != "sam_refiner":
            raise ValueError(f"create_model({kind!r}) needs a checkpoint (a best.pt or models/model.pt)")
        model = _zero_shot_refiner(dict(overrides), sam_checkpoint)
    else:
        path = Path(checkpoint)
        obj = read_checkpoint(path, f"{kind} checkpoint")
        require_phase(path, obj, BUNDLE_PHASES[kind], f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} model")
        if identity:
            check_identity(path, obj.get("identity") if isinstance(obj, dict) else None, identity,
                           hint="use the model of this run's dataset and fold (<ckpt_root>/<bundle>/<dataset>/"
                                "fold_<k>/best.pt)")
        stored = obj.get("network_kwargs") if isinstance(obj, dict) else None
        if not stored and fallback_kwargs:
            stored = dict(fallback_kwargs() if callable(fallback_kwargs) else fallback_kwargs)
        build = {"transunet": _transunet, "sam_refiner": _sam_refiner, "ultrarefiner": _ultrarefiner}[kind]
        model = build(path, obj, dict(stored or {}), dict(overrides), sam_checkpoint)
        logger.info(f"{kind} built from {path}")
    return model.to(device).eval()


def network_kwargs_from_bundle(bundle: str | os.PathLike, overrides: Mapping[str, Any] | None = None,
                               config: str = "inference.json") -> dict:
    """``network_kwargs`` of a bundle's config (with ``overrides`` of its ids): the description of a plain
    ``models/model.pt`` that records none."""
    from monai.bundle import ConfigParser

    path = Path(bundle) / "configs" / config
    if not path.is_file():
        raise BadInputError(path, "bundle config not found")
    parser = ConfigParser()
    parser.read_config(str(path))
    if "network_kwargs" not in parser:
        raise BadInputError(path, "defines no network_kwargs")
    for k, v in (overrides or {}).items():
        parser[k] = v
    return dict(parser.get_parsed_content("network_kwargs"))


# ------------------------------------------------------------------------------------------------ kwargs
def _merge(path: Path, stored: Mapping[str, Any], overrides: Mapping[str, Any], fixed: Sequence[str] | None,
           what: str) -> dict:
    """``stored`` updated by ``overrides``; refuses an override of a ``fixed`` key (None: every key) that differs
    from a recorded value (None on either side is unset: not compared)."""
    for k in sorted(stored.keys() & overrides.keys()):
        if (fixed is None or k in fixed) and stored[k] is not None and overrides[k] is not None \
                and _canonical(stored[k]) != _canonical(overrides[k]):
            raise BadInputError(path, f"was trained with {what} {k}={stored[k]!r}, not {overrides[k]!r}: its weights "
                                      "do not fit that network (drop the override or use a matching file)")
    return {**stored, **overrides}


def _no_kwargs(path: Path, kind: str, example: str) -> BadInputError:
    return BadInputError(path, f"records no network_kwargs (a plain state_dict): give them, e.g. "
                               f"create_model({kind!r}, path, {example})")


# ------------------------------------------------------------------------------------------------ weights
def _few(names: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(names[:n]) + (", ..." if len(names) > n else "")
    return f"{len(names)} ({shown})" if names else "0"


def _load_strict(network: nn.Module, weights: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    """``load_state_dict(strict=True)`` with a short message naming the file: counts and a few names, not the
    thousands of a whole state_dict."""
    own = network.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        raise BadInputError(path, f"does not match the {what} of its network_kwargs: {_few(missing)} missing, "
                                  f"{_few(unexpected)} unexpected weights")
    try:
        network.load_state_dict(weights, strict=True)
    except RuntimeError as e:  # shape mismatches: one line per tensor, keep the first few
        lines = str(e).splitlines()
        raise BadInputError(path, f"does not match the {what} of its network_kwargs: "
                                  f"{' '.join(lines[:4])[:600]}") from e


# ------------------------------------------------------------------------------------------------ kinds
def _transunet(path: Path, obj: Any, stored: dict, overrides: dict, sam_checkpoint: Any) -> nn.Module:
    from ultrarefiner.networks import TransUNet
    from ultrarefiner.networks.transunet_weights import load_transunet_checkpoint

    if not (stored or overrides):
        raise _no_kwargs(path, "transunet", "img_size=224, variant='R50-ViT-B_16'")
    model = TransUNet(**_merge(path, stored, overrides, None, "TransUNet"))
    weights = weights_of(obj)
    if not _has_kwargs(obj) and set(weights) != set(model.state_dict()):
        return load_transunet_checkpoint(model, path)  # the original TransUNet code's .pth (its own key names)
    _load_strict(model, weights, path, "TransUNet")
    return model


def _has_kwargs(obj: Any) -> bool:
    """Whether a loaded file records its ``network_kwargs``."""
    return isinstance(obj, dict) and bool(obj.get("network_kwargs"))


def _is_plain_sam(obj: Any) -> bool:
    """A SAM/MedSAM/LiteMedSAM weights file (``image_encoder.*``, ...), not a refiner checkpoint (``sam.*``)."""
    from ultrarefiner.networks.sam_weights import extract_state_dict

    if checkpoint_kind(obj) is not None:
        return False
    try:
        sd = extract_state_dict(obj)
    except ValueError:
        return False
    return {str(k).split(".", 1)[0] for k in sd} <= _SAM_ROOTS


def _refiner(model_type: str, base: Any, sam_kwargs: Mapping[str, Any], kwargs: Mapping[str, Any]) -> nn.Module:
    from ultrarefiner.networks import SAMRefiner, build_sam

    return SAMRefiner(sam=build_sam(model_type, base, **dict(sam_kwargs)), **dict(kwargs))


def _zero_shot_refiner(overrides: dict, sam_checkpoint: Any, base_file: Path | None = None) -> nn.Module:
    model_type = overrides.pop("model_type", "lite_medsam")
    sam_kwargs = overrides.pop("sam_kwargs", {})
    base = base_file or sam_checkpoint or ("packaged" if model_type == "lite_medsam" else "")
    return _refiner(model_type, base, sam_kwargs, overrides)


def _sam_refiner(path: Path, obj: Any, stored: dict, overrides: dict, sam_checkpoint: Any) -> nn.Module:
    from ultrarefiner.engines.checkpoints.refiner_checkpoint import apply_refiner_checkpoint, as_refiner_checkpoint

    if _is_plain_sam(obj):  # base weights only: the zero-shot refiner over them
        return _zero_shot_refiner(overrides, None, base_file=path)
    arch = {k: stored[k] for k in REFINER_ARCH_KEYS if k in stored}
    # the recorded build_sam arguments (a tiny SAM's, ``networks.sam_record``), merged key by key
    sam_kwargs = _merge(path, dict(stored.get("sam_kwargs") or {}), dict(overrides.pop("sam_kwargs", None) or {}),
                        None, "SAM")
    kwargs = _merge(path, arch, overrides, [k for k in REFINER_ARCH_KEYS if k not in _REFINER_FREE], "refiner")
    model_type = kwargs.pop("model_type", "lite_medsam")
    rec = as_refiner_checkpoint(obj, path)
    base = sam_checkpoint
    if not base:
        if model_type == "lite_medsam":
            base = "packaged"
        elif rec["partial"] and model_type != "tiny":
            raise BadInputError(path, f"holds only part of a {model_type} refiner (decoder or LoRA adapters): give "
                                      "the base SAM weights it was trained on (sam_checkpoint=<medsam_vit_b.pth>), "
                                      "or export the full refiner")
        else:
            base = "random"  # the file holds every weight
    refiner = _refiner(model_type, base, sam_kwargs, kwargs)
    apply_refiner_checkpoint(refiner, rec, path)
    return refiner


def _ultrarefiner(path: Path, obj: Any, stored: dict, overrides: dict, sam_checkpoint: Any) -> nn.Module:
    from ultrarefiner.engines.training.e2e_setup import build_ultrarefiner

    sections = {s: dict(overrides.pop(s)) for s in ("transunet", "sam", "refiner") if s in overrides}
    if "transunet" not in stored and "transunet" not in sections:
        raise _no_kwargs(path, "ultrarefiner", "transunet={...}, sam={...}, refiner={...}")
    fixed_refiner = [k for k in REFINER_ARCH_KEYS if k not in _REFINER_FREE]
    kwargs = {
        "transunet": _merge(path, dict(stored.get("transunet") or {}), sections.get("transunet", {}), None,
                            "TransUNet"),
        "sam": _merge(path, dict(stored.get("sam") or {}), sections.get("sam", {}), None, "SAM"),
        "refiner": _merge(path, dict(stored.get("refiner") or {}), sections.get("refiner", {}), fixed_refiner,
                          "refiner"),
    }
    model = build_ultrarefiner(kwargs, sam_checkpoint=sam_checkpoint, **{"cache_embeddings": False, **overrides})
    _load_strict(model, weights_of(obj), path, "UltraRefiner")
    return model
