"""Phase-2 datasets: (image, coarse mask, ground truth) samples for training the SAM refiner.

Two sources of coarse masks, mixable with :class:`MixedRefinerDataset` (``real_ratio``):

* **Option A, simulated**: ground truth corrupted by the failure simulation, either offline
  (:class:`ShardCoarseDataset` over ``python -m ultrarefiner augment`` shards) or online
  (:class:`SimulatedCoarseDataset`, ``SimulateSegmentationFailured`` on the fold's training images).
* **Option B, real**: out-of-fold TransUNet predictions (:class:`PredictionCoarseDataset`) written by
  ``python -m ultrarefiner predict-transunet`` (``engines/inference/transunet_predict.py``)::

      <pred_root>/<dataset>/datalist.json           the source datalist plus "coarse" per item (paths relative
                                                    to this folder); testing items also "coarse_fold_<k>"
      <pred_root>/<dataset>/fold_<k>/coarse/<name>  soft probability of fold model k for its held-out fold
                                                    (and the test split): 8-bit PNG p*255 at native size,
                                                    or a float .npy in [0, 1]
      <pred_root>/<dataset>/ensemble/coarse/<name>  mean of the fold models (test split)

Fold safety: every dataset is built for one validation fold k and refuses (:class:`FoldLeakageError`) any
training sample whose image belongs to fold k (by fold number and, given the datalist, by path); real coarse
masks must come from the model that held their image out (``fold_<j>/`` for an image of fold j).

Frames (``frame``):

* ``encoder`` (training): the image is resized into the SAM encoder frame in the data worker with the exact
  reference resize (``SamGeometry.resize_uint8``), zero-padded bottom/right to S x S (``input_size`` gives the
  content size; the trainer fills the padding so SAM's normalise-then-pad is reproduced exactly). Label and
  coarse live in the L x L low-res frame of that padded square (L = S / 4: mask -> content size, pad, 4x4 mean;
  the same mapping as SAM's mask prompt), and ``original_size`` is (L, L): every sample has the same shapes, so
  batches collate, and the loss and the simulated Dice are measured at the resolution the model trains on.
* ``native`` (evaluation, batch size 1 unless sizes agree): image resized into the encoder frame without padding
  (or native with ``geometry=None``), label and coarse at native size, ``original_size`` = native (H, W).

Sample dict: ``image`` (1,S,S) or (1,h',w') float32 on the 0-255 scale (absent with ``with_image=False``),
``input_size`` (2,) content size of ``image``, ``label`` (1,h,w) 0/1, ``coarse`` (1,h,w) soft in [0, 1],
``original_size`` (2,), ``native_size`` (2,), ``input_dice`` () Dice of coarse > 0.5 with the label in the output
frame, ``bucket``, ``image_key`` (embedding-cache key of the (image content, flip, resize) triple), ``source``
(image path), ``flip``, ``kind`` (``simulated``/``real``), ``dataset``.

Augmentation is horizontal flips only (no vertical flip: the skin line is at the top), so each image has at most
two encoder inputs and their embeddings can be cached; the flip is part of ``image_key``. Per-sample randomness
comes from ``SeedSequence([seed, epoch, index])``: reproducible and independent of the worker layout. Call
``set_epoch`` at each epoch start (``DatasetEpochHandler``) with non-persistent workers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ultrarefiner.data.augmented import AugmentedShards
from ultrarefiner.data.datalist import load_split
from ultrarefiner.data.imaging import read_image, read_label, read_soft_mask
from ultrarefiner.errors import BadInputError, UltraRefinerError
from ultrarefiner.networks.sam_geometry import SamGeometry
from ultrarefiner.transforms.failure_simulation import FailurePolicy, SimulateSegmentationFailured

__all__ = [
    "FRAMES",
    "FoldLeakageError",
    "MixedRefinerDataset",
    "PredictionCoarseDataset",
    "RefinerSampleBuilder",
    "ShardCoarseDataset",
    "SimulatedCoarseDataset",
    "check_no_fold_leakage",
    "dice_bucket",
    "file_digest",
    "image_key",
    "load_encoder_image",
    "read_probability",
    "resize_backend",
]

FRAMES = ("encoder", "native")


class FoldLeakageError(UltraRefinerError, ValueError):
    """A phase-2 training sample belongs to the validation fold its refiner is evaluated on."""


# ------------------------------------------------------------------------------------------------ helpers
def check_no_fold_leakage(sources: Iterable[tuple[str, int | None]], fold: int | None,
                          val_images: Iterable[str] = (), what: str = "training samples") -> None:
    """Raise :class:`FoldLeakageError` when a training source belongs to validation fold ``fold``.

    Arguments:
      sources: (image path, fold of that image) pairs of the training samples (fold None when unknown).
      fold: the refiner's validation fold; None (no held-out fold) checks nothing.
      val_images: image paths of fold ``fold``'s validation split (e.g. ``load_split(datalist, fold, "val")``),
        compared by resolved path, which also catches a wrong fold number.
      what: how the message names the samples.
    """
    def shown(paths: list[str]) -> str:
        return ", ".join(paths[:5]) + (f" ... (+{len(paths) - 5} more)" if len(paths) > 5 else "")

    sources = list(sources)
    test = sorted({p for p, f in sources if f is not None and int(f) < 0})
    if test:  # the test split (fold -1) is never trained on, whatever the fold
        raise FoldLeakageError(f"{len(test)} {what} belong to the test split: {shown(test)}")
    if fold is None or fold < 0:
        return
    val = {os.path.realpath(p) for p in val_images}
    bad = sorted({p for p, f in sources if (f is not None and int(f) == fold) or os.path.realpath(p) in val})
    if bad:
        raise FoldLeakageError(f"{len(bad)} {what} belong to validation fold {fold} (the refiner of fold {fold} must "
                               f"never train on them): {shown(bad)}")


def dice_bucket(dice: float, policy: FailurePolicy | None = None) -> str:
    """Quality bucket of a coarse mask from its Dice: ``perfect`` above the mild range, ``mild``, else ``heavy``."""
    p = policy or FailurePolicy()
    if dice >= p.mild_range[1]:
        return "perfect"
    return "mild" if dice >= p.mild_range[0] else "heavy"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0.5, b > 0.5
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * int((a & b).sum()) / denom


@lru_cache(maxsize=65536)
def _digest_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """BLAKE2 digest of a file's bytes (memoised per process on path, size and mtime): the cache identity of an
    image, so an edited or replaced file never reuses a stale embedding."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise BadInputError(path, "image file not found") from e
    return _digest_cached(os.path.realpath(path), st.st_size, st.st_mtime_ns)


