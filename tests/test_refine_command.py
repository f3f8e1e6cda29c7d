"""``python -m ultrarefiner refine`` and ``refine_folder``: refined masks of any segmenter's coarse masks.

One real run through the command line (LiteMedSAM zero-shot with its packaged weights: seconds per image on a CPU,
so it refines only two images); everything else calls the engine directly, with a stub refiner where a forward
pass is needed: batching, bad samples skipped and listed, resuming, option errors. Batch-size invariance and flip
TTA: tests/test_inference_batching.py, tests/test_tta.py."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save
from ultrarefiner.cli import main
from ultrarefiner.engines.inference import refine_folder as engine
from ultrarefiner.errors import UltraRefinerError

H, W = 96, 128


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def _scene(seed: int, h: int = H, w: int = W) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, label, coarse): a bright ellipse on noise; the coarse mask is a smaller, shifted ellipse."""
    rng = np.random.default_rng(seed)
    label = _ellipse(h, w, h / 2, w / 2, h / 4, w / 5)
    image = np.clip(50 + 150 * label + rng.normal(0, 10, (h, w)), 0, 255).astype(np.uint8)
    coarse = _ellipse(h, w, h / 2 + 4, w / 2 + 6, h / 5, w / 6)
    return image, label.astype(np.uint8) * 255, coarse.astype(np.uint8) * 255


