"""UltraRefiner: TransUNet coarse segmenter + SAM/MedSAM refiner, differentiable end to end.

TransUNet sees the 224x224 image; its softmax foreground probability is the coarse mask. ``SAMRefiner`` turns that
mask into differentiable prompts (soft-argmax point, straight-through/moment box, mask logits) and decodes it
against the NATIVE-resolution image (never the 224 image upsampled), so the refined-mask loss reaches TransUNet's
decoder and encoder through the prompts.

The SAM image does not depend on the coarse mask: with a frozen image encoder its embeddings are computed once
per image and reused (``EmbeddingCache``, keyed by the dataset's image identity or else the raw 0-255 image; a hit
also skips SAM's resize).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ultrarefiner.utils.amp import autocast, float32_region
from ultrarefiner.utils.transfer import to_device

from .embedding_cache import EmbeddingCache, content_key
from .sam_geometry import SamGeometry
from .sam_refiner import SAMRefiner

__all__ = ["SamImageEncoding", "UltraRefiner", "UltraRefinerExport"]

logger = logging.getLogger(__name__)


class SamImageEncoding(nn.Module):
    def __init__(self, encoder: nn.Module, geometry: SamGeometry, resized: bool = False) -> None:
        """
        SAM's preprocessing + image encoder as one module: raw 0-255 image -> image embeddings.

        Wrapped by ``EmbeddingCache`` so that the cache key is the raw image (a hit skips the CPU resize as well as
        the encoder). Its state is the encoder's weights plus a code of the preprocessing settings, so the cache
        fingerprint changes with either.

        Arguments:
          encoder (nn.Module): SAM's ``image_encoder`` (frozen).
          geometry (SamGeometry): the refiner's preprocessing (``SAMRefiner.geometry``).
          resized (bool): inputs are already in the encoder frame (``SamGeometry.resize_uint8`` output).
        """
        super().__init__()
        self.encoder = encoder
        self.geometry = geometry
        self.resized = resized
        settings = repr((geometry.mode, geometry.img_size, geometry.image_resize, geometry.pixel_mean.tolist(),
                         geometry.pixel_std.tolist(), resized))
        digest = hashlib.blake2b(settings.encode(), digest_size=8).digest()
        self.register_buffer("preprocessing_code", torch.tensor(list(digest), dtype=torch.uint8))
        self.amp_dtype: torch.dtype | None = None  # autocast dtype of the encoder (set per call by UltraRefiner)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B,1|3,H,W) 0-255 image -> (B,C,S/16,S/16) embeddings, on the encoder's device."""
        return self.encode(self.geometry.preprocess_image(image, self.resized))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) preprocessed encoder input (``SamGeometry.preprocess_image``) -> (B,C,S/16,S/16) embeddings."""
        device = next(self.encoder.parameters()).device
        with autocast(device, self.amp_dtype is not None, self.amp_dtype or torch.bfloat16):
            return self.encoder(to_device(x, device))


class UltraRefiner(nn.Module):
    def __init__(
        self,
        transunet: nn.Module,
        refiner: SAMRefiner,
        cache_embeddings: bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        cache_max_items: int | None = None,
        cache_dtype: torch.dtype = torch.float16,
    ) -> None:
        """
        TransUNet -> softmax foreground probability -> differentiable prompts -> SAM refiner on the native image.

        Arguments:
          transunet (nn.Module): coarse segmenter, (B,Cin,S,S) in [0,1] -> (B,K,S,S) logits, K >= 2 with class 0 the
            background (``TransUNet``; its ``in_channels``/``img_size`` attributes are used to check inputs).
          refiner (SAMRefiner): the SAM/MedSAM refiner; its ``geometry`` decides the encoder frame (longest side
            1024 + padding for ``sam``, 1024x1024 squash for ``medsam``).
          cache_embeddings (bool or None): reuse image embeddings across calls (``EmbeddingCache``). None: cache
            when the image encoder is frozen (no LoRA, not unfrozen); True with a trainable encoder is an error
            (cached embeddings would cut its gradient). Entries accumulate per distinct image: for inference over
            many new images pass False (or bound ``cache_max_items``).
          cache_dir (str or None): persistent cache folder (``<cache_dir>/<fingerprint>-v<N>/<key>.pt``); None:
            memory only.
          cache_max_items (int or None): bound of the in-memory cache (LRU); None: unbounded (2 MB per vit_b entry).
          cache_dtype (torch.dtype): storage dtype of cached embeddings (float16; float32 reproduces the uncached
            output exactly).
        """
        super().__init__()
        if not isinstance(refiner, SAMRefiner):
            raise TypeError(f"refiner must be a SAMRefiner, got {type(refiner).__name__}")
        self.transunet = transunet
        self.refiner = refiner
        trainable = refiner.encoder_trainable()
        if cache_embeddings is None:
            cache_embeddings = not trainable
        if cache_embeddings and trainable:
            raise ValueError("cache_embeddings=True needs a frozen SAM image encoder, but it is trainable (LoRA or "
                             "freeze_image_encoder=False); pass cache_embeddings=False")
        self.cache_embeddings = bool(cache_embeddings)
        self.cache_dir, self.cache_max_items, self.cache_dtype = cache_dir, cache_max_items, cache_dtype
        # plain dict: kept out of the module tree so the encoder weights are not duplicated in state_dict()
        self._caches: dict[bool, EmbeddingCache] = {}
        self._range_checked = False  # the TransUNet input's [0,1] range, read back on the first forward only
        if self.cache_embeddings:
            # loading weights (a SAM/MedSAM file, a checkpoint) changes the embeddings: re-key the cache then
            refiner.sam.image_encoder.register_load_state_dict_post_hook(lambda module, keys: self.refresh_cache())

    # --------------------------------------------------------------------------------------------- cache
    def embedding_cache(self, resized: bool = False) -> EmbeddingCache:
        """The cache for native (``resized`` False) or encoder-frame inputs, built on first use."""
        if resized not in self._caches:
            encoding = SamImageEncoding(self.refiner.sam.image_encoder, self.refiner.geometry, resized)
            self._caches[resized] = EmbeddingCache(encoding, self.cache_dir, self.cache_max_items, self.cache_dtype)
        return self._caches[resized]

    def refresh_cache(self) -> None:
        """Recompute the weight fingerprints (called automatically after ``load_state_dict``; call it after
        changing encoder weights in place, e.g. ``merge_lora``)."""
        for cache in self._caches.values():
            cache.refresh()

    def cache_stats(self) -> dict[str, int]:
        """Hits and misses summed over the caches (a low hit rate means the SAM image is augmented per step)."""
        return {"hits": sum(c.hits for c in self._caches.values()),
                "misses": sum(c.misses for c in self._caches.values())}

    # --------------------------------------------------------------------------------------------- parts
    def coarse_probability(self, coarse_logits: torch.Tensor) -> torch.Tensor:
        """(B,K,S,S) TransUNet logits -> (B,1,S,S) float32 foreground probability (1 - softmax background)."""
        probs = torch.softmax(coarse_logits.float(), dim=1)  # float32 also under bf16 autocast
        return probs[:, 1:].sum(dim=1, keepdim=True)

    def _sam_frame(self, sam_image: torch.Tensor, original_size: Sequence[int] | None) -> tuple[tuple[int, int], bool]:
        """(original_size, resized) of a SAM image: native when original_size is None or its own size."""
        own = (int(sam_image.shape[-2]), int(sam_image.shape[-1]))
        if original_size is None or tuple(int(s) for s in original_size) == own:
            return own, False
        size = (int(original_size[0]), int(original_size[1]))
        frame = tuple(self.refiner.geometry.input_size(size))
        if own != frame:
            raise ValueError(f"sam_image {own} is neither original_size {size} nor its encoder frame {frame}")
        return size, True

    def encode_image(self, sam_image: torch.Tensor, original_size: Sequence[int] | None = None,
                     image_keys: Sequence[str] | None = None) -> torch.Tensor:
        """
        SAM image embeddings, through the cache when enabled (e.g. to precompute them).

        Arguments:
          sam_image (torch.Tensor): (B,1|3,H,W) on the 0-255 scale, native (or in the encoder frame with
            ``original_size`` the native (H, W)).
          original_size: native (H, W); None: the image's own size.
          image_keys: cache key per image (file identity, frame, flip: ``E2EPrepareBatch`` passes the dataset's);
            None: digests of the image contents (read back to the host: a sync for a device image).

        Returns:
          torch.Tensor: (B,256,S/16,S/16) embeddings (S = 1024 for vit_b) on the encoder's device.
        """
        _, resized = self._sam_frame(sam_image, original_size)
        if not self.cache_embeddings:
            return self.refiner.encode_image(sam_image, resized)
        device = next(self.refiner.sam.image_encoder.parameters()).device
        cache = self.embedding_cache(resized)
        # the cache stacks its float16 entries, which CPU autocast refuses: look up outside autocast and run the
        # encoder (cache misses) under the caller's autocast dtype
        amp = torch.is_autocast_enabled(device.type)
        cache.encoder.amp_dtype = torch.get_autocast_dtype(device.type) if amp else None
        with float32_region(device):
            return cache(sam_image, None if image_keys is None else list(image_keys)).to(device)

    def encode_images(self, sam_images: Sequence[torch.Tensor], image_keys: Sequence[str] | None = None,
                      frames: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """
        ``encode_image`` for native images of different sizes (a validation or inference batch): each image is
        resized on its own, then one encoder pass runs for the batch (for its cache misses only when caching).

        Arguments:
          sam_images: B (1|3,H_i,W_i) native images on the 0-255 scale.
          image_keys: cache key per image, as in ``encode_image`` (the same keys share entries with it).
          frames: the same images already resized into the encoder frame (``SamGeometry.resize_uint8``, e.g. by
            data workers: ``SamFramed``'s ``frame_key``), (1|3,h'_i,w'_i); None: resized here.

        Returns:
          torch.Tensor: (B,256,S/16,S/16) embeddings on the encoder's device.
        """
        images = list(sam_images)
        if not images:
            raise ValueError("encode_images needs at least one image")
        if image_keys is not None and len(image_keys) != len(images):
            raise ValueError(f"{len(image_keys)} cache keys for {len(images)} images")
        if frames is not None and len(frames) != len(images):
            raise ValueError(f"{len(frames)} encoder frames for {len(images)} images")
        if frames is None and len({tuple(im.shape) for im in images}) == 1:
            return self.encode_image(torch.stack(images), None, image_keys)
        geometry = self.refiner.geometry

        def inputs(idx: Sequence[int]) -> torch.Tensor:  # (M,3,S,S): every frame is padded to the encoder's square
            if frames is not None:
                return torch.cat([geometry.preprocess_image(frames[i][None], resized=True) for i in idx])
            return torch.cat([geometry.preprocess_image(images[i][None]) for i in idx])

        if not self.cache_embeddings:
            return self.refiner.encode_preprocessed(inputs(range(len(images))))
        device = next(self.refiner.sam.image_encoder.parameters()).device
        cache = self.embedding_cache(False)
        keys = list(image_keys) if image_keys is not None else [content_key(im) for im in images]
        amp = torch.is_autocast_enabled(device.type)
        cache.encoder.amp_dtype = torch.get_autocast_dtype(device.type) if amp else None
        with float32_region(device):
            return cache.embed(keys, lambda idx: cache.encoder.encode(inputs(idx)), device, dtype=None)

    def _check_inputs(self, image: torch.Tensor, sam_image: torch.Tensor | None,
                      image_embeddings: torch.Tensor | None, original_size: Sequence[int] | None) -> None:
        in_channels = getattr(self.transunet, "in_channels", None)
        img_size = getattr(self.transunet, "img_size", None)
        if not torch.is_tensor(image) or image.dim() != 4:
            raise ValueError(f"image must be a (B,C,S,S) tensor for TransUNet, got {getattr(image, 'shape', image)}")
        if in_channels is not None and image.shape[1] != in_channels:
            raise ValueError(f"image has {image.shape[1]} channels, TransUNet expects {in_channels} "
                             f"(image shape {tuple(image.shape)})")
        if img_size is not None and tuple(image.shape[-2:]) != (img_size, img_size):
            raise ValueError(f"image must be {img_size}x{img_size} for TransUNet, got {tuple(image.shape[-2:])}")
        # reading the values back is a host sync: done on the first forward only (a 0-255 input is a systematic
        # mistake); E2EPrepareBatch checks every training batch on the host, before it moves to the device
        if not self._range_checked and image.is_floating_point() and image.numel():
            if float(image.detach().amax()) > 1.0 + 1e-3:
                raise ValueError("TransUNet's image must be in [0,1] (max > 1: a 0-255 image?); only sam_image is on "
                                 "the 0-255 scale")
            self._range_checked = True
        b = image.shape[0]
        if (sam_image is None) == (image_embeddings is None):
            raise ValueError("give exactly one of sam_image (native 0-255 image) and image_embeddings")
        if sam_image is not None:
            if sam_image.dim() != 4 or sam_image.shape[1] not in (1, 3):
                raise ValueError(f"sam_image must be (B,1|3,H,W), got {tuple(sam_image.shape)}")
            if sam_image.shape[0] != b:
                raise ValueError(f"batch mismatch: image has {b} samples, sam_image {sam_image.shape[0]}")
        else:
            if image_embeddings.dim() != 4 or image_embeddings.shape[0] != b:
                raise ValueError(f"image_embeddings must be (B={b},C,h,w), got {tuple(image_embeddings.shape)}")
            if original_size is None:
                raise ValueError("original_size (H, W) is required with image_embeddings")
        if original_size is not None and (len(original_size) != 2 or min(int(s) for s in original_size) < 1):
            raise ValueError(f"original_size must be (H, W) shared by the batch, got {original_size}")

    # --------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        image: torch.Tensor,
        sam_image: torch.Tensor | None = None,
        image_embeddings: torch.Tensor | None = None,
        original_size: Sequence[int] | None = None,
        image_keys: Sequence[str] | None = None,
    ) -> dict[str, object]:
        """
        Arguments:
          image (torch.Tensor): (B,Cin,S,S) TransUNet input in [0,1] (S = 224), the whole image squashed to S x S.
          sam_image (torch.Tensor or None): (B,1|3,H,W) the same image on the 0-255 scale at native resolution
            (one size per batch); or, with ``original_size`` given and different, already in the encoder frame
            (``SamGeometry.resize_uint8``).
          image_embeddings (torch.Tensor or None): (B,256,S'/16,S'/16) precomputed embeddings instead of
            ``sam_image`` (then ``original_size`` is required).
          original_size: native (H, W) shared by the batch; None: ``sam_image``'s own size.
          image_keys: embedding-cache key per ``sam_image`` (see ``encode_image``); None: content digests.

        Returns:
          dict with
            "coarse_logits": (B,K,S,S) TransUNet logits;
            "coarse_probs": (B,1,S,S) float32 foreground probability fed to the refiner;
            and the refiner's outputs (``SAMRefiner.forward``): "masks" (B,1,H,W) refined logits at the native size,
            "low_res_logits" (B,K',L,L), "iou_predictions" (B,K'), "selection_weights", "low_res_masks",
            "candidate_logits" (B,K',H,W), "prompts".
        """
        self._check_inputs(image, sam_image, image_embeddings, original_size)
        if sam_image is not None:
            original_size, _ = self._sam_frame(sam_image, original_size)
            if self.cache_embeddings:
                image_embeddings = self.encode_image(sam_image, original_size, image_keys)
                sam_image = None
        coarse_logits = self.transunet(image)
        coarse_probs = self.coarse_probability(coarse_logits)
        refined = self.refiner(image=sam_image, coarse=coarse_probs, image_embeddings=image_embeddings,
                               original_size=original_size)
        return {"coarse_logits": coarse_logits, "coarse_probs": coarse_probs, **refined}


class UltraRefinerExport(nn.Module):
    def __init__(self, transunet: nn.Module, refiner: SAMRefiner) -> None:
        """
        One-tensor interface of ``UltraRefiner`` for ``verify_net_in_out``, TorchScript export and deployment.

        Holds the same ``transunet`` and ``refiner`` children as ``UltraRefiner``, so its state_dict keys are the same
        (a phase-3 ``models/model.pt`` loads into either). The TransUNet input is made inside: min-max scaling per
        image to [0,1] and an anti-aliased bilinear resize to ``transunet.img_size`` (the MONAI pipeline's
        ``ScaleIntensity`` + anti-aliased ``Resize`` differ from it by interpolation details only). No embedding
        cache. For ``torch.jit.trace`` build the refiner with ``image_resize="torch"`` (the exact resize runs in
        numpy); a trace is fixed to its input size.

        Arguments:
          transunet (nn.Module): coarse segmenter (``img_size`` attribute).
          refiner (SAMRefiner): the refiner.
        """
        super().__init__()
        if not isinstance(refiner, SAMRefiner):
            raise TypeError(f"refiner must be a SAMRefiner, got {type(refiner).__name__}")
        self.transunet = transunet
        self.refiner = refiner
        self.img_size = int(getattr(transunet, "img_size", 224))

    @classmethod
    def from_model(cls, model: UltraRefiner) -> UltraRefinerExport:
        """The export interface sharing ``model``'s sub-networks (and weights)."""
        return cls(model.transunet, model.refiner)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; given the bundle's self-describing ``models/model.pt`` (``{"model": ...,
        "kind", "identity", ...}``, what phase-3 training exports), its ``"model"`` weights, once the file is known
        to be a phase-3 one. MONAI's ``ckpt_export`` and the Zoo's checks then load the file as it is, without
        ``--key_in_ckpt model`` (ignite's loader hands the whole dict here; a strict load of it would fail on the
        keys "model", "identity", ...).

        Raises:
          ValueError: the file holds another phase's weights (names it and the bundle that writes the right one).
        """
        from ultrarefiner.engines.checkpoints.checkpoint import phase_problem

        if isinstance(state_dict, Mapping) and isinstance(state_dict.get("model"), Mapping):
            problem = phase_problem(dict(state_dict), 3, "the end-to-end network")
            if problem is not None:
                raise ValueError(f"this {problem}")
            state_dict = state_dict["model"]
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Arguments:
          x (torch.Tensor): (B,1,H,W) float32 grayscale image scaled to [0,1] (8-bit image / 255), native size; the
            batch shares one size.

        Returns:
          torch.Tensor: (B,2,H,W) float32 lesion probabilities at the input size: channel 0 coarse (TransUNet,
          bilinearly resized), channel 1 refined (SAM refiner).
        """
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"x must be (B,1,H,W), got {tuple(x.shape)}")
        x = x.float()
        size = (int(x.shape[-2]), int(x.shape[-1]))
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        scaled = (x - lo) / (hi - lo).clamp_min(1e-8)
        small = F.interpolate(scaled, (self.img_size, self.img_size), mode="bilinear", align_corners=False,
                              antialias=True).clamp(0.0, 1.0)
        coarse = torch.softmax(self.transunet(small).float(), dim=1)[:, 1:].sum(dim=1, keepdim=True)
        refined = self.refiner(image=x * 255.0, coarse=coarse, original_size=size)["masks"]
        coarse_native = F.interpolate(coarse, size, mode="bilinear", align_corners=False)
        return torch.cat([coarse_native, torch.sigmoid(refined.float())], dim=1)
