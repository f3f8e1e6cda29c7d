"""The bad-input campaign: every command and bundle fed every kind of bad input, with the exit status and message a
user gets. ``CASES`` is the matrix; ``docs/bad_inputs.md`` is its table (one row per case id, same exit status),
and a test keeps the two equal.

Commands run in-process (``ultrarefiner.cli.main``), bundles through ``monai.bundle.run`` in-process (an uncaught
exception is exit status 1 for ``python -m monai.bundle run``), with tiny networks. A full disk and a read-only
folder are simulated in ``ultrarefiner.utils.io`` (every atomic write and folder swap of the package goes through it;
chmod would not stop root): ``os.replace`` failing with ENOSPC, ``tempfile.mkstemp``/``mkdtemp`` with EROFS.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from bundle_utils import REPO, preprocessed_phantoms
from conftest import blob, save, scan
from ultrarefiner.cli import main
from ultrarefiner.data.imaging import read_mask

DOC = REPO / "docs" / "bad_inputs.md"
TU = {"img_size": 32, "num_classes": 2, "in_channels": 1, "variant": "R50-ViT-B_16", "vit_depth": 1}
TINY_TU = {**TU, "hidden_size": 32, "num_heads": 2, "mlp_dim": 64, "block_units": [1, 1, 1],
           "decoder_channels": [32, 16, 16, 8]}
ULTRA_KWARGS = {"transunet": TINY_TU, "sam": {"model_type": "tiny", "img_size": 256}, "refiner": {}}
SHIPPED_REFINER = REPO / "bundles" / "sam_refiner" / "models" / "model.pt"
TINY_SAM = {"sam_def": "$ultrarefiner.networks.build_tiny_sam(img_size=256, seed=0)", "image_resize": "torch"}


# ------------------------------------------------------------------------------------------------ shared inputs
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """Phantom data preprocessed with 2 folds, tiny checkpoints of each phase, a good image."""
    from ultrarefiner.engines.checkpoints.checkpoint import save_checkpoint
    from ultrarefiner.engines.training.e2e_setup import build_ultrarefiner
    from ultrarefiner.networks import TransUNet

    root = preprocessed_phantoms(tmp_path_factory.mktemp("bad_inputs"), n_benign=4, n_malignant=3)
    torch.manual_seed(0)
    for k in range(2):
        save_checkpoint(root / "ckpt" / "BUSI" / f"fold_{k}" / "best.pt",
                        {"model": TransUNet(**TU).state_dict(), "network_kwargs": TU})
    ultra = root / "ultra.pt"
    torch.save({"model": build_ultrarefiner(ULTRA_KWARGS, cache_embeddings=False).state_dict(),
                "network_kwargs": ULTRA_KWARGS}, ultra)
    truncated = root / "truncated.pt"
    data = (root / "ckpt" / "BUSI" / "fold_0" / "best.pt").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    good = save(root / "good" / "a.png", np.clip(60 + 120 * (blob() > 0) + scan(1) // 8, 0, 255).astype(np.uint8))
    return SimpleNamespace(root=root, processed=root / "processed", ckpts=root / "ckpt",
                           transunet=root / "ckpt" / "BUSI" / "fold_0" / "best.pt", ultra=ultra,
                           truncated=truncated, good=good)


def _copy_processed(w: SimpleNamespace, tmp: Path) -> Path:
    shutil.copytree(w.processed, tmp / "processed")
    return tmp / "processed"


def _first_training(processed: Path) -> dict:
    return json.loads((processed / "BUSI" / "datalist.json").read_text())["training"][0]


def _raw_bus(tmp: Path, n: int = 4) -> Path:
    """R/BUS with ``n`` good pairs (40x48)."""
    root = tmp / "raw" / "BUS"
    for i in range(1, n + 1):
        save(root / "original" / f"{i:06d}.png", scan(i))
        save(root / "GT" / f"{i:06d}.png", blob())
    return tmp / "raw"


def _preprocess_argv(raw: Path, out: Path, *extra: str) -> list[str]:
    return ["preprocess", "--raw_root", str(raw), "--output_root", str(out), "--datasets", "BUS", "--n_splits",
            "2", "--test_ratio", "0", "--num_workers", "1", *extra]


def _truncated_png(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(scan(9)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def _check_modes(folder: Path) -> None:
    """Outputs get the umask's permissions (0644 files, 0755 folders), not those of mkstemp/mkdtemp (0600/0700)."""
    import stat

    from ultrarefiner.utils.io import DIR_MODE, FILE_MODE

    for p in folder.rglob("*"):
        assert stat.S_IMODE(p.stat().st_mode) == (DIR_MODE if p.is_dir() else FILE_MODE), p


def _stored_mask(out: Path, key: str) -> np.ndarray:
    return np.asarray(Image.open(out / "BUS" / "masks" / f"{key}.png")) > 0


# ------------------------------------------------------------------------------------------------ failures
class _FullDiskOS:
    """``os`` as ``ultrarefiner.utils.io`` sees it on a full disk: putting a written file in place fails."""

    def __getattr__(self, name: str):
        return getattr(os, name)

    @staticmethod
    def replace(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _ReadOnlyTempfile:
    """``tempfile`` as ``ultrarefiner.utils.io`` sees it in a read-only folder: nothing can be created there."""

    def __getattr__(self, name: str):
        return getattr(tempfile, name)

    @staticmethod
    def mkstemp(dir=None, prefix="", suffix=""):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(str(dir), f"{prefix}xyz{suffix}"))

    mkdtemp = mkstemp


