"""bundles/ultrarefiner/configs/inference.json: a MONAI ``SupervisedEvaluator`` whose iteration is ``UltraPredictor``
and whose postprocessing writer transforms save the masks. What it writes is, byte for byte, the per-image
prediction (``UltraPredictor.predict_array``) thresholded and written as PNG; batches of mixed sizes, unreadable
files (skipped and reported) and the NIfTI switch behave as before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image
from test_predict import NETWORK_KWARGS, _scene

from conftest import save
from ultrarefiner.engines.inference.ultra_predict import (
    UltraPredictor,
    overlay_coarse_refined,
    run_inference,
    transunet_transform,
)
from ultrarefiner.engines.training.e2e_setup import build_ultrarefiner
from ultrarefiner.errors import BadInputError, UltraRefinerError
from ultrarefiner.utils.io import PICTURE_PNG_LEVEL, write_png

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "ultrarefiner"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_ultrarefiner(NETWORK_KWARGS, cache_embeddings=False).eval()


@pytest.fixture()
def inputs(tmp_path) -> Path:
    """Three images of two sizes (one RGB), two with the same stem, and a broken file."""
    src = tmp_path / "in"
    save(src / "a.png", _scene(seed=1))
    save(src / "a.jpg", _scene(44, 40, seed=3))
    save(src / "b.png", np.stack([_scene(36, 52, seed=2)] * 3, -1))
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return src


def _png_bytes(path: Path, array: np.ndarray, compress_level: int | None = None) -> bytes:
    write_png(path, array, compress_level)
    return path.read_bytes()


def test_inference_config_is_an_evaluator_with_writer_transforms(model, inputs):
    from monai.engines import SupervisedEvaluator
    from monai.transforms import SaveImaged

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser["network"], parser["input_dir"] = model, str(inputs)
    evaluator = parser.get_parsed_content("evaluator")
    assert isinstance(evaluator, SupervisedEvaluator)
    assert isinstance(parser.get_parsed_content("predictor"), UltraPredictor)
    writers = [t for t in parser.get_parsed_content("postprocessing").transforms if isinstance(t, SaveImaged)]
    assert [w.keys for w in writers] == [("coarse",), ("refined",), ("overlay",)]  # NIfTI writers off by default
    parser["nifti"] = True
    parser.parse()
    writers = [t for t in parser.get_parsed_content("postprocessing").transforms if isinstance(t, SaveImaged)]
    assert len(writers) == 5
    # the TransUNet input chain written in the config is the predictor's
    chain = parser.get_parsed_content("preprocessing")
    image = torch.from_numpy(_scene(seed=4))[None].float()
    assert torch.equal(torch.as_tensor(chain(image)), torch.as_tensor(transunet_transform(32)(image)))


@pytest.mark.parametrize("batch_size", [1, 2])
def test_outputs_are_the_per_image_predictions_byte_for_byte(model, inputs, tmp_path, batch_size):
    out = tmp_path / "out"
    report = run_inference(BUNDLE, {"network": model, "device": "cpu", "input_dir": str(inputs),
                                    "output_dir": str(out), "iterations": 1, "quality_gate": True,
                                    "batch_size": batch_size, "num_workers": 1, "optimize": "none"})
    assert json.loads((out / "predictions.json").read_text()) == report
    assert report["settings"] == {"iterations": 1, "quality_gate": True, "gate_threshold": 0.5, "threshold": 0.5,
                                  "tta": "none"}
    assert [s["image"] for s in report["skipped"]] == [str(inputs / "broken.png")]
    assert "unreadable image" in report["skipped"][0]["reason"]
    names = {e["image"]: Path(e["refined"]).stem for e in report["images"]}
    assert names == {str(inputs / "a.jpg"): "a_jpg", str(inputs / "a.png"): "a_png", str(inputs / "b.png"): "b"}
    from ultrarefiner.data.imaging import read_image

    predictor = UltraPredictor(model, "cpu", iterations=1, quality_gate=True, optimize="none")
    ref_dir = tmp_path / "ref"
    for e in report["images"]:
        image = read_image(e["image"])
        ref = predictor.predict_array(image)
        coarse, refined = ref["coarse"] > 0.5, ref["refined"] > 0.5
        name = Path(e["refined"]).stem
        assert e == {"image": e["image"], "height": image.shape[0], "width": image.shape[1],
                     "pred_iou": round(ref["pred_iou"], 6), "coarse": f"coarse/{name}.png",
                     "refined": f"refined/{name}.png", "overlay": f"overlays/{name}.png",
                     "coarse_area": int(coarse.sum()), "refined_area": int(refined.sum()),
                     "final_iou": round(ref["final_iou"], 6), "best_pass": ref["best_pass"], "gated": ref["gated"]}
        for key, array in (("coarse", coarse.astype(np.uint8) * 255), ("refined", refined.astype(np.uint8) * 255),
                           ("overlay", overlay_coarse_refined(image.astype(np.float32) / 255.0, coarse, refined))):
            level = PICTURE_PNG_LEVEL if key == "overlay" else None  # overlays: the fast zlib level
            assert (out / e[key]).read_bytes() == _png_bytes(ref_dir / key / f"{name}.png", array, level), (key, name)
    assert not (out / "nifti").exists()


def test_nifti_writers(model, inputs, tmp_path):
    import nibabel as nib

    out = tmp_path / "out"
    report = run_inference(BUNDLE, {"network": model, "device": "cpu", "input_dir": str(inputs),
                                    "output_dir": str(out), "nifti": True, "num_workers": 0, "optimize": "none"})
    for e in report["images"]:
        for kind in ("coarse", "refined"):
            assert e[f"{kind}_nifti"] == f"nifti/{Path(e[kind]).stem}_{kind}.nii.gz"
            volume = np.asarray(nib.load(out / e[f"{kind}_nifti"]).dataobj)
            mask = np.asarray(Image.open(out / e[kind])) > 0
            assert volume.shape[:2] == (e["width"], e["height"])  # x = column, as the PNG's
            assert np.array_equal(volume.reshape(volume.shape[:2]).T > 0, mask)


def test_nothing_predictable_raises_after_writing_the_report(model, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(UltraRefinerError, match="no input image could be predicted"):
        run_inference(BUNDLE, {"network": model, "device": "cpu", "input_dir": str(bad),
                               "output_dir": str(tmp_path / "o"), "num_workers": 0, "optimize": "none"})
    report = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert report["n_images"] == 0 and report["skipped"][0]["image"] == str(bad)


def test_unwritable_output_fails_with_the_os_error(model, inputs, tmp_path):
    """A folder that cannot be written is an ``OSError`` naming it (the CLI prints it as one line), not MONAI's
    wrapped RuntimeError."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError) as e:
        run_inference(BUNDLE, {"network": model, "device": "cpu", "input_dir": str(inputs),
                               "output_dir": str(blocker / "out"), "num_workers": 0, "optimize": "none"})
    assert str(blocker) in str(e.value)


