"""Phase-2 (SAM refiner) pieces of MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator``.

Batches come from ``ultrarefiner.data.refiner_data`` (image in the encoder frame, coarse, label, ``image_key``).
With a frozen image encoder the embeddings go through :class:`EmbeddingCache`: each (image, flip) is encoded
once and reused across epochs and across every coarse mask of that image; only the prompt encoder and mask
decoder run with autograd. :class:`RefinerTrainStep` and :class:`RefinerEvalStep` are phase 2's hooks of the shared
``TrainStep`` / ``EvalStep`` (``engines.training.step``), with :class:`RefinerPrepareBatch` as ``prepare_batch``;
``engine.state.output`` carries MONAI keys: ``pred`` (refined probability at the label's resolution), ``label``,
``loss``, plus ``coarse``, ``input_dice``, ``iou_predictions`` and the loss terms.

The trainer is ``bundles/sam_refiner/configs/train.json``'s ``train#trainer`` (tests and benchmarks build it with
``engines.training.bundle_trainer``)::

    cache = EmbeddingCache(refiner.sam.image_encoder, cache_dir)
    precompute_embeddings(refiner, cache, train_ds, num_workers=8)       # optional: fills the cache in parallel
    trainer = bundle_trainer("sam_refiner", {"network": refiner, "cache": cache, "train#dataset": train_ds})
    trainer.run()
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.utils.enums import CommonKeys as Keys
from torch.utils.data import DataLoader, Dataset

from ultrarefiner.data.refiner_data import load_encoder_image, resize_backend
from ultrarefiner.engines.training.step import EvalStep, TrainStep
from ultrarefiner.losses.refiner_loss import curriculum_weights
from ultrarefiner.networks.embedding_cache import EmbeddingCache
from ultrarefiner.networks.sam_geometry import SamGeometry
from ultrarefiner.utils.amp import autocast
from ultrarefiner.utils.flags import as_flag
from ultrarefiner.utils.transfer import pins_for, to_device

if TYPE_CHECKING:
    from ultrarefiner.networks.sam_refiner import SAMRefiner

__all__ = [
    "DatasetEpochHandler",
    "RefinerEvalStep",
    "RefinerPrepareBatch",
    "RefinerTrainStep",
    "check_geometry",
    "encode_batch",
    "encoder_inputs",
    "fill_encoder_padding",
    "parse_curriculum",
    "precompute_embeddings",
    "refine_batch",
]

logger = logging.getLogger(__name__)

ImageLoader = Callable[[str, bool, SamGeometry], torch.Tensor]


# ------------------------------------------------------------------------------------------------ cache
# ------------------------------------------------------------------------------------------------ encoder input
def fill_encoder_padding(image: torch.Tensor, input_size: torch.Tensor | None, geometry: SamGeometry) -> torch.Tensor:
    """Encoder-frame images padded with zeros by the data worker -> images whose SAM preprocessing is exact.

    SAM normalises, then pads with 0 (``Sam.preprocess``); filling the padding with ``pixel_mean`` makes the
    normalised padding exactly 0, so ``SamGeometry.preprocess_image(x, resized=True)`` (and the refiner's own image
    path) reproduce SAM's input for a whole batch of different content sizes. MedSAM squashes (no padding): the
    image is returned as is.

    Arguments:
      image: (B,1|3,H',W') on the 0-255 scale.
      input_size: (B,2) content (h', w') per sample, or None (no padding).
      geometry: the refiner's geometry.

    Returns:
      torch.Tensor: (B,1|3,H',W') float32 (3 channels where padding was filled).
    """
    x = image.float()
    if geometry.mode != "sam" or input_size is None:
        return x
    h, w = x.shape[-2:]
    # decided on the host copy of the sizes (the data worker's): no device value is read back
    if all(sh >= h and sw >= w for sh, sw in torch.as_tensor(input_size).reshape(-1, 2).tolist()):
        return x
    sizes = to_device(input_size, x.device).long()
    rows = torch.arange(h, device=x.device)[None, :] < sizes[:, :1]  # (B,H')
    cols = torch.arange(w, device=x.device)[None, :] < sizes[:, 1:2]  # (B,W')
    inside = (rows[:, :, None] & cols[:, None, :])[:, None]  # (B,1,H',W')
    mean = to_device(geometry.pixel_mean, x.device).to(x.dtype)  # (1,3,1,1)
    return torch.where(inside, x.expand(-1, 3, -1, -1), mean)


def _is_resized(image: torch.Tensor, original_size: Sequence[int] | Sequence[Sequence[int]]) -> bool:
    """The refiner's rule: an image whose size differs from ``original_size`` is already in the encoder frame. With
    one size per image (an uncollated batch, whose images are stacked, so in the encoder frame), unless every image
    is native: an image of the encoder frame's own size resizes to itself."""
    if _per_image(original_size):
        return any(_is_resized(image, s) for s in original_size)
    return tuple(image.shape[-2:]) != tuple(int(v) for v in original_size)