def _break_disk(monkeypatch, kind: str) -> None:
    import ultrarefiner.utils.io as uio

    if kind == "full":
        monkeypatch.setattr(uio, "os", _FullDiskOS())
    else:
        monkeypatch.setattr(uio, "tempfile", _ReadOnlyTempfile())


# ------------------------------------------------------------------------------------------------ runners
def cli(argv: list, capsys) -> tuple[int, str]:
    """``python -m ultrarefiner ...`` in-process: (exit status, stdout + stderr)."""
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out + out.err


def bundle(name: str, configs: list[str], overrides: dict) -> tuple[int, str]:
    """``python -m monai.bundle run --config_file ...`` in-process: (exit status, the traceback an error prints)."""
    from monai.bundle import run

    root = REPO / "bundles" / name
    try:
        run(config_file=[str(root / "configs" / c) for c in configs], meta_file=str(root / "configs" / "metadata.json"),
            bundle_root=str(root), **overrides)
        return 0, ""
    except Exception as e:
        return 1, "".join(traceback.format_exception(e))


def _train_overrides(w: SimpleNamespace, processed: Path, ckpt_root: Path, **extra) -> dict:
    return {"data_root": str(processed), "ckpt_root": str(ckpt_root), "model_path": str(ckpt_root / "model.pt"),
            "n_splits": 2, "img_size": 32, "vit_depth": 1, "epochs": 1, "epoch_length": 1, "batch_size": 2,
            "num_workers": 0, "cache": "memory", "device": "$torch.device('cpu')", "amp": False, **extra}


# ------------------------------------------------------------------------------------------------ preprocess
def pre_corrupt(w, tmp, capsys, monkeypatch):
    raw = _raw_bus(tmp)
    (raw / "BUS" / "original" / "000002.png").write_bytes(b"not an image at all")
    code, out = cli(_preprocess_argv(raw, tmp / "out"), capsys)
    assert "000002.png" in out
    return code, out


def pre_truncated(w, tmp, capsys, monkeypatch):
    raw = _raw_bus(tmp)
    _truncated_png(raw / "BUS" / "original" / "000002.png")
    code, out = cli(_preprocess_argv(raw, tmp / "out"), capsys)
    assert "000002.png" in out
    return code, out


def pre_16bit(w, tmp, capsys, monkeypatch):
    raw = _raw_bus(tmp)
    Image.fromarray(scan(2).astype(np.uint16) * 257).save(raw / "BUS" / "original" / "000002.png")
    assert Image.open(raw / "BUS" / "original" / "000002.png").mode.startswith("I")
    code, out = cli(_preprocess_argv(raw, tmp / "out"), capsys)
    stored = Image.open(tmp / "out" / "BUS" / "images" / "000002.png")
    assert stored.mode == "L" and np.array_equal(np.asarray(stored), scan(2))  # 16-bit rescaled, not clipped
    return code, out


def _rgba_case(tmp, capsys, rgba: np.ndarray) -> tuple[int, str, Path]:
    raw = _raw_bus(tmp)
    save(raw / "BUS" / "GT" / "000002.png", rgba)
    return (*cli(_preprocess_argv(raw, tmp / "out"), capsys), tmp / "out")


def pre_rgba_alpha(w, tmp, capsys, monkeypatch):
    rgba = np.full((40, 48, 4), 255, np.uint8)  # white everywhere, lesion = the opaque pixels
    rgba[..., 3] = np.where(blob(r=3) > 0, 255, 0)
    code, out, res = _rgba_case(tmp, capsys, rgba)
    assert np.array_equal(_stored_mask(res, "000002"), blob(r=3) > 0)  # 29 pixels (1.5%), not 100%
    return code, out


def pre_rgba_opaque(w, tmp, capsys, monkeypatch):
    rgba = np.zeros((40, 48, 4), np.uint8)
    rgba[..., 3] = 255  # opaque everywhere: the colour carries the mask
    rgba[blob(r=5) > 0, :3] = 255
    code, out, res = _rgba_case(tmp, capsys, rgba)
    assert np.array_equal(_stored_mask(res, "000002"), blob(r=5) > 0)
    return code, out


