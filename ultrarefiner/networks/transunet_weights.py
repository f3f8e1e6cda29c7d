"""Loading weights into ``TransUNet``: Google's ImageNet-21k npz files and original TransUNet ``.pth`` checkpoints.

npz layout (``R50+ViT-B_16.npz`` / ``ViT-B_16.npz``, as read by TransUNet's ``load_from`` and timm's
``_load_weights``): ``conv_root/kernel`` (7,7,3,64) HWIO, ``gn_root/scale|bias``,
``block{b}/unit{u}/conv{1,2,3}/kernel``, ``.../gn{1,2,3}/scale|bias``, ``.../conv_proj/kernel``, ``.../gn_proj/...``,
``embedding/kernel|bias``, ``cls``, ``Transformer/posembed_input/pos_embedding`` (1, 1+14*14, 768),
``Transformer/encoderblock_{i}/{LayerNorm_0,LayerNorm_2}/scale|bias``,
``.../MultiHeadDotProductAttention_1/{query,key,value}/kernel`` (768, 12, 64) and ``/bias`` (12, 64),
``.../out/kernel`` (12, 64, 768), ``.../MlpBlock_3/Dense_{0,1}/kernel`` (in, out),
``Transformer/encoder_norm/scale|bias``, ``head/*``, ``pre_logits/*``. GroupNorm parameters may be stored as (C,)
or (1, 1, 1, C); both are accepted (TransUNet and timm flatten them).

Conversions as TransUNet's ``np2th``: convs HWIO -> OIHW, dense kernels transposed, attention kernels reshaped to
(768, 768) and transposed, query/key/value concatenated into timm's fused ``qkv``.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ultrarefiner.errors import BadInputError
from ultrarefiner.utils.io import read_checkpoint

from .transunet import TransUNet

logger = logging.getLogger(__name__)

# Keys of the classification model that a segmentation network has no use for.
IGNORED_NPZ_PREFIXES = ("head/", "pre_logits/")
IGNORED_NPZ_KEYS = ("cls",)


@dataclass
class LoadReport:
    """What a load did: model tensors set, file keys not used (ignored head keys excluded), model tensors left as is."""

    loaded: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    not_loaded: list[str] = field(default_factory=list)


def _conv(a: np.ndarray) -> np.ndarray:
    return a.transpose(3, 2, 0, 1)


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1)


def _dense(a: np.ndarray) -> np.ndarray:
    return a.T


def _attn_in(a: np.ndarray) -> np.ndarray:  # (dim, heads, head_dim) -> (heads*head_dim, dim)
    return a.reshape(a.shape[0], -1).T


def _attn_out(a: np.ndarray) -> np.ndarray:  # (heads, head_dim, dim) -> (dim, heads*head_dim)
    return a.reshape(-1, a.shape[-1]).T


def _hwio(w: torch.Tensor) -> tuple[int, ...]:
    return tuple(w.shape[2:]) + (w.shape[1], w.shape[0])


# One entry per model tensor: (model key, [(npz key, expected file shape, converter), ...]); several npz keys are
# concatenated along dim 0 (query/key/value -> qkv).
_Entry = tuple[str, list[tuple[str, tuple[tuple[int, ...], ...], Callable[[np.ndarray], np.ndarray]]]]


def _norm_shapes(n: int) -> tuple[tuple[int, ...], ...]:
    return ((n,), (1, 1, 1, n))


def _npz_plan(model: TransUNet) -> list[_Entry]:
    sd = model.state_dict()
    plan: list[_Entry] = []

    def conv(key: str, npz: str) -> None:
        plan.append((key, [(npz, (_hwio(sd[key]),), _conv)]))

    def norm(prefix: str, npz: str) -> None:
        n = sd[f"{prefix}.weight"].shape[0]
        plan.append((f"{prefix}.weight", [(f"{npz}/scale", _norm_shapes(n), _flat)]))
        plan.append((f"{prefix}.bias", [(f"{npz}/bias", _norm_shapes(n), _flat)]))

    if model.backbone is not None:
        conv("backbone.root.conv.weight", "conv_root/kernel")
        norm("backbone.root.norm", "gn_root")
        for i, stage in enumerate(model.backbone.stages):
            for j, block in enumerate(stage):
                p, f = f"backbone.stages.{i}.{j}", f"block{i + 1}/unit{j + 1}"
                for r in (1, 2, 3):
                    conv(f"{p}.conv{r}.weight", f"{f}/conv{r}/kernel")
                    norm(f"{p}.norm{r}", f"{f}/gn{r}")
                if block.downsample is not None:
                    conv(f"{p}.downsample.conv.weight", f"{f}/conv_proj/kernel")
                    norm(f"{p}.downsample.norm", f"{f}/gn_proj")
    conv("patch_embed.weight", "embedding/kernel")
    d = sd["patch_embed.bias"].shape[0]
    plan.append(("patch_embed.bias", [("embedding/bias", ((d,),), _flat)]))
    heads = model.blocks[0].attn.num_heads if len(model.blocks) else 1
    for i, block in enumerate(model.blocks):
        p, f = f"blocks.{i}", f"Transformer/encoderblock_{i}"
        mlp = block.mlp.fc1.weight.shape[0]
        att = f"{f}/MultiHeadDotProductAttention_1"
        plan.append((f"{p}.norm1.weight", [(f"{f}/LayerNorm_0/scale", ((d,),), _flat)]))
        plan.append((f"{p}.norm1.bias", [(f"{f}/LayerNorm_0/bias", ((d,),), _flat)]))
        qkv_w = [(f"{att}/{n}/kernel", ((d, heads, d // heads),), _attn_in) for n in ("query", "key", "value")]
        qkv_b = [(f"{att}/{n}/bias", ((heads, d // heads),), _flat) for n in ("query", "key", "value")]
        plan.append((f"{p}.attn.qkv.weight", qkv_w))
        plan.append((f"{p}.attn.qkv.bias", qkv_b))
        plan.append((f"{p}.attn.proj.weight", [(f"{att}/out/kernel", ((heads, d // heads, d),), _attn_out)]))
        plan.append((f"{p}.attn.proj.bias", [(f"{att}/out/bias", ((d,),), _flat)]))
        plan.append((f"{p}.norm2.weight", [(f"{f}/LayerNorm_2/scale", ((d,),), _flat)]))
        plan.append((f"{p}.norm2.bias", [(f"{f}/LayerNorm_2/bias", ((d,),), _flat)]))
        plan.append((f"{p}.mlp.fc1.weight", [(f"{f}/MlpBlock_3/Dense_0/kernel", ((d, mlp),), _dense)]))
        plan.append((f"{p}.mlp.fc1.bias", [(f"{f}/MlpBlock_3/Dense_0/bias", ((mlp,),), _flat)]))
        plan.append((f"{p}.mlp.fc2.weight", [(f"{f}/MlpBlock_3/Dense_1/kernel", ((mlp, d),), _dense)]))
        plan.append((f"{p}.mlp.fc2.bias", [(f"{f}/MlpBlock_3/Dense_1/bias", ((d,),), _flat)]))
    plan.append(("norm.weight", [("Transformer/encoder_norm/scale", ((d,),), _flat)]))
    plan.append(("norm.bias", [("Transformer/encoder_norm/bias", ((d,),), _flat)]))
    return plan


def resize_pos_embed(posemb: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """(1, [1 +] g*g, D) checkpoint position embedding -> (1, grid_size[0]*grid_size[1], D), class token dropped.

    A leading class-token embedding is recognised by the token count not being a square.
    """
    from timm.layers import resample_abs_pos_embed

    n = posemb.shape[1]
    prefix = 0 if int(round(n**0.5)) ** 2 == n else 1
    posemb = posemb[:, prefix:]
    return resample_abs_pos_embed(
        posemb, list(grid_size), num_prefix_tokens=0, interpolation="bilinear", antialias=False
    )


def _check_pos_embed(path: object, key: str, shape: tuple[int, ...], dim: int) -> None:
    n = shape[1] if len(shape) == 3 else -1
    square = n > 0 and (int(round(n**0.5)) ** 2 == n or int(round((n - 1) ** 0.5)) ** 2 == n - 1)
    if len(shape) != 3 or shape[0] != 1 or shape[2] != dim or not square:
        raise BadInputError(path, f"key '{key}' has shape {shape}, expected (1, [1 +] g*g, {dim})")


def load_pretrained_npz(model: TransUNet, path: str | os.PathLike) -> LoadReport:
    """Set ``model``'s encoder from a Google ViT npz (``R50+ViT-B_16.npz`` for the hybrid, ``ViT-B_16.npz`` otherwise).

    Every encoder tensor must come from the file (a missing or mis-shaped key raises ``BadInputError`` naming the key
    and both shapes); the decoder and segmentation head keep their initialisation. File keys not used are returned in
    the report and logged, apart from the classification head (``head/*``, ``pre_logits/*``, ``cls``). The position
    embedding is resized to ``model.grid_size`` when the file's grid differs.
    """
    try:
        with np.load(path) as npz:
            weights = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise BadInputError(path, f"cannot read as an npz file ({e})") from e
    return _load_npz_weights(model, weights, path)


def _load_npz_weights(model: TransUNet, weights: Mapping[str, np.ndarray], path: object) -> LoadReport:
    sd = model.state_dict()
    report = LoadReport()
    used: set[str] = set()
    new: dict[str, torch.Tensor] = {}
    for key, sources in _npz_plan(model):
        parts = []
        for npz_key, shapes, convert in sources:
            if npz_key not in weights:
                raise BadInputError(path, f"key '{npz_key}' missing (needed for {key} {tuple(sd[key].shape)})")
            a = np.asarray(weights[npz_key])
            if a.shape not in shapes:
                raise BadInputError(path, f"key '{npz_key}' has shape {a.shape}, expected {shapes[0]} for {key}")
            parts.append(torch.from_numpy(np.ascontiguousarray(convert(a))))
            used.add(npz_key)
        new[key] = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
    pos_key = "Transformer/posembed_input/pos_embedding"
    if pos_key not in weights:
        raise BadInputError(path, f"key '{pos_key}' missing (needed for pos_embed {tuple(sd['pos_embed'].shape)})")
    posemb = np.asarray(weights[pos_key])
    _check_pos_embed(path, pos_key, posemb.shape, sd["pos_embed"].shape[-1])
    new["pos_embed"] = resize_pos_embed(torch.from_numpy(posemb), model.grid_size)
    used.add(pos_key)

    encoder = {k for k in sd if not k.startswith(("decoder.", "segmentation_head."))}
    if encoder != set(new):  # a model/plan mismatch is a bug here, not bad input
        raise RuntimeError(f"npz plan does not cover the encoder: {sorted(encoder ^ set(new))}")
    with torch.no_grad():
        for key, value in new.items():
            sd[key].copy_(value.to(sd[key].dtype))
    report.loaded = sorted(new)
    report.not_loaded = sorted(set(sd) - encoder)
    ignored = [k for k in weights if k in IGNORED_NPZ_KEYS or k.startswith(IGNORED_NPZ_PREFIXES)]
    report.unused = sorted(set(weights) - used - set(ignored))
    if report.unused:
        logger.warning(f"{path}: {len(report.unused)} keys not used: {', '.join(report.unused)}")
    logger.info(f"{path}: loaded {len(report.loaded)} encoder tensors")
    return report


def transunet_key_map(model: TransUNet) -> dict[str, list[str]]:
    """Model key -> keys of an original TransUNet state dict (several for the fused qkv, concatenated in order)."""
    m: dict[str, list[str]] = {}
    emb = "transformer.embeddings"
    hyb = f"{emb}.hybrid_model"
    for key in model.state_dict():
        if key.startswith(("decoder.", "segmentation_head.")):
            m[key] = [key]  # decoder modules mirror TransUNet's names
        elif key == "pos_embed":
            m[key] = [f"{emb}.position_embeddings"]
        elif key.startswith("patch_embed."):
            m[key] = [f"{emb}.patch_embeddings.{key.split('.')[-1]}"]
        elif key.startswith("backbone.root."):
            m[key] = [f"{hyb}.root.{key.split('.', 2)[2].replace('norm', 'gn')}"]
        elif key.startswith("backbone.stages."):
            _, _, i, j, rest = key.split(".", 4)
            rest = {"downsample.conv.weight": "downsample.weight", "downsample.norm.weight": "gn_proj.weight"}.get(
                rest, rest
            )
            rest = rest.replace("downsample.norm.bias", "gn_proj.bias").replace("norm", "gn")
            m[key] = [f"{hyb}.body.block{int(i) + 1}.unit{int(j) + 1}.{rest}"]
        elif key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            p = f"transformer.encoder.layer.{i}"
            if rest.startswith("attn.qkv."):
                m[key] = [f"{p}.attn.{n}.{rest.split('.')[-1]}" for n in ("query", "key", "value")]
            else:
                for a, b in (
                    ("norm1", "attention_norm"),
                    ("norm2", "ffn_norm"),
                    ("mlp.", "ffn."),
                    ("attn.proj", "attn.out"),
                ):
                    rest = rest.replace(a, b)
                m[key] = [f"{p}.{rest}"]
        elif key.startswith("norm."):
            m[key] = [f"transformer.encoder.encoder_norm.{key.split('.')[-1]}"]
        else:
            raise RuntimeError(f"no TransUNet name for {key}")
    return m


def load_transunet_checkpoint(model: TransUNet, path: str | os.PathLike) -> TransUNet:
    """Load a ``.pth`` state dict saved by the original TransUNet code (``torch.save(net.state_dict(), ...)``).

    A ``module.`` prefix (DataParallel) is stripped and a ``{"state_dict": ...}``/``{"model": ...}`` wrapper
    unwrapped. All keys must match: a missing or mis-shaped key raises ``BadInputError`` naming it and both shapes;
    keys the model has no use for are an error too, since they mean a different architecture. Returns ``model``.
    """
    state = read_checkpoint(path, "TransUNet checkpoint")
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise BadInputError(path, f"expected a state dict, got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    sd = model.state_dict()
    used: set[str] = set()
    new: dict[str, torch.Tensor] = {}
    for key, sources in transunet_key_map(model).items():
        parts = []
        for src in sources:
            if src not in state:
                raise BadInputError(path, f"key '{src}' missing (needed for {key} {tuple(sd[key].shape)})")
            parts.append(state[src])
            used.add(src)
        value = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
        if value.shape != sd[key].shape:
            expected = tuple(sd[key].shape) if len(parts) == 1 else (sd[key].shape[0] // 3, *sd[key].shape[1:])
            raise BadInputError(path, f"key '{sources[0]}' has shape {tuple(parts[0].shape)}, expected {expected}")
        new[key] = value
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise BadInputError(path, f"{len(unexpected)} keys not in this TransUNet ({model.variant}): {unexpected[:10]}")
    model.load_state_dict(new, strict=True)
    return model
