"""Horizontal-flip test-time augmentation (``--tta flip`` / config id ``tta``): the output is the mean of the
probabilities of the original pass and of the flipped pass flipped back; a flip-equivariant model gains nothing
from it (so flips and un-flips line up, pixel for pixel), on a symmetric input as on any other."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_inference_batching import SIZES, _sample, _scene, _tiny_refiner

from ultrarefiner.engines.inference import refine_folder as engine
from ultrarefiner.engines.inference.fast_inference import check_tta, flip_tta_mean, hflip
from ultrarefiner.engines.inference.flip_inferer import FlipTTAInferer, tta_inferer


def _symmetric_conv(channels_out: int) -> torch.nn.Conv2d:
    """A convolution whose kernels are left-right symmetric: flip-equivariant (zero padding is symmetric too)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, channels_out, 5, padding=2)
    with torch.no_grad():
        conv.weight.copy_(0.5 * (conv.weight + conv.weight.flip(-1)))
    return conv.eval()


@pytest.mark.parametrize("activation, channels", [("sigmoid", 1), ("softmax", 2)])
def test_inferer_equivariant_model_and_symmetric_input(activation, channels):
    net = _symmetric_conv(channels)
    tta, plain = FlipTTAInferer(activation), tta_inferer("none")
    x = torch.rand(2, 1, 12, 17, generator=torch.Generator().manual_seed(1))
    symmetric = 0.5 * (x + hflip(x))
    with torch.no_grad():
        for inp in (symmetric, x):  # equivariant model: TTA changes nothing, on symmetric and asymmetric inputs
            assert torch.allclose(tta.probabilities(tta(inp, net)), tta.probabilities(plain(inp, net)), atol=1e-5)


@pytest.mark.parametrize("activation, channels", [("sigmoid", 1), ("softmax", 3)])
def test_inferer_output_is_the_mean_of_the_two_passes(activation, channels):
    torch.manual_seed(2)
    net = torch.nn.Conv2d(1, channels, 3, padding=1).eval()  # not flip-equivariant
    inferer = FlipTTAInferer(activation)
    x = torch.rand(3, 1, 10, 14)
    with torch.no_grad():
        got = inferer.probabilities(inferer(x, net))
        expected = flip_tta_mean(inferer.probabilities(net(x)), inferer.probabilities(net(hflip(x))))
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, inferer.probabilities(net(x)), atol=1e-3)  # the flipped pass did count


def test_check_tta():
    assert check_tta(None) == check_tta("none") == check_tta(False) == "none" and check_tta("flip") == "flip"
    with pytest.raises(ValueError, match="--tta"):
        check_tta("rotate")