def pre_rgba_ambiguous(w, tmp, capsys, monkeypatch):
    rgba = np.zeros((40, 48, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[blob(r=5) > 0] = (255, 255, 255, 0)  # bright but transparent, dark but opaque elsewhere
    code, out, res = _rgba_case(tmp, capsys, rgba)
    assert not (res / "BUS" / "masks" / "000002.png").exists()
    return code, out


def pre_mask_size(w, tmp, capsys, monkeypatch):
    raw = _raw_bus(tmp)
    save(raw / "BUS" / "GT" / "000002.png", blob(h=20, w=30, cy=10, cx=15))
    code, out = cli(_preprocess_argv(raw, tmp / "out"), capsys)
    assert str(raw / "BUS" / "GT" / "000002.png") in out and str(raw / "BUS" / "original" / "000002.png") in out
    return code, out


def pre_class_map(w, tmp, capsys, monkeypatch):
    raw = _raw_bus(tmp)
    save(raw / "BUS" / "GT" / "000002.png", blob() // 255 * 2)  # 0 background, 2 malignant
    code, out = cli(_preprocess_argv(raw, tmp / "out"), capsys)
    assert str(raw / "BUS" / "GT" / "000002.png") in out and not (tmp / "out" / "BUS" / "masks" / "000002.png").exists()
    return code, out


def pre_inverted_mask(w, tmp, capsys, monkeypatch):
    raw = _raw_bus(tmp)
    save(raw / "BUS" / "GT" / "000002.png", 255 - blob())  # lesion black on white
    code, out = cli(_preprocess_argv(raw, tmp / "out"), capsys)
    assert str(raw / "BUS" / "GT" / "000002.png") in out and not (tmp / "out" / "BUS" / "masks" / "000002.png").exists()
    return code, out


def pre_empty(w, tmp, capsys, monkeypatch):
    (tmp / "raw").mkdir()
    return cli(["preprocess", "--raw_root", tmp / "raw", "--output_root", tmp / "out"], capsys)


def pre_missing(w, tmp, capsys, monkeypatch):
    return cli(["preprocess", "--raw_root", tmp / "nope", "--output_root", tmp / "out"], capsys)


def pre_wrong_dataset(w, tmp, capsys, monkeypatch):
    return cli(_preprocess_argv(_raw_bus(tmp), tmp / "out")[:-8] + ["--datasets", "BUSY"], capsys)


def pre_nothing_usable(w, tmp, capsys, monkeypatch):
    raw = _raw_bus(tmp, n=2)
    for f in (raw / "BUS" / "original").glob("*.png"):
        f.write_bytes(b"garbage")
    return cli(_preprocess_argv(raw, tmp / "out"), capsys)


def pre_stale_tmp(w, tmp, capsys, monkeypatch):
    stale = tmp / "out" / "BUS" / "images" / ".000001.png.k1ll3d.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")  # what a killed run leaves
    code, out = cli(_preprocess_argv(_raw_bus(tmp), tmp / "out"), capsys)
    assert not stale.exists() and not list((tmp / "out").rglob("*.tmp"))
    _check_modes(tmp / "out")
    return code, out


def pre_disk(kind: str) -> Callable:
    def case(w, tmp, capsys, monkeypatch):
        raw = _raw_bus(tmp)
        _break_disk(monkeypatch, kind)
        code, out = cli(_preprocess_argv(raw, tmp / "out"), capsys)
        assert str(tmp / "out") in out and "Traceback" not in out and len(out.strip().splitlines()) == 1
        assert not list((tmp / "out").rglob("*.tmp"))
        return code, out

    return case


# ------------------------------------------------------------------------------------------------ augment
def _augment_argv(processed: Path, out: Path, *extra) -> list:
    return ["augment", "--data_root", processed, "--output_dir", out, "--datasets", "BUSI", "--target_samples", 4,
            "--shard_size", 4, "--num_workers", 1, "--resolution", 64, *extra]


def aug_fold(fold: int) -> Callable:
    def case(w, tmp, capsys, monkeypatch):
        code, out = cli(_augment_argv(w.processed, tmp / "aug", "--fold", fold), capsys)
        assert not (tmp / "aug").exists()
        return code, out

    return case


def aug_wrong_dataset(w, tmp, capsys, monkeypatch):
    return cli(["augment", "--data_root", w.processed, "--output_dir", tmp / "aug", "--datasets", "BUSY"], capsys)


def aug_missing_root(w, tmp, capsys, monkeypatch):
    return cli(_augment_argv(tmp / "nope", tmp / "aug"), capsys)


def aug_disk_full(w, tmp, capsys, monkeypatch):
    _break_disk(monkeypatch, "full")
    code, out = cli(_augment_argv(w.processed, tmp / "aug", "--fold", 0), capsys)
    assert str(tmp / "aug") in out and "Traceback" not in out
    return code, out


# ------------------------------------------------------------------------------------------------ predict-transunet
def _pt_argv(processed: Path, ckpts: Path, out: Path, *extra) -> list:
    return ["predict-transunet", "--data_root", processed, "--dataset", "BUSI", "--checkpoint_root", ckpts,
            "--output_dir", out, "--n_splits", 2, "--device", "cpu", "--amp", "false", *extra]


def pt_corrupt(w, tmp, capsys, monkeypatch):
    processed = _copy_processed(w, tmp)
    item = _first_training(processed)
    (processed / "BUSI" / item["image"]).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    code, out = cli(_pt_argv(processed, w.ckpts, tmp / "pred"), capsys)
    skipped = json.loads((tmp / "pred" / "BUSI" / "skipped.json").read_text())
    assert [Path(s["file"]).name for s in skipped] == [Path(item["image"]).name]
    dl = json.loads((tmp / "pred" / "BUSI" / "datalist.json").read_text())
    assert Path(item["image"]).name not in {Path(e["image"]).name for e in dl["training"]}
    _check_modes(tmp / "pred")  # the staged folder gets the usual modes, not mkdtemp's 0700
    return code, out


def pt_mask_size(w, tmp, capsys, monkeypatch):
    processed = _copy_processed(w, tmp)
    item = _first_training(processed)
    save(processed / "BUSI" / item["label"], blob(h=20, w=30, cy=10, cx=15))
    return cli(_pt_argv(processed, w.ckpts, tmp / "pred"), capsys)


def _pt_bad_ckpt(w, tmp, capsys, source: Path) -> tuple[int, str]:
    ckpts = tmp / "ckpt"
    shutil.copytree(w.ckpts, ckpts)
    shutil.copy(source, ckpts / "BUSI" / "fold_1" / "best.pt")  # fold 0 runs first: nothing may be half-written
    code, out = cli(_pt_argv(w.processed, ckpts, tmp / "pred"), capsys)
    assert str(ckpts / "BUSI" / "fold_1" / "best.pt") in out and len(out) < 2000
    assert not list((tmp / "pred").rglob("*.png")) and not (tmp / "pred" / "BUSI").exists()
    return code, out


def pt_wrong_phase(w, tmp, capsys, monkeypatch):
    return _pt_bad_ckpt(w, tmp, capsys, w.ultra)


def pt_truncated(w, tmp, capsys, monkeypatch):
    return _pt_bad_ckpt(w, tmp, capsys, w.truncated)


def pt_wrong_dataset(w, tmp, capsys, monkeypatch):
    return cli(_pt_argv(w.processed, w.ckpts, tmp / "pred")[:3] + ["--dataset", "BUSY"]
               + _pt_argv(w.processed, w.ckpts, tmp / "pred")[5:], capsys)


def pt_n_splits(w, tmp, capsys, monkeypatch):
    return cli(_pt_argv(w.processed, w.ckpts, tmp / "pred") + ["--n_splits", 3], capsys)


def pt_disk_full(w, tmp, capsys, monkeypatch):
    assert cli(_pt_argv(w.processed, w.ckpts, tmp / "pred"), capsys)[0] == 0
    before = {p: p.read_bytes() for p in (tmp / "pred").rglob("*") if p.is_file()}
    _break_disk(monkeypatch, "full")
    code, out = cli(_pt_argv(w.processed, w.ckpts, tmp / "pred"), capsys)
    after = {p: p.read_bytes() for p in (tmp / "pred").rglob("*") if p.is_file()}
    assert after == before  # the earlier output is whole, nothing half-written next to it
    return code, out


# ------------------------------------------------------------------------------------------------ predict
def _predict(w, tmp, capsys, inputs, ckpt) -> tuple[int, str]:
    return cli(["predict", "--input", inputs, "--output_dir", tmp / "out", "--checkpoint", ckpt, "--device", "cpu",
                "--amp", "false"], capsys)


def pr_corrupt(w, tmp, capsys, monkeypatch):
    src = tmp / "in"
    src.mkdir()
    shutil.copy(w.good, src / "a.png")
    (src / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, out = _predict(w, tmp, capsys, src, w.ultra)
    assert "b.png" in out
    return code, out


def pr_ckpt(which: str) -> Callable:
    def case(w, tmp, capsys, monkeypatch):
        path = {"phase1": w.transunet, "phase2": SHIPPED_REFINER, "truncated": w.truncated}[which]
        code, out = _predict(w, tmp, capsys, w.good, path)
        assert str(path) in out and len(out) < 2000  # no dump of state_dict keys
        return code, out

    return case


def pr_missing(w, tmp, capsys, monkeypatch):
    return _predict(w, tmp, capsys, tmp / "nope", w.ultra)


def pr_empty(w, tmp, capsys, monkeypatch):
    (tmp / "empty").mkdir()
    return _predict(w, tmp, capsys, tmp / "empty", w.ultra)


def pr_read_only(w, tmp, capsys, monkeypatch):
    _break_disk(monkeypatch, "read-only")
    code, out = _predict(w, tmp, capsys, w.good, w.ultra)
    assert str(tmp / "out") in out and "Traceback" not in out
    return code, out


# ------------------------------------------------------------------------------------------------ refine
def _refine_folders(tmp: Path) -> tuple[Path, Path]:
    images, masks = tmp / "images", tmp / "masks"
    save(images / "a.png", scan(1))
    save(masks / "a.png", blob())
    return images, masks


def _refine(tmp: Path, capsys, images: Path, masks: Path, *extra) -> tuple[int, str]:
    return cli(["refine", "--images", images, "--masks", masks, "--output_dir", tmp / "out", "--device", "cpu",
                "--amp", "false", "--num_workers", 0, *extra], capsys)


def rf_corrupt(w, tmp, capsys, monkeypatch):
    images, masks = _refine_folders(tmp)
    (images / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    save(masks / "b.png", blob())
    code, out = _refine(tmp, capsys, images, masks, "--zero_shot")
    assert "b.png" in (tmp / "out" / "skipped.csv").read_text()
    return code, out


def rf_mask_size(w, tmp, capsys, monkeypatch):
    images, masks = _refine_folders(tmp)
    save(images / "b.png", scan(2))
    save(masks / "b.png", blob(h=20, w=30, cy=10, cx=15))
    return _refine(tmp, capsys, images, masks, "--zero_shot")


def rf_logit_mask(w, tmp, capsys, monkeypatch):
    images, masks = _refine_folders(tmp)
    save(images / "b.png", scan(2))
    logits = np.where(blob() > 0, 4.0, -6.0).astype(np.float32)  # a segmenter's raw output, not probabilities
    Image.fromarray(logits, mode="F").save(masks / "b.tif")
    code, out = _refine(tmp, capsys, images, masks, "--zero_shot")
    assert "b.tif" in (tmp / "out" / "skipped.csv").read_text()
    return code, out


def rf_class_map_mask(w, tmp, capsys, monkeypatch):
    images, masks = _refine_folders(tmp)
    save(images / "b.png", scan(2))
    save(masks / "b.png", (blob() > 0).astype(np.uint8) * 2)  # a multi-class segmenter's output: class 2, malignant
    code, out = _refine(tmp, capsys, images, masks, "--zero_shot")
    assert "b.png" in out and "a multi-class label map?" in (tmp / "out" / "skipped.csv").read_text()
    assert "or pass --mask_classes with the lesion's values" in out
    return code, out


def rf_colour_class_map(w, tmp, capsys, monkeypatch):
    images, masks = _refine_folders(tmp)
    save(images / "b.png", scan(2))
    drawn = np.zeros((40, 48, 3), np.uint8)
    drawn[..., 0] = blob()  # a red drawing given as a class map: colours, not indices
    save(masks / "b.png", drawn)
    save(masks / "a.png", (blob() > 0).astype(np.uint8) * 2)
    code, out = _refine(tmp, capsys, images, masks, "--zero_shot", "--mask_classes", "1,2")
    assert "b.png" in out and "in colour: a class map" in (tmp / "out" / "skipped.csv").read_text()
    return code, out


def rf_bad_classes(w, tmp, capsys, monkeypatch):
    images, masks = _refine_folders(tmp)
    return _refine(tmp, capsys, images, masks, "--zero_shot", "--mask_classes", "0,2")


def rf_exclude_all(w, tmp, capsys, monkeypatch):
    images, masks = _refine_folders(tmp)
    return _refine(tmp, capsys, images, masks, "--zero_shot", "--exclude", "*.PNG")


def rf_postfix(w, tmp, capsys, monkeypatch):
    images, masks = _refine_folders(tmp)
    (masks / "a.png").rename(masks / "a_seg.png")  # MONAI's SaveImage naming
    return _refine(tmp, capsys, images, masks, "--zero_shot")


def rf_ckpt(which: str) -> Callable:
    def case(w, tmp, capsys, monkeypatch):
        images, masks = _refine_folders(tmp)
        path = {"phase3": w.ultra, "truncated": w.truncated}[which]
        code, out = _refine(tmp, capsys, images, masks, "--checkpoint", path)
        assert str(path) in out
        return code, out

    return case


def rf_missing(w, tmp, capsys, monkeypatch):
    _, masks = _refine_folders(tmp)
    return _refine(tmp, capsys, tmp / "nope", masks, "--zero_shot")


def rf_empty(w, tmp, capsys, monkeypatch):
    _, masks = _refine_folders(tmp)
    (tmp / "empty").mkdir()
    return _refine(tmp, capsys, tmp / "empty", masks, "--zero_shot")


def rf_disk_full(w, tmp, capsys, monkeypatch):
    images, masks = _refine_folders(tmp)
    _break_disk(monkeypatch, "full")
    code, out = _refine(tmp, capsys, images, masks, "--zero_shot")
    assert str(tmp / "out") in out and "Traceback" not in out
    return code, out


# ------------------------------------------------------------------------------------------------ export-bundle
def _tiny_transunet_weights(path: Path) -> Path:
    from ultrarefiner.networks import TransUNet

    torch.manual_seed(1)
    torch.save(TransUNet(in_channels=1, num_classes=2, img_size=32, vit_depth=1).state_dict(), path)
    return path


def _export(tmp: Path, capsys, ckpt: Path, *extra) -> tuple[int, str]:
    return cli(["export-bundle", "--bundle", REPO / "bundles" / "transunet", "--output", tmp / "dist",
                "--ckpt_file", ckpt, "--overrides", '{"img_size": 32, "vit_depth": 1}', "--spatial_shape", "32,32",
                *extra], capsys)


def _earlier_export(tmp: Path, capsys) -> dict[Path, bytes]:
    """A good export (copy only) and its files, to compare after a failed one."""
    assert _export(tmp, capsys, _tiny_transunet_weights(tmp / "good.pt"), "--noverify")[0] == 0
    _check_modes(tmp / "dist")
    return {p: p.read_bytes() for p in (tmp / "dist").rglob("*") if p.is_file()}


def _unchanged(tmp: Path, before: dict[Path, bytes]) -> None:
    assert {p: p.read_bytes() for p in (tmp / "dist").rglob("*") if p.is_file()} == before
    assert [p.name for p in (tmp / "dist").iterdir() if p.name.startswith(".")] == []


def ex_ckpt(which: str) -> Callable:
    def case(w, tmp, capsys, monkeypatch):
        before = _earlier_export(tmp, capsys)
        path = {"truncated": w.truncated, "phase3": w.ultra, "missing": tmp / "missing.pt"}[which]
        code, out = _export(tmp, capsys, path)
        assert str(path) in out
        _unchanged(tmp, before)
        return code, out

    return case


def ex_check_fails(w, tmp, capsys, monkeypatch):
    import ultrarefiner.zoo.export as export

    before = _earlier_export(tmp, capsys)
    weights = _tiny_transunet_weights(tmp / "new.pt")

    def fake(command, folder, args, overrides, cwd, timeout):  # the MONAI checks, ckpt_export failing
        return subprocess.CompletedProcess([command], 1 if command == "ckpt_export" else 0, "", "RuntimeError: boom")

    monkeypatch.setattr(export, "_bundle_cmd", fake)
    code, out = _export(tmp, capsys, weights)
    assert str(weights) in out
    _unchanged(tmp, before)
    return code, out


def ex_read_only(w, tmp, capsys, monkeypatch):
    before = _earlier_export(tmp, capsys)
    _break_disk(monkeypatch, "read-only")
    code, out = _export(tmp, capsys, _tiny_transunet_weights(tmp / "new.pt"), "--noverify")
    _unchanged(tmp, before)
    assert str(tmp / "dist") in out and "Traceback" not in out
    return code, out


def ex_not_bundle(w, tmp, capsys, monkeypatch):
    return cli(["export-bundle", "--bundle", tmp, "--output", tmp / "dist"], capsys)


# ------------------------------------------------------------------------------------------------ bundles
def bu_train_fold(name: str, fold: int) -> Callable:
    def case(w, tmp, capsys, monkeypatch):
        extra = {"transunet_ckpt": str(w.transunet), "refiner_ckpt": str(SHIPPED_REFINER)} if name == "ultrarefiner" \
            else {}
        code, out = bundle(name, ["train.json"], _train_overrides(w, w.processed, tmp / "ckpt", fold=fold, **extra))
        assert not list(tmp.rglob(f"fold_{fold}"))  # refused before any work: not even its folder
        return code, out

    return case


def bu_train_wrong_dataset(w, tmp, capsys, monkeypatch):
    code, out = bundle("transunet", ["train.json"], _train_overrides(w, w.processed, tmp / "ckpt", dataset_name="BUSY"))
    assert not (tmp / "ckpt").exists()
    return code, out


def bu_train_mask_size(w, tmp, capsys, monkeypatch):
    processed = _copy_processed(w, tmp)
    item = _first_training(processed)
    save(processed / "BUSI" / item["label"], blob(h=20, w=30, cy=10, cx=15))
    code, out = bundle("transunet", ["train.json"], _train_overrides(w, processed, tmp / "ckpt"))
    assert str(processed / "BUSI" / item["image"]) in out and not list((tmp / "ckpt").rglob("*.pt"))
    return code, out


def bu_train_class_map(w, tmp, capsys, monkeypatch):
    processed = _copy_processed(w, tmp)
    item = _first_training(processed)
    label = processed / "BUSI" / item["label"]
    save(label, read_mask(label).astype(np.uint8) * 2)  # its lesion as class 2 of a multi-class map
    code, out = bundle("transunet", ["train.json"], _train_overrides(w, processed, tmp / "ckpt"))
    assert str(label) in out and not list((tmp / "ckpt").rglob("*.pt"))
    return code, out


def bu_inference(name: str, folder: str) -> Callable:
    def case(w, tmp, capsys, monkeypatch):
        src = tmp / folder
        if folder == "empty":
            src.mkdir()
        overrides = {"input_dir": str(src), "output_dir": str(tmp / "out"), "device": "$torch.device('cpu')",
                     "amp": False}
        if name == "transunet":
            overrides.update(img_size=32, vit_depth=1, ckpt_path=str(w.transunet))
        elif name == "sam_refiner":
            from monai.bundle import ConfigParser

            parser = ConfigParser()
            parser.read_config(str(REPO / "bundles" / name / "configs" / "inference.json"))
            parser.update({"bundle_root": str(REPO / "bundles" / name), **TINY_SAM})
            torch.save(parser.get_parsed_content("network_def").refiner.state_dict(), tmp / "tiny_refiner.pt")
            overrides.update(TINY_SAM, ckpt_path=str(tmp / "tiny_refiner.pt"), coarse_dir=str(tmp / "coarse"))
        else:
            overrides.update(network_kwargs=ULTRA_KWARGS, ckpt_path=str(w.ultra))
        code, out = bundle(name, ["inference.json"], overrides)
        assert str(src) in out and not (tmp / "out").exists()
        return code, out

    return case


# ------------------------------------------------------------------------------------------------ the matrix
P, A, T, R, F, X = "preprocess", "augment", "predict-transunet", "predict", "refine", "export-bundle"
BT, BI = "bundle {} train.json", "bundle {} inference.json"
CASES: list[dict] = [
    # preprocess: bad files are reported (stdout, preprocess_report.json) and skipped; the rest is kept
    dict(id="preprocess-corrupt-png", command=P, exit=0, message="unreadable image", run=pre_corrupt),
    dict(id="preprocess-truncated-png", command=P, exit=0, message="unreadable image", run=pre_truncated),
    dict(id="preprocess-16bit-png", command=P, exit=0, message="Datalists and report written", run=pre_16bit),
    dict(id="preprocess-rgba-alpha-mask", command=P, exit=0, message="Datalists and report written",
         run=pre_rgba_alpha),
    dict(id="preprocess-rgba-opaque-mask", command=P, exit=0, message="Datalists and report written",
         run=pre_rgba_opaque),
    dict(id="preprocess-rgba-ambiguous-mask", command=P, exit=0, message="cannot tell which is the lesion",
         run=pre_rgba_ambiguous),
    dict(id="preprocess-mask-size", command=P, exit=0, message="mask size 30x20 (WxH) differs from image size 48x40",
         run=pre_mask_size),
    dict(id="preprocess-multi-class-mask", command=P, exit=0, message="values 0, 2, which read as no lesion: a "
         "multi-class label map?", run=pre_class_map),
    dict(id="preprocess-inverted-mask", command=P, exit=0, message="label is lesion along the whole image border "
         "with background inside: an inverted mask?", run=pre_inverted_mask),
    dict(id="preprocess-empty-folder", command=P, exit=2, message="no dataset folder found", run=pre_empty),
    dict(id="preprocess-missing-folder", command=P, exit=2, message="raw_root is not a folder", run=pre_missing),
    dict(id="preprocess-wrong-dataset", command=P, exit=2, message="unknown value(s) BUSY", run=pre_wrong_dataset),
    dict(id="preprocess-nothing-usable", command=P, exit=2, message="no usable sample", run=pre_nothing_usable),
    dict(id="preprocess-stale-temp-file", command=P, exit=0, message="Datalists and report written",
         run=pre_stale_tmp),
    dict(id="preprocess-disk-full", command=P, exit=2, message="No space left on device", run=pre_disk("full")),
    dict(id="preprocess-read-only", command=P, exit=2, message="Read-only file system", run=pre_disk("read-only")),
    # augment
    dict(id="augment-fold-too-large", command=A, exit=2, message="fold 2 does not exist", run=aug_fold(2)),
    dict(id="augment-fold-negative", command=A, exit=2, message="--fold must be in [0, 99], got -1",
         run=aug_fold(-1)),
    dict(id="augment-wrong-dataset", command=A, exit=2, message="no datalist", run=aug_wrong_dataset),
    dict(id="augment-missing-folder", command=A, exit=2, message="data_root is not a folder", run=aug_missing_root),
    dict(id="augment-disk-full", command=A, exit=2, message="No space left on device", run=aug_disk_full),
    # predict-transunet: bad samples listed in skipped.json; the output folder is swapped in only when complete
    dict(id="predict-transunet-corrupt-png", command=T, exit=0, message="1 image(s) skipped", run=pt_corrupt),
    dict(id="predict-transunet-mask-size", command=T, exit=0, message="mask size 30x20 (WxH) differs from the size",
         run=pt_mask_size),
    dict(id="predict-transunet-wrong-phase-checkpoint", command=T, exit=2,
         message="is a phase-3 UltraRefiner checkpoint (bundles/ultrarefiner); a transunet model needs a phase-1",
         run=pt_wrong_phase),
    dict(id="predict-transunet-truncated-checkpoint", command=T, exit=2, message="not a readable PyTorch checkpoint",
         run=pt_truncated),
    dict(id="predict-transunet-wrong-dataset", command=T, exit=2, message="no datalist", run=pt_wrong_dataset),
    dict(id="predict-transunet-wrong-n-splits", command=T, exit=2, message="has 2 folds, --n_splits is 3",
         run=pt_n_splits),
    dict(id="predict-transunet-disk-full", command=T, exit=2, message="No space left on device", run=pt_disk_full),
    # predict
    dict(id="predict-corrupt-png", command=R, exit=0, message="1 skipped", run=pr_corrupt),
    dict(id="predict-phase1-checkpoint", command=R, exit=2,
         message="is a phase-1 TransUNet checkpoint (bundles/transunet); an ultrarefiner model needs a phase-3",
         run=pr_ckpt("phase1")),
    dict(id="predict-phase2-checkpoint", command=R, exit=2, message="is a phase-2 SAM refiner checkpoint",
         run=pr_ckpt("phase2")),
    dict(id="predict-truncated-checkpoint", command=R, exit=2, message="not a readable PyTorch checkpoint",
         run=pr_ckpt("truncated")),
    dict(id="predict-missing-input", command=R, exit=2, message="input not found", run=pr_missing),
    dict(id="predict-empty-folder", command=R, exit=2, message="no image files", run=pr_empty),
    dict(id="predict-read-only", command=R, exit=2, message="Read-only file system", run=pr_read_only),
    # refine
    dict(id="refine-corrupt-png", command=F, exit=0, message="1 sample(s) skipped", run=rf_corrupt),
    dict(id="refine-mask-size", command=F, exit=0, message="differs from the image size", run=rf_mask_size),
    dict(id="refine-logit-mask", command=F, exit=0, message="1 sample(s) skipped", run=rf_logit_mask),
    dict(id="refine-class-map-mask", command=F, exit=0,
         message="blank coarse mask: holds only the values 0, 2, which read as no lesion", run=rf_class_map_mask),
    dict(id="refine-colour-class-map", command=F, exit=0, message="RGB mask in colour: a class map stores class "
         "indices in one channel", run=rf_colour_class_map),
    dict(id="refine-mask-classes-background", command=F, exit=2, message="--mask_classes: 0 is the background of a "
         "class map", run=rf_bad_classes),
    dict(id="refine-mask-postfix", command=F, exit=2, message="set --mask_postfix _seg", run=rf_postfix),
    dict(id="refine-phase3-checkpoint", command=F, exit=2,
         message="is a phase-3 UltraRefiner checkpoint (bundles/ultrarefiner); a sam_refiner model needs a phase-2",
         run=rf_ckpt("phase3")),
    dict(id="refine-truncated-checkpoint", command=F, exit=2, message="not a readable PyTorch checkpoint",
         run=rf_ckpt("truncated")),
    dict(id="refine-missing-folder", command=F, exit=2, message="images folder not found", run=rf_missing),
    dict(id="refine-empty-folder", command=F, exit=2, message="no image files", run=rf_empty),
    dict(id="refine-exclude-everything", command=F, exit=2,
         message="the exclude patterns *.PNG match every image file of the images folder (1)", run=rf_exclude_all),
    dict(id="refine-disk-full", command=F, exit=2, message="No space left on device", run=rf_disk_full),
    # export-bundle: built and checked next to the old export, swapped in only when every check passed
    dict(id="export-bundle-truncated-checkpoint", command=X, exit=2, message="not a readable PyTorch checkpoint",
         run=ex_ckpt("truncated")),
    dict(id="export-bundle-wrong-phase-checkpoint", command=X, exit=2,
         message="is a phase-3 UltraRefiner checkpoint (bundles/ultrarefiner); bundles/transunet needs a phase-1",
         run=ex_ckpt("phase3")),
    dict(id="export-bundle-missing-checkpoint", command=X, exit=2, message="checkpoint not found",
         run=ex_ckpt("missing")),
    dict(id="export-bundle-check-fails", command=X, exit=2, message="ckpt_export of these weights failed",
         run=ex_check_fails),
    dict(id="export-bundle-read-only", command=X, exit=2, message="Read-only file system", run=ex_read_only),
    dict(id="export-bundle-not-a-bundle", command=X, exit=2, message="configs/metadata.json missing",
         run=ex_not_bundle),
    # bundles (python -m monai.bundle run): an uncaught exception, exit 1, whose message names the problem
    dict(id="bundle-transunet-train-fold-negative", command=BT.format("transunet"), exit=1,
         message="fold -1 does not exist", run=bu_train_fold("transunet", -1)),
    dict(id="bundle-transunet-train-fold-too-large", command=BT.format("transunet"), exit=1,
         message="fold 2 does not exist", run=bu_train_fold("transunet", 2)),
    dict(id="bundle-sam_refiner-train-fold-negative", command=BT.format("sam_refiner"), exit=1,
         message="fold -1 does not exist", run=bu_train_fold("sam_refiner", -1)),
    dict(id="bundle-ultrarefiner-train-fold-negative", command=BT.format("ultrarefiner"), exit=1,
         message="fold -1 does not exist", run=bu_train_fold("ultrarefiner", -1)),
    dict(id="bundle-transunet-train-wrong-dataset", command=BT.format("transunet"), exit=1, message="no datalist",
         run=bu_train_wrong_dataset),
    dict(id="bundle-transunet-train-mask-size", command=BT.format("transunet"), exit=1,
         message="label size 30x20 (WxH) differs from the size", run=bu_train_mask_size),
    dict(id="bundle-transunet-train-multi-class-label", command=BT.format("transunet"), exit=1,
         message="a multi-class label map?", run=bu_train_class_map),
    dict(id="bundle-transunet-inference-missing-folder", command=BI.format("transunet"), exit=1,
         message="input folder not found", run=bu_inference("transunet", "nope")),
    dict(id="bundle-transunet-inference-empty-folder", command=BI.format("transunet"), exit=1,
         message="no image files (.png, .jpg", run=bu_inference("transunet", "empty")),
    dict(id="bundle-sam_refiner-inference-missing-folder", command=BI.format("sam_refiner"), exit=1,
         message="input folder not found", run=bu_inference("sam_refiner", "nope")),
    dict(id="bundle-ultrarefiner-inference-missing-folder", command=BI.format("ultrarefiner"), exit=1,
         message="input not found", run=bu_inference("ultrarefiner", "nope")),
]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input(case, world, tmp_path, capsys, monkeypatch):
    code, out = case["run"](world, tmp_path, capsys, monkeypatch)
    assert code == case["exit"], f"exit {code}, expected {case['exit']}:\n{out[-3000:]}"
    assert case["message"] in out, f"{case['message']!r} not in:\n{out[-3000:]}"
    if case["exit"] == 2:  # the CLI's own errors: one line, no traceback
        assert "Traceback" not in out and "ultrarefiner: error:" in out
    if case["id"].endswith(("disk-full", "read-only")):  # the path the user asked for, not a temporary one
        assert ".tmp" not in out and ".partial" not in out, out


def _doc_rows() -> list[list[str]]:
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else []
        if cells and re.fullmatch(r"`[a-z0-9_-]+`", cells[0]):
            rows.append([cells[0].strip("`"), *cells[1:]])
    return rows


def test_doc_table_lists_exactly_the_matrix():
    """docs/bad_inputs.md has one row per case, in the same order, with the same command and exit status."""
    rows = _doc_rows()
    assert [r[0] for r in rows] == [c["id"] for c in CASES]
    for row, case in zip(rows, CASES, strict=True):
        assert row[1].strip("`") == case["command"], row
        assert row[3] == str(case["exit"]), row
