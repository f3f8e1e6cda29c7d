"""``ultrarefiner.create_model``: one way from any file the package writes to a ready network.

For each kind, the model rebuilt from a training ``best.pt`` (written by ``TrainingCheckpoints``), from the bundle's
exported ``models/model.pt`` (``export_best`` / ``export_refiner``) and, for the refiner, from the shipped
``bundles/sam_refiner/models/model.pt`` gives the training network's outputs bit for bit. Files of another kind,
overrides that contradict a file, and files that record no ``network_kwargs`` are refused with the file named.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

import ultrarefiner
from ultrarefiner.engines.checkpoints.checkpoint import TrainingCheckpoints, export_best, save_checkpoint
from ultrarefiner.errors import BadInputError

SHIPPED = Path(__file__).resolve().parents[1] / "bundles" / "sam_refiner" / "models" / "model.pt"
TU = {"img_size": 32, "num_classes": 2, "in_channels": 1, "variant": "R50-ViT-B_16", "vit_depth": 1, "hidden_size": 32,
      "num_heads": 2, "mlp_dim": 64, "block_units": [1, 1, 1], "decoder_channels": [32, 16, 16, 8]}
ULTRA = {"transunet": TU, "sam": {"model_type": "tiny", "img_size": 256}, "refiner": {}}
REFINER = {"model_type": "lite_medsam", "use_mask_prompt": True, "box_source": "largest", "image_resize": "exact"}


def _save_best(ckpt_dir: Path, network: torch.nn.Module, network_kwargs: dict, phase: str, **kwargs) -> Path:
    """``best.pt`` as a bundle's training writes it: one (no-op) epoch through ``TrainingCheckpoints``."""
    opt = torch.optim.SGD([p for p in network.parameters() if p.requires_grad] or [torch.zeros(1)], lr=0.0)
    trainer, evaluator = Engine(lambda e, b: 0.0), Engine(lambda e, b: None)
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_mean_dice=0.5))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run([0]))
    TrainingCheckpoints(ckpt_dir, network, opt, evaluator, network_kwargs=network_kwargs, phase=phase,
                        dataset="BUSI", fold=0, **kwargs).attach(trainer)
    trainer.run([0], max_epochs=1)
    return ckpt_dir / "best.pt"


def _scene(h: int = 40, w: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(1,1,H,W) 0-255 image with a bright ellipse, and a shifted, shrunken coarse mask of it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    truth = ((xx - w / 2) / (w / 4)) ** 2 + ((yy - h / 2) / (h / 4)) ** 2 < 1
    image = np.clip(60 + 40 * rng.standard_normal((h, w)) + 90 * truth, 0, 255).astype(np.float32)
    coarse = ((xx - w / 2 - 3) / (w / 5)) ** 2 + ((yy - h / 2) / (h / 5)) ** 2 < 1
    return torch.from_numpy(image)[None, None], torch.from_numpy(coarse.astype(np.float32))[None, None]


# ------------------------------------------------------------------------------------------------ transunet
@pytest.fixture(scope="module")
def transunet_files(tmp_path_factory):
    from ultrarefiner.networks import TransUNet

    d = tmp_path_factory.mktemp("transunet")
    torch.manual_seed(0)
    net = TransUNet(**TU).eval()
    best = _save_best(d, net, TU, "transunet")
    model = export_best(d, d / "model.pt")
    return net, best, model


def test_transunet_from_best_and_exported_model(transunet_files):
    net, best, model = transunet_files
    exported = torch.load(model, weights_only=True)
    assert exported["kind"] == "transunet" and exported["network_kwargs"] == TU  # self-describing
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x)
        for path in (best, model):
            rebuilt = ultrarefiner.create_model("transunet", path)
            assert not rebuilt.training
            assert torch.equal(rebuilt(x), ref)


def test_transunet_file_without_kwargs_needs_them_explicitly(transunet_files, tmp_path):
    net, _, _ = transunet_files
    plain = tmp_path / "plain.pt"
    save_checkpoint(plain, net.state_dict())  # e.g. the Model Zoo's fake weights
    with pytest.raises(BadInputError, match="records no network_kwargs") as e:
        ultrarefiner.create_model("transunet", plain)
    assert str(plain) in str(e.value)
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(ultrarefiner.create_model("transunet", plain, **TU)(x), net(x))
        assert torch.equal(ultrarefiner.create_model("transunet", plain, fallback_kwargs=lambda: TU)(x), net(x))


