"""Phase 3 set-up: building ``UltraRefiner`` and its data.

Network description (``network_kwargs``, stored in every phase-3 checkpoint so tools can rebuild the network)::

    {"transunet": TransUNet kwargs, "sam": {"model_type": "vit_b"} (or "tiny" + build_tiny_sam kwargs),
     "refiner": SAMRefiner kwargs (preprocessing, image_resize, use_lora, ...)}

Initialisation from the phase-1/phase-2 checkpoints: ``engines.training.initialisation.init_from_phase_checkpoints``.

Data (the ``train#preprocessing`` / ``validate#preprocessing`` chains written out in
``bundles/ultrarefiner/configs/train.json``: MONAI transforms and the two below, ``SamFramed`` and ``FlipWithIdd``):
one sample holds the TransUNet input ``image`` (1,S,S) in [0,1] with its ``label`` (1,S,S), and the SAM image
``sam_image`` (uint8, 0-255) with ``sam_label`` and ``sam_original_size``:

* ``sam_frame="square"`` (training, any batch size): the native image squashed into the S'xS' encoder square with
  the checkpoint's reference resize (MedSAM: skimage, as MedSAM's inference; SAM: the predictor's PIL resize with
  a square target), the label area-resized to the L x L low-res frame (L = S'/4 = 256) where the loss is taken, and
  ``sam_original_size`` = (L, L). With MedSAM preprocessing this is exactly what the encoder sees at inference
  (MedSAM squashes every image to 1024x1024); with SAM preprocessing inference keeps the aspect ratio instead.
* ``sam_frame="native"`` (evaluation; training only with batch size 1): native image and label; with ``frame_key``
  also the image in the encoder frame, resized by the data workers (validation's uncollated batches encode it).

Augmentation: left-right flips of all four (no vertical flips: the skin line is at the top), so each image has two
SAM inputs whose embeddings the cache keeps; intensity jitter on the TransUNet input only. Rotations and zooms would
give every step a new SAM image (no cache hit) and are left out.

Each sample also carries ``sam_image_id``, the identity of its SAM input (image file digest, frame, flip), which
``E2EPrepareBatch`` hands to the embedding cache as its key: no image is hashed, and nothing is read back from the
device, to look an embedding up.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping
from typing import Any

import cv2
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandFlipd

from ultrarefiner.data.refiner_data import file_digest
from ultrarefiner.networks.sam_geometry import SamGeometry

__all__ = [
    "FlipWithIdd",
    "SamFramed",
    "build_ultrarefiner",
]

logger = logging.getLogger(__name__)

SAM_FRAMES = ("square", "native")


# ------------------------------------------------------------------------------------------------ network
def build_ultrarefiner(network_kwargs: Mapping[str, Any], sam_checkpoint: str | os.PathLike | None = None,
                       **ultra_kwargs: Any):
    """``UltraRefiner`` from a ``network_kwargs`` description (module docstring); ``ultra_kwargs`` go to
    ``UltraRefiner`` (``cache_embeddings``, ``cache_dir``, ...). Weights are random (or SAM's ``sam_checkpoint``)."""
    from ultrarefiner.networks import SAMRefiner, TransUNet, UltraRefiner, build_sam

    unknown = set(network_kwargs) - {"transunet", "sam", "refiner"}
    if unknown or "transunet" not in network_kwargs:
        raise ValueError("network_kwargs needs 'transunet' (and optionally 'sam', 'refiner'), "
                         f"got {sorted(network_kwargs)}")
    transunet = TransUNet(**dict(network_kwargs["transunet"]))
    sam_kwargs = dict(network_kwargs.get("sam") or {})
    if sam_checkpoint is None:  # inference: the weights come from the bundle's model file; LiteMedSAM's are packaged
        lite = sam_kwargs.get("model_type", "lite_medsam") == "lite_medsam"
        sam_checkpoint = "packaged" if lite else "random"
    sam = build_sam(checkpoint=sam_checkpoint, **sam_kwargs)
    refiner = SAMRefiner(sam, **dict(network_kwargs.get("refiner") or {}))
    return UltraRefiner(transunet, refiner, **ultra_kwargs)


# ------------------------------------------------------------------------------------------------ data
class SamFramed(MapTransform):
    def __init__(
        self,
        frame: str = "square",
        preprocessing: str = "medsam",
        encoder_size: int = 1024,
        label_size: int | None = None,
        image_key: str = "sam_image",
        label_key: str = "sam_label",
        size_key: str = "sam_original_size",
        id_key: str = "sam_image_id",
        frame_key: str | None = None,
        image_resize: str = "exact",
    ) -> None:
        """
        SAM image and label into the training frame (module docstring).

        Arguments:
          frame (str): ``square`` (S'xS' encoder square, label at label_size) or ``native`` (unchanged).
          preprocessing (str): ``medsam`` or ``sam``: which reference resize squashes the image.
          encoder_size (int): the encoder input side S' (1024 for vit_b).
          label_size (int or None): side of the label in the square frame; None: S'/4 (SAM's low-res frame).
          image_key: (1,H,W) native image on the 0-255 scale -> uint8 (1,S',S') (square) or (1,H,W) (native).
          label_key: (1,H,W) 0/1 native label -> (1,L,L) (square) or unchanged (native).
          size_key: written: the ``original_size`` the refiner decodes at, (L, L) or (H, W).
          id_key: written when the image was loaded from a file: ``<file digest>-<frame>``, the embedding-cache key
            of the framed image (``FlipWithIdd`` appends the flip).
          frame_key: with ``frame="native"``, also write the native image resized into the encoder frame here,
            uint8 (1,h',w'), by the refiner's exact reference resize (``refine_folder.encoder_frame``), so that data
            workers do it, not the main process (MedSAM's 1024 resize costs about 90 ms per BUSI image). Not
            written with ``image_resize="torch"`` (the refiner resizes on its device). None: not written.
          image_resize: the refiner's ``image_resize`` (``exact`` or ``torch``).
        """
        keys: KeysCollection = [image_key, label_key]
        super().__init__(keys)
        if frame not in SAM_FRAMES:
            raise ValueError(f"sam_frame must be one of {SAM_FRAMES}, got {frame!r}")
        self.frame = frame
        self.geometry = SamGeometry(preprocessing, encoder_size, image_resize=image_resize)
        self.label_size = int(label_size or self.geometry.low_res_size)
        self.image_key, self.label_key, self.size_key = image_key, label_key, size_key
        self.id_key, self.frame_key = id_key, frame_key

    def _identity(self, image: Any) -> str | None:
        source = getattr(image, "meta", {}).get("filename_or_obj")
        if not isinstance(source, (str, os.PathLike)) or not os.path.isfile(source):
            return None
        frame = "native" if self.frame == "native" else f"square{self.geometry.img_size}-{self.geometry.mode}"
        return f"{file_digest(source)}-{frame}"

    def _square_image(self, image: np.ndarray) -> np.ndarray:
        s = self.geometry.img_size
        if self.geometry.mode == "medsam":
            return self.geometry.resize_uint8(image[..., None])[..., 0]  # MedSAM's own squash
        if self.geometry.mode == "litemedsam":
            return cv2.resize(image, (s, s), interpolation=cv2.INTER_AREA)  # LiteMedSAM's resize, square target
        from torchvision.transforms.functional import resize, to_pil_image

        return np.asarray(resize(to_pil_image(image), [s, s]))  # SamPredictor's PIL resize, square target

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        identity = self._identity(d[self.image_key])
        if identity is not None:
            d[self.id_key] = identity
        image = np.asarray(torch.as_tensor(d[self.image_key]).detach().cpu(), dtype=np.float32)[0]
        image = np.clip(np.round(image), 0, 255).astype(np.uint8)
        label = np.asarray(torch.as_tensor(d[self.label_key]).detach().cpu(), dtype=np.float32)[0]
        if self.frame == "native":
            d[self.image_key] = torch.from_numpy(image)[None]
            d[self.size_key] = torch.tensor(image.shape, dtype=torch.long)
            if self.frame_key is not None:
                from ultrarefiner.engines.inference.refine_folder import encoder_frame

                frame = encoder_frame(self.geometry, image)
                if frame is not None:
                    d[self.frame_key] = torch.from_numpy(frame)[None]
            return d
        d[self.image_key] = torch.from_numpy(np.ascontiguousarray(self._square_image(image)))[None]
        n = self.label_size
        interp = cv2.INTER_AREA if n < max(label.shape) else cv2.INTER_LINEAR
        small = cv2.resize(label, (n, n), interpolation=interp) > 0.5
        d[self.label_key] = torch.from_numpy(small.astype(np.float32))[None]
        d[self.size_key] = torch.tensor((n, n), dtype=torch.long)
        return d


class FlipWithIdd(RandFlipd):
    """``RandFlipd`` that appends ``-flip1`` to the SAM image identity (``SamFramed``'s ``id_key``) when it flips:
    a flipped image has its own embedding. The random draws are RandFlipd's own."""

    def __init__(self, *args: Any, id_key: str = "sam_image_id", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.id_key = id_key

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = super().__call__(data, lazy)
        if self._do_transform and self.id_key in d:
            d[self.id_key] = f"{d[self.id_key]}-flip1"
        return d
