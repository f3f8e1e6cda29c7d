"""Cache of frozen image-encoder outputs (SAM's 256x64x64 embeddings), in memory and optionally on disk.

The SAM image does not depend on the coarse mask, so with a frozen encoder each (image, flip) embedding is
computed once and reused across epochs and across all augmented masks of that image. Entries are keyed by
the caller's keys (the image's file identity, frame and flip, from the dataset) or, without them, by the image
content (a BLAKE2 digest of the exact input tensor, so a flipped image is another entry, and its size), and by a
fingerprint of the encoder weights: loading other weights, or training the encoder, changes the fingerprint and
nothing stale is ever returned. Embeddings are stored in float16.

Content digests read the whole image back to the host: free for host images, a device-to-host copy (a host sync)
for device ones. Training passes dataset keys instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ultrarefiner.utils.io import atomic_write

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
    """Wrap an image encoder: ``cache(images)`` returns embeddings, computing only those not cached yet.

    Arguments:
        encoder: the frozen encoder, (B, 3, H, W) -> (B, C, h, w).
        cache_dir: folder for a persistent cache (``<cache_dir>/<fingerprint>/<key>.pt``); None: memory only.
        max_items: bound of the in-memory cache (least recently used entries are dropped); None: unbounded.
        dtype: storage dtype of cached embeddings.
    The encoder must have no trainable parameter; :meth:`refresh` recomputes the weight fingerprint after
    weights were loaded into it.
    """

    def __init__(
        self,
        encoder: nn.Module,
        cache_dir: str | os.PathLike | None = None,
        max_items: int | None = None,
        dtype: torch.dtype = torch.float16,
    ):
        super().__init__()
        self.encoder = encoder
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.max_items, self.dtype = max_items, dtype
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

    def _disk_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / self.fingerprint / f"{key}.pt"

    def _get(self, key: str) -> torch.Tensor | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        path = self._disk_path(key)
        if path is not None and path.is_file():
            try:
                value = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # a corrupt entry is recomputed, not fatal
                logger.warning(f"{path}: unreadable cache entry ({e}); recomputing")
                return None
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
            atomic_write(path, lambda tmp: torch.save(value, tmp))

    @torch.no_grad()
    def forward(self, images: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        """(B, 3, H, W) encoder input -> (B, C, h, w) embeddings in the encoder's output dtype, on the images' device.

        ``keys``: one identity per image (e.g. file digest, frame and flip); None: digests of the image contents.
        """
        if keys is None:
            keys = content_keys(images)
        elif len(keys) != images.shape[0]:
            raise ValueError(f"{len(keys)} cache keys for {images.shape[0]} images")
        found = [self._get(k) for k in keys]
        missing = [i for i, v in enumerate(found) if v is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            computed = self.encoder(images[missing])
            out_dtype = computed.dtype
            stored = computed.to("cpu", self.dtype)  # one device-to-host copy for the batch's misses
            for i, emb in zip(missing, stored, strict=True):
                found[i] = emb.clone()  # own storage: a view would keep (and save) the whole batch
                self._put(keys[i], found[i])
        else:
            out_dtype = next(self.encoder.parameters()).dtype
        return torch.stack(found).to(images.device, out_dtype)
