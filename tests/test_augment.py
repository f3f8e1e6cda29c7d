"""Offline generator: layout, fold handling, resume after a kill, bad files, workers, preview, reader and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ultrarefiner.data.augmented as aug
from ultrarefiner.cli import main
from ultrarefiner.commands.augment import augment
from ultrarefiner.data.augmented import AugmentedShards, generate, shard_complete, training_sources
from ultrarefiner.errors import BadInputError

H, W = 64, 80


def _blob(rng: np.random.RandomState) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    cy, cx = rng.randint(20, 44), rng.randint(25, 55)
    ry, rx = rng.randint(7, 14), rng.randint(8, 16)
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8) * 255


@pytest.fixture
def processed(tmp_path: Path) -> Path:
    """<root>/TOY/datalist.json: 10 training items over folds 0-4, 1 blank 'normal' item, 2 test items."""
    root = tmp_path / "processed"
    base = root / "TOY"
    (base / "images").mkdir(parents=True)
    (base / "masks").mkdir()
    rng = np.random.RandomState(0)

    def item(name: str, fold: int, cls: str = "benign", blank: bool = False) -> dict:
        Image.fromarray(rng.randint(0, 256, (H, W)).astype(np.uint8)).save(base / "images" / f"{name}.png")
        mask = np.zeros((H, W), np.uint8) if blank else _blob(rng)
        Image.fromarray(mask).save(base / "masks" / f"{name}.png")
        return {
            "image": f"images/{name}.png",
            "label": f"masks/{name}.png",
            "fold": fold,
            "group": f"TOY/{name}",
            "dataset": "TOY",
            "class": cls,
            "source": f"raw/{name}.png",
        }

    training = [item(f"tr{i:02d}", i % 5) for i in range(10)] + [item("normal00", 0, "normal", blank=True)]
    testing = [item(f"te{i:02d}", -1) for i in range(2)]
    meta = {"name": "TOY", "datasets": ["TOY"], "n_splits": 5, "seed": 42, "training": training, "testing": testing}
    (base / "datalist.json").write_text(json.dumps(meta))
    return root


def _records(out: Path) -> list[dict]:
    return [r for p in sorted(out.glob("shard_*.json")) for r in json.loads(p.read_text())["samples"]]


def test_generate_layout_summary_reader_and_preview(processed, tmp_path):
    summary = generate(processed, tmp_path / "aug", ["TOY"], 30, shard_size=10, resolution=64, preview=8)
    out = tmp_path / "aug" / "TOY"
    expected = [f"shard_0000{j}.{e}" for j in range(3) for e in ("json", "npz")]
    assert sorted(p.name for p in out.glob("shard_*")) == expected
    assert summary["n_samples"] == 30 and summary["n_sources"] == 10 and summary["shards_made"] == 3
    assert json.loads((out / "summary.json").read_text())["n_samples"] == 30
    recs = _records(out)
    assert [r["index"] for r in sorted(recs, key=lambda r: r["index"])] == list(range(30))
    assert all(not r["image"].endswith(("te00.png", "te01.png", "normal00.png")) for r in recs)  # no test, no blank
    for r in recs:
        assert set(r) >= {"image", "dataset", "source_fold", "modes", "dice", "iou", "bucket"}
    ds = AugmentedShards(out)
    assert len(ds) == 30
    it = ds[3]
    assert it["image"].shape == it["label"].shape == it["coarse"].shape == (1, 51, 64)  # longest side 64
    assert it["image"].dtype == np.float32 and set(np.unique(it["label"])) <= {0.0, 1.0}
    pred, gt = it["coarse"] > 0.5, it["label"] > 0.5
    dice = 2 * (pred & gt).sum() / (pred.sum() + gt.sum())
    assert abs(dice - it["coarse_dice"]) < 1e-3  # stored Dice is measured at the stored resolution
    from torch.utils.data import DataLoader

    batch = next(iter(DataLoader(ds, batch_size=1, shuffle=True)))  # items collate (modes as strings)
    assert tuple(batch["coarse"].shape) == (1, 1, 51, 64) and isinstance(batch["coarse_modes"][0], str)
    preview = Image.open(out / "preview.png")
    assert preview.mode == "RGB" and preview.size[0] >= 224 and np.asarray(preview).std() > 0


def test_fold_uses_only_training_items_outside_the_fold(processed, tmp_path):
    sources = training_sources(processed, ["TOY"], fold=2)
    names = {Path(s["image"]).name for s in sources}
    assert names == {f"tr{i:02d}.png" for i in range(10) if i % 5 != 2}
    generate(processed, tmp_path / "aug", ["TOY"], 16, fold=2, shard_size=8, resolution=64, progress=False)
    out = tmp_path / "aug" / "TOY" / "fold_2"
    recs = _records(out)
    assert recs and all(r["source_fold"] != 2 for r in recs)
    assert all(json.loads(p.read_text())["fold"] == 2 for p in out.glob("shard_*.json"))
    assert len(AugmentedShards(out, fold=2)) == 16
    with pytest.raises(BadInputError, match="fold 2, not fold 1"):
        AugmentedShards(out, fold=1)  # a fold-1 model must not train on data that includes fold 1
    with pytest.raises(ValueError, match="fold 7 does not exist"):
        training_sources(processed, ["TOY"], fold=7)


def test_several_datasets_without_combined_datalist(processed, tmp_path):
    import shutil

    shutil.copytree(processed / "TOY", processed / "ABC")
    meta = json.loads((processed / "ABC" / "datalist.json").read_text())
    for it in meta["training"]:
        it["dataset"] = "ABC"
    (processed / "ABC" / "datalist.json").write_text(json.dumps(meta))
    summary = generate(processed, tmp_path / "aug", ["TOY", "ABC"], 20, shard_size=20, resolution=64, progress=False)
    assert summary["n_sources"] == 20 and Path(summary["folder"]).name == "ABC_TOY"
    assert {r["dataset"] for r in _records(tmp_path / "aug" / "ABC_TOY")} == {"ABC", "TOY"}


def test_resume_after_kill_skips_finished_shards_and_redoes_partial_ones(processed, tmp_path, monkeypatch):
    kw = dict(shard_size=10, resolution=64, progress=False)
    reference = tmp_path / "ref"
    generate(processed, reference, ["TOY"], 40, **kw)
    ref = {r["index"]: r for r in _records(reference / "TOY")}

    # "kill" the run right after shard 1's .npz is written, before its manifest
    real_write_json = aug.write_json

    def dying_write_json(path, obj, indent=2):
        if Path(path).name == "shard_00001.json":
            raise KeyboardInterrupt
        return real_write_json(path, obj, indent)

    monkeypatch.setattr(aug, "write_json", dying_write_json)
    with pytest.raises(KeyboardInterrupt):
        generate(processed, tmp_path / "aug", ["TOY"], 40, **kw)
    monkeypatch.setattr(aug, "write_json", real_write_json)
    out = tmp_path / "aug" / "TOY"
    h = json.loads((reference / "TOY" / "summary.json").read_text())["config_hash"]
    assert shard_complete(out, 0, h) and not shard_complete(out, 1, h)
    assert (out / "shard_00001.npz").is_file()  # the orphan .npz is not taken as finished
    # a truncated shard with a manifest is not finished either, and a stale temp file is cleaned up
    generate(processed, tmp_path / "aug", ["TOY"], 40, **kw)  # finishes 1-3
    npz2 = out / "shard_00002.npz"
    npz2.write_bytes(npz2.read_bytes()[:100])
    (out / ".shard_00003.npz.abc.tmp").write_bytes(b"partial")
    mtime0 = (out / "shard_00000.npz").stat().st_mtime_ns
    summary = generate(processed, tmp_path / "aug", ["TOY"], 40, **kw)
    assert summary["shards_made"] == 1 and summary["shards_skipped"] == 3
    assert (out / "shard_00000.npz").stat().st_mtime_ns == mtime0
    assert not list(out.glob(".shard_*.tmp"))
    got = {r["index"]: r for r in _records(out)}
    assert got == ref  # resumed output equals an uninterrupted run
    with pytest.raises(BadInputError, match="other settings"):
        generate(processed, tmp_path / "aug", ["TOY"], 40, seed=1, **kw)


def test_bad_source_file_is_reported_not_fatal(processed, tmp_path):
    (processed / "TOY" / "images" / "tr03.png").write_bytes(b"not a png")
    summary = generate(processed, tmp_path / "aug", ["TOY"], 20, shard_size=10, resolution=64, progress=False)
    assert [Path(b["file"]).name for b in summary["bad_files"]] == ["tr03.png"]
    assert "unreadable" in summary["bad_files"][0]["reason"]
    assert summary["n_samples"] == 18  # the bad image's two samples are skipped, the rest is made


def test_output_does_not_depend_on_worker_count(processed, tmp_path):
    kw = dict(shard_size=6, resolution=64, progress=False)
    generate(processed, tmp_path / "one", ["TOY"], 12, num_workers=1, **kw)
    generate(processed, tmp_path / "two", ["TOY"], 12, num_workers=2, **kw)
    a, b = AugmentedShards(tmp_path / "one" / "TOY"), AugmentedShards(tmp_path / "two" / "TOY")
    assert [r for _, r in a.records] == [r for _, r in b.records]
    assert all(np.array_equal(a[i]["coarse"], b[i]["coarse"]) for i in range(len(a)))


def test_command_validates_arguments(processed, tmp_path, capsys):
    base = dict(data_root=str(processed), output_dir=str(tmp_path / "aug"), datasets="TOY")
    cases = [
        (dict(datasets=None), "--datasets is required; datalists under .*TOY"),
        (dict(use_sdf=False), "only the signed-distance"),
        (dict(target_samples=0), "--target_samples"),
        (dict(num_workers=0), "--num_workers"),
        (dict(fold=-1), "--fold"),
        (dict(resolution=8), "--resolution"),
        (dict(mix="0.5,0.5,0.5"), "sum to 1"),
        (dict(mild="0.9,0.8"), "low < high"),
        (dict(heavy="0.4"), "2 comma-separated"),
        (dict(shard_size=1.5), "--shard_size"),
    ]
    for override, message in cases:
        with pytest.raises(ValueError, match=message):
            augment(**{**base, **override})
    with pytest.raises(BadInputError, match="no datalist"):
        augment(**{**base, "datasets": "NOPE"})
    with pytest.raises(BadInputError, match="not a folder"):
        augment(**{**base, "data_root": str(tmp_path / "missing")})


def test_cli_end_to_end(processed, tmp_path, capsys):
    out = tmp_path / "aug"
    argv = ["augment", f"--data_root={processed}", f"--output_dir={out}", "--datasets=TOY", "--target_samples=8"]
    main(argv + ["--shard_size=4", "--resolution=64", "--num_workers=1", "--fold=1", "--preview=4"])
    text = capsys.readouterr().out
    assert "8 samples from 8 images" in text and "shards made 2" in text
    folder = out / "TOY" / "fold_1"
    assert (folder / "preview.png").is_file() and (folder / "summary.json").is_file()
    coarse = np.concatenate([AugmentedShards(folder)[i]["coarse"].ravel() for i in range(8)])
    assert ((coarse > 0.02) & (coarse < 0.98)).any()  # soft maps by default, as the online simulation feeds
    hard = tmp_path / "hard"
    main(["augment", f"--data_root={processed}", f"--output_dir={hard}", "--datasets=TOY", "--target_samples=4",
          "--shard_size=4", "--resolution=64", "--num_workers=1", "--fold=1", "--soft=False"])
    coarse = np.concatenate([AugmentedShards(hard / "TOY" / "fold_1")[i]["coarse"].ravel() for i in range(4)])
    assert set(np.unique(coarse).tolist()) <= {0.0, 1.0}
    with pytest.raises(SystemExit):
        main(["augment", f"--data_root={processed}", "--datasets=TOY", "--mix=1,1,1"])
    assert "ultrarefiner: error: --mix" in capsys.readouterr().err
