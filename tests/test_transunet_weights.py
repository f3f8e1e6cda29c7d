"""TransUNet weight loading: Google npz (synthetic files with the real key names and shapes) and original .pth."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ultrarefiner.errors import BadInputError
from ultrarefiner.networks.transunet import TransUNet
from ultrarefiner.networks.transunet_weights import (
    _load_npz_weights,
    load_pretrained_npz,
    load_transunet_checkpoint,
)

D, HEADS, MLP = 768, 12, 3072
R50 = [(3, 64, 256, 64), (4, 256, 512, 128), (9, 512, 1024, 256)]  # (units, cin of unit1, cout, cmid)


def google_npz(hybrid: bool = True, depth: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """Key names and shapes of R50+ViT-B_16.npz / ViT-B_16.npz (ImageNet-21k), random values.

    Names from TransUNet's ``load_from`` / timm's ``_load_weights``; GroupNorm scales as (1, 1, 1, C), which both
    loaders flatten.
    """
    rng = np.random.default_rng(seed)
    w: dict[str, np.ndarray] = {}

    def put(key: str, *shape: int) -> None:
        w[key] = rng.standard_normal(shape, dtype=np.float32)

    if hybrid:
        put("conv_root/kernel", 7, 7, 3, 64)
        put("gn_root/scale", 1, 1, 1, 64)
        put("gn_root/bias", 1, 1, 1, 64)
        for b, (units, cin0, cout, cmid) in enumerate(R50, 1):
            for u in range(1, units + 1):
                p = f"block{b}/unit{u}"
                put(f"{p}/conv1/kernel", 1, 1, cin0 if u == 1 else cout, cmid)
                put(f"{p}/conv2/kernel", 3, 3, cmid, cmid)
                put(f"{p}/conv3/kernel", 1, 1, cmid, cout)
                for g, c in (("gn1", cmid), ("gn2", cmid), ("gn3", cout)):
                    put(f"{p}/{g}/scale", 1, 1, 1, c)
                    put(f"{p}/{g}/bias", 1, 1, 1, c)
                if u == 1:
                    put(f"{p}/conv_proj/kernel", 1, 1, cin0, cout)
                    put(f"{p}/gn_proj/scale", 1, 1, 1, cout)
                    put(f"{p}/gn_proj/bias", 1, 1, 1, cout)
        put("embedding/kernel", 1, 1, 1024, D)
    else:
        put("embedding/kernel", 16, 16, 3, D)
    put("embedding/bias", D)
    put("cls", 1, 1, D)
    put("Transformer/posembed_input/pos_embedding", 1, 1 + 14 * 14, D)
    for i in range(depth):
        p = f"Transformer/encoderblock_{i}"
        for n in ("LayerNorm_0", "LayerNorm_2"):
            put(f"{p}/{n}/scale", D)
            put(f"{p}/{n}/bias", D)
        a = f"{p}/MultiHeadDotProductAttention_1"
        for n in ("query", "key", "value"):
            put(f"{a}/{n}/kernel", D, HEADS, D // HEADS)
            put(f"{a}/{n}/bias", HEADS, D // HEADS)
        put(f"{a}/out/kernel", HEADS, D // HEADS, D)
        put(f"{a}/out/bias", D)
        put(f"{p}/MlpBlock_3/Dense_0/kernel", D, MLP)
        put(f"{p}/MlpBlock_3/Dense_0/bias", MLP)
        put(f"{p}/MlpBlock_3/Dense_1/kernel", MLP, D)
        put(f"{p}/MlpBlock_3/Dense_1/bias", D)
    put("Transformer/encoder_norm/scale", D)
    put("Transformer/encoder_norm/bias", D)
    put("pre_logits/kernel", D, D)
    put("pre_logits/bias", D)
    put("head/kernel", D, 21843)
    put("head/bias", 21843)
    return w


@pytest.fixture(scope="module")
def r50_npz(tmp_path_factory):
    w = google_npz()
    path = tmp_path_factory.mktemp("npz") / "R50+ViT-B_16.npz"
    np.savez(path, **w)
    return w, path


def _eq(t: torch.Tensor, a: np.ndarray) -> bool:
    return torch.equal(t.detach(), torch.from_numpy(np.ascontiguousarray(a)))


def test_full_r50_npz_loads_every_tensor_with_transposes(r50_npz):
    w, path = r50_npz
    model = TransUNet(img_size=224)
    decoder_before = model.decoder.conv_more[0].weight.clone()
    report = load_pretrained_npz(model, path)
    assert report.unused == []  # only head/pre_logits/cls are unused, and those are ignored by name
    assert set(report.not_loaded) == {k for k in model.state_dict() if k.startswith(("decoder.", "segmentation_"))}
    assert torch.equal(model.decoder.conv_more[0].weight, decoder_before)

    bb = model.backbone
    assert _eq(bb.root.conv.weight, w["conv_root/kernel"].transpose(3, 2, 0, 1))
    assert _eq(bb.root.norm.weight, w["gn_root/scale"].reshape(-1))
    unit = bb.stages[2][8]
    assert _eq(unit.conv2.weight, w["block3/unit9/conv2/kernel"].transpose(3, 2, 0, 1))
    assert _eq(unit.norm3.bias, w["block3/unit9/gn3/bias"].reshape(-1))
    proj = bb.stages[1][0].downsample
    assert _eq(proj.conv.weight, w["block2/unit1/conv_proj/kernel"].transpose(3, 2, 0, 1))
    assert _eq(proj.norm.weight, w["block2/unit1/gn_proj/scale"].reshape(-1))
    assert _eq(model.patch_embed.weight, w["embedding/kernel"].transpose(3, 2, 0, 1))
    assert _eq(model.patch_embed.bias, w["embedding/bias"])
    assert _eq(model.pos_embed, w["Transformer/posembed_input/pos_embedding"][:, 1:])  # class token dropped

    blk, p = model.blocks[11], "Transformer/encoderblock_11"
    a = f"{p}/MultiHeadDotProductAttention_1"
    qkv = blk.attn.qkv.weight
    for i, n in enumerate(("query", "key", "value")):
        # TransUNet: np2th(kernel).view(768, 768).t()
        assert _eq(qkv[i * D : (i + 1) * D], w[f"{a}/{n}/kernel"].reshape(D, D).T)
        assert _eq(blk.attn.qkv.bias[i * D : (i + 1) * D], w[f"{a}/{n}/bias"].reshape(-1))
    assert _eq(blk.attn.proj.weight, w[f"{a}/out/kernel"].reshape(D, D).T)
    assert _eq(blk.attn.proj.bias, w[f"{a}/out/bias"])
    assert _eq(blk.mlp.fc1.weight, w[f"{p}/MlpBlock_3/Dense_0/kernel"].T)
    assert _eq(blk.mlp.fc2.weight, w[f"{p}/MlpBlock_3/Dense_1/kernel"].T)
    assert _eq(blk.mlp.fc2.bias, w[f"{p}/MlpBlock_3/Dense_1/bias"])
    assert _eq(blk.norm1.weight, w[f"{p}/LayerNorm_0/scale"])
    assert _eq(blk.norm2.bias, w[f"{p}/LayerNorm_2/bias"])
    assert _eq(model.norm.weight, w["Transformer/encoder_norm/scale"])


def test_pos_embed_resized_and_extra_blocks_listed(r50_npz):
    w, path = r50_npz
    model = TransUNet(img_size=64, vit_depth=2)
    report = load_pretrained_npz(model, path)
    assert model.pos_embed.shape == (1, 16, D)
    grid = torch.from_numpy(w["Transformer/posembed_input/pos_embedding"][:, 1:]).reshape(1, 14, 14, D)
    ref = torch.nn.functional.interpolate(grid.permute(0, 3, 1, 2), size=(4, 4), mode="bilinear")
    assert torch.allclose(model.pos_embed.detach(), ref.permute(0, 2, 3, 1).reshape(1, 16, D))
    assert report.unused and all(k.startswith("Transformer/encoderblock_") for k in report.unused)
    assert "Transformer/encoderblock_2/LayerNorm_0/scale" in report.unused
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 1, 64, 64)).shape == (1, 2, 64, 64)


def test_missing_and_misshaped_keys_name_the_key(r50_npz):
    w, _ = r50_npz
    model = TransUNet(img_size=32, vit_depth=1)
    missing = {k: v for k, v in w.items() if k != "block2/unit3/gn2/scale"}
    with pytest.raises(BadInputError, match="block2/unit3/gn2/scale"):
        _load_npz_weights(model, missing, "x.npz")
    bad = dict(w)
    bad["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"] = np.zeros((D, 3000), np.float32)
    with pytest.raises(BadInputError, match=r"Dense_0/kernel' has shape \(768, 3000\), expected \(768, 3072\)"):
        _load_npz_weights(model, bad, "x.npz")


def test_vit_b16_npz_file_and_errors(tmp_path):
    w = google_npz(hybrid=False, depth=1)
    good, missing = tmp_path / "ViT-B_16.npz", tmp_path / "missing.npz"
    np.savez(good, **w)
    np.savez(missing, **{k: v for k, v in w.items() if k != "Transformer/encoder_norm/bias"})
    model = TransUNet(img_size=32, variant="ViT-B_16", vit_depth=1)
    load_pretrained_npz(model, good)
    assert _eq(model.patch_embed.weight, w["embedding/kernel"].transpose(3, 2, 0, 1))
    with pytest.raises(BadInputError, match="encoder_norm/bias") as e:
        load_pretrained_npz(model, missing)
    assert str(missing) in str(e.value)
    with pytest.raises(BadInputError, match="conv_root/kernel"):  # ViT-only file into the hybrid
        load_pretrained_npz(TransUNet(img_size=32, vit_depth=1), good)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(BadInputError, match="junk.npz"):
        load_pretrained_npz(model, junk)


def transunet_state_dict(depth: int, grid: int, num_classes: int = 2) -> dict[str, torch.Tensor]:
    """Key layout of a state dict saved by Beckschen/TransUNet's VisionTransformer (R50-ViT-B_16, n_skip=3)."""
    g = torch.Generator().manual_seed(1)
    s: dict[str, torch.Tensor] = {}

    def put(key: str, *shape: int) -> None:  # scaled so that activations stay O(1) through the random network
        t = torch.randn(shape, generator=g)
        if len(shape) >= 2 and "position" not in key:
            t = t / float(np.prod(shape[1:])) ** 0.5
        elif "position" in key or not key.endswith(".weight"):
            t = 0.1 * t
        else:  # norm scales
            t = 1 + 0.1 * t
        s[key] = t.abs() + 0.5 if key.endswith("running_var") else t

    h = "transformer.embeddings.hybrid_model"
    put(f"{h}.root.conv.weight", 64, 3, 7, 7)
    put(f"{h}.root.gn.weight", 64)
    put(f"{h}.root.gn.bias", 64)
    for b, (units, cin0, cout, cmid) in enumerate(R50, 1):
        for u in range(1, units + 1):
            p = f"{h}.body.block{b}.unit{u}"
            put(f"{p}.conv1.weight", cmid, cin0 if u == 1 else cout, 1, 1)
            put(f"{p}.conv2.weight", cmid, cmid, 3, 3)
            put(f"{p}.conv3.weight", cout, cmid, 1, 1)
            for n, c in (("gn1", cmid), ("gn2", cmid), ("gn3", cout)):
                put(f"{p}.{n}.weight", c)
                put(f"{p}.{n}.bias", c)
            if u == 1:
                put(f"{p}.downsample.weight", cout, cin0, 1, 1)
                put(f"{p}.gn_proj.weight", cout)
                put(f"{p}.gn_proj.bias", cout)
    put("transformer.embeddings.patch_embeddings.weight", D, 1024, 1, 1)
    put("transformer.embeddings.patch_embeddings.bias", D)
    put("transformer.embeddings.position_embeddings", 1, grid * grid, D)
    for i in range(depth):
        p = f"transformer.encoder.layer.{i}"
        for n in ("attention_norm", "ffn_norm"):
            put(f"{p}.{n}.weight", D)
            put(f"{p}.{n}.bias", D)
        put(f"{p}.ffn.fc1.weight", MLP, D)
        put(f"{p}.ffn.fc1.bias", MLP)
        put(f"{p}.ffn.fc2.weight", D, MLP)
        put(f"{p}.ffn.fc2.bias", D)
        for n in ("query", "key", "value", "out"):
            put(f"{p}.attn.{n}.weight", D, D)
            put(f"{p}.attn.{n}.bias", D)
    put("transformer.encoder.encoder_norm.weight", D)
    put("transformer.encoder.encoder_norm.bias", D)

    def conv_bn(p: str, cin: int, cout: int) -> None:
        put(f"{p}.0.weight", cout, cin, 3, 3)
        for n in ("weight", "bias", "running_mean", "running_var"):
            put(f"{p}.1.{n}", cout)
        s[f"{p}.1.num_batches_tracked"] = torch.tensor(7)

    conv_bn("decoder.conv_more", D, 512)
    for i, (cin, cout, skip) in enumerate(zip((512, 256, 128, 64), (256, 128, 64, 16), (512, 256, 64, 0), strict=True)):
        conv_bn(f"decoder.blocks.{i}.conv1", cin + skip, cout)
        conv_bn(f"decoder.blocks.{i}.conv2", cout, cout)
    put("segmentation_head.0.weight", num_classes, 16, 3, 3)
    put("segmentation_head.0.bias", num_classes)
    return s


