"""The bundles' ``compile`` option (``ultrarefiner.utils.compile``): which parts it compiles, that checkpoints keep
their keys, and that a compiled phase-3 step computes what the eager one does (CPU inductor; minutes: slow)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from test_bundle_sam_refiner import TINY as SR_TINY
from test_bundle_transunet import TINY as TU_TINY
from test_bundle_ultrarefiner import TINY as UR_TINY
from torch._dynamo.utils import counters

from ultrarefiner.engines.training.bundle_engines import bundle_config
from ultrarefiner.engines.training.e2e_training import E2EPrepareBatch, build_e2e_optimizer
from ultrarefiner.networks import SAMRefiner, TransUNet, UltraRefiner, build_tiny_sam
from ultrarefiner.utils.compile import compile_network, compiled_parts

CPU = {"device": "$torch.device('cpu')", "amp": False}
TINY = {"transunet": TU_TINY, "sam_refiner": SR_TINY, "ultrarefiner": {**UR_TINY, "from_scratch": True}}
PARTS = {"transunet": ["TransUNet"], "sam_refiner": ["TwoWayTransformer"],
         "ultrarefiner": ["TransUNet", "TwoWayTransformer"]}


def is_compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


@pytest.mark.parametrize("bundle", ["transunet", "sam_refiner", "ultrarefiner"])
def test_training_configs_compile_on_request(bundle, tmp_path):
    """``--compile true`` compiles the trainable parts of the bundle's network in place; the state dict (what the
    checkpoints hold) keeps its keys; off by default."""
    overrides = {**CPU, **TINY[bundle], "ckpt_root": str(tmp_path)}
    eager = bundle_config(bundle, overrides).get_parsed_content("network")
    compiled = bundle_config(bundle, {**overrides, "compile": "true",
                                      "compile_kwargs": {"mode": "reduce-overhead"}}).get_parsed_content("network")
    assert not any(is_compiled(m) for m in eager.modules())
    parts = compiled_parts(compiled)
    assert sorted({type(m).__name__ for m in parts}) == PARTS[bundle]
    assert all(is_compiled(m) for m in parts)
    assert not any(is_compiled(m) for m in compiled.modules() if m not in parts)  # the frozen encoder is not
    assert list(compiled.state_dict()) == list(eager.state_dict())


def test_compile_refuses_a_network_without_parts():
    assert compile_network(torch.nn.Conv2d(1, 1, 3), "false") is not None  # off: anything goes
    with pytest.raises(ValueError, match="compile: Conv2d holds no TransUNet"):
        compile_network(torch.nn.Conv2d(1, 1, 3), True)
    with pytest.raises(ValueError, match="--compile: expected true or false"):
        compile_network(torch.nn.Conv2d(1, 1, 3), "maybe")


def _model() -> UltraRefiner:
    torch.manual_seed(0)
    transunet = TransUNet(img_size=32, vit_depth=1, hidden_size=32, num_heads=2, mlp_dim=64, block_units=(1, 1, 1),
                          decoder_channels=(32, 16, 16, 8))
    refiner = SAMRefiner(build_tiny_sam(img_size=64, encoder_depth=1, seed=0), preprocessing="medsam")
    return UltraRefiner(transunet, refiner)


def _losses(model: UltraRefiner, iterations: int = 4) -> list[float]:
    """The phase-3 bundle's trainer over ``iterations`` copies of one phantom batch; every iteration's loss."""
    g = torch.Generator().manual_seed(0)
    ys, xs = torch.meshgrid(torch.arange(48.0), torch.arange(64.0), indexing="ij")
    label = ((((xs - 30) / 14) ** 2 + ((ys - 22) / 10) ** 2) < 1).float()[None, None].repeat(2, 1, 1, 1)
    native = ((0.3 + 0.4 * label + 0.2 * torch.rand(2, 1, 48, 64, generator=g)) * 255).round()
    batch = {"image": F.interpolate(native / 255, (32, 32), mode="bilinear", antialias=True), "sam_image": native,
             "label": label, "sam_image_id": ["a", "b"], "original_size": torch.tensor([[48, 64], [48, 64]])}
    trainer = bundle_config("ultrarefiner", {
        **CPU, "num_workers": 0, "network": model, "optimizer": build_e2e_optimizer(model), "epochs": 1,
        "epoch_length": iterations, "train#dataloader": [batch] * iterations, "train#handlers": [],
        "train#prepare_batch": E2EPrepareBatch(original_size_key="original_size"),
    }).get_parsed_content("train#trainer")
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    trainer.run()
    return losses


@pytest.mark.slow
def test_compiled_phase3_step_computes_what_the_eager_one_does():
    eager = _model()
    compiled = compile_network(copy.deepcopy(eager))
    expected = _losses(eager)
    counters.clear()
    got = _losses(compiled)
    assert counters["stats"]["unique_graphs"] >= 2  # dynamo did compile (TransUNet, the decoder's transformer)
    assert got == pytest.approx(expected, rel=1e-3, abs=1e-4)
    assert got[-1] < got[0]  # and it trains
    # the compiled model's weights load into an eager one, key for key, and give its outputs
    fresh = _model()
    fresh.load_state_dict(compiled.state_dict(), strict=True)
    for a, b in zip(fresh.state_dict().values(), eager.state_dict().values(), strict=True):
        assert a.shape == b.shape
    assert torch.allclose(fresh.transunet.pos_embed, compiled.transunet.pos_embed)
