"""Building the phase-2 (SAM refiner) pieces from the ``sam_refiner`` bundle's configs.

Each function is one config expression's worth of logic that a JSON config cannot express by itself: an embedding
cache only where the encoder is frozen, the inference datalist of (image, coarse mask) pairs, and the export of the
best weights as one self-contained file. The datasets are ``_target_`` components of the configs (``train#simulated``,
``train#shards``, ``train#real`` mixed by ``train#dataset``; ``validate#simulated`` / ``validate#real``).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ignite.engine import Engine, Events
from torch import nn
from torch.utils.data import Dataset

from ultrarefiner.data.datalist import folder_images
from ultrarefiner.engines.checkpoints.checkpoint import _is_main_process, save_checkpoint
from ultrarefiner.engines.checkpoints.refiner_checkpoint import load_refiner_checkpoint
from ultrarefiner.engines.training.refiner_training import precompute_embeddings
from ultrarefiner.errors import BadInputError
from ultrarefiner.networks.embedding_cache import EmbeddingCache
from ultrarefiner.networks.lora import has_lora, merge_lora
from ultrarefiner.networks.sam_weights import sam_record

__all__ = [
    "PrecomputeEmbeddings",
    "embedding_cache",
    "export_refiner",
    "fill_embedding_cache",
    "inference_datalist",
    "trainable_parameters",
]

logger = logging.getLogger(__name__)


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)  # DDP / DataParallel


def trainable_parameters(network: nn.Module) -> list[nn.Parameter]:
    """Parameters that require grad (decoder, prompt encoder, LoRA adapters; not the frozen encoder)."""
    return [p for p in network.parameters() if p.requires_grad]


def embedding_cache(network: nn.Module, enabled: bool = True, cache_dir: str | os.PathLike | None = None,
                    max_items: int | None = None) -> EmbeddingCache | None:
    """The frozen encoder's embedding cache, or None when disabled or when the encoder trains (LoRA, unfrozen).

    Arguments:
      network: the ``SAMRefiner`` (or a DDP wrapper of it), with its weights already loaded.
      enabled: False turns the cache off (every step runs the image encoder).
      cache_dir: folder of a persistent cache (reused across runs and restarts); empty: memory only.
      max_items: bound of the in-memory LRU (None: unbounded, ~2 MB per vit_b entry).
    """
    refiner = _unwrap(network)
    if not enabled:
        return None
    if refiner.encoder_trainable():
        logger.info("image encoder trains (LoRA or unfrozen): no embedding cache, the encoder runs every step")
        return None
    return EmbeddingCache(refiner.sam.image_encoder, cache_dir or None, max_items)


def fill_embedding_cache(network: nn.Module, cache: EmbeddingCache | None, datasets: Sequence[Dataset],
                         batch_size: int | None = None, num_workers: int = 0, amp: bool = False) -> int:
    """Encode every (image, flip) the datasets can use into ``cache``, loading and resizing the images in
    ``num_workers`` processes (the exact 1024 resize takes about 0.5 s per image on one CPU core, far more than a
    decoder step); entries already cached are skipped (``precompute_embeddings``: batch 1 and a frozen encoder copy
    on a CPU, ``batch_size`` None: 8 on CUDA). No-op without a cache. Returns the number encoded."""
    if cache is None:
        return 0
    # one pass over all the datasets' inputs: one frozen encoder copy (a trace) and one progress bar
    sources = [t for d in datasets if d is not None for t in d.encoder_sources()]
    n = precompute_embeddings(_unwrap(network), cache, sources, batch_size=batch_size, num_workers=num_workers,
                              amp=amp)
    logger.info(f"embedding cache: {n} encoder inputs encoded")
    return n


class PrecomputeEmbeddings:
    """Trainer handler: when the run starts, after ``TrainingCheckpoints`` restored a checkpoint (attach it after
    that handler), refresh the cache's encoder fingerprint and fill it (:func:`fill_embedding_cache`).

    Arguments:
      cache: the embedding cache (None: the handler does nothing).
      datasets: the training and validation datasets.
      batch_size (None: 1 on a CPU, 8 on CUDA), num_workers, amp: of the encoding pass.
    """

    def __init__(self, cache: EmbeddingCache | None, datasets: Sequence[Dataset], batch_size: int | None = None,
                 num_workers: int = 0, amp: bool = False) -> None:
        self.cache, self.datasets = cache, list(datasets)
        self.batch_size, self.num_workers, self.amp = batch_size, num_workers, amp

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if self.cache is None:
            return
        self.cache.refresh()  # the weights may have just been restored from last.pt
        fill_embedding_cache(engine.network, self.cache, self.datasets, self.batch_size, self.num_workers, self.amp)


def export_refiner(ckpt_dir: str | os.PathLike, model_path: str | os.PathLike, network: nn.Module) -> str | None:
    """Write the best weights of ``<ckpt_dir>/best.pt`` as the bundle's self-describing ``models/model.pt``
    (``{"kind": "sam_refiner", "model", "network_kwargs", "lora", "partial", ...}``, ``refiner_checkpoint`` format,
    keys ``sam.*``), which ``ultrarefiner.create_model("sam_refiner", path)`` rebuilds:

    * frozen base encoder: only what trained (prompt encoder + mask decoder) and the encoder's fingerprint; the
      encoder comes from the base weights (LiteMedSAM's packaged file), and the record refuses any other encoder;
    * otherwise the whole refiner, LoRA adapters merged into the encoder (``network_kwargs["use_lora"]`` false).

    Returns the written path; None (logged) when no ``best.pt`` exists or on ranks other than 0.
    """
    if not _is_main_process():
        return None
    best = os.path.join(ckpt_dir, "best.pt")
    if not os.path.isfile(best):
        logger.warning(f"{best} not found: nothing exported to {model_path}")
        return None
    refiner = copy.deepcopy(_unwrap(network)).cpu()
    obj = load_refiner_checkpoint(refiner, best)
    record = {k: obj[k] for k in ("identity", "epoch", "metric", "metric_name") if k in obj}
    kwargs = dict(obj.get("network_kwargs") or {})
    if getattr(refiner.sam, "build_kwargs", None):  # the SAM as built (tiny kwargs included), not as configured
        kwargs.pop("sam_kwargs", None)
        kwargs.update(sam_record(refiner.sam))
    if obj["partial"] and not obj["lora"]:
        save_checkpoint(model_path, {"kind": "sam_refiner", "model": obj["model"], "network_kwargs": kwargs,
                                     "lora": False, "partial": True, "encoder": obj.get("encoder"), **record})
        logger.info(f"best refiner decoder ({best}) exported to {model_path}")
        return str(model_path)
    if has_lora(refiner):
        merge_lora(refiner)
        kwargs["use_lora"] = False  # adapters are merged: a plain SAMRefiner holds these weights
    weights = {k: v.detach().clone() for k, v in refiner.state_dict().items()}
    save_checkpoint(model_path, {"kind": "sam_refiner", "model": weights, "network_kwargs": kwargs, "lora": False,
                                 "partial": False, **record})
    logger.info(f"best refiner weights ({best}) exported to {model_path}")
    return str(model_path)


def inference_datalist(input_dir: str | os.PathLike, coarse_dir: str | os.PathLike, coarse_postfix: str = "",
                       exclude: str | Iterable[str] | None = None) -> list[dict[str, str]]:
    """Every image of ``input_dir`` (``folder_images``: PNG, JPEG, BMP, TIFF; sorted; those matching the file-name
    patterns ``exclude`` left out) paired with its coarse mask
    ``<coarse_dir>/<stem><postfix>.*``, a picture file or a 2D NIfTI (``predict-transunet`` writes ``<stem>.png``, the
    transunet bundle's inference ``<stem>_seg.png``, MONAI's ``SaveImage`` ``<stem>/<stem>_seg.nii.gz``).

    Raises:
      BadInputError: no image in ``input_dir``, or an image without its coarse mask or with several (the message
        names the file).
    """
    from ultrarefiner.engines.inference.refine_folder import files_by_stem

    images = folder_images(input_dir, exclude)
    postfix = str(coarse_postfix or "")
    coarse = files_by_stem(Path(coarse_dir), "coarse masks", postfix)
    items = []
    for image in images:
        found = coarse.get(image.stem, [])
        if len(found) != 1:
            problem = "not found" if not found else f"ambiguous: {', '.join(f.name for f in found)}"
            raise BadInputError(Path(coarse_dir) / f"{image.stem}{postfix}.png",
                                f"coarse mask of {image.name} {problem} (set coarse_dir / coarse_postfix)")
        items.append({"image": str(image), "coarse": str(found[0])})
    return items