def test_original_transunet_checkpoint_loads(tmp_path):
    sd = transunet_state_dict(depth=2, grid=2)
    path = tmp_path / "epoch_149.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)  # saved from nn.DataParallel
    model = load_transunet_checkpoint(TransUNet(img_size=32, vit_depth=2), path)
    layer = "transformer.encoder.layer.1"
    qkv = torch.cat([sd[f"{layer}.attn.{n}.weight"] for n in ("query", "key", "value")])
    assert torch.equal(model.blocks[1].attn.qkv.weight, qkv)
    assert torch.equal(model.blocks[1].attn.proj.bias, sd[f"{layer}.attn.out.bias"])
    assert torch.equal(model.blocks[1].norm2.weight, sd[f"{layer}.ffn_norm.weight"])
    h = "transformer.embeddings.hybrid_model.body"
    assert torch.equal(model.backbone.stages[0][0].downsample.norm.weight, sd[f"{h}.block1.unit1.gn_proj.weight"])
    assert torch.equal(model.backbone.stages[2][5].norm2.bias, sd[f"{h}.block3.unit6.gn2.bias"])
    assert torch.equal(model.decoder.blocks[2].conv1[1].running_var, sd["decoder.blocks.2.conv1.1.running_var"])
    assert torch.equal(model.pos_embed, sd["transformer.embeddings.position_embeddings"])

    short = tmp_path / "short.pth"
    torch.save({k: v for k, v in sd.items() if k != "decoder.conv_more.0.weight"}, short)
    with pytest.raises(BadInputError, match="decoder.conv_more.0.weight"):
        load_transunet_checkpoint(TransUNet(img_size=32, vit_depth=2), short)
    with pytest.raises(BadInputError, match=r"position_embeddings' has shape \(1, 4, 768\), expected \(1, 16, 768\)"):
        load_transunet_checkpoint(TransUNet(img_size=64, vit_depth=2), path)
    with pytest.raises(BadInputError, match="layer.2"):  # a deeper checkpoint is a different architecture
        torch.save(transunet_state_dict(depth=3, grid=2), short)
        load_transunet_checkpoint(TransUNet(img_size=32, vit_depth=2), short)