def resize_backend(geometry: SamGeometry | None) -> str:
    """Names the resize implementation in the cache key (MedSAM's skimage resize and its scipy re-statement differ
    slightly, so an embedding made with one must not be served to the other)."""
    if geometry is None:
        return "native"
    if geometry.mode == "sam":
        return f"sam{geometry.img_size}-pil"
    if geometry.mode == "litemedsam":
        return f"litemedsam{geometry.img_size}-cv2area"
    try:
        import skimage  # noqa: F401  # type: ignore[import-not-found]

        backend = "skimage"
    except ImportError:
        backend = "scipy"
    return f"medsam{geometry.img_size}-{backend}"


def image_key(digest: str, flip: bool, geometry: SamGeometry | None) -> str:
    """Cache key of one encoder input: image content, flip, resize (mode, size, implementation)."""
    return f"{digest}-flip{int(bool(flip))}-{resize_backend(geometry)}"


def _resize_image_uint8(image: np.ndarray, geometry: SamGeometry) -> np.ndarray:
    """(H, W) uint8 -> (h', w') uint8 in the encoder frame (exact reference resize, one channel: identical per
    channel to the 3-channel resize and 3-14x faster)."""
    out = geometry.resize_uint8(np.ascontiguousarray(image)[..., None])
    return out.reshape(out.shape[0], out.shape[1])


def load_encoder_image(path: str | os.PathLike, flip: bool, geometry: SamGeometry | None) -> torch.Tensor:
    """The encoder-frame content of one image file: (1, h', w') float32 on the 0-255 scale (unpadded; native when
    ``geometry`` is None). What a sample's ``image`` holds, for cache misses of samples loaded without images."""
    img = read_image(path)
    if flip:
        img = img[:, ::-1]
    if geometry is not None:
        img = _resize_image_uint8(img, geometry)
    return torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None]


