"""Initialising a network before training: the one place that says where a run's starting weights come from.

* Phase 1 (``init_from_imagenet``): TransUNet's R50+ViT-B/16 encoder from Google's ImageNet-21k npz.
* Phase 3 (``init_from_phase_checkpoints``): ``UltraRefiner``'s TransUNet from
  ``<ckpt_root>/transunet/<dataset>/fold_<k>/best.pt`` (its stored ``network_kwargs`` must match the config), its
  refiner from ``<ckpt_root>/sam_refiner/<dataset>/fold_<k>/best.pt`` (``engines.checkpoints.refiner_checkpoint``
  format, full or LoRA-only). A file that records its run (``identity``, ``checkpoints.checkpoint``) must come from
  phase 1 / phase 2 and, for this run's dataset, from its fold: another fold's model was trained on this fold's
  validation images (another dataset's file is a transfer, used with a warning). Files without an identity (older
  runs, the shipped ``bundles/sam_refiner/models/model.pt``) are taken as they are. A LoRA-only checkpoint is loaded
  on top of the base SAM/MedSAM file (``sam_checkpoint``) and, unless phase 3 trains adapters itself (``use_lora``),
  merged into the encoder weights: the encoder is then a frozen plain ViT again and its embeddings can be cached.

Building a ready model from a trained or exported file, for inference, is ``ultrarefiner.create_model``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ultrarefiner.engines.checkpoints.checkpoint import check_identity, read_checkpoint, run_identity, weights_of
from ultrarefiner.engines.checkpoints.refiner_checkpoint import (
    check_encoder,
    load_refiner_checkpoint,
    read_refiner_checkpoint,
)
from ultrarefiner.errors import BadInputError, UltraRefinerError
from ultrarefiner.networks.lite_medsam import is_lite_medsam
from ultrarefiner.networks.lora import apply_lora, has_lora, merge_lora
from ultrarefiner.utils.flags import as_flag

__all__ = ["MissingCheckpointError", "init_from_imagenet", "init_from_phase_checkpoints"]

logger = logging.getLogger(__name__)

# LoRA target names of ``networks.lora.apply_lora`` by the path of the adapted linear inside a ViT block
_LORA_TARGETS = {"attn.qkv": "qkv", "attn.proj": "proj", "mlp.lin1": "lin1", "mlp.lin2": "lin2"}


def init_from_imagenet(network: torch.nn.Module, pretrained_npz: str | os.PathLike | None = None) -> torch.nn.Module:
    """Phase 1: load the Google R50+ViT-B_16 / ViT-B_16 npz into the TransUNet ``network`` when a path is given;
    returns ``network``. An empty path means random initialisation (logged, since results are then far below
    published ones)."""
    if pretrained_npz:
        from ultrarefiner.networks.transunet_weights import load_pretrained_npz

        load_pretrained_npz(network, pretrained_npz)
        logger.info(f"encoder initialised from {pretrained_npz}")
    else:
        logger.warning("no --pretrained_npz given: TransUNet starts from random initialisation")
    return network


class MissingCheckpointError(UltraRefinerError, FileNotFoundError):
    """A phase-1/phase-2 checkpoint that phase 3 starts from does not exist."""


def _missing_message(missing: list[tuple[str, str, Path]]) -> str:
    lines = ["UltraRefiner starts from the phase-1 (TransUNet) and phase-2 (SAM refiner) weights, but "
             + ("this checkpoint is" if len(missing) == 1 else "these checkpoints are") + " missing:"]
    lines += [f"  {what} (--{option}): {path}" for what, option, path in missing]
    lines.append("Train them with bundles/transunet and bundles/sam_refiner for the same dataset and fold, or point "
                 "the options above at existing files; --from_scratch True starts from random weights instead "
                 "(experiments only: results are far below the published ones).")
    return "\n".join(lines)


def _check_source(path: Path, obj: object, phase: str, dataset: str | None, fold: int | None, option: str) -> None:
    """A phase-1/phase-2 file that records its run must be that phase's and, for this dataset, of this fold (another
    fold's model was trained on this fold's validation images). A file of another dataset is a transfer (e.g. the
    BUSI refiner on BUSBRA): no image is shared, so it is allowed with a warning."""
    found = obj.get("identity") if isinstance(obj, Mapping) else None
    expected = run_identity(phase, dataset, fold)
    fields: tuple[str, ...] = ("phase", "dataset", "fold")
    if found and found.get("dataset") is not None and dataset is not None and str(found["dataset"]) != str(dataset):
        logger.warning(f"--{option} {path} was trained on dataset {found['dataset']!r}, this run is {dataset!r}: "
                       "used as a transfer (no fold check across datasets)")
        fields = ("phase",)
    check_identity(path, found, expected, fields=fields,
                   hint=f"Phase 3 starts from the {phase} run of its own dataset and fold (another fold's model was "
                        f"trained on this fold's validation images): point --{option} at that run's best.pt")


def _load_transunet(transunet: torch.nn.Module, path: Path, transunet_kwargs: Mapping[str, Any] | None,
                    dataset: str | None = None, fold: int | None = None) -> None:
    obj = read_checkpoint(path, "TransUNet checkpoint")
    _check_source(path, obj, "transunet", dataset, fold, "transunet_ckpt")
    stored = obj.get("network_kwargs") if isinstance(obj, dict) else None
    if stored and transunet_kwargs:
        diff = {k: (stored[k], transunet_kwargs[k]) for k in stored.keys() & transunet_kwargs.keys()
                if list(np.atleast_1d(stored[k])) != list(np.atleast_1d(transunet_kwargs[k]))}
        if diff:
            shown = ", ".join(f"{k}={a!r} (config: {b!r})" for k, (a, b) in sorted(diff.items()))
            raise BadInputError(path, f"TransUNet checkpoint was trained with {shown}; set the same values in "
                                      "transunet_kwargs (e.g. --img_size, --vit_depth)")
    try:
        transunet.load_state_dict(weights_of(obj), strict=True)
    except RuntimeError as e:
        raise BadInputError(path, f"does not match the configured TransUNet: {e}") from e


def _lora_settings(obj: Mapping[str, Any], rank: int, alpha: float) -> tuple[int, float, list[str]]:
    """(rank, alpha, target modules) of a LoRA-only refiner checkpoint: stored settings when present, else the
    rank from the adapter shapes, the given alpha and the targets from the key names."""
    stored: dict[str, Any] = {}
    nk = obj.get("network_kwargs") or {}
    for d in (nk, *(v for v in nk.values() if isinstance(v, Mapping))):
        stored.update({k: d[k] for k in ("lora_rank", "lora_alpha", "lora_target_modules") if k in d})
    a_keys = [k for k in obj["model"] if k.endswith(".lora_A")]
    if "lora_rank" not in stored and a_keys:
        rank = int(obj["model"][a_keys[0]].shape[0])
    targets = stored.get("lora_target_modules")
    if targets is None:
        paths = {k.split(".blocks.", 1)[1].split(".", 1)[1].rsplit(".lora_A", 1)[0] for k in a_keys if ".blocks." in k}
        targets = sorted({_LORA_TARGETS[p] for p in paths if p in _LORA_TARGETS}) or ["qkv"]
    targets = [targets] if isinstance(targets, str) else list(targets)
    return int(stored.get("lora_rank", rank)), float(stored.get("lora_alpha", alpha)), targets


def _load_refiner(network: torch.nn.Module, path: Path, sam_checkpoint: str | os.PathLike | None,
                  lora_rank: int, lora_alpha: float, dataset: str | None = None, fold: int | None = None) -> None:
    refiner = network.refiner
    obj = read_refiner_checkpoint(path)
    _check_source(path, obj, "sam_refiner", dataset, fold, "refiner_ckpt")
    encoder = refiner.sam.image_encoder
    if obj["lora"]:
        if not sam_checkpoint and not is_lite_medsam(refiner.sam):
            raise BadInputError(path, "is a LoRA-only refiner checkpoint: the image encoder comes from the base "
                                      "SAM/MedSAM weights its adapters were trained on; pass --sam_checkpoint "
                                      "<medsam_vit_b.pth>")
        if has_lora(refiner):  # phase 3 keeps training the adapters
            load_refiner_checkpoint(refiner, path)
            return
        rank, alpha, targets = _lora_settings(obj, lora_rank, lora_alpha)
        apply_lora(encoder, rank, alpha, 0.0, targets, freeze_base=True)
        load_refiner_checkpoint(refiner, path)
        merge_lora(encoder)  # back to a plain, frozen ViT: embeddings can be cached
        encoder.requires_grad_(False)
        logger.info(f"LoRA adapters of {path} (rank {rank}, alpha {alpha}, {targets}) merged into the image encoder")
    elif has_lora(refiner):  # full (or decoder-only) phase-2 weights, fresh phase-3 adapters
        own = refiner.state_dict()
        adapters = {k for k in own if k.endswith((".lora_A", ".lora_B"))}
        if obj["partial"]:  # the frozen encoder stays the base weights the decoder was trained with
            check_encoder(refiner, obj, path)
            adapters |= {k for k in own if k.startswith("sam.image_encoder.")}
        sd = {k: v for k, v in obj["model"].items()}
        missing, unexpected = sorted(set(own) - set(sd) - adapters), sorted(set(sd) - set(own))
        if missing or unexpected:
            raise BadInputError(path, f"does not match the refiner: missing {missing[:10]}, "
                                      f"unexpected {unexpected[:10]}")
        refiner.load_state_dict(sd, strict=False)
    else:
        load_refiner_checkpoint(refiner, path)
    if hasattr(network, "refresh_cache"):
        network.refresh_cache()


def init_from_phase_checkpoints(
    network: torch.nn.Module,
    transunet_ckpt: str | os.PathLike,
    refiner_ckpt: str | os.PathLike,
    from_scratch: bool = False,
    sam_checkpoint: str | os.PathLike | None = None,
    transunet_kwargs: Mapping[str, Any] | None = None,
    lora_rank: int = 4,
    lora_alpha: float = 4.0,
    dataset: str | None = None,
    fold: int | None = None,
) -> torch.nn.Module:
    """Load the phase-1 and phase-2 weights into ``network`` (an ``UltraRefiner``); returns ``network``.

    Arguments:
      network: the UltraRefiner built from the config (``network_def``).
      transunet_ckpt: TransUNet ``best.pt`` of the transunet bundle (``network_kwargs`` checked against
        ``transunet_kwargs``).
      refiner_ckpt: refiner ``best.pt`` of the sam_refiner bundle (full or LoRA-only, ``refiner_checkpoint``).
      from_scratch: skip both files (random TransUNet; SAM from ``sam_checkpoint`` or random), for experiments.
      sam_checkpoint: base SAM/MedSAM file; required by LoRA-only refiner checkpoints.
      transunet_kwargs: the configured TransUNet arguments (None: the network's own ``network_kwargs``).
      lora_rank, lora_alpha: adapter settings of a LoRA checkpoint that does not store them.
      dataset, fold: this run's; a checkpoint that records another phase, or another fold of this dataset, is
        refused; one of another dataset is used with a warning (None: not checked).

    Raises:
      MissingCheckpointError: a checkpoint does not exist (the message names it and suggests ``--from_scratch``).
      CheckpointMismatchError: a checkpoint records another phase or fold (the message names both).
      BadInputError: a checkpoint does not match the configured network.
    """
    if as_flag(from_scratch, "from_scratch"):
        logger.warning("--from_scratch: TransUNet starts from random weights and the refiner from "
                       + (f"{sam_checkpoint}" if sam_checkpoint else "random weights")
                       + "; the phase-1/phase-2 checkpoints are not used")
        return network
    files = [("TransUNet checkpoint", "transunet_ckpt", Path(transunet_ckpt)),
             ("SAM refiner checkpoint", "refiner_ckpt", Path(refiner_ckpt))]
    missing = [f for f in files if not f[2].is_file()]
    if missing:
        raise MissingCheckpointError(_missing_message(missing))
    if transunet_kwargs is None:  # what the TransUNet was built with (``TransUNet.network_kwargs``)
        transunet_kwargs = getattr(network.transunet, "network_kwargs", None)
    _load_transunet(network.transunet, Path(transunet_ckpt), transunet_kwargs, dataset, fold)
    _load_refiner(network, Path(refiner_ckpt), sam_checkpoint, lora_rank, lora_alpha, dataset, fold)
    logger.info(f"UltraRefiner initialised from {transunet_ckpt} and {refiner_ckpt}")
    return network
