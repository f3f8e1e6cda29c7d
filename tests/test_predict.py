"""``python -m ultrarefiner predict`` and ``engines.inference.ultra_predict``: outputs, bad inputs reported and skipped,
iterative refinement and the quality gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import blob, save
from ultrarefiner.cli import main
from ultrarefiner.engines.inference.ultra_predict import _output_names, refine
from ultrarefiner.engines.training.e2e_setup import build_ultrarefiner

TU = {"img_size": 32, "num_classes": 2, "in_channels": 1, "variant": "R50-ViT-B_16", "vit_depth": 1, "hidden_size": 32,
      "num_heads": 2, "mlp_dim": 64, "block_units": [1, 1, 1], "decoder_channels": [32, 16, 16, 8]}
NETWORK_KWARGS = {"transunet": TU, "sam": {"model_type": "tiny", "img_size": 256}, "refiner": {}}


def _scene(h: int = 40, w: int = 48, seed: int = 0) -> np.ndarray:
    """A bright blob on a noisy background, uint8."""
    rng = np.random.default_rng(seed)
    return np.clip(60 + 120 * (blob(h, w) > 0) + rng.normal(0, 15, (h, w)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A phase-3 best.pt in the bundle's format: weights + network_kwargs (random tiny networks)."""
    torch.manual_seed(0)
    model = build_ultrarefiner(NETWORK_KWARGS, cache_embeddings=False)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    torch.save({"model": model.state_dict(), "epoch": 1, "metric": 0.5, "network_kwargs": NETWORK_KWARGS}, path)
    return path


def test_cli_folder_with_corrupt_file_iterations_gate_and_nifti(checkpoint, tmp_path, capsys):
    src = tmp_path / "in"
    save(src / "a.png", _scene(seed=1))
    save(src / "b.png", np.stack([_scene(36, 52, seed=2)] * 3, -1))  # RGB, another size
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (src / "notes.txt").write_text("ignored: not an image suffix")
    save(src / "a_mask.png", (_scene(seed=1) > 128).astype(np.uint8) * 255)  # BUSI's masks lie beside the images
    out = tmp_path / "out"
    main(["predict", "--input", str(src), "--output_dir", str(out), "--checkpoint", str(checkpoint),
          "--iterations", "2", "--quality_gate", "--gate_threshold", "0.5", "--nifti", "--device", "cpu",
          "--batch_size", "2", "--num_workers", "1", "--writers", "1", "--exclude", "*_mask*"])
    printed = capsys.readouterr().out
    assert "2 image(s) predicted" in printed and "1 skipped" in printed and "broken.png" in printed
    report = json.loads((out / "predictions.json").read_text())
    assert report["settings"] == {"iterations": 2, "quality_gate": True, "gate_threshold": 0.5, "threshold": 0.5,
                                  "tta": "none"}
    assert [s["image"] for s in report["skipped"]] == [str(src / "broken.png")]
    assert "unreadable image" in report["skipped"][0]["reason"]
    sizes = {"a": (48, 40), "b": (52, 36)}
    for e in report["images"]:
        name = Path(e["image"]).stem
        assert e["final_iou"] >= e["pred_iou"] - 1e-6 and e["best_pass"] in (0, 1, 2)
        assert isinstance(e["gated"], bool) and e["gated"] == (e["final_iou"] < 0.5)
        for kind in ("coarse", "refined"):
            mask = np.asarray(Image.open(out / e[kind]))
            assert mask.shape == sizes[name][::-1] and set(np.unique(mask)) <= {0, 255}
            import nibabel as nib

            assert nib.load(str(out / e[f"{kind}_nifti"])).shape[:2] == sizes[name]  # (x, y) = (width, height)
        overlay = np.asarray(Image.open(out / e["overlay"]))
        assert overlay.shape == (*sizes[name][::-1], 3)
    assert not list(out.rglob("*.tmp"))


