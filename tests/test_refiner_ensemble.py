"""Refiner ensembles (``refine --checkpoint a.pt,b.pt,...``, ``BatchRefiner([...])``): the output is the mean of the
members' probabilities and predicted IoUs (with flip TTA too); members holding one frozen encoder share its pass;
members of another image preprocessing are refused; a folder refined by an ensemble is not resumed by one member."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_inference_batching import SIZES, _sample, _scene

from conftest import save
from ultrarefiner.cli import main
from ultrarefiner.engines.checkpoints.checkpoint import save_checkpoint
from ultrarefiner.engines.inference import refine_folder as engine
from ultrarefiner.errors import BadOptionError, UltraRefinerError
from ultrarefiner.networks import SAMRefiner, build_sam, sam_record

CPU = torch.device("cpu")


def _refiner(encoder_seed: int, decoder_seed: int, img_size: int = 64) -> SAMRefiner:
    """Tiny SAM refiner; refiners of one ``encoder_seed`` share the encoder weights (as phase-2 refiners share
    LiteMedSAM's frozen encoder), their decoders differ by ``decoder_seed`` (as the folds' refiners do)."""
    refiner = SAMRefiner(build_sam("tiny", "random", img_size=img_size, encoder_depth=1, seed=encoder_seed)).eval()
    g = torch.Generator().manual_seed(decoder_seed)
    with torch.no_grad():
        for p in refiner.sam.mask_decoder.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return refiner


def _samples(refiner: SAMRefiner, n: int = 3) -> list[dict]:
    out = []
    for i, (h, w) in enumerate(SIZES[:n]):
        image, coarse = _scene(h, w, i)
        s = _sample(refiner, image, coarse)
        s["frame_flipped"] = engine.encoder_frame(refiner.geometry, np.ascontiguousarray(np.fliplr(image)))
        out.append(s)
    return out


def _calls(module: torch.nn.Module) -> list[int]:
    batches: list[int] = []
    module.register_forward_hook(lambda _m, args, _out: batches.append(args[0].shape[0]))
    return batches


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_ensemble_is_the_mean_of_its_members_and_shares_their_encoder(tta):
    a, b = _refiner(3, 1), _refiner(3, 2)
    samples = _samples(a)
    singles = [engine.BatchRefiner(m, CPU, tta=tta, optimize="none").probabilities(samples) for m in (a, b)]
    assert not torch.allclose(singles[0][0][0], singles[1][0][0], atol=1e-3)  # the members do disagree
    ensemble = engine.BatchRefiner([a, b], CPU, tta=tta, optimize="none")
    assert len(ensemble.groups) == 1  # one frozen encoder: one pass for both members
    calls_a, calls_b = _calls(a.sam.image_encoder), _calls(b.sam.image_encoder)
    probs, iou = ensemble.probabilities(samples)
    assert calls_a == [len(samples) * (2 if tta == "flip" else 1)] and calls_b == []
    for j, p in enumerate(probs):
        assert p.shape == samples[j]["pixels"].shape
        assert torch.allclose(p, 0.5 * (singles[0][0][j] + singles[1][0][j]), atol=1e-6)
    assert torch.allclose(iou, 0.5 * (singles[0][1] + singles[1][1]), atol=1e-6)
    masks = ensemble(samples)  # the mask is the mean probability above 0.5
    for (mask, v), p, pv in zip(masks, probs, iou.tolist(), strict=True):
        assert np.array_equal(mask, (p > 0.5).numpy()) and v == pytest.approx(pv)


def test_members_with_other_encoders_get_their_own_pass():
    a, c = _refiner(3, 1), _refiner(4, 1)
    samples = _samples(a, n=2)
    ensemble = engine.BatchRefiner([a, c], CPU, optimize="none")
    assert len(ensemble.groups) == 2
    calls_a, calls_c = _calls(a.sam.image_encoder), _calls(c.sam.image_encoder)
    probs, _ = ensemble.probabilities(samples)
    assert calls_a == [2] and calls_c == [2]
    pa, _ = engine.BatchRefiner(a, CPU, optimize="none").probabilities(samples)
    pc, _ = engine.BatchRefiner(c, CPU, optimize="none").probabilities(samples)
    for p, x, y in zip(probs, pa, pc, strict=True):
        assert torch.allclose(p, 0.5 * (x + y), atol=1e-6)


def test_members_of_another_preprocessing_are_refused():
    with pytest.raises(UltraRefinerError, match="share the image preprocessing"):
        engine.BatchRefiner([_refiner(3, 1), _refiner(3, 1, img_size=128)], CPU, optimize="none")


def _save_refiner(path, refiner: SAMRefiner):
    return save_checkpoint(path, {"kind": "sam_refiner", "model": refiner.state_dict(),
                                  "network_kwargs": sam_record(refiner.sam), "lora": False, "partial": False})


def test_refine_folder_with_an_ensemble_of_checkpoint_files(tmp_path, capsys):
    a, b = _refiner(3, 1), _refiner(3, 2)
    files = [_save_refiner(tmp_path / "fold_0.pt", a), _save_refiner(tmp_path / "fold_1.pt", b)]
    for i, (h, w) in enumerate(SIZES[:3]):
        image, coarse = _scene(h, w, i)
        save(tmp_path / "img" / f"s{i}.png", image)
        save(tmp_path / "msk" / f"s{i}.png", coarse)
    out = tmp_path / "out"
    # the command line as users type it: files separated by a comma
    main(["refine", "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk"), "--output_dir", str(out),
          "--checkpoint", f"{files[0]},{files[1]}", "--device", "cpu", "--num_workers", "0", "--optimize", "none"])
    assert "refined 3 image(s)" in capsys.readouterr().out
    report = (out / "report.json").read_text()
    assert "ensemble of 2 refiners" in report and all(str(f.resolve()) in report for f in files)
    expected = engine.BatchRefiner([a, b], CPU, optimize="none")
    for i, (h, w) in enumerate(SIZES[:3]):
        image, coarse = _scene(h, w, i)
        (mask, _), = expected([_sample(a, image, coarse)])
        written = np.asarray(Image.open(out / "masks" / f"s{i}.png")) > 0
        assert np.array_equal(written, mask)
    # one member alone is another refiner: the folder is not resumed with it
    with pytest.raises(UltraRefinerError, match="another refiner"):
        engine.refine_folder(tmp_path / "img", tmp_path / "msk", out, checkpoint=files[0], device="cpu",
                             num_workers=0)
    # a list works as the comma string does (same name: resumed, nothing refined again)
    again = engine.refine_folder(tmp_path / "img", tmp_path / "msk", out, checkpoint=[str(f) for f in files],
                                 device="cpu", num_workers=0, optimize="none")
    assert again["summary"]["n_refined_now"] == 0 and again["summary"]["n_resumed"] == 3


def test_ensemble_option_errors(tmp_path):
    f = _save_refiner(tmp_path / "a.pt", _refiner(3, 1))
    with pytest.raises(BadOptionError, match="twice"):
        engine.resolve_refiners([f, str(f)])
    with pytest.raises(BadOptionError, match="empty entry"):
        engine.resolve_refiners(f"{f},")
    with pytest.raises(UltraRefinerError, match="--zero_shot"):
        engine.resolve_refiners(f"{f},{f}", zero_shot=True)
    missing = tmp_path / "missing.pt"
    with pytest.raises(Exception, match="missing.pt"):
        engine.resolve_refiners(f"{f},{missing}")
    assert engine.checkpoint_list(("x.pt", "y.pt")) == ["x.pt", "y.pt"] == engine.checkpoint_list(" x.pt, y.pt")