def _per_image(original_size: Any) -> bool:
    """One (H, W) per image (a list of pairs, ``RefinerPrepareBatch``'s uncollated form), not one for the batch."""
    return isinstance(original_size, list) and bool(original_size) and isinstance(original_size[0], (tuple, list))


def encoder_inputs(refiner: SAMRefiner, image: torch.Tensor, input_size: torch.Tensor | None,
                   original_size: Sequence[int]) -> torch.Tensor:
    """(B,1|3,H',W') batch image -> (B,3,S,S) normalised encoder input (what the image encoder sees)."""
    x = fill_encoder_padding(image, input_size, refiner.geometry)
    return refiner.preprocess_image(x, _is_resized(x, original_size))


def _cache_keys(refiner: SAMRefiner, keys: Sequence[str]) -> list[str]:
    """Dataset keys name the resize they were made with; refuse another geometry, and qualify native images
    (resized by the refiner itself) with the refiner's resize."""
    expected = resize_backend(refiner.geometry)
    g = refiner.geometry
    out = []
    for k in keys:
        if k.endswith("-native"):
            out.append(f"{k}-{g.mode}{g.img_size}-{g.image_resize}")
        elif k.endswith(expected):
            out.append(k)
        else:
            raise ValueError(f"sample key {k!r} was made for another geometry than the refiner's ({expected}); build "
                             "the dataset with geometry=refiner.geometry")
    return out