class _PixelRefiner(torch.nn.Module):
    """A per-pixel, hence flip-equivariant, refiner behind the ``BatchRefiner`` interface (tests/test_refine_command's
    stub): refined logits from the coarse mask and the image's top-left embedding."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        from ultrarefiner.networks.sam_geometry import SamGeometry

        super().__init__()
        self.geometry = SamGeometry("litemedsam", 64, image_resize="exact")
        self.sam = SimpleNamespace(image_encoder=lambda x: x[:, :1, ::16, ::16])

    def preprocess_image(self, image: torch.Tensor, resized: bool = False) -> torch.Tensor:
        return self.geometry.preprocess_image(image, resized)

    def forward_sizes(self, image_embeddings, coarse, original_sizes):
        from ultrarefiner.networks.sam_geometry import resize_mask

        b = coarse.shape[0]
        return {"masks": [resize_mask((coarse[i : i + 1] - 0.45) * 8, tuple(s))[0]
                          for i, s in enumerate(original_sizes)],
                "iou_predictions": torch.full((b, 1), 0.7), "selection_weights": torch.ones(b, 1)}


def _samples(refiner, symmetric: bool, tta: bool) -> list[dict]:
    out = []
    for i, (h, w) in enumerate(SIZES[:2]):
        image, coarse = _scene(h, w, i)
        if symmetric:
            image, coarse = np.maximum(image, np.fliplr(image)), np.maximum(coarse, np.fliplr(coarse))
        s = _sample(refiner, image, coarse)
        if tta:
            s["frame_flipped"] = engine.encoder_frame(refiner.geometry, np.fliplr(image))
        out.append(s)
    return out


@pytest.mark.parametrize("symmetric", [True, False])
def test_refine_tta_with_an_equivariant_refiner_changes_nothing(symmetric):
    refiner = _PixelRefiner()
    plain = engine.BatchRefiner(refiner, torch.device("cpu"), optimize="none")
    tta = engine.BatchRefiner(refiner, torch.device("cpu"), tta="flip", optimize="none")
    p, iou = plain.probabilities(_samples(refiner, symmetric, tta=False))
    q, tta_iou = tta.probabilities(_samples(refiner, symmetric, tta=True))
    for a, b in zip(p, q, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(iou, tta_iou)


def test_refine_tta_is_the_mean_of_the_two_passes():
    """Tiny SAM (not equivariant): the TTA probability is the mean of the plain pass and of the pass on the flipped
    image prompted by the flipped coarse mask, flipped back; the IoU estimate their mean."""
    refiner = _tiny_refiner()
    plain = engine.BatchRefiner(refiner, torch.device("cpu"), optimize="none")
    tta = engine.BatchRefiner(refiner, torch.device("cpu"), tta="flip", optimize="none")
    samples = _samples(refiner, symmetric=False, tta=True)
    flipped = [_sample(refiner, np.ascontiguousarray(np.fliplr(s["pixels"])),
                       np.ascontiguousarray(np.fliplr(s["coarse"]))) for s in samples]
    p, p_iou = plain.probabilities(samples)
    f, f_iou = plain.probabilities(flipped)
    q, q_iou = tta.probabilities(samples)
    for a, b, c in zip(p, f, q, strict=True):
        assert torch.allclose(c, flip_tta_mean(a, b), atol=1e-5)
    assert torch.allclose(q_iou, 0.5 * (p_iou + f_iou), atol=1e-5)
    assert not all(torch.allclose(a, c, atol=1e-3) for a, c in zip(p, q, strict=True))


def test_predict_tta_is_the_mean_of_the_two_passes():
    """Full pipeline: TransUNet and the refiner on the image and on its flip; coarse and refined probabilities are
    the means of the two passes (the flipped one flipped back)."""
    from test_predict import NETWORK_KWARGS

    from ultrarefiner.engines.inference.ultra_predict import UltraPredictor
    from ultrarefiner.engines.training.e2e_setup import build_ultrarefiner

    torch.manual_seed(0)
    model = build_ultrarefiner(NETWORK_KWARGS, cache_embeddings=False).eval()
    plain = UltraPredictor(model, "cpu", optimize="none")
    tta = UltraPredictor(model, "cpu", tta="flip", optimize="none")
    image = _scene(*SIZES[1], seed=3)[0]
    a, b = plain.predict_array(image), plain.predict_array(np.ascontiguousarray(np.fliplr(image)))
    got = tta.predict_array(image)
    for key in ("coarse", "refined"):
        assert np.allclose(got[key], 0.5 * (a[key] + np.fliplr(b[key])), atol=1e-5)
    assert got["pred_iou"] == pytest.approx(0.5 * (a["pred_iou"] + b["pred_iou"]), abs=1e-5)
    assert tta.settings()["tta"] == "flip" and plain.settings()["tta"] == "none"


@pytest.mark.parametrize("bundle, activation", [("sam_refiner", "sigmoid"), ("transunet", "softmax")])
def test_bundle_inference_tta_option(bundle, activation):
    from monai.bundle import ConfigParser
    from monai.inferers import SimpleInferer

    from conftest import REPO

    for tta, kind in (("none", SimpleInferer), ("flip", FlipTTAInferer)):
        parser = ConfigParser()
        parser.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.json"))
        parser["tta"] = tta
        inferer = parser.get_parsed_content("inferer")
        if bundle == "transunet":  # with its speed option (optimize) around it
            assert type(inferer).__name__ == "FastSegmenterInferer" and inferer.optimize == "auto"
            inferer = inferer.inferer
        assert type(inferer) is kind
        if tta == "flip":
            assert inferer.activation == activation


def test_refine_folder_with_tta_is_not_resumed_without(tmp_path, monkeypatch):
    from conftest import save
    from ultrarefiner.errors import UltraRefinerError

    monkeypatch.setattr(engine, "create_model", lambda *_, **__: _PixelRefiner())
    for i, (h, w) in enumerate(SIZES[:3]):
        image, coarse = _scene(h, w, i)
        save(tmp_path / "img" / f"t{i}.png", image)
        save(tmp_path / "msk" / f"t{i}.png", coarse)
    out = tmp_path / "out"
    report = engine.refine_folder(tmp_path / "img", tmp_path / "msk", out, zero_shot=True, batch_size=2,
                                  device="cpu", num_workers=0, tta="flip", optimize="none")
    assert report["settings"]["tta"] == "flip" and report["summary"]["n_images"] == 3
    assert report["settings"]["refiner"] == engine.ZERO_SHOT + " with flip TTA"
    with pytest.raises(UltraRefinerError, match="another refiner"):
        engine.refine_folder(tmp_path / "img", tmp_path / "msk", out, zero_shot=True, device="cpu", num_workers=0)