def read_probability(path: str | os.PathLike, expected_shape: tuple[int, int] | None = None) -> np.ndarray:
    """A stored soft prediction as (H, W) float32 in [0, 1]: 8-bit PNG (p * 255; a 0/1 label map as 0/1) or float
    ``.npy``.

    Raises:
      BadInputError: missing/unreadable file, wrong dimensions, values outside [0, 1] or (``expected_shape``) a
        size other than the image's; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, "coarse prediction file not found (run `python -m ultrarefiner predict-transunet`)")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            raise BadInputError(path, f"unreadable coarse prediction ({type(e).__name__}: {e})") from e
        arr = np.squeeze(arr)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
            raise BadInputError(path, f"coarse prediction must be a 2-D numeric array, got {arr.dtype} {arr.shape}")
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise BadInputError(path, "coarse prediction values must be probabilities in [0, 1]")
    else:
        arr = read_soft_mask(path).astype(np.float32) / 255.0  # BadInputError names the file
    if expected_shape is not None and tuple(arr.shape) != tuple(expected_shape):
        raise BadInputError(path, f"coarse prediction size {tuple(arr.shape)} differs from the image size "
                                  f"{tuple(expected_shape)}")
    return arr


def _rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(index)]))


# ------------------------------------------------------------------------------------------------ frames
class RefinerSampleBuilder:
    """Maps native (image, label, coarse) arrays into the output frame and assembles the sample dict.

    Arguments:
      geometry (SamGeometry or None): the refiner's geometry (``refiner.geometry``); None only with
        ``frame="native"`` (the image stays native and the refiner resizes it).
      frame (str): ``encoder`` or ``native`` (see the module docstring).
      with_image (bool): load and resize the image (False: samples carry only ``image_key``; the trainer
        takes embeddings from a filled cache, see ``engines.training.refiner_training.precompute_embeddings``).
    """

    def __init__(self, geometry: SamGeometry | None, frame: str = "encoder", with_image: bool = True) -> None:
        if frame not in FRAMES:
            raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
        if geometry is None and frame == "encoder":
            raise ValueError("frame='encoder' needs the refiner's geometry (refiner.geometry)")
        self.geometry, self.frame, self.with_image = geometry, frame, with_image

    @property
    def low_res(self) -> int:
        return self.geometry.low_res_size if self.geometry is not None else 0

    def content_size(self, native: tuple[int, int]) -> tuple[int, int]:
        """(h', w') of the image inside the encoder frame."""
        return self.geometry.input_size(native) if self.geometry is not None else tuple(native)

    def content_low_res(self, native: tuple[int, int]) -> tuple[int, int]:
        """Rows/columns of the L x L frame touched by the image content (the rest is SAM's padding)."""
        h, w = self.content_size(native)
        f = self.geometry.img_size // self.low_res
        return -(-h // f), -(-w // f)

    def mask_to_frame(self, mask: np.ndarray, native: tuple[int, int], binary: bool) -> np.ndarray:
        """(h, w) mask covering the whole image -> (L, L) (encoder frame) or native (H, W) float32.

        Encoder frame: resized to the content size (bilinear), zero-padded to S x S, 4x4 mean: the mapping of
        ``SamGeometry.mask_prompt_frame``, so masks and the padded image line up exactly. ``binary``: > 0.5.
        """
        m = mask.astype(np.float32)
        if self.frame == "native":
            if m.shape != tuple(native):
                m = cv2.resize(m, (native[1], native[0]), interpolation=cv2.INTER_LINEAR)
            return (m > 0.5).astype(np.float32) if binary else m
        s, low = self.geometry.img_size, self.low_res
        h, w = self.content_size(native)
        interp = cv2.INTER_AREA if h < m.shape[0] else cv2.INTER_LINEAR
        big = np.zeros((s, s), np.float32)
        big[:h, :w] = cv2.resize(m, (w, h), interpolation=interp)
        f = s // low
        out = big.reshape(low, f, low, f).mean(axis=(1, 3))
        return (out > 0.5).astype(np.float32) if binary else np.clip(out, 0.0, 1.0)

    def image_to_frame(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """(H, W) uint8 -> (image float32, content size); encoder frame: resized and zero-padded to S x S."""
        if self.geometry is None:
            return image.astype(np.float32), image.shape
        r = _resize_image_uint8(image, self.geometry)
        if self.frame == "native":
            return r.astype(np.float32), r.shape
        s = self.geometry.img_size
        out = np.zeros((s, s), np.float32)
        out[: r.shape[0], : r.shape[1]] = r
        return out, r.shape

    def build(self, *, label: np.ndarray, coarse: np.ndarray | None, flip: bool, key: str, source: str,
              kind: str, dataset: str, bucket: str | None = None, image: np.ndarray | None = None,
              simulator: SimulateSegmentationFailured | None = None, sim_seed: int | None = None,
              policy: FailurePolicy | None = None) -> dict:
        """One sample dict (module docstring) from native arrays; ``coarse`` None: simulated in the output frame.

        Arguments:
          label: (H, W) native ground truth (bool or 0/1); its size is the image's native size.
          coarse: (h, w) soft coarse mask in [0, 1] covering the whole image, or None (needs ``simulator``).
          flip: horizontal flip of image, label and coarse.
          image: (H, W) uint8 native image (required when ``with_image``).
        """
        native = tuple(int(v) for v in label.shape)
        if flip:
            label = label[:, ::-1]
            coarse = None if coarse is None else coarse[:, ::-1]
            image = None if image is None else image[:, ::-1]
        lab = self.mask_to_frame(label, native, binary=True)
        if coarse is None:
            if simulator is None:
                raise ValueError("no coarse mask and no simulator")
            # simulate in the output frame (the resolution the model trains on), inside the image content
            ch, cw = self.content_low_res(native) if self.frame == "encoder" else native
            simulator.set_random_state(seed=sim_seed)
            d = simulator({"label": lab[None, :ch, :cw]})
            coa = np.zeros_like(lab)
            coa[:ch, :cw] = np.asarray(d["coarse"], np.float32)[0]
            bucket = d["coarse_bucket"]
        else:
            coa = self.mask_to_frame(coarse, native, binary=False)
        dice = _dice(coa, lab)
        if bucket is None:
            bucket = dice_bucket(dice, policy)
        osize = (self.low_res, self.low_res) if self.frame == "encoder" else native
        sample = {
            "label": torch.from_numpy(np.ascontiguousarray(lab))[None],
            "coarse": torch.from_numpy(np.ascontiguousarray(coa, dtype=np.float32))[None],
            "original_size": torch.tensor(osize, dtype=torch.long),
            "native_size": torch.tensor(native, dtype=torch.long),
            "input_dice": torch.tensor(dice, dtype=torch.float32),
            "bucket": str(bucket),
            "image_key": key,
            "source": source,
            "flip": bool(flip),
            "kind": kind,
            "dataset": dataset or "",
        }
        if self.with_image:
            if image is None:
                raise ValueError("with_image=True but no image given")
            if image.shape != native:
                raise BadInputError(source, f"image size {image.shape} differs from the mask size {native}")
            img, content = self.image_to_frame(np.ascontiguousarray(image))
            sample["image"] = torch.from_numpy(np.ascontiguousarray(img))[None]
            sample["input_size"] = torch.tensor(content, dtype=torch.long)
        else:
            sample["input_size"] = torch.tensor(self.content_size(native), dtype=torch.long)
        return sample


class _RefinerDataset(Dataset):
    """Shared parts: fold, frame builder, flips, epoch, the (key, source, flip) list for embedding precomputation."""

    kind = "simulated"

    def __init__(self, fold: int | None, geometry: SamGeometry | None, frame: str, with_image: bool,
                 flip_prob: float, seed: int) -> None:
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.fold = fold
        self.geometry = geometry
        self.builder = RefinerSampleBuilder(geometry, frame, with_image)
        self.flip_prob, self.seed, self.epoch = float(flip_prob), int(seed), 0

    @property
    def frame(self) -> str:
        return self.builder.frame

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch's flips and simulated masks (call before the DataLoader iterator is created)."""
        self.epoch = int(epoch)

    def _flip(self, rng: np.random.Generator) -> bool:
        return self.flip_prob > 0 and bool(rng.uniform() < self.flip_prob)

    def _flips(self) -> tuple[bool, ...]:
        if self.flip_prob >= 1.0:
            return (True,)
        return (False, True) if self.flip_prob > 0 else (False,)

    def image_paths(self) -> list[str]:
        """Distinct source image paths, sorted."""
        raise NotImplementedError

    def encoder_sources(self) -> list[tuple[str, str, bool]]:
        """Every (image_key, image path, flip) a sample can use: what ``precompute_embeddings`` fills."""
        return [(image_key(file_digest(p), f, self.geometry), p, f) for p in self.image_paths() for f in self._flips()]


# ------------------------------------------------------------------------------------------------ option A
class SimulatedCoarseDataset(_RefinerDataset):
    """Option A online: the fold's training images with coarse masks simulated on the fly (new ones each epoch).

    Arguments:
      items: datalist items (``image``, ``label`` absolute paths, ``fold``, ``dataset``, ``class``), e.g.
        ``load_split(datalist, fold, "train")`` or :meth:`from_datalist`.
      fold: the refiner's validation fold; items of that fold are refused (:class:`FoldLeakageError`).
      geometry: the refiner's ``SamGeometry`` (None only with ``frame="native"``).
      frame: ``encoder`` (training) or ``native``.
      samples_per_image: epoch length = len(items) * samples_per_image (different masks each time).
      policy: failure-simulation policy (default: ``FailurePolicy(soft=True)``, soft like a network's output).
      flip_prob: probability of a horizontal flip.
      seed: base seed of flips and simulations.
      with_image: load and resize images (see :class:`RefinerSampleBuilder`).
      skip_normal: drop ``class == "normal"`` items (blank masks give no prompt).
      val_images: fold ``fold``'s validation image paths, checked against the items.
      check_leakage: refuse test-split and fold-``fold`` items (default); False only for evaluation sets
        (validation or test images with simulated coarse masks), never for training.
    """

    def __init__(self, items: Sequence[dict], fold: int | None, geometry: SamGeometry | None, frame: str = "encoder",
                 samples_per_image: int = 1, policy: FailurePolicy | None = None, flip_prob: float = 0.5,
                 seed: int = 0, with_image: bool = True, skip_normal: bool = True,
                 val_images: Iterable[str] = (), check_leakage: bool = True) -> None:
        super().__init__(fold, geometry, frame, with_image, flip_prob, seed)
        self.items = sorted((dict(it) for it in items if not (skip_normal and it.get("class") == "normal")),
                            key=lambda d: (str(d.get("dataset", "")), str(d["image"])))
        if not self.items:
            raise ValueError("no training items")
        if check_leakage:
            check_no_fold_leakage(((it["image"], it.get("fold")) for it in self.items), fold, val_images)
        if samples_per_image < 1:
            raise ValueError(f"samples_per_image must be >= 1, got {samples_per_image}")
        self.samples_per_image = int(samples_per_image)
        self.policy = policy or FailurePolicy(soft=True)
        self.simulator = SimulateSegmentationFailured(keys="label", coarse_key="coarse", policy=self.policy)

    @classmethod
    def from_datalist(cls, datalist: str | os.PathLike, fold: int | None, geometry: SamGeometry | None,
                      **kwargs) -> SimulatedCoarseDataset:
        """The ``train`` split of fold ``fold`` (all training items when None), checked against its ``val`` split."""
        val = [it["image"] for it in load_split(datalist, fold, "val")] if fold is not None and fold >= 0 else []
        return cls(load_split(datalist, fold, "train"), fold, geometry, val_images=val, **kwargs)

    def __len__(self) -> int:
        return len(self.items) * self.samples_per_image

    def image_paths(self) -> list[str]:
        return sorted({it["image"] for it in self.items})

    def __getitem__(self, index: int) -> dict:
        it = self.items[index % len(self.items)]
        rng = _rng(self.seed, self.epoch, index)
        flip = self._flip(rng)
        label = read_label(it["label"])
        image = read_image(it["image"]) if self.builder.with_image else None
        key = image_key(file_digest(it["image"]), flip, self.geometry)
        return self.builder.build(label=label, coarse=None, flip=flip, key=key, source=it["image"], kind=self.kind,
                                  dataset=it.get("dataset", ""), image=image, simulator=self.simulator,
                                  sim_seed=int(rng.integers(0, 2**31 - 1)), policy=self.policy)


class ShardCoarseDataset(_RefinerDataset):
    """Option A offline: samples of an ``augment`` folder (``AugmentedShards``), each seen once per epoch.

    Arguments:
      root: the generated folder (holding config.json), made for fold ``fold``.
      fold: the refiner's validation fold: the folder's config and every record's source fold are checked.
      geometry, frame, flip_prob, seed, with_image: as in :class:`SimulatedCoarseDataset`.
      image_source: ``source`` (default) reads the native image and label files named in the manifest (SAM must
        see the native image; shards store ``resolution``-sized copies); ``shard`` uses the stored arrays (when the
        sources are not at hand; needs ``with_image=True``).
      datalist: the source datalist; its fold-``fold`` validation images are checked against the records.
    """

    def __init__(self, root: str | os.PathLike, fold: int | None, geometry: SamGeometry | None,
                 frame: str = "encoder", flip_prob: float = 0.5, seed: int = 0, with_image: bool = True,
                 image_source: str = "source", datalist: str | os.PathLike | None = None) -> None:
        super().__init__(fold, geometry, frame, with_image, flip_prob, seed)
        if image_source not in ("source", "shard"):
            raise ValueError(f"image_source must be 'source' or 'shard', got {image_source!r}")
        if image_source == "shard" and not with_image:
            raise ValueError("image_source='shard' needs with_image=True (no file to reload on a cache miss)")
        self.image_source = image_source
        self.shards = AugmentedShards(root, fold=fold)  # refuses a folder made for another fold
        records = [r for _, r in self.shards.records]
        val = [it["image"] for it in load_split(datalist, fold, "val")] if datalist and fold is not None else []
        check_no_fold_leakage(((r["image"], r.get("source_fold")) for r in records), fold, val,
                              what=f"augmented samples of {root}")
        self.policy = FailurePolicy(**{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in self.shards.config["policy"].items()})

    def __len__(self) -> int:
        return len(self.shards)

    def image_paths(self) -> list[str]:
        if self.image_source == "shard":
            raise ValueError("image_source='shard': embeddings are keyed by the stored arrays; load with images")
        return sorted({r["image"] for _, r in self.shards.records})

    def __getitem__(self, index: int) -> dict:
        _, rec = self.shards.records[index]
        it = self.shards[index]
        flip = self._flip(_rng(self.seed, self.epoch, index))
        coarse = it["coarse"][0]
        if self.image_source == "shard":
            image = np.round(it["image"][0] * 255).astype(np.uint8)
            label = it["label"][0] > 0.5
            h = hashlib.blake2b(image.tobytes(), digest_size=16)
            h.update(str(image.shape).encode())
            key = image_key(h.hexdigest(), flip, self.geometry)
        else:
            label = read_label(rec["label"])
            image = read_image(rec["image"]) if self.builder.with_image else None
            key = image_key(file_digest(rec["image"]), flip, self.geometry)
        return self.builder.build(label=label, coarse=coarse, flip=flip, key=key, source=rec["image"], kind=self.kind,
                                  dataset=rec.get("dataset") or "", bucket=rec["bucket"], image=image,
                                  policy=self.policy)


# ------------------------------------------------------------------------------------------------ option B
class PredictionCoarseDataset(_RefinerDataset):
    """Option B: out-of-fold TransUNet predictions (``predict-transunet`` output) as coarse masks.

    Arguments:
      pred_root: ``<pred_root>`` (then ``dataset`` is required) or directly ``<pred_root>/<dataset>`` or its
        ``datalist.json``.
      fold: the refiner's validation fold k. ``split="train"``: the training items of the other folds, each with
        the prediction of the model that held it out; ``val``: fold k's items (predicted by model k);
        ``test``: the test split with model k's predictions (``coarse_fold_<k>``; the ``ensemble`` with None).
      dataset: dataset (or combined) name, a folder of ``pred_root``.
      split: ``train``, ``val`` or ``test``.
      geometry, frame, flip_prob, seed, with_image, skip_normal: as in :class:`SimulatedCoarseDataset`.
      policy: Dice ranges of the quality buckets (``dice_bucket``).
      check_files: stat every prediction at construction (a missing one fails now, naming the file).

    Raises:
      BadInputError: missing datalist or prediction file (named); FoldLeakageError: a training item of fold k,
        or a prediction not stored under ``fold_<j>/`` of its own fold j (an in-sample prediction).
    """

    kind = "real"

    def __init__(self, pred_root: str | os.PathLike, fold: int | None, geometry: SamGeometry | None,
                 dataset: str | None = None, split: str = "train", frame: str = "encoder", flip_prob: float = 0.5,
                 seed: int = 0, with_image: bool = True, skip_normal: bool = True,
                 policy: FailurePolicy | None = None, check_files: bool = True) -> None:
        super().__init__(fold, geometry, frame, with_image, flip_prob, seed)
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        if split == "val" and (fold is None or fold < 0):
            raise ValueError("split='val' needs a fold")
        path = Path(pred_root)
        if path.is_dir() and dataset is not None and not (path / "datalist.json").is_file():
            path = path / dataset
        if path.is_dir():
            path = path / "datalist.json"
        if not path.is_file():
            raise BadInputError(path, "no prediction datalist (run `python -m ultrarefiner predict-transunet`)")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise BadInputError(path, f"not valid JSON ({e})") from e
        self.root = path.parent
        self.policy = policy or FailurePolicy()
        self.split = split
        if split == "test":
            entries = meta.get("testing", [])
            ckey = "coarse" if fold is None or fold < 0 else f"coarse_fold_{fold}"
        else:
            entries = meta.get("training", [])
            if fold is not None and fold >= 0:
                entries = [e for e in entries if (int(e["fold"]) == fold) == (split == "val")]
            ckey = "coarse"
        self.items = []
        for e in entries:
            if skip_normal and e.get("class") == "normal":
                continue
            if ckey not in e:
                raise BadInputError(path, f"item {e.get('image')} has no {ckey!r} prediction")
            self.items.append({**e, "image": str(self.root / e["image"]), "label": str(self.root / e["label"]),
                               "coarse": str(self.root / e[ckey]), "coarse_rel": e[ckey]})
        self.items.sort(key=lambda d: (str(d.get("dataset", "")), d["image"]))
        if not self.items:
            raise BadInputError(path, f"no {split} items for fold {fold}")
        if split == "train":
            check_no_fold_leakage(((it["image"], it.get("fold")) for it in self.items), fold,
                                  what=f"training items of {path}")
        if split != "test":
            in_sample = [it["coarse"] for it in self.items
                         if Path(it["coarse_rel"]).parts[0] != f"fold_{int(it['fold'])}"]
            if in_sample:
                raise FoldLeakageError(f"{len(in_sample)} predictions are not out-of-fold (an image of fold j must be "
                                       f"predicted by model j, under fold_<j>/), e.g. {in_sample[0]}")
        if check_files:
            for it in self.items:
                if not Path(it["coarse"]).is_file():
                    raise BadInputError(it["coarse"], "coarse prediction file not found (listed in "
                                                      f"{path}; rerun `python -m ultrarefiner predict-transunet`)")

    def __len__(self) -> int:
        return len(self.items)

    def image_paths(self) -> list[str]:
        return sorted({it["image"] for it in self.items})

    def __getitem__(self, index: int) -> dict:
        it = self.items[index]
        flip = self._flip(_rng(self.seed, self.epoch, index))
        label = read_label(it["label"])
        coarse = read_probability(it["coarse"], label.shape)
        image = read_image(it["image"]) if self.builder.with_image else None
        key = image_key(file_digest(it["image"]), flip, self.geometry)
        return self.builder.build(label=label, coarse=coarse, flip=flip, key=key, source=it["image"], kind=self.kind,
                                  dataset=it.get("dataset", ""), image=image, policy=self.policy)


# ------------------------------------------------------------------------------------------------ mixing
class MixedRefinerDataset(Dataset):
    """Simulated (option A) and real (option B) samples in a fixed proportion per epoch.

    Each epoch has ``length`` samples, exactly ``round(real_ratio * length)`` of them real; which samples of each
    source are used (cycling through a fresh permutation when more are needed than exist) and where they sit in
    the epoch depend on ``(seed, epoch)`` only.

    Arguments:
      simulated: an option-A dataset (or None with ``real_ratio=1``).
      real: an option-B dataset (or None with ``real_ratio=0``).
      real_ratio (float): fraction of real samples in [0, 1].
      length (int or None): samples per epoch; default len(simulated) + len(real).
      seed (int): base seed of the draw.
    Both datasets must be for the same fold, geometry and frame.
    """

    def __init__(self, simulated: Dataset | None, real: Dataset | None, real_ratio: float = 0.5,
                 length: int | None = None, seed: int = 0) -> None:
        if not 0.0 <= real_ratio <= 1.0:
            raise ValueError(f"real_ratio must be in [0, 1], got {real_ratio}")
        if real_ratio > 0 and real is None or real_ratio < 1 and simulated is None:
            raise ValueError(f"real_ratio={real_ratio} needs {'real' if real is None else 'simulated'} samples")
        parts = [d for d in (simulated, real) if d is not None]
        folds = {getattr(d, "fold", None) for d in parts}
        if len(folds) > 1:
            raise FoldLeakageError(f"datasets made for different validation folds {sorted(map(str, folds))}")
        frames = {(getattr(d, "frame", None), getattr(getattr(d, "builder", None), "with_image", None))
                  for d in parts}
        modes = {(d.geometry.mode, d.geometry.img_size) if getattr(d, "geometry", None) else None for d in parts}
        if len(frames) > 1 or len(modes) > 1:
            raise ValueError(f"datasets disagree on (frame, with_image) {frames} or geometry {modes}")
        self.simulated, self.real, self.real_ratio = simulated, real, float(real_ratio)
        self.fold = folds.pop()
        self.geometry = getattr(parts[0], "geometry", None)
        self.frame = frames.pop()[0]
        self.length = int(length) if length is not None else sum(len(d) for d in parts)
        self.seed, self.epoch = int(seed), 0
        self._plan_epoch = None
        self._plan: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return self.length

    @property
    def n_real(self) -> int:
        return int(round(self.real_ratio * self.length))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for d in (self.simulated, self.real):
            if d is not None and hasattr(d, "set_epoch"):
                d.set_epoch(epoch)

    @staticmethod
    def _draw(rng: np.random.Generator, n_source: int, n: int) -> np.ndarray:
        reps = -(-n // n_source) if n else 0
        return np.concatenate([rng.permutation(n_source) for _ in range(reps)])[:n] if reps else np.zeros(0, int)

    def plan(self) -> list[tuple[int, int]]:
        """The epoch's (source, index) list: source 0 simulated, 1 real. One source at its own length (``real_ratio``
        0 or 1, default ``length``) is served in its own order, exactly as that dataset alone."""
        if self._plan_epoch != self.epoch:
            only = self.real if self.n_real == self.length else self.simulated if self.n_real == 0 else None
            if only is not None and len(only) == self.length:
                self._plan = [(int(only is self.real), i) for i in range(self.length)]
                self._plan_epoch = self.epoch
                return self._plan
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, 0x6D6978]))
            n_real = self.n_real
            real = self._draw(rng, len(self.real), n_real) if n_real else np.zeros(0, int)
            sim = self._draw(rng, len(self.simulated), self.length - n_real) if self.length > n_real else real[:0]
            pairs = [(0, int(i)) for i in sim] + [(1, int(i)) for i in real]
            order = rng.permutation(len(pairs))
            self._plan = [pairs[i] for i in order]
            self._plan_epoch = self.epoch
        return self._plan

    def __getitem__(self, index: int) -> dict:
        which, i = self.plan()[index]
        return (self.real if which else self.simulated)[i]

    def encoder_sources(self) -> list[tuple[str, str, bool]]:
        seen: dict[str, tuple[str, str, bool]] = {}
        for d in (self.simulated, self.real):
            if d is not None:
                for k, p, f in d.encoder_sources():
                    seen.setdefault(k, (k, p, f))
        return list(seen.values())