def encode_batch(refiner: SAMRefiner, batch: dict, cache: EmbeddingCache,
                 image_loader: ImageLoader = load_encoder_image,
                 encoder: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(B,256,S/16,S/16) embeddings of a prepared batch through the cache (encoder frozen).

    Misses are encoded from ``batch["image"]``, or, for batches loaded without images, from
    ``image_loader(source, flip, geometry)`` -> (1,h',w') encoder-frame content, by ``encoder`` (default: the
    refiner's image encoder; ``precompute_embeddings`` passes a faster equivalent).
    """
    if refiner.encoder_trainable():
        raise ValueError("an embedding cache needs a frozen image encoder (no LoRA, requires_grad off)")
    osize = batch["original_size"]
    device = refiner.sam.pixel_mean.device

    def compute(idx: list[int]) -> torch.Tensor:
        if "image" in batch:
            sizes = batch.get("input_size")
            x = encoder_inputs(refiner, batch["image"][idx], None if sizes is None else sizes[idx], osize)
        else:
            xs = []
            for i in idx:
                img = image_loader(batch["source"][i], bool(batch["flip"][i]), refiner.geometry)
                img = to_device(img[None], device)
                xs.append(refiner.preprocess_image(img, resized=True))
            x = torch.cat(xs)
        return (encoder or refiner.sam.image_encoder)(to_device(x, device))

    return cache.embed(_cache_keys(refiner, batch["image_key"]), compute, device)


def refine_batch(refiner: SAMRefiner, batch: dict, cache: EmbeddingCache | None = None,
                 image_loader: ImageLoader = load_encoder_image) -> dict[str, Any]:
    """The refiner's forward on a prepared batch (see :class:`RefinerPrepareBatch`).

    With ``cache`` (frozen encoder) only the prompt encoder and decoder run on this call's autograd graph;
    otherwise the refiner encodes ``batch["image"]`` itself (with grad when its encoder is trainable).
    ``refiner`` may be wrapped in ``DistributedDataParallel``: the forward goes through the wrapper (gradient
    synchronisation), attributes are read from its ``module``.

    Returns:
      the ``SAMRefiner.forward`` dict ("masks" (B,1,h,w) logits at ``original_size``, "iou_predictions" (B,K), ...).
    """
    inner = getattr(refiner, "module", refiner)
    osize = batch["original_size"]
    if cache is None and "image" not in batch:
        raise ValueError("the batch has no image (dataset with_image=False): pass an embedding cache")
    emb = encode_batch(inner, batch, cache, image_loader) if cache is not None else None
    if _per_image(osize):  # uncollated (evaluation): native coarse masks of different sizes, one decoder pass
        if emb is None:
            emb = inner.encode_preprocessed(encoder_inputs(inner, batch["image"], batch.get("input_size"), osize))
        return inner.forward_items(emb, batch["coarse"], osize)
    if emb is not None:
        return refiner(image_embeddings=emb, coarse=batch["coarse"], original_size=osize)
    x = fill_encoder_padding(batch["image"], batch.get("input_size"), inner.geometry)
    return refiner(image=x, coarse=batch["coarse"], original_size=osize)


# ------------------------------------------------------------------------------------------------ engine pieces
class RefinerPrepareBatch:
    """``prepare_batch`` for refiner engines: collated dataset dict -> dict on ``device``.

    Returns keys: ``coarse`` (B,1,h,w), ``label`` (B,1,hl,wl), ``input_dice`` (B,) float32 on device; ``image``
    (B,1,H',W') on device and ``input_size`` (B,2) when present; ``original_size`` (H, W) tuple shared by the batch;
    ``image_key``, ``source`` (lists of str), ``flip`` (list of bool). An uncollated batch (a list of sample dicts)
    gives ``coarse`` and ``label`` as lists of (1,h_i,w_i) and ``original_size`` as a list of (H, W), one per sample.
    """

    def __call__(self, batchdata: dict | list[dict], device: torch.device | str | None = None,
                 non_blocking: bool = False, **kwargs: Any) -> dict:
        def dev(t: torch.Tensor) -> torch.Tensor:
            return t.as_subclass(torch.Tensor).to(device, non_blocking=non_blocking, **kwargs)  # MetaTensor -> Tensor

        if isinstance(batchdata, (list, tuple)):
            return self._prepare_items(batchdata, dev)
        # host-side bookkeeping in Python lists: the collated sizes and flips are never device values
        sizes = [tuple(s) for s in torch.as_tensor(batchdata["original_size"]).reshape(-1, 2).tolist()]
        if len(set(sizes)) > 1:
            raise ValueError(f"samples of different original sizes in one batch ({sizes}): use "
                             "frame='encoder', batch_size=1 or an uncollated batch (monai.data.utils.no_collation)")

        n = len(sizes)
        flips = batchdata.get("flip", [False] * n)
        out = {
            "coarse": dev(batchdata["coarse"]).float(),
            "label": dev(batchdata["label"]).float(),
            "input_dice": dev(torch.as_tensor(batchdata["input_dice"])).float().reshape(-1),
            "original_size": (int(sizes[0][0]), int(sizes[0][1])),
            "image_key": list(batchdata.get("image_key", [""] * n)),
            "source": list(batchdata.get("source", [""] * n)),
            "flip": [bool(f) for f in (flips.tolist() if torch.is_tensor(flips) else flips)],
        }
        if "image" in batchdata:
            out["image"] = dev(batchdata["image"])
        if "input_size" in batchdata:
            out["input_size"] = torch.as_tensor(batchdata["input_size"]).reshape(-1, 2)
        return out

    @staticmethod
    def _prepare_items(items: Sequence[dict], dev: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """An uncollated batch (native frame, evaluation): the keys of a collated one, but ``coarse`` and ``label``
        lists of (1,h_i,w_i) and ``original_size`` a list of one (H, W) per sample."""
        if not items:
            raise ValueError("an empty batch")
        out = {
            "coarse": [dev(it["coarse"]).float() for it in items],
            "label": [dev(it["label"]).float() for it in items],
            "input_dice": dev(torch.stack([torch.as_tensor(it["input_dice"]) for it in items])).float().reshape(-1),
            "original_size": [tuple(int(v) for v in torch.as_tensor(it["original_size"]).reshape(2).tolist())
                              for it in items],
            "image_key": [str(it.get("image_key", "")) for it in items],
            "source": [str(it.get("source", "")) for it in items],
            "flip": [bool(it.get("flip", False)) for it in items],
        }
        if all("image" in it for it in items):
            # encoder-frame contents (long side S, or S x S) zero-padded to one shape, as the encoder-frame datasets
            # pad them; ``input_size`` keeps each content's size (``fill_encoder_padding``)
            images = [torch.as_tensor(it["image"]).as_subclass(torch.Tensor) for it in items]
            h, w = max(im.shape[-2] for im in images), max(im.shape[-1] for im in images)
            out["image"] = dev(torch.stack([F.pad(im, (0, w - im.shape[-1], 0, h - im.shape[-2])) for im in images]))
        if all("input_size" in it for it in items):
            out["input_size"] = torch.stack([torch.as_tensor(it["input_size"]) for it in items]).reshape(-1, 2)
        return out


def _at(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, tuple(size), mode="bilinear",
                                                                      align_corners=False)


def _outputs(batch: dict, out: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
    """MONAI-style output dict: pred = sigmoid(selected logits) at the label's resolution, (B,1,hl,wl); for an
    uncollated batch the list of per-sample dicts a batch-1 evaluator would have decollated ((1,hl,wl) maps)."""
    if isinstance(batch["label"], list):
        items = []
        for i, (label, coarse, masks) in enumerate(zip(batch["label"], batch["coarse"], out["masks"], strict=True)):
            size = label.shape[-2:]
            item = {Keys.LABEL: label, Keys.PRED: torch.sigmoid(_at(masks[None].detach().float(), size))[0],
                    "coarse": _at(coarse[None], size)[0], "input_dice": batch["input_dice"][i],
                    "iou_predictions": out["iou_predictions"][i].detach().float(), "image_key": batch["image_key"][i]}
            if "image" in batch:
                item[Keys.IMAGE] = batch["image"][i]
            items.append(item)
        return items
    label = batch["label"]
    size = label.shape[-2:]
    res = {
        Keys.LABEL: label,
        Keys.PRED: torch.sigmoid(_at(out["masks"].detach().float(), size)),
        "coarse": _at(batch["coarse"], size),
        "input_dice": batch["input_dice"],
        "iou_predictions": out["iou_predictions"].detach().float(),
        "image_key": batch["image_key"],
    }
    if "image" in batch:
        res[Keys.IMAGE] = batch["image"]
    return res


def parse_curriculum(value: Any) -> dict | None:
    """``curriculum`` option -> ``curriculum_weights`` keyword arguments, or None (off). Accepts a dict, a bare flag
    (True: the defaults) and the on/off words of ``as_flag``."""
    if value is None or isinstance(value, dict):
        return value
    return {} if as_flag(value, "curriculum") else None


def check_geometry(loader: Iterable | None, refiner: torch.nn.Module) -> None:
    """Refuse a data loader whose dataset was built for another SAM geometry than the refiner's (its samples would
    be in the wrong encoder frame)."""
    inner = getattr(refiner, "module", refiner)
    g, r = getattr(getattr(loader, "dataset", None), "geometry", None), inner.geometry
    if g is not None and (g.mode, g.img_size) != (r.mode, r.img_size):
        raise ValueError(f"dataset geometry ({g.mode}, {g.img_size}) differs from the refiner's ({r.mode}, "
                         f"{r.img_size}): use geometry=refiner.geometry")


class RefinerTrainStep(TrainStep):
    def __init__(self, cache: EmbeddingCache | None = None, grad_clip: float | None = 1.0,
                 curriculum: dict | None = None, amp: bool = True, amp_dtype: torch.dtype = torch.bfloat16,
                 skip_nonfinite: bool = False, image_loader: ImageLoader = load_encoder_image) -> None:
        """
        Phase 2's hook of :class:`TrainStep`, the ``iteration_update`` of a ``SupervisedTrainer`` whose network is
        a ``SAMRefiner`` and whose ``loss_function`` is a ``RefinerLoss``.

        Forward: embeddings (from ``cache`` when given), prompts + decoder with grad; the loss in float32 with the
        coarse mask as its input mask and optional curriculum weights. ``engine.state.output``: ``pred``
        (B,1,hl,wl) probability, ``label``, ``coarse`` (at label size), ``input_dice`` (B,), ``iou_predictions``
        (B,K), ``image_key``, ``loss`` and ``loss_bce``/``loss_dice``/``loss_iou``/``loss_change`` (detached
        scalars), ``grad_norm`` when clipping, ``image`` when loaded.

        Arguments:
          cache: embeddings of the frozen encoder (None: encode every step).
          grad_clip: max global gradient norm over the trainable parameters (None or 0: no clipping).
          curriculum: easy-to-hard curriculum by loss weighting (``curriculum_weights``: a sample with input Dice d
            weighs exp(-s (1 - d)), s decaying from 5 to 0 over the first half of ``engine.state.max_epochs``).
            True (the original scripts' bare ``--curriculum``) uses those defaults, a dict sets them (e.g.
            ``{"start_sharpness": 3.0}``), None/False (or 'false') keeps uniform weights.
          amp, amp_dtype, skip_nonfinite: see :class:`TrainStep`.
          image_loader: loads a cache miss of a batch without images (see :func:`encode_batch`).
        """
        super().__init__(amp, amp_dtype, max_grad_norm=grad_clip, clip_per_group=False, skip_nonfinite=skip_nonfinite)
        self.cache, self.curriculum, self.image_loader = cache, parse_curriculum(curriculum), image_loader

    def forward_and_loss(self, engine: Engine, batch: dict) -> dict[str, Any]:
        check_geometry(getattr(engine, "data_loader", None), engine.network)
        out = refine_batch(engine.network, batch, self.cache, self.image_loader)
        weights = None
        if self.curriculum is not None:
            weights = curriculum_weights(batch["input_dice"], engine.state.epoch - 1, engine.state.max_epochs,
                                         **self.curriculum)
        terms = self.compute_loss(engine, out, batch["label"], input_mask=batch["coarse"], sample_weights=weights)
        result = _outputs(batch, out)
        result[Keys.LOSS] = terms["loss"]
        result.update({f"loss_{name}": terms[name].detach() for name in ("bce", "dice", "iou", "change")})
        return result


class RefinerEvalStep(EvalStep):
    def __init__(self, cache: EmbeddingCache | None = None, amp: bool = True,
                 amp_dtype: torch.dtype = torch.bfloat16, image_loader: ImageLoader = load_encoder_image) -> None:
        """
        Phase 2's hook of :class:`EvalStep` over a ``SAMRefiner`` (eval mode: the argmax candidate). Output keys as
        :class:`RefinerTrainStep` without the loss: ``pred`` is the refined probability at the label's resolution
        (native with ``frame="native"``). An uncollated batch (``monai.data.utils.no_collation``: native samples of
        different sizes, the bundle's validation) gives the list of per-sample outputs, as decollation would.

        Arguments:
          cache: embedding cache of the frozen encoder (None: encode every batch).
          amp, amp_dtype: see :class:`EvalStep`.
          image_loader: as in :class:`RefinerTrainStep`.
        """
        super().__init__(amp, amp_dtype)
        self.cache, self.image_loader = cache, image_loader

    def forward(self, engine: Engine, batch: dict) -> dict[str, Any]:
        check_geometry(getattr(engine, "data_loader", None), engine.network)
        return _outputs(batch, refine_batch(engine.network, batch, self.cache, self.image_loader))


class DatasetEpochHandler:
    """Calls ``dataset.set_epoch(epoch - 1)`` at each epoch start (new flips / simulated masks per epoch).

    DataLoader workers copy the dataset when an epoch's iterator is created, which happens after EPOCH_STARTED
    unless workers are persistent: persistent workers would keep epoch 0's state and are refused.
    """

    def __init__(self, datasets: Dataset | Iterable[Dataset]) -> None:
        self.datasets = [datasets] if isinstance(datasets, Dataset) else list(datasets)

    def attach(self, engine: Engine) -> None:
        loader = getattr(engine, "data_loader", None)
        if getattr(loader, "persistent_workers", False):
            raise ValueError("persistent_workers=True keeps each worker's dataset at epoch 0: use non-persistent "
                             "workers with per-epoch datasets")
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        for d in self.datasets:
            if hasattr(d, "set_epoch"):
                d.set_epoch(engine.state.epoch - 1)


# ------------------------------------------------------------------------------------------------ precompute
class _EncoderImages(Dataset):
    """(key, path, flip) -> {"key", "image" (1,S,S) zero-padded encoder-frame content, "input_size" (2,)}."""

    def __init__(self, sources: Sequence[tuple[str, str, bool]], geometry: SamGeometry) -> None:
        self.sources, self.geometry = list(sources), geometry

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict:
        key, path, flip = self.sources[i]
        img = load_encoder_image(path, flip, self.geometry)
        s = self.geometry.img_size
        out = torch.zeros(1, s, s)
        out[:, : img.shape[1], : img.shape[2]] = img
        return {"key": key, "image": out, "input_size": torch.tensor(img.shape[1:])}


def precompute_embeddings(refiner: SAMRefiner, cache: EmbeddingCache,
                          sources: Dataset | Sequence[tuple[str, str, bool]], batch_size: int | None = None,
                          num_workers: int = 0, amp: bool = False, optimize: str = "auto") -> int:
    """Fills ``cache`` with every (image, flip) a dataset can use, loading and resizing images in ``num_workers``
    DataLoader workers; entries already cached are skipped. Shows a progress bar; returns the number of embeddings
    computed.

    Arguments:
      sources: a refiner dataset (its ``encoder_sources()``) or (image_key, image path, flip) triples.
      batch_size: images per encoder pass; None: ``fast_inference.default_batch_size`` (8 on CUDA, 1 on a CPU,
        where a batch costs more per image).
      optimize: the encoder for this pass: ``auto`` runs a TorchScript-frozen copy on a CPU
        (``fast_inference.FrozenEncoder``: float32, the same embeddings up to ~1e-6, LiteMedSAM's stem on row slabs;
        its encoder on 2 AVX2 cores: 0.87 s per image at batch 1 against 1.82 s eager at batch 8) and the encoder
        itself on CUDA (with ``amp``); ``none``: the encoder itself everywhere.
    """
    from tqdm import tqdm

    from ultrarefiner.engines.inference.fast_inference import FrozenEncoder, default_batch_size

    if optimize not in ("auto", "none"):
        raise ValueError(f"optimize must be 'auto' or 'none', got {optimize!r}")
    triples = sources.encoder_sources() if hasattr(sources, "encoder_sources") else list(sources)
    triples = [t for t in triples if _cache_keys(refiner, [t[0]])[0] not in cache]
    if not triples:
        return 0
    device = refiner.sam.pixel_mean.device
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    refiner.eval()
    # a snapshot of the weights the cache's fingerprint names: built here, dropped when the pass ends
    encoder = FrozenEncoder(refiner.sam.image_encoder) if optimize == "auto" and device.type == "cpu" else None
    logger.info(f"embedding cache: encoding {len(triples)} encoder inputs, batch {batch_size}"
                + (", TorchScript-frozen encoder" if encoder else ""))
    loader = DataLoader(_EncoderImages(triples, refiner.geometry), batch_size=batch_size, num_workers=num_workers,
                        pin_memory=pins_for(device))
    before = cache.misses
    with tqdm(total=len(triples), desc="embedding cache", unit="image", disable=None) as bar:
        for b in loader:
            batch = {"image": to_device(b["image"], device), "input_size": b["input_size"],
                     "image_key": list(b["key"]),
                     "original_size": (refiner.geometry.low_res_size, refiner.geometry.low_res_size)}
            with autocast(device, amp):
                encode_batch(refiner, batch, cache, encoder=encoder)
            bar.update(len(b["key"]))
    return cache.misses - before
