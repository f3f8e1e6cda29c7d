"""LoRA on SAM's image encoder: trainable set, counts, merge, LoRA checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ultrarefiner.networks.lora import (
    LoRALinear,
    apply_lora,
    count_parameters,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
)
from ultrarefiner.networks.sam_refiner import SAMRefiner
from ultrarefiner.networks.sam_weights import build_tiny_sam

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def _randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


@pytest.fixture()
def sam():
    return build_tiny_sam(img_size=128, encoder_depth=2, seed=0)


def test_only_adapters_train_in_encoder_and_counts(sam):
    base_keys = set(sam.state_dict())
    adapted = apply_lora(sam.image_encoder, rank=4, alpha=8.0, target_modules=("qkv", "proj", "mlp"))
    assert adapted == [f"blocks.{i}.{p}" for i in range(2) for p in ("attn.proj", "attn.qkv", "mlp.lin1", "mlp.lin2")]
    trainable = [n for n, p in sam.image_encoder.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    # base weights keep their segment-anything names (a SAM checkpoint still maps onto them)
    assert base_keys <= set(sam.state_dict())
    counts = count_parameters(sam)
    qkv = sam.image_encoder.blocks[0].attn.qkv
    assert qkv.scaling == 2.0 and qkv.lora_A.shape == (4, 32) and qkv.lora_B.shape == (96, 4)
    expected_lora = sum(p.numel() for n, p in sam.named_parameters() if "lora_" in n)
    assert counts["lora"] == expected_lora == counts["trainable/image_encoder"]
    assert counts["trainable"] == expected_lora + sum(
        p.numel() for p in list(sam.prompt_encoder.parameters()) + list(sam.mask_decoder.parameters()))
    assert counts["total"] == sum(p.numel() for p in sam.parameters())


def test_zero_init_then_merge_preserves_outputs(sam):
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        before = sam.image_encoder(x)
    apply_lora(sam.image_encoder, rank=2, alpha=4.0, target_modules=("qkv", "mlp"))
    with torch.no_grad():
        assert torch.allclose(sam.image_encoder(x), before, atol=1e-6)  # lora_B = 0 at init
        _randomize_adapters(sam)
        adapted = sam.image_encoder(x)
    assert not torch.allclose(adapted, before, atol=1e-4)
    merge_lora(sam)
    assert not any(isinstance(m, LoRALinear) for m in sam.modules())
    assert type(sam.image_encoder.blocks[0].attn.qkv) is nn.Linear
    with torch.no_grad():
        merged = sam.image_encoder(x)
    assert torch.allclose(merged, adapted, atol=1e-5)
    fresh = build_tiny_sam(img_size=128, encoder_depth=2, seed=0)
    assert set(sam.state_dict()) == set(fresh.state_dict())  # exportable as a plain SAM checkpoint
    fresh.load_state_dict(sam.state_dict(), strict=True)


def test_dropout_only_on_adapter_path():
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    layer = LoRALinear.from_linear(base, rank=2, alpha=2.0, dropout=0.5)
    x = torch.randn(32, 8)
    with torch.no_grad():
        assert torch.allclose(layer.train()(x), base(x))  # B = 0 at init: the adapted layer is the base layer
        layer.lora_B.normal_(0, 0.5)  # a trained adapter
        update = x @ layer.lora_A.t() @ layer.lora_B.t() * layer.scaling
        evaluated = layer.eval()(x)
        assert torch.allclose(evaluated, base(x) + update, atol=1e-6) and torch.equal(layer(x), evaluated)
        layer.train()
        torch.manual_seed(1)
        trained = layer(x)
        torch.manual_seed(1)  # the same draw: the mask nn.Dropout(0.5) applied to the adapter's input
        mask = nn.functional.dropout(torch.ones_like(x), 0.5, training=True)
        dropped = base(x) + (x * mask) @ layer.lora_A.t() @ layer.lora_B.t() * layer.scaling
    assert not torch.allclose(trained, evaluated, atol=1e-3)  # train mode: dropout changes the output ...
    assert torch.allclose(trained, dropped, atol=1e-6)  # ... on the adapter path only, the base output is whole
    with pytest.raises(ValueError):
        LoRALinear(8, 6, rank=0)


def test_lora_state_dict_keys_and_roundtrip():
    ref = SAMRefiner(build_tiny_sam(img_size=128, encoder_depth=2, seed=0), use_lora=True, lora_rank=2)
    sd = lora_state_dict(ref)
    lora_keys = {k for k in sd if k.startswith("sam.image_encoder.")}
    assert lora_keys == {f"sam.image_encoder.blocks.{i}.attn.qkv.lora_{ab}" for i in range(2) for ab in "AB"}
    others = set(sd) - lora_keys
    assert others and all(k.startswith(("sam.prompt_encoder.", "sam.mask_decoder.")) for k in others)
    assert others == {k for k in ref.state_dict() if k.startswith(("sam.prompt_encoder.", "sam.mask_decoder."))}
    # round trip into a second refiner with the same base weights
    _randomize_adapters(ref, seed=3)
    with torch.no_grad():
        ref.sam.mask_decoder.iou_prediction_head.layers[0].weight.add_(0.1)
    sd = lora_state_dict(ref)
    other = SAMRefiner(build_tiny_sam(img_size=128, encoder_depth=2, seed=0), use_lora=True, lora_rank=2)
    load_lora_state_dict(other, sd)
    for k, v in sd.items():
        assert torch.equal(other.state_dict()[k], v)
    with pytest.raises(KeyError):
        load_lora_state_dict(other, {k: v for k, v in sd.items() if "lora_A" not in k})


def test_bad_targets_rejected(sam):
    with pytest.raises(ValueError):
        apply_lora(sam.image_encoder, target_modules=("qkv", "attention"))
    assert apply_lora(sam.image_encoder, target_modules="proj") == ["blocks.0.attn.proj", "blocks.1.attn.proj"]
    assert apply_lora(sam.image_encoder, target_modules=("proj",)) == []  # idempotent


@pytest.mark.parametrize("bundle", ["sam_refiner", "ultrarefiner"])
def test_bundle_lora_options_decide_the_adapters(bundle):
    """``lora_target_modules`` and ``lora_dropout`` of a training config reach the adapters built on the default
    encoder (LiteMedSAM's TinyViT) and the ``refiner_kwargs`` its checkpoints store."""
    from monai.bundle import ConfigParser

    def build(**overrides) -> tuple[dict, dict[str, LoRALinear]]:
        parser = ConfigParser()
        parser.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
        small = {"img_size": 64, "vit_depth": 1} if bundle == "ultrarefiner" else {}  # phase 3's TransUNet
        parser.update({"use_lora": True, **small, **overrides})
        refiner = parser.get_parsed_content("network_def").refiner
        adapters = {n: m for n, m in refiner.sam.image_encoder.named_modules() if isinstance(m, LoRALinear)}
        return parser.get_parsed_content("refiner_kwargs"), adapters

    kwargs, adapters = build()
    assert kwargs["lora_target_modules"] == ["qkv"] and kwargs["lora_dropout"] == 0.0
    assert adapters and {".".join(n.split(".")[-2:]) for n in adapters} == {"attn.qkv"}
    assert all(isinstance(m.lora_dropout, nn.Identity) for m in adapters.values())
    n_blocks = len(adapters)
    kwargs, adapters = build(lora_target_modules=["proj", "mlp"], lora_dropout=0.2)
    assert kwargs["lora_target_modules"] == ["proj", "mlp"] and kwargs["lora_dropout"] == 0.2
    assert {".".join(n.split(".")[-2:]) for n in adapters} == {"attn.proj", "mlp.fc1", "mlp.fc2"}
    assert len(adapters) == 3 * n_blocks  # the same attention blocks, three linears each
    assert all(isinstance(m.lora_dropout, nn.Dropout) and m.lora_dropout.p == 0.2 for m in adapters.values())