def test_mismatched_kwargs_and_other_kinds_are_refused(transunet_files, tmp_path):
    _, best, model = transunet_files
    with pytest.raises(BadInputError, match="vit_depth=1, not 2") as e:
        ultrarefiner.create_model("transunet", best, vit_depth=2)
    assert str(best) in str(e.value)
    for kind in ("sam_refiner", "ultrarefiner"):
        with pytest.raises(BadInputError, match="phase-1 TransUNet checkpoint") as e:
            ultrarefiner.create_model(kind, model)
        assert str(model) in str(e.value)
    # a file whose recorded kwargs do not describe its weights: refused by the strict load, file named
    wrong = tmp_path / "wrong.pt"
    save_checkpoint(wrong, {"kind": "transunet", "model": torch.load(model, weights_only=True)["model"],
                            "network_kwargs": {**TU, "decoder_channels": [16, 16, 16, 8]}})
    with pytest.raises(BadInputError, match="does not match the TransUNet") as e:
        ultrarefiner.create_model("transunet", wrong)
    assert str(wrong) in str(e.value)
    with pytest.raises(ValueError, match="unknown model kind"):
        ultrarefiner.create_model("unet", best)
    with pytest.raises(ValueError, match="needs a checkpoint"):
        ultrarefiner.create_model("transunet")


# ------------------------------------------------------------------------------------------------ sam_refiner
@pytest.fixture(scope="module")
def refiner_files(tmp_path_factory):
    """A LiteMedSAM refiner with a frozen encoder and a "trained" decoder, as phase 2 saves and exports it."""
    from ultrarefiner.engines.checkpoints.refiner_checkpoint import encoder_record, refiner_state_dict
    from ultrarefiner.engines.training.refiner_setup import export_refiner
    from ultrarefiner.networks import SAMRefiner, StackedInputRefiner, build_sam

    d = tmp_path_factory.mktemp("sam_refiner")
    refiner_kwargs = {k: v for k, v in REFINER.items() if k != "model_type"}
    refiner = SAMRefiner(sam=build_sam("lite_medsam", "packaged"), **refiner_kwargs)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in refiner.sam.mask_decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    network = StackedInputRefiner(refiner).eval()
    best = _save_best(d, network, REFINER, "sam_refiner", state_dict_fn=refiner_state_dict,
                      extra={"lora": False, **encoder_record(refiner)})
    model = export_refiner(d, d / "model.pt", network)
    return refiner, best, Path(model)


def _refined(refiner: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    image, coarse = _scene(seed=seed)
    with torch.no_grad():
        return refiner(image=image, coarse=coarse)["masks"]


def test_sam_refiner_from_best_and_exported_model(refiner_files):
    refiner, best, model = refiner_files
    exported = torch.load(model, weights_only=True)
    assert exported["kind"] == "sam_refiner" and exported["network_kwargs"] == REFINER and exported["partial"]
    ref = _refined(refiner.eval())
    for path in (best, model):
        assert torch.equal(_refined(ultrarefiner.create_model("sam_refiner", path)), ref)
    with pytest.raises(BadInputError, match="model_type='lite_medsam', not 'vit_b'") as e:
        ultrarefiner.create_model("sam_refiner", model, model_type="vit_b")
    assert str(model) in str(e.value)
    # prompts are the caller's choice, not the file's: they override without a complaint
    assert ultrarefiner.create_model("sam_refiner", model, box_source="components").prompt_generator is not None


def test_shipped_refiner_matches_the_old_loading_path():
    """The shipped file describes itself; create_model equals the refiner loaded the old way (built with the bundle's
    defaults, then ``load_refiner_checkpoint``)."""
    from ultrarefiner.engines.checkpoints.refiner_checkpoint import load_refiner_checkpoint
    from ultrarefiner.networks import SAMRefiner

    obj = torch.load(SHIPPED, weights_only=True)
    assert obj["kind"] == "sam_refiner" and obj["network_kwargs"]["model_type"] == "lite_medsam"
    old = SAMRefiner().eval()
    load_refiner_checkpoint(old, SHIPPED)
    new = ultrarefiner.create_model("sam_refiner", SHIPPED)
    assert new.state_dict().keys() == old.state_dict().keys()
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in new.state_dict().items())
    for seed in (0, 1):
        assert torch.equal(_refined(new, seed), _refined(old, seed))


def test_zero_shot_refiner_is_litemedsam_packaged():
    from ultrarefiner.networks import SAMRefiner

    zero = ultrarefiner.create_model("sam_refiner")
    ref = SAMRefiner().state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in zero.state_dict().items())
    with pytest.raises(BadInputError, match="no weights ship"):
        ultrarefiner.create_model("sam_refiner", model_type="vit_b")


def test_partial_vit_refiner_needs_its_base_weights(tmp_path):
    partial = tmp_path / "partial.pt"
    save_checkpoint(partial, {"kind": "sam_refiner", "model": {}, "partial": True, "lora": False,
                              "network_kwargs": {"model_type": "vit_b"}})
    with pytest.raises(BadInputError, match="base SAM weights") as e:
        ultrarefiner.create_model("sam_refiner", partial)
    assert str(partial) in str(e.value)