def reference_forward(s: dict[str, torch.Tensor], x: torch.Tensor, depth: int, heads: int = HEADS) -> torch.Tensor:
    """TransUNet's R50-ViT-B_16 forward (eval mode, n_skip=3) in plain functional torch, read off its state dict.

    Written independently from the paper's code semantics: StdConv (eps 1e-5), root padding 3, max-pool padding 0
    with zero-padded skips, GroupNorm eps 1e-6 / per-channel projection GroupNorm, no class token, separate q/k/v,
    BatchNorm decoder with align_corners bilinear upsampling.
    """

    def std(w: torch.Tensor) -> torch.Tensor:
        v, m = torch.var_mean(w, dim=[1, 2, 3], keepdim=True, unbiased=False)
        return (w - m) / torch.sqrt(v + 1e-5)

    def gn(y: torch.Tensor, p: str, groups: int = 32, eps: float = 1e-6) -> torch.Tensor:
        return F.group_norm(y, groups, s[f"{p}.weight"], s[f"{p}.bias"], eps)

    def ln(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.layer_norm(t, (D,), s[f"{p}.weight"], s[f"{p}.bias"], 1e-6)

    size = x.shape[-1]
    x = x.repeat(1, 3, 1, 1)
    h = "transformer.embeddings.hybrid_model"
    y = F.relu(gn(F.conv2d(x, std(s[f"{h}.root.conv.weight"]), stride=2, padding=3), f"{h}.root.gn"))
    feats = [y]
    y = F.max_pool2d(y, 3, 2)
    for b, (units, *_) in enumerate(R50, 1):
        for u in range(1, units + 1):
            p, stride = f"{h}.body.block{b}.unit{u}", 2 if (u == 1 and b > 1) else 1
            res = y
            if u == 1:
                res = F.conv2d(y, std(s[f"{p}.downsample.weight"]), stride=stride)
                res = gn(res, f"{p}.gn_proj", groups=res.shape[1], eps=1e-5)
            z = F.relu(gn(F.conv2d(y, std(s[f"{p}.conv1.weight"])), f"{p}.gn1"))
            z = F.relu(gn(F.conv2d(z, std(s[f"{p}.conv2.weight"]), stride=stride, padding=1), f"{p}.gn2"))
            z = gn(F.conv2d(z, std(s[f"{p}.conv3.weight"])), f"{p}.gn3")
            y = F.relu(res + z)
        if b < 3:
            right = size // 4 // b
            feat = torch.zeros(y.shape[0], y.shape[1], right, right)
            feat[:, :, : y.shape[2], : y.shape[3]] = y
            feats.append(feat)
    e = "transformer.embeddings"
    t = F.conv2d(y, s[f"{e}.patch_embeddings.weight"], s[f"{e}.patch_embeddings.bias"]).flatten(2).transpose(1, 2)
    t = t + s[f"{e}.position_embeddings"]
    for i in range(depth):
        p = f"transformer.encoder.layer.{i}"
        z = ln(t, f"{p}.attention_norm")
        q, k, v = (
            F.linear(z, s[f"{p}.attn.{n}.weight"], s[f"{p}.attn.{n}.bias"]).unflatten(-1, (heads, -1)).transpose(1, 2)
            for n in ("query", "key", "value")
        )
        a = torch.softmax(q @ k.transpose(-1, -2) / (D // heads) ** 0.5, -1) @ v
        t = t + F.linear(a.transpose(1, 2).flatten(2), s[f"{p}.attn.out.weight"], s[f"{p}.attn.out.bias"])
        z = F.gelu(F.linear(ln(t, f"{p}.ffn_norm"), s[f"{p}.ffn.fc1.weight"], s[f"{p}.ffn.fc1.bias"]))
        t = t + F.linear(z, s[f"{p}.ffn.fc2.weight"], s[f"{p}.ffn.fc2.bias"])
    t = ln(t, "transformer.encoder.encoder_norm")
    g = int(t.shape[1] ** 0.5)
    y = t.transpose(1, 2).reshape(t.shape[0], D, g, g)

    def cbr(y: torch.Tensor, p: str) -> torch.Tensor:
        y = F.conv2d(y, s[f"{p}.0.weight"], padding=1)
        bn = [s[f"{p}.1.{n}"] for n in ("running_mean", "running_var", "weight", "bias")]
        return F.relu(F.batch_norm(y, *bn, training=False, eps=1e-5))

    y = cbr(y, "decoder.conv_more")
    skips = feats[::-1]
    for i in range(4):
        y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=True)
        if i < 3:
            y = torch.cat([y, skips[i]], 1)
        y = cbr(cbr(y, f"decoder.blocks.{i}.conv1"), f"decoder.blocks.{i}.conv2")
    return F.conv2d(y, s["segmentation_head.0.weight"], s["segmentation_head.0.bias"], padding=1)


def test_loaded_transunet_checkpoint_computes_what_transunet_computes(tmp_path):
    sd = transunet_state_dict(depth=2, grid=2)
    path = tmp_path / "transunet.pth"
    torch.save(sd, path)
    model = load_transunet_checkpoint(TransUNet(img_size=32, vit_depth=2), path).eval()
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, ref = model(x), reference_forward(sd, x, depth=2)
    assert ref.abs().max() > 1e-2
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max(), float((ours - ref).abs().max())