def test_exclude_leaves_files_out_and_an_older_bundle_is_refused(model, inputs, tmp_path):
    """``exclude`` (a config id) leaves the matching files out of the run; an override that the config does not
    declare (a bundle older than the package) is an error naming the config, not an option silently never read."""
    save(inputs / "b_mask.png", (_scene(36, 52, seed=2) > 128).astype(np.uint8) * 255)
    report = run_inference(BUNDLE, {"network": model, "device": "cpu", "input_dir": str(inputs),
                                    "output_dir": str(tmp_path / "out"), "num_workers": 0, "optimize": "none",
                                    "exclude": "*_mask*,broken*"})
    assert sorted(Path(e["image"]).name for e in report["images"]) == ["a.jpg", "a.png", "b.png"]
    assert report["skipped"] == [] and not (tmp_path / "out" / "refined" / "b_mask.png").exists()
    old = tmp_path / "old_bundle"
    (old / "configs").mkdir(parents=True)
    config = json.loads((BUNDLE / "configs" / "inference.json").read_text())
    del config["exclude"]
    config["datalist"] = config["datalist"].replace(", @exclude", "")
    (old / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(BadInputError, match="declares no exclude: a bundle older than this package"):
        run_inference(old, {"network": model, "input_dir": str(inputs), "exclude": ["*_mask*"]})
