"""The one cache of frozen image-encoder outputs (SAM's 256x64x64 embeddings), in memory and optionally on disk.

The SAM image does not depend on the coarse mask, so with a frozen encoder each (image, flip) embedding is
computed once and reused across epochs and across all augmented masks of that image. As segment-anything's
``SamPredictor.set_image`` keeps the embedding of its image, the cache belongs to whoever runs the encoder: the
``UltraRefiner`` network (phase 3), the phase-2 training engine (``refiner_setup.embedding_cache``).

Entries are keyed by the caller's keys (the image's file identity, frame and flip, from the dataset: no image is
hashed, nothing is read back from the device, so training steps stay free of host syncs) or, without them, by the
image content (a BLAKE2 digest of the exact input tensor and its size; a flipped image is another entry). Every
entry is namespaced by a fingerprint of the encoder weights (memory and ``<cache_dir>/<fingerprint>-v<N>/<key>.pt``):
loading other weights, or training the encoder, changes the fingerprint and nothing stale is ever returned. ``N``
(:data:`DISK_FORMAT`) changes when the way entries are computed changes for the same weights.
Embeddings are stored in float16 by default.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ultrarefiner.utils.io import atomic_write
from ultrarefiner.utils.transfer import pins_for

__all__ = ["DISK_FORMAT", "EmbeddingCache", "content_key", "content_keys", "weights_fingerprint"]

# 2: entries are encoded in eval mode. Before ultrarefiner 0.1.8 (version 1, folders named by the fingerprint
# alone) phase 3 cached embeddings of an encoder that training had put in train mode (LiteMedSAM's batch norms
# on batch statistics); those folders are never read again.
DISK_FORMAT = 2

logger = logging.getLogger(__name__)


def weights_fingerprint(module: nn.Module) -> str:
    """Digest of every parameter and buffer (names, shapes, values) of ``module``."""
    h = hashlib.blake2b(digest_size=12)
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def content_key(image: torch.Tensor) -> str:
    """Digest of one input image (C, H, W), shape included."""
    return content_keys(image[None])[0]


def content_keys(images: torch.Tensor) -> list[str]:
    """Digests of a batch (B, C, H, W) of images, as ``content_key`` of each (one host copy for the batch)."""
    host = images.detach().to("cpu", torch.float16).contiguous().numpy()
    keys = []
    for image in host:
        h = hashlib.blake2b(digest_size=16)
        h.update(str(tuple(image.shape)).encode())
        h.update(image.tobytes())
        keys.append(h.hexdigest())
    return keys


class EmbeddingCache(nn.Module):
    """Wrap a frozen image encoder: embeddings by key, computing only those not cached yet.

    ``cache(images, keys=None)`` encodes ``images`` itself; ``cache.embed(keys, compute, ...)`` asks the caller for
    the missing ones only (training: the images of a hit are never loaded, resized or moved to the device).

    Arguments:
        encoder: the frozen encoder, (B, 3, H, W) -> (B, C, h, w); refused if any parameter requires grad.
        cache_dir: folder for a persistent cache (``<cache_dir>/<fingerprint>-v<DISK_FORMAT>/<key>.pt``); None:
            memory only.
        max_items: bound of the in-memory cache (least recently used entries are dropped); None: unbounded
            (~2 MB per vit_b entry in float16).
        dtype: storage dtype of cached embeddings.
        store_device: where in-memory entries live (``cuda`` saves the host-to-device copy when they fit). Host
            entries bound for a CUDA device are pinned on first use, so that their copies do not sync the host
            (the pinned memory is the cache's size: ~2 MB per entry in float16).
    :meth:`refresh` recomputes the weight fingerprint after weights were loaded into the encoder.
    """

    def __init__(
        self,
        encoder: nn.Module,
        cache_dir: str | os.PathLike | None = None,
        max_items: int | None = None,
        dtype: torch.dtype = torch.float16,
        store_device: str | torch.device = "cpu",
    ):
        super().__init__()
        self.encoder = encoder
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.max_items, self.dtype = max_items, dtype
        self.store_device = torch.device(store_device)
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0
        self.fingerprint = ""
        self.refresh()

    def refresh(self) -> None:
        """Recompute the encoder fingerprint (after loading weights); cached entries of other weights are unused."""
        if any(p.requires_grad for p in self.encoder.parameters()):
            raise ValueError("EmbeddingCache needs a frozen encoder: some of its parameters require grad")
        self.fingerprint = weights_fingerprint(self.encoder)
        self._memory.clear()

    def __contains__(self, key: str) -> bool:
        if key in self._memory:
            return True
        path = self._disk_path(key)
        return path is not None and path.is_file()

    def _disk_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{self.fingerprint}-v{DISK_FORMAT}" / f"{key}.pt"

    def _get(self, key: str) -> torch.Tensor | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        path = self._disk_path(key)
        if path is not None and path.is_file():
            from ultrarefiner.engines.checkpoints.checkpoint import read_checkpoint
            from ultrarefiner.errors import BadInputError

            try:
                value = read_checkpoint(path, "cache entry")
            except BadInputError as e:  # a corrupt entry is recomputed, not fatal
                logger.warning(f"{e}; recomputing")
                return None
            value = value.to(self.store_device)  # a disk hit lands on the CPU
            self._put(key, value, write=False)
            return value
        return None

    def _put(self, key: str, value: torch.Tensor, write: bool = True) -> None:
        self._memory[key] = value
        if self.max_items is not None:
            while len(self._memory) > self.max_items:
                self._memory.popitem(last=False)
        path = self._disk_path(key)
        if write and path is not None:
            atomic_write(path, lambda tmp: torch.save(value.cpu(), tmp))

    def embed(self, keys: Sequence[str], compute: Callable[[list[int]], torch.Tensor],
              device: torch.device | str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Embeddings of a batch, computing only the missing ones (each distinct key once).

        Arguments:
          keys: B cache keys.
          compute: ``compute(indices)`` -> (M,C,h,w) encoder outputs for those batch positions (one per distinct
            missing key); called at most once, under ``torch.no_grad``.
          device, dtype: of the returned tensor (dtype None: the computed embeddings' dtype, or the encoder's when
            every key was cached).

        Returns:
          torch.Tensor: (B,C,h,w).
        """
        found = [self._get(k) for k in keys]
        first_missing: dict[str, int] = {}
        for i, (k, v) in enumerate(zip(keys, found, strict=True)):
            if v is None:
                first_missing.setdefault(k, i)
        self.hits += len(keys) - len(first_missing)
        self.misses += len(first_missing)
        if first_missing:
            idx = list(first_missing.values())
            with torch.no_grad():
                computed = compute(idx)
            if computed.shape[0] != len(idx):
                raise ValueError(f"compute returned {computed.shape[0]} embeddings for {len(idx)} images")
            dtype = dtype or computed.dtype
            # one device-to-host copy for the batch's misses, not one per sample
            stored = computed.detach().to(self.store_device, self.dtype)
            new = {}
            for k, emb in zip(first_missing, stored, strict=True):
                new[k] = emb.clone()  # own storage: a view would keep the whole batch alive in the LRU
                self._put(k, new[k])
            found = [new[k] if v is None else v for k, v in zip(keys, found, strict=True)]
        dtype = dtype or next(self.encoder.parameters()).dtype
        if pins_for(device) and self.store_device.type == "cpu":
            found = [self._pinned(k, v) for k, v in zip(keys, found, strict=True)]
        # cast before stacking: stack under a bf16 autocast rejects the fp16 store dtype. A non-blocking copy casts on
        # the device, and from a pinned entry it is queued without a host sync (``ultrarefiner.utils.transfer``).
        return torch.stack([v.to(device, dtype, non_blocking=True) for v in found])

    def _pinned(self, key: str, value: torch.Tensor) -> torch.Tensor:
        """The entry in pinned host memory, pinned once and kept so (entries are never written in place)."""
        if value.is_pinned():
            return value
        value = value.pin_memory()
        if key in self._memory:
            self._memory[key] = value
        return value

    @torch.no_grad()
    def forward(self, images: torch.Tensor, keys: Sequence[str] | None = None) -> torch.Tensor:
        """(B, 3, H, W) encoder input -> (B, C, h, w) embeddings in the encoder's output dtype, on the images' device.

        ``keys``: one identity per image (e.g. file digest, frame and flip); None: digests of the image contents
        (read back to the host: a sync for device images).
        """
        if keys is None:
            keys = content_keys(images)
        elif len(keys) != images.shape[0]:
            raise ValueError(f"{len(keys)} cache keys for {images.shape[0]} images")
        return self.embed(keys, lambda idx: self.encoder(images[idx]), images.device, dtype=None)