def test_cli_fails_when_nothing_can_be_predicted(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(SystemExit) as e:
        main(["predict", "--input", str(bad), "--output_dir", str(tmp_path / "o"), "--checkpoint", str(checkpoint)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no input image could be predicted" in err and "bad.png" in err
    report = json.loads((tmp_path / "o" / "predictions.json").read_text())  # the report is written anyway
    assert report["n_images"] == 0 and report["skipped"][0]["image"] == str(bad)
    with pytest.raises(SystemExit):
        main(["predict", "--input", str(tmp_path / "nope"), "--checkpoint", str(checkpoint)])
    assert "input not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", "--input", str(bad), "--checkpoint", str(tmp_path / "missing.pt")])
    assert "checkpoint not found" in capsys.readouterr().err
    for flag, value, problem in (("--tta", "rotate", "--tta"), ("--batch_size", "0", "--batch_size"),
                                 ("--optimize", "fastest", "--optimize"),
                                 ("--exclude", "in/*_mask*", "exclude patterns match file names, not paths")):
        with pytest.raises(SystemExit):
            main(["predict", "--input", str(bad), "--checkpoint", str(checkpoint), flag, value])
        assert problem in capsys.readouterr().err


def test_iterations_keep_the_best_pass_and_gate_rule(checkpoint):
    from ultrarefiner.hub import create_model

    model = create_model("ultrarefiner", checkpoint)
    native = torch.from_numpy(_scene(seed=3))[None, None]
    small = torch.nn.functional.interpolate(native.float() / 255, (32, 32), mode="bilinear", antialias=True)
    plain = refine(model, small, native)
    assert set(plain) == {"coarse", "refined", "pred_iou", "final", "final_iou"}
    assert torch.equal(plain["final"], plain["refined"]) and plain["coarse"].shape == (1, 1, 40, 48)
    it = refine(model, small, native, iterations=3)
    assert torch.allclose(it["refined"], plain["refined"]) and float(it["iterative_iou"]) >= float(it["pred_iou"])
    if int(it["best_pass"]) == 0:
        assert torch.equal(it["iterative"], it["refined"])
    never = refine(model, small, native, quality_gate=True, gate_threshold=-10.0)
    always = refine(model, small, native, quality_gate=True, gate_threshold=10.0)
    assert float(never["gate"]) == 0.0 and torch.equal(never["final"], plain["refined"])
    assert float(always["gate"]) == 1.0 and torch.equal(always["final"], plain["coarse"])


def test_output_names_are_unique():
    paths = [Path("x/a.png"), Path("x/a.jpg"), Path("x/b.png")]
    assert _output_names(paths) == ["a_png", "a_jpg", "b"]


@pytest.mark.parametrize("cores, workers", [(1, 1), (2, 2), (16, 2)])
def test_default_workers_follow_the_usable_cores(checkpoint, tmp_path, monkeypatch, cores, workers):
    """Without --num_workers, predict and predict-transunet start 2 data workers, but never more than the cores they
    may use (on one core a second worker only competes with the network)."""
    import ultrarefiner.commands.args as command_args
    from ultrarefiner.engines.inference import transunet_predict, ultra_predict

    seen: dict[str, int] = {}

    def fake_run(bundle, options):
        seen["predict"] = options["num_workers"]
        return {"n_images": 1, "n_skipped": 0, "skipped": []}

    def fake_oof(*args, num_workers, optimize):
        seen["predict-transunet"] = num_workers
        assert optimize == "auto"  # the option reaches the models (TransUNet's speed option)
        path = tmp_path / "oof" / "datalist.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
        return path

    monkeypatch.setattr(command_args, "usable_cores", lambda: cores)  # the one default both commands share
    monkeypatch.setattr(ultra_predict, "run_inference", fake_run)
    monkeypatch.setattr(transunet_predict, "predict_out_of_fold", fake_oof)
    save(tmp_path / "in" / "a.png", _scene())
    main(["predict", "--input", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"), "--checkpoint",
          str(checkpoint), "--device", "cpu"])
    main(["predict-transunet", "--data_root", str(tmp_path), "--dataset", "BUSI", "--device", "cpu"])
    assert seen == {"predict": workers, "predict-transunet": workers}
