"""Phase 3 set-up: building ``UltraRefiner``, initialising it from the phase-1/phase-2 checkpoints, and its data.

Network description (``network_kwargs``, stored in every phase-3 checkpoint so tools can rebuild the network)::

    {"transunet": TransUNet kwargs, "sam": {"model_type": "vit_b"} (or "tiny" + build_tiny_sam kwargs),
     "refiner": SAMRefiner kwargs (preprocessing, image_resize, use_lora, ...)}

Initialisation (``init_network``): TransUNet from ``<ckpt_root>/transunet/<dataset>/fold_<k>/best.pt`` (its stored
``network_kwargs`` must match the config), the refiner from ``<ckpt_root>/sam_refiner/<dataset>/fold_<k>/best.pt``
(``engines.checkpoints.refiner_checkpoint`` format, full or LoRA-only). A file that records its run (``identity``,
``checkpoints.checkpoint``) must come from phase 1 / phase 2 and, for this run's dataset, from its fold: another fold's
model was trained on this fold's validation images (another dataset's file is a transfer, used with a warning).
Files without an identity (older runs, the shipped
``bundles/sam_refiner/models/model.pt``) are taken as they are. A LoRA-only checkpoint is loaded on top of the base
SAM/MedSAM file (``sam_checkpoint``) and, unless phase 3 trains adapters itself (``use_lora``), merged into the
encoder weights: the encoder is then a frozen plain ViT again and its embeddings can be cached.

Data (``e2e_transforms``): one sample holds the TransUNet input ``image`` (1,S,S) in [0,1] with its ``label``
(1,S,S), and the SAM image ``sam_image`` (uint8, 0-255) with ``sam_label`` and ``sam_original_size``:

* ``sam_frame="square"`` (training, any batch size): the native image squashed into the S'xS' encoder square with
  the checkpoint's reference resize (MedSAM: skimage, as MedSAM's inference; SAM: the predictor's PIL resize with
  a square target), the label area-resized to the L x L low-res frame (L = S'/4 = 256) where the loss is taken, and
  ``sam_original_size`` = (L, L). With MedSAM preprocessing this is exactly what the encoder sees at inference
  (MedSAM squashes every image to 1024x1024); with SAM preprocessing inference keeps the aspect ratio instead.
* ``sam_frame="native"`` (evaluation; training only with batch size 1): native image and label.

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
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    CopyItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    RandAdjustContrastd,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
)

from ultrarefiner.data.pipeline import load_transforms, spatial_transforms
from ultrarefiner.data.refiner_data import file_digest
from ultrarefiner.engines.checkpoints.checkpoint import check_identity, load_weights, run_identity
from ultrarefiner.engines.checkpoints.refiner_checkpoint import (
    check_encoder,
    load_refiner_checkpoint,
    read_refiner_checkpoint,
)
from ultrarefiner.engines.training.e2e_training import E2EPrepareBatch
from ultrarefiner.errors import BadInputError, UltraRefinerError
from ultrarefiner.networks.lite_medsam import is_lite_medsam
from ultrarefiner.networks.lora import apply_lora, has_lora, merge_lora
from ultrarefiner.networks.sam_geometry import SamGeometry
from ultrarefiner.utils.flags import as_flag

__all__ = [
    "MissingCheckpointError",
    "FlipWithIdd",
    "SamFramed",
    "build_sam_model",
    "build_ultrarefiner",
    "e2e_prepare_batch",
    "e2e_transforms",
    "init_network",
]

logger = logging.getLogger(__name__)

SAM_FRAMES = ("square", "native")
# LoRA target names of ``networks.lora.apply_lora`` by the path of the adapted linear inside a ViT block
_LORA_TARGETS = {"attn.qkv": "qkv", "attn.proj": "proj", "mlp.lin1": "lin1", "mlp.lin2": "lin2"}


class MissingCheckpointError(UltraRefinerError, FileNotFoundError):
    """A phase-1/phase-2 checkpoint that phase 3 starts from does not exist."""


# ------------------------------------------------------------------------------------------------ network
def build_sam_model(model_type: str = "lite_medsam", checkpoint: str | os.PathLike | None = "packaged",
                    **tiny_kwargs: Any):
    """A segment-anything ``Sam``: ``lite_medsam`` (default), ``vit_b``/``vit_l``/``vit_h`` from the registry, or
    ``tiny`` (``build_tiny_sam`` with ``tiny_kwargs``, for tests and smoke runs); weights from ``checkpoint`` as
    ``refiner_setup.init_sam`` reads it (``packaged``/empty: LiteMedSAM's packaged file, ``random``, or a file)."""
    from ultrarefiner.engines.training.refiner_setup import init_sam
    from ultrarefiner.networks.sam_weights import build_sam, build_tiny_sam

    if model_type == "tiny":
        return init_sam(build_tiny_sam(**tiny_kwargs), checkpoint)
    if tiny_kwargs:
        raise ValueError(f"sam kwargs {sorted(tiny_kwargs)} are only valid with model_type 'tiny'")
    return init_sam(build_sam(model_type, None), checkpoint)


def build_ultrarefiner(network_kwargs: Mapping[str, Any], sam_checkpoint: str | os.PathLike | None = None,
                       **ultra_kwargs: Any):
    """``UltraRefiner`` from a ``network_kwargs`` description (module docstring); ``ultra_kwargs`` go to
    ``UltraRefiner`` (``cache_embeddings``, ``cache_dir``, ...). Weights are random (or SAM's ``sam_checkpoint``)."""
    from ultrarefiner.networks import SAMRefiner, TransUNet, UltraRefiner

    unknown = set(network_kwargs) - {"transunet", "sam", "refiner"}
    if unknown or "transunet" not in network_kwargs:
        raise ValueError("network_kwargs needs 'transunet' (and optionally 'sam', 'refiner'), "
                         f"got {sorted(network_kwargs)}")
    transunet = TransUNet(**dict(network_kwargs["transunet"]))
    sam_kwargs = dict(network_kwargs.get("sam") or {})
    if sam_checkpoint is None:  # inference: the weights come from the bundle's model file; LiteMedSAM's are packaged
        lite = sam_kwargs.get("model_type", "lite_medsam") == "lite_medsam"
        sam_checkpoint = "packaged" if lite else "random"
    sam = build_sam_model(checkpoint=sam_checkpoint, **sam_kwargs)
    refiner = SAMRefiner(sam, **dict(network_kwargs.get("refiner") or {}))
    return UltraRefiner(transunet, refiner, **ultra_kwargs)


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
    obj = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else {}
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
        transunet.load_state_dict(load_weights(path), strict=True)
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


def init_network(
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
      transunet_kwargs: the configured TransUNet arguments.
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
    _load_transunet(network.transunet, Path(transunet_ckpt), transunet_kwargs, dataset, fold)
    _load_refiner(network, Path(refiner_ckpt), sam_checkpoint, lora_rank, lora_alpha, dataset, fold)
    logger.info(f"UltraRefiner initialised from {transunet_ckpt} and {refiner_ckpt}")
    return network


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
        """
        keys: KeysCollection = [image_key, label_key]
        super().__init__(keys)
        if frame not in SAM_FRAMES:
            raise ValueError(f"sam_frame must be one of {SAM_FRAMES}, got {frame!r}")
        self.frame = frame
        self.geometry = SamGeometry(preprocessing, encoder_size)
        self.label_size = int(label_size or self.geometry.low_res_size)
        self.image_key, self.label_key, self.size_key = image_key, label_key, size_key
        self.id_key = id_key

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


def e2e_transforms(
    train: bool = False,
    img_size: int = 224,
    sam_frame: str = "native",
    preprocessing: str = "medsam",
    encoder_size: int = 1024,
    label_size: int | None = None,
    flip_prob: float = 0.5,
    intensity_prob: float = 0.5,
    native_keys: Sequence[str] = ("image", "label"),
) -> Compose:
    """Transforms of one phase-3 sample (module docstring) from a datalist item {"image", "label", ...}.

    Arguments:
      train: add the flips and the TransUNet intensity jitter.
      img_size: TransUNet input side.
      sam_frame: ``square`` (training) or ``native`` (evaluation, batch size 1).
      preprocessing, encoder_size, label_size: see ``SamFramed``.
      flip_prob, intensity_prob: augmentation probabilities.
      native_keys: copied to ``<key>_native`` before resizing (evaluation at native resolution, overlays).
    """
    chain: list = [CopyItemsd(keys="image", names="sam_image"), *load_transforms(("image", "label")),
                   LoadImaged(keys="sam_image", reader="PILReader", reverse_indexing=False, image_only=True),
                   EnsureChannelFirstd(keys="sam_image"), CopyItemsd(keys="label", names="sam_label")]
    if native_keys:
        chain.append(CopyItemsd(keys=list(native_keys), names=[f"{k}_native" for k in native_keys]))
    chain.append(SamFramed(sam_frame, preprocessing, encoder_size, label_size))
    chain += spatial_transforms("transunet", ["image", "label"], img_size)
    if train:
        chain += [
            FlipWithIdd(keys=["image", "label", "sam_image", "sam_label"], prob=flip_prob, spatial_axis=1),
            RandAdjustContrastd(keys="image", prob=0.3 * intensity_prob / 0.5, gamma=(0.8, 1.25)),
            RandScaleIntensityd(keys="image", factors=0.1, prob=intensity_prob),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=intensity_prob),
            ScaleIntensityRanged(keys="image", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
        ]
    float_keys = ["image", "label", "sam_label"] + [f"{k}_native" for k in native_keys]
    chain += [EnsureTyped(keys=float_keys, dtype=torch.float32, track_meta=True),
              EnsureTyped(keys="sam_image", dtype=torch.uint8, track_meta=False)]
    return Compose(chain)


def e2e_prepare_batch(train: bool = True) -> E2EPrepareBatch:
    """``E2EPrepareBatch`` for ``e2e_transforms`` samples: training decodes at ``sam_original_size`` against
    ``sam_label`` (coarse loss on the 224 ``label``); evaluation decodes at the native size against
    ``label_native``."""
    if train:
        return E2EPrepareBatch(image_key="image", sam_image_key="sam_image", label_key="sam_label",
                               coarse_label_key="label", original_size_key="sam_original_size")
    return E2EPrepareBatch(image_key="image", sam_image_key="sam_image", label_key="label_native")