def test_tiny_sam_refiner_record_rebuilds_its_sam(tmp_path):
    """A refiner over a tiny SAM records that SAM's build kwargs (read from the built Sam, ``sam_record``):
    ``create_model`` rebuilds it from the file alone, and an override contradicting the record is refused."""
    from ultrarefiner.networks import SAMRefiner, build_sam, sam_record

    refiner = SAMRefiner(build_sam("tiny", "random", img_size=64, encoder_depth=2, seed=3)).eval()
    record = sam_record(refiner.sam)
    assert record == {"model_type": "tiny", "sam_kwargs": {"img_size": 64, "encoder_dim": 32, "encoder_depth": 2,
                                                           "prompt_dim": 64, "decoder_depth": 1, "window_size": 8,
                                                           "seed": 3}}
    path = save_checkpoint(tmp_path / "model.pt", {"kind": "sam_refiner", "model": refiner.state_dict(),
                                                   "network_kwargs": record, "lora": False, "partial": False})
    rebuilt = ultrarefiner.create_model("sam_refiner", path)
    assert len(rebuilt.sam.image_encoder.blocks) == 2
    assert all(torch.equal(v, refiner.state_dict()[k]) for k, v in rebuilt.state_dict().items())
    with pytest.raises(BadInputError, match="img_size=64, not 128"):
        ultrarefiner.create_model("sam_refiner", path, sam_kwargs={"img_size": 128})


# ------------------------------------------------------------------------------------------------ ultrarefiner
def test_ultrarefiner_from_best_and_exported_model(tmp_path):
    from ultrarefiner.engines.inference.ultra_predict import refine
    from ultrarefiner.engines.training.e2e_setup import build_ultrarefiner

    torch.manual_seed(0)
    net = build_ultrarefiner(ULTRA, cache_embeddings=False).eval()
    best = _save_best(tmp_path, net, ULTRA, "ultrarefiner")
    model = export_best(tmp_path, tmp_path / "model.pt")
    native, coarse = _scene()
    small = torch.nn.functional.interpolate(native / 255, (32, 32), mode="bilinear", antialias=True)
    ref = refine(net, small, native)
    for path in (best, model):
        rebuilt = ultrarefiner.create_model("ultrarefiner", path)
        assert not rebuilt.cache_embeddings
        out = refine(rebuilt, small, native)
        assert torch.equal(out["refined"], ref["refined"]) and torch.equal(out["coarse"], ref["coarse"])
    with pytest.raises(BadInputError, match="phase-3 UltraRefiner checkpoint") as e:
        ultrarefiner.create_model("transunet", model)
    assert str(model) in str(e.value)
    with pytest.raises(BadInputError, match="TransUNet img_size=32, not 64"):
        ultrarefiner.create_model("ultrarefiner", model, transunet={"img_size": 64})
    plain = tmp_path / "plain.pt"
    save_checkpoint(plain, net.state_dict())
    with pytest.raises(BadInputError, match="records no network_kwargs"):
        ultrarefiner.create_model("ultrarefiner", plain)
    rebuilt = ultrarefiner.create_model("ultrarefiner", plain, **ULTRA)
    assert torch.equal(refine(rebuilt, small, native)["refined"], ref["refined"])


def test_zoo_export_reads_self_describing_weights_under_model(transunet_files, refiner_files, tmp_path):
    """``export-bundle``'s ``ckpt_export`` check passes ``--key_in_ckpt model`` for a self-describing file, not for
    a plain state_dict (the Zoo's fake weights) nor a refiner checkpoint (loaded whole by the refiner's network)."""
    from ultrarefiner.zoo.export import _weights_under_model

    net, best, model = transunet_files
    plain = tmp_path / "plain.pt"
    save_checkpoint(plain, net.state_dict())
    assert _weights_under_model(model) and _weights_under_model(best) and not _weights_under_model(plain)
    assert not _weights_under_model(refiner_files[2]) and not _weights_under_model(SHIPPED)


def test_original_transunet_pth_loads_with_explicit_kwargs(tmp_path):
    """The original TransUNet code's ``.pth`` (its own key names, no kwargs) loads through create_model too."""
    from test_transunet_weights import transunet_state_dict

    from ultrarefiner.networks import TransUNet
    from ultrarefiner.networks.transunet_weights import load_transunet_checkpoint

    path = tmp_path / "epoch_149.pth"
    torch.save({f"module.{k}": v for k, v in transunet_state_dict(depth=2, grid=2).items()}, path)
    with pytest.raises(BadInputError, match="records no network_kwargs"):
        ultrarefiner.create_model("transunet", path)
    model = ultrarefiner.create_model("transunet", path, img_size=32, vit_depth=2)
    ref = load_transunet_checkpoint(TransUNet(img_size=32, vit_depth=2), path)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