def _csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """images/, masks/, labels/ with two good samples (one binary, one soft coarse mask) and five bad ones."""
    root = tmp_path_factory.mktemp("refine_data")
    img, msk, lab = root / "images", root / "masks", root / "labels"
    for i in (0, 1):
        image, label, coarse = _scene(i)
        if i == 1:  # a probability map (p * 255) instead of a 0/255 mask
            coarse = np.where(coarse > 0, 230, 40).astype(np.uint8)
        save(img / f"good{i}.png", image)
        save(msk / f"good{i}.png", coarse)
        save(lab / f"good{i}.png", label)
    image, label, coarse = _scene(2)
    # truncated image: its header reads, its pixels do not (fails in the data worker)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (H, W), dtype=np.uint8)).save(buf, format="PNG")
    (img / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (img / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image at all")  # no readable header either
    save(img / "mismatch.png", image)
    save(msk / "mismatch.png", coarse[:64, :64])
    save(img / "blank.png", image)
    save(msk / "blank.png", np.zeros((H, W), np.uint8))
    save(img / "nomask.png", image)
    for stem in ("truncated", "garbage", "blank", "mismatch", "nomask"):
        save(lab / f"{stem}.png", label)
        if stem in ("truncated", "garbage"):
            save(msk / f"{stem}.png", coarse)
    return {"images": img, "masks": msk, "labels": lab}


@pytest.fixture(scope="module")
def cli_run(folders, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The real command line, zero-shot LiteMedSAM, with labels, NIfTI and two data workers: the one run of this
    file that refines with SAM."""
    out = tmp_path_factory.mktemp("refine_out") / "out"
    res = subprocess.run([sys.executable, "-m", "ultrarefiner", "refine", "--images", str(folders["images"]),
                          "--masks", str(folders["masks"]), "--labels", str(folders["labels"]), "--output_dir",
                          str(out), "--zero_shot", "--nifti", "true", "--device", "cpu", "--amp", "false",
                          "--batch_size", "4", "--num_workers", "2"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def test_refine_without_labels_starts_without_monai(folders, tmp_path):
    """Without labels ``refine`` needs neither MONAI, MLflow nor Ignite (importing MONAI and MLflow took about 4 of
    the 13 s of a one-image run on 2 CPU cores, Ignite 0.6 s): the whole run, report and overlays included, leaves
    them unimported and prints no third-party warning."""
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(folders["images"] / "good0.png", images / "good0.png")
    out = tmp_path / "out"
    code = (f"import sys; from ultrarefiner.engines.inference.refine_folder import refine_folder; "
            f"refine_folder({str(images)!r}, {str(folders['masks'])!r}, {str(out)!r}, zero_shot=True, "
            f"device='cpu', num_workers=0); "
            f"print(sorted(m for m in ('monai', 'mlflow', 'ignite') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"
    assert "Warning" not in res.stderr, res.stderr[-3000:]  # e.g. timm's deprecation from the vendored TinyViT
    assert (out / "masks" / "good0.png").is_file() and (out / "overlays" / "good0.png").is_file()
    assert json.loads((out / "report.json").read_text())["summary"]["n_images"] == 1


def test_cli_masks_overlays_and_report(cli_run):
    import nibabel as nib

    out, res = cli_run
    mode = _umask_mode()
    for stem in ("good0", "good1"):
        mask = np.asarray(Image.open(out / "masks" / f"{stem}.png"))
        assert mask.shape == (H, W) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255} and (mask == 255).any()
        overlay = np.asarray(Image.open(out / "overlays" / f"{stem}.png"))
        assert overlay.shape == (H, W, 3)
        nii = np.asarray(nib.load(out / "masks" / f"{stem}.nii.gz").dataobj)
        assert nii.shape == (W, H, 1) and np.array_equal(nii[:, :, 0].T > 0, mask > 0)
    for f in [*(out / "masks").iterdir(), *(out / "overlays").iterdir(), out / "report.json", out / "report.csv",
              out / "skipped.csv", out / "progress.jsonl"]:
        assert stat.S_IMODE(f.stat().st_mode) == mode, f  # the umask's permissions, not mkstemp's 0600
    assert not list(out.rglob("*.tmp"))

    rows = _csv(out / "report.csv")
    assert [r["stem"] for r in rows] == ["good0", "good1"]
    for r in rows:
        assert 0.0 < float(r["pred_iou"]) <= 1.5 and math.isfinite(float(r["pred_iou"]))
        assert int(r["coarse_area"]) > 0 and int(r["refined_area"]) > 0
        assert 0.0 <= float(r["refined_dice"]) <= 1.0 and 0.0 <= float(r["coarse_iou"]) <= 1.0
        assert float(r["refined_hd95"]) >= 0.0
    # the soft mask's coarse area counts p > 0.5 only (230/255, not 40/255): the same ellipse as the binary one
    assert rows[0]["coarse_area"] == rows[1]["coarse_area"]
    saved = json.loads((out / "report.json").read_text())
    summary = saved["summary"]
    assert summary["n_images"] == 2 and summary["n_labelled"] == 2 and summary["n_skipped"] == 5
    assert summary["n_blank_labels"] == 0 and "no lesion pixel" not in res.stdout
    dice = summary["refined_vs_coarse"]["dice"]
    assert {"mean_a", "mean_b", "mean_diff", "ci95", "improved", "worsened", "unchanged"} <= set(dice)
    assert len(dice["ci95"]) == 2 and dice["n"] == 2
    assert set(summary["refined_vs_coarse"]) >= {"dice", "iou", "hd95"}
    assert saved["settings"]["refiner"] == engine.ZERO_SHOT
    assert len((out / "progress.jsonl").read_text().splitlines()) == 2
    assert "refined 2 image(s)" in res.stdout and "refined-coarse [95% CI]" in res.stdout and "hd95" in res.stdout
    assert "5 sample(s) skipped" in res.stdout


def test_bad_samples_are_listed_and_skipped(cli_run, folders):
    out, _ = cli_run
    reasons = {r["stem"]: r for r in _csv(out / "skipped.csv")}
    assert set(reasons) == {"truncated", "garbage", "mismatch", "blank", "nomask"}
    assert "unreadable image" in reasons["truncated"]["reason"]
    assert "unreadable image" in reasons["garbage"]["reason"]
    assert "differs from the image size" in reasons["mismatch"]["reason"]
    assert reasons["mismatch"]["file"] == str(folders["masks"] / "mismatch.png")
    assert "blank coarse mask" in reasons["blank"]["reason"]
    assert "no coarse mask" in reasons["nomask"]["reason"]
    assert not (out / "masks" / "blank.png").exists()


def test_second_run_skips_finished_images(cli_run, folders, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(cli_run[0], out)
    before = json.loads((out / "report.json").read_text())
    lines = (out / "progress.jsonl").read_text().splitlines()
    mtime = (out / "masks" / "good0.png").stat().st_mtime_ns

    def no_build(*_, **__):
        raise AssertionError("nothing is left to refine: the refiner must not be built")

    monkeypatch.setattr(engine, "create_model", no_build)
    with (out / "progress.jsonl").open("a") as f:
        f.write('{"stem": "cut sho')  # a crash in the middle of a line is tolerated
    report = engine.refine_folder(folders["images"], folders["masks"], out, labels=folders["labels"],
                                  zero_shot=True, device="cpu", num_workers=0)
    s = report["summary"]
    assert s["n_refined_now"] == 0 and s["n_resumed"] == 2 and s["n_skipped"] == 5
    assert report["images"] == before["images"]
    assert (out / "progress.jsonl").read_text().splitlines()[: len(lines)] == lines
    assert (out / "masks" / "good0.png").stat().st_mtime_ns == mtime
    # results of another refiner are not mixed into this folder
    other = tmp_path / "other.pt"
    other.write_bytes(b"x")
    with pytest.raises(UltraRefinerError, match="another refiner"):
        engine.refine_folder(folders["images"], folders["masks"], out, checkpoint=other, device="cpu")


class _StubEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, 64, 64)  # every image in the encoder frame, whatever its size
        self.batches.append(x.shape[0])
        return x[:, :1, ::16, ::16]


class _StubRefiner(torch.nn.Module):
    """SAMRefiner's interface without SAM: a LiteMedSAM-style 64 px geometry, an encoder that subsamples its input,
    refined = coarse > 0.5, three candidates (the third selected); a coarse mask marked at (0, 0) fails."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        from ultrarefiner.networks.sam_geometry import SamGeometry

        super().__init__()
        self.geometry = SamGeometry("litemedsam", 64, image_resize="exact")
        self.sam = SimpleNamespace(image_encoder=_StubEncoder())
        self.calls: list[tuple[int, int, int]] = []

    def preprocess_image(self, image: torch.Tensor, resized: bool = False) -> torch.Tensor:
        return self.geometry.preprocess_image(image, resized)

    def forward_sizes(self, image_embeddings: torch.Tensor, coarse: torch.Tensor,
                      original_sizes: list[tuple[int, int]]) -> dict[str, object]:
        from ultrarefiner.networks.sam_geometry import resize_mask

        # every coarse mask in the 64 px prompt frame, whatever its image's size
        assert coarse.shape[1:] == (1, 64, 64) and image_embeddings.shape[0] == coarse.shape[0] == len(original_sizes)
        assert 0.0 <= float(coarse.min()) and float(coarse.max()) <= 1.0
        if (coarse[:, 0, 0, 0] > 0).any():
            raise ValueError("odd image")
        b = coarse.shape[0]
        self.calls.append((b, *[tuple(s) for s in original_sizes]))
        iou = torch.tensor([[0.2, 0.5, 0.9]]).repeat(b, 1)
        return {"masks": [resize_mask((coarse[i : i + 1] - 0.5) * 20, tuple(s))[0]
                          for i, s in enumerate(original_sizes)],
                "iou_predictions": iou,
                "selection_weights": torch.nn.functional.one_hot(torch.full((b,), 2), 3).float()}


def test_0_1_label_maps_are_refined_and_scored_as_0_255_masks(tmp_path, monkeypatch):
    """Coarse masks and labels written as 0/1 label maps (nnU-Net, MONAI's SaveImage) are the masks they are: the
    same refined mask and the same scores as their 0/255 twins. Read by luminance, the coarse mask was skipped as
    blank and the label was empty, every Dice 0 without a word. Labels that stay blank are counted and named; a
    class-index map (lesion = 2), which read as blank, is skipped with its reason."""
    monkeypatch.setattr(engine, "create_model", lambda *_, **__: _StubRefiner())
    image, label, coarse = _scene(0, 40, 48)
    for stem, scale in (("levels255", 1), ("levels01", 255), ("classes02", 255), ("blank", 0)):
        save(tmp_path / "img" / f"{stem}.png", image)
        save(tmp_path / "msk" / f"{stem}.png", coarse // max(scale, 1))
        save(tmp_path / "lab" / f"{stem}.png", label * 0 if stem == "blank" else
             label // scale * (2 if stem == "classes02" else 1))
    out = tmp_path / "out"
    report = engine.refine_folder(tmp_path / "img", tmp_path / "msk", out, labels=tmp_path / "lab", zero_shot=True,
                                  batch_size=1, device="cpu", num_workers=0, writers=0, optimize="none")
    skipped = report["skipped"]
    assert [s["stem"] for s in skipped] == ["classes02"] and "multi-class label map" in skipped[0]["reason"]
    rows = {r["stem"]: r for r in report["images"]}
    assert rows["levels255"]["refined_dice"] > 0.3  # the stub's refined mask is the coarse one: Dice 0.48
    for key in ("label_area", "coarse_area", "refined_area", "coarse_dice", "refined_dice", "refined_hd95"):
        assert rows["levels01"][key] == rows["levels255"][key], key
    masks = [np.asarray(Image.open(out / "masks" / f"{stem}.png")) for stem in ("levels01", "levels255")]
    assert np.array_equal(*masks)
    # a blank label is counted and named, not scored in silence
    assert rows["levels255"]["label_area"] > 0 and rows["blank"]["label_area"] == 0
    assert report["summary"]["n_blank_labels"] == 1
    assert "1 label(s) have no lesion pixel" in engine.format_summary(report)
    assert "label_area" in _csv(out / "report.csv")[0]


def test_class_map_coarse_masks_and_labels_with_their_classes(tmp_path, monkeypatch, capsys):
    """A multi-class segmenter's coarse masks and labels (1 benign, 2 malignant; one as a palette PNG) are refined
    and scored as their 0/255 twins with --mask_classes 1,2 --label_classes 1,2. The settings are recorded, a 0/255
    coarse mask is skipped naming the values it holds, and the folder is not resumed from coarse masks read another
    way. Without the option the 0/2 coarse mask's skip reason names --mask_classes."""
    monkeypatch.setattr(engine, "create_model", lambda *_, **__: _StubRefiner())
    image, label, coarse = _scene(0, 40, 48)
    for stem, k in (("benign", 1), ("malignant", 2), ("palette", 2), ("twin", 0)):
        save(tmp_path / "img" / f"{stem}.png", image)
        if stem == "palette":
            pal = Image.fromarray(coarse // 255 * k, "P")
            pal.putpalette([0, 0, 0, 0, 0, 0, 40, 40, 40] + [0] * 759)  # class 2 drawn dark: its index counts
            pal.save(tmp_path / "msk" / f"{stem}.png")
        else:
            save(tmp_path / "msk" / f"{stem}.png", coarse if stem == "twin" else coarse // 255 * k)
        save(tmp_path / "lab" / f"{stem}.png", label if stem == "twin" else label // 255 * k)
    run = ["refine", "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk"), "--labels",
           str(tmp_path / "lab"), "--zero_shot", "--num_workers", "0", "--writers", "0", "--optimize", "none"]
    main([*run, "--output_dir", str(tmp_path / "plain")])
    plain = json.loads((tmp_path / "plain" / "report.json").read_text())
    reasons = {s["stem"]: s["reason"] for s in plain["skipped"]}
    assert "or pass --mask_classes with the lesion's values" in reasons["malignant"]
    main([*run, "--output_dir", str(tmp_path / "out"), "--mask_classes", "1,2", "--label_classes", "1,2"])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["mask_classes"] == report["settings"]["label_classes"] == [1, 2]
    rows = {r["stem"]: r for r in report["images"]}
    assert sorted(rows) == ["benign", "malignant", "palette"]
    assert report["skipped"][0]["reason"] == ("blank coarse mask: holds the values 0, 255, none of the classes 1, "
                                              "2, nothing to refine")
    twin = {r["stem"]: r for r in plain["images"]}["twin"]
    assert twin["refined_dice"] > 0.3
    for stem in rows:
        for key in ("label_area", "coarse_area", "refined_area", "coarse_dice", "refined_dice"):
            assert rows[stem][key] == twin[key], (stem, key)
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "masks" / f"{stem}.png")),
                              np.asarray(Image.open(tmp_path / "plain" / "masks" / "twin.png")))
    err = _cli_error([*run, "--output_dir", str(tmp_path / "out"), "--mask_classes", "2"], capsys)
    assert "holds results of another refiner" in err and "from coarse classes 1,2" in err
    err = _cli_error([*run, "--output_dir", str(tmp_path / "bad"), "--mask_classes", "benign"], capsys)
    assert "--mask_classes: class values are whole numbers" in err


def test_masks_and_labels_named_with_a_postfix(tmp_path, monkeypatch, capsys):
    """MONAI's SaveImage and the Zoo's bundles write <stem>_seg.png, BUSI names its labels <stem>_mask.png: matched
    with --mask_postfix / --label_postfix. Without them every image is skipped, and the reason names the option."""
    monkeypatch.setattr(engine, "create_model", lambda *_, **__: _StubRefiner())
    for i in range(2):
        image, label, coarse = _scene(i, 40, 48)
        save(tmp_path / "img" / f"case {i}.png", image)
        save(tmp_path / "msk" / f"case {i}_seg.png", coarse)
        save(tmp_path / "lab" / f"case {i}_mask.png", label)
    run = ["refine", "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk"), "--labels",
           str(tmp_path / "lab"), "--zero_shot", "--num_workers", "0", "--writers", "0", "--optimize", "none"]
    err = _cli_error([*run, "--output_dir", str(tmp_path / "none")], capsys)
    assert "no coarse mask named case 0.* in" in err and "set --mask_postfix _seg" in err
    err = _cli_error([*run, "--output_dir", str(tmp_path / "half"), "--mask_postfix", "_seg"], capsys)
    assert "no label named case 0.* in" in err and "set --label_postfix _mask" in err
    main([*run, "--output_dir", str(tmp_path / "out"), "--mask_postfix", "_seg", "--label_postfix", "_mask"])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["stem"] for r in report["images"]] == ["case 0", "case 1"] and not report["skipped"]
    assert all(r["refined_dice"] > 0.3 for r in report["images"])  # scored against the _mask labels
    assert report["settings"]["mask_postfix"] == "_seg" and report["settings"]["label_postfix"] == "_mask"
    assert sorted(f.name for f in (tmp_path / "out" / "masks").iterdir()) == ["case 0.png", "case 1.png"]
    err = _cli_error([*run, "--output_dir", str(tmp_path / "bad"), "--mask_postfix", "_seg.png"], capsys)
    assert "--mask_postfix goes before the extension" in err and "'_seg'" in err
    err = _cli_error([*run, "--output_dir", str(tmp_path / "bad"), "--label_postfix", "masks/x"], capsys)
    assert "--label_postfix is part of a file name, not a path" in err



def test_a_busi_class_folder_with_exclude(tmp_path, monkeypatch, capsys):
    """BUSI keeps each image's masks beside it (``x_mask.png``, ``x_mask_1.png``). Given that folder as the images
    and the labels, ``refine`` takes the masks for images too and lists each in skipped.csv; ``--exclude '*_mask*'``
    leaves them out (they are still read as the labels), and the report records it."""
    monkeypatch.setattr(engine, "create_model", lambda *_, **__: _StubRefiner())
    busi = tmp_path / "benign"
    for i in range(2):
        image, label, coarse = _scene(i, 40, 48)
        save(busi / f"benign ({i}).png", image)
        save(busi / f"benign ({i})_mask.png", label)
        save(tmp_path / "msk" / f"benign ({i}).png", coarse)
    save(busi / "benign (1)_mask_1.png", np.zeros((40, 48), np.uint8))
    run = ["refine", "--images", str(busi), "--masks", str(tmp_path / "msk"), "--labels", str(busi),
           "--label_postfix", "_mask", "--zero_shot", "--num_workers", "0", "--writers", "0", "--optimize", "none"]
    main([*run, "--output_dir", str(tmp_path / "all")])
    skipped = _csv(tmp_path / "all" / engine.SKIPPED_CSV)
    assert sorted(r["stem"] for r in skipped) == ["benign (0)_mask", "benign (1)_mask", "benign (1)_mask_1"]
    main([*run, "--output_dir", str(tmp_path / "out"), "--exclude", "*_mask*"])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["stem"] for r in report["images"]] == ["benign (0)", "benign (1)"] and not report["skipped"]
    assert report["settings"]["exclude"] == ["*_mask*"] and all(r["refined_dice"] > 0.3 for r in report["images"])
    assert sorted(f.name for f in (tmp_path / "out" / "masks").iterdir()) == ["benign (0).png", "benign (1).png"]
    err = _cli_error([*run, "--output_dir", str(tmp_path / "none"), "--exclude", "benign*"], capsys)
    assert f"{busi}: the exclude patterns benign* match every image file of the images folder (5), leaving none" in err
    err = _cli_error([*run, "--output_dir", str(tmp_path / "none"), "--exclude", "benign/*_mask*"], capsys)
    assert "exclude patterns match file names, not paths: got 'benign/*_mask*'" in err

def test_engine_batches_any_sizes_with_a_stub_refiner(tmp_path, monkeypatch):
    """Fast engine path: the encoder and the decoder batch images of any size (size order), a failing image is
    skipped alone, the selected candidate's IoU is reported."""
    stub = _StubRefiner()
    monkeypatch.setattr(engine, "create_model", lambda *_, **__: stub)
    sizes = {"a": (40, 48), "b": (40, 48), "c": (40, 48), "d": (30, 50), "odd": (40, 48)}
    for i, (stem, (h, w)) in enumerate(sizes.items()):
        image, _, coarse = _scene(i, h, w)
        coarse[0, 0] = 7 if stem == "odd" else 0
        save(tmp_path / "img" / f"{stem}.png", image)
        save(tmp_path / "msk" / f"{stem}.png", coarse)
    out = tmp_path / "out"
    report = engine.refine_folder(tmp_path / "img", tmp_path / "msk", out, zero_shot=True, batch_size=2,
                                  device="cpu", num_workers=0, writers=0, optimize="none")
    # batches in (size, name) order: [d, a] (two sizes, one encoder pass), [b, c], [odd] (fails alone)
    assert stub.sam.image_encoder.batches == [2, 2, 1]
    assert stub.calls == [(2, (30, 50), (40, 48)), (2, (40, 48), (40, 48))]  # one decoder pass per batch
    assert [r["stem"] for r in report["images"]] == ["a", "b", "c", "d"]
    assert [s["stem"] for s in report["skipped"]] == ["odd"]
    assert "refiner failed (ValueError: odd image)" in report["skipped"][0]["reason"]
    for r in report["images"]:
        assert r["pred_iou"] == pytest.approx(0.9) and r["refined_area"] == r["coarse_area"] > 0
        assert "refined_dice" not in r
        coarse = np.asarray(Image.open(tmp_path / "msk" / f"{r['stem']}.png")) > 127
        assert np.array_equal(np.asarray(Image.open(out / "masks" / f"{r['stem']}.png")) > 0, coarse)
    assert "refined_vs_coarse" not in report["summary"]
    assert report["settings"]["tta"] == "none" and report["settings"]["optimize"] == "none"
    assert "predicted IoU" in engine.format_summary(report)


@pytest.mark.parametrize("cores, workers", [(1, 1), (2, 2), (16, 4)])
def test_default_workers_follow_the_usable_cores(folders, tmp_path, monkeypatch, cores, workers):
    """Without --num_workers, refine starts 4 data workers but never more than the cores it may use: on a 2-core
    laptop 4 workers only compete with the refiner (and PyTorch warns about them at every run)."""
    import ultrarefiner.commands.args as args

    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        return {"images": [{}], "skipped": [], "summary": {}, "settings": {}}

    monkeypatch.setattr(args, "usable_cores", lambda: cores)
    monkeypatch.setattr(engine, "refine_folder", fake)
    monkeypatch.setattr(engine, "format_summary", lambda report: "")
    main(["refine", "--images", str(folders["images"]), "--masks", str(folders["masks"]),
          "--output_dir", str(tmp_path / "out"), "--zero_shot"])
    assert seen["num_workers"] == workers


def _cli_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_option_errors(folders, tmp_path, capsys, monkeypatch):
    base = ["refine", "--images", str(folders["images"]), "--masks", str(folders["masks"]),
            "--output_dir", str(tmp_path / "out")]
    err = _cli_error([*base, "--checkpoint", str(tmp_path / "x.pt"), "--zero_shot"], capsys)
    assert "--checkpoint and --zero_shot" in err and "Traceback" not in err
    err = _cli_error([*base, "--checkpoint", str(tmp_path / "missing.pt")], capsys)
    assert "missing.pt" in err and "not found" in err
    monkeypatch.setattr(engine, "DEFAULT_REFINER", tmp_path / "bundle" / "model.pt")
    err = _cli_error(base, capsys)
    assert "--checkpoint" in err and "--zero_shot" in err and str(tmp_path / "bundle" / "model.pt") in err
    missing = tmp_path / "no_such_images"
    err = _cli_error(["refine", "--images", str(missing), "--masks", str(folders["masks"]), "--output_dir",
                      str(tmp_path / "out"), "--zero_shot"], capsys)
    assert str(missing) in err and "images folder not found" in err
    (tmp_path / "empty").mkdir()
    err = _cli_error(["refine", "--images", str(tmp_path / "empty"), "--masks", str(folders["masks"]),
                      "--output_dir", str(tmp_path / "out"), "--zero_shot"], capsys)
    assert str(tmp_path / "empty") in err and "no image files" in err
    err = _cli_error([*base, "--zero_shot", "--nifti", "maybe"], capsys)
    assert "--nifti" in err
    err = _cli_error([*base, "--zero_shot", "--batch_size", "0"], capsys)
    assert "--batch_size" in err
    err = _cli_error([*base, "--zero_shot", "--writers", "-1"], capsys)
    assert "--writers" in err
    err = _cli_error([*base, "--zero_shot", "--tta", "rotate"], capsys)
    assert "--tta" in err and "flip" in err
    err = _cli_error([*base, "--zero_shot", "--optimize", "fastest"], capsys)
    assert "--optimize" in err and "jit_freeze" in err
    err = _cli_error([*base, "--zero_shot", "--box_source", "biggest"], capsys)
    assert "--box_source" in err and "components" in err
    assert not (tmp_path / "out" / "report.json").exists()


def test_nothing_refinable_fails(folders, tmp_path, capsys):
    img, msk = tmp_path / "img", tmp_path / "msk"
    img.mkdir()
    msk.mkdir()
    shutil.copy(folders["images"] / "blank.png", img / "blank.png")
    shutil.copy(folders["masks"] / "blank.png", msk / "blank.png")
    err = _cli_error(["refine", "--images", str(img), "--masks", str(msk), "--output_dir", str(tmp_path / "out"),
                      "--zero_shot", "--num_workers", "0"], capsys)
    assert "no image could be refined" in err and "blank coarse mask" in err
    assert "blank" in (tmp_path / "out" / "skipped.csv").read_text()


def test_a_failed_write_stops_the_run_and_a_rerun_finishes(tmp_path, monkeypatch):
    """Masks and overlays are written by threads (``BackgroundWrites``): a write failing there (disk full) stops
    the run with its OSError; what was logged before is whole, and the next run refines only the rest."""
    monkeypatch.setattr(engine, "create_model", lambda *_, **__: _StubRefiner())
    for i in range(5):
        image, _, coarse = _scene(i, 40, 48)
        save(tmp_path / "img" / f"s{i}.png", image)
        save(tmp_path / "msk" / f"s{i}.png", coarse)
    real = engine.write_png

    def full_disk(path, array, compress_level=None):
        if Path(path).name == "s3.png" and Path(path).parent.name == "overlays":
            raise OSError(28, "No space left on device", str(path))
        return real(path, array, compress_level)

    monkeypatch.setattr(engine, "write_png", full_disk)
    out = tmp_path / "out"
    run = dict(zero_shot=True, batch_size=1, device="cpu", num_workers=0, optimize="none")
    with pytest.raises(OSError, match="No space left") as e:
        engine.refine_folder(tmp_path / "img", tmp_path / "msk", out, **run)
    assert e.value.filename == str(out / "overlays" / "s3.png")
    logged = [json.loads(line)["stem"] for line in (out / "progress.jsonl").read_text().splitlines()]
    assert "s3" not in logged and len(logged) == len(set(logged))
    assert not (out / "report.json").exists() and not list(out.rglob("*.tmp"))
    monkeypatch.setattr(engine, "write_png", real)
    report = engine.refine_folder(tmp_path / "img", tmp_path / "msk", out, **run)
    assert [r["stem"] for r in report["images"]] == [f"s{i}" for i in range(5)]
    assert report["summary"]["n_refined_now"] == 5 - len(logged) and report["summary"]["n_resumed"] == len(logged)
