"""TransUNet network: shapes, variants, TransUNet encoder details, channels_last, bf16 autocast, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ultrarefiner.networks import TransUNet


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return TransUNet(img_size=32, vit_depth=1)


def test_output_shape_and_grayscale_equals_rgb(tiny):
    model = tiny.eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, 2, 32, 32)
        rgb = TransUNet(img_size=32, vit_depth=1, in_channels=3)
        rgb.load_state_dict(model.state_dict())
        assert torch.allclose(rgb.eval()(x.repeat(1, 3, 1, 1)), y, atol=1e-5)
    with pytest.raises(ValueError, match="32x32"):
        model(torch.rand(1, 1, 48, 48))


def test_vit_variant_has_no_skips():
    model = TransUNet(img_size=32, variant="ViT-B_16", vit_depth=1, num_classes=3).eval()
    assert model.backbone is None
    assert all(b.skip_channels == 0 for b in model.decoder.blocks)
    with torch.no_grad():
        assert model(torch.rand(1, 1, 32, 32)).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="variant"):
        TransUNet(variant="R26")


def test_encoder_matches_transunet_definitions(tiny):
    bb = tiny.backbone
    # StdConv2d of TransUNet: (w - mean) / sqrt(var + 1e-5), padding 3 on the 7x7/2 root
    x = torch.rand(1, 3, 32, 32)
    w = bb.root.conv.weight
    v, m = torch.var_mean(w, dim=[1, 2, 3], keepdim=True, unbiased=False)
    ref = F.conv2d(x, (w - m) / torch.sqrt(v + 1e-5), None, 2, 3)
    assert torch.allclose(bb.root.conv(x), ref, atol=1e-5)
    assert bb.root.norm.eps == 1e-6 and bb.root.norm.num_groups == 32
    proj = bb.stages[1][0].downsample.norm
    assert proj.num_groups == proj.num_channels == 512 and proj.eps == 1e-5  # GroupNorm(cout, cout)
    assert bb.stages[1][0].conv2.stride == (2, 2) and bb.stages[1][0].conv2.padding == (1, 1)
    assert tiny.pos_embed.shape == (1, 4, 768)  # no class token
    assert tiny.blocks[0].norm1.eps == 1e-6
    with torch.no_grad():
        _, skips = bb(x)
    # stage-1 output is 7x7 after the padding-0 pool at 32; zero-padded to 8x8 bottom/right
    assert [tuple(s.shape[1:]) for s in skips] == [(512, 4, 4), (256, 8, 8), (64, 16, 16)]
    assert torch.all(skips[1][..., 7, :] == 0) and torch.all(skips[1][..., :, 7] == 0)


def test_channels_last_and_bf16_autocast(tiny):
    model = tiny.eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        model.to(memory_format=torch.contiguous_format)
        assert torch.allclose(cl, ref, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
    assert y.shape == ref.shape and torch.isfinite(y).all()
    assert (y.float().argmax(1) == ref.argmax(1)).float().mean() > 0.8


def test_gradients_reach_resnet_vit_and_decoder():
    torch.manual_seed(0)
    model = TransUNet(img_size=32, vit_depth=2).train()
    x = torch.rand(2, 1, 32, 32)
    target = (torch.rand(2, 32, 32) > 0.5).long()
    F.cross_entropy(model(x), target).backward()
    named = dict(model.named_parameters())
    for key in (
        "backbone.root.conv.weight",
        "backbone.stages.0.0.conv1.weight",
        "backbone.stages.2.8.norm3.weight",
        "patch_embed.weight",
        "pos_embed",
        "blocks.0.attn.qkv.weight",
        "blocks.1.mlp.fc2.weight",
        "norm.weight",
        "decoder.conv_more.0.weight",
        "decoder.blocks.3.conv2.0.weight",
        "segmentation_head.0.weight",
    ):
        grad = named[key].grad
        assert grad is not None and grad.abs().sum() > 0, key
    assert all(p.grad is not None for p in model.parameters())
