"""Offline generator of (image, ground truth, simulated coarse mask) training pairs for phase 2, and their reader.

Layout of ``<output_dir>/<combined_name(datasets)>/`` (``.../fold_<k>/`` with a fold)::

    config.json          settings the shards were made with (a resume with other settings is refused)
    shard_00000.npz      compressed arrays: image_<j>, label_<j> (per source j) and coarse_<i> (per sample i),
                         sample_source (int, i -> j); image/label/coarse are uint8 (label 0/1, coarse 0..255)
    shard_00000.json     the shard's manifest, written after its .npz: one record per sample (source image,
                         dataset, class, fold, modes, dice, iou, bucket) and the bad source files
    summary.json         achieved distribution over all shards
    preview.png          with --preview N: ground truth (green) vs coarse (red) contours, modes and Dice

A shard counts as finished only when its manifest parses, matches the config and names an ``.npz`` of the
recorded size, so a run killed at any point is resumed by re-running the same command. Sample ``i`` uses
source ``i * n_sources // target_samples`` and a random seed derived from (seed, i): the output does not depend
on the number of workers. Arrays are stored at ``resolution`` (longest side) so the Dice buckets are measured on
the resolution phase 2 trains on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from ultrarefiner.data.datalist import combined_name, datalist_path, load_split
from ultrarefiner.errors import BadInputError
from ultrarefiner.utils.io import atomic_write, remove_stale_temporaries, write_json, write_png

FORMAT_VERSION = 1


def output_folder(output_dir: str | os.PathLike, datasets: list[str], fold: int | None) -> Path:
    """``<output_dir>/<sorted names joined by _>`` plus ``fold_<k>`` when a validation fold is held out."""
    out = Path(output_dir) / combined_name(datasets)
    return out / f"fold_{fold}" if fold is not None else out


def training_sources(data_root: str | os.PathLike, datasets: list[str], fold: int | None) -> list[dict]:
    """Training items (never the test split) minus validation fold ``fold``; blank ``normal`` cases dropped.

    Uses the combined datalist when ``preprocess`` wrote one, else each dataset's own datalist. Sorted by
    (dataset, image) so the plan does not depend on file-system order.
    """
    name = combined_name(datasets)
    if len(set(datasets)) > 1 and (Path(data_root) / name / "datalist.json").is_file():
        paths = [datalist_path(data_root, name)]
    else:
        paths = [datalist_path(data_root, d) for d in sorted(set(datasets))]
    items = []
    for p in paths:
        split = "train" if fold is not None else "trainval"
        for it in load_split(p, fold, split):
            if it.get("class") != "normal":
                items.append(it)
    items.sort(key=lambda d: (str(d.get("dataset", "")), str(d["image"])))
    return items


def _resize_long(arr: np.ndarray, long_side: int, mask: bool) -> np.ndarray:
    h, w = arr.shape
    if long_side <= 0 or max(h, w) == long_side:
        return arr
    s = long_side / max(h, w)
    size = (max(int(round(w * s)), 1), max(int(round(h * s)), 1))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    if mask:
        return cv2.resize(arr.astype(np.float32), size, interpolation=interp) > 0.5
    return cv2.resize(arr, size, interpolation=interp)


def _sample_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _shard_name(j: int) -> str:
    return f"shard_{j:05d}"


def shard_complete(out: Path, j: int, config_hash: str) -> bool:
    """True only for a shard whose manifest parses, matches the config and whose .npz has the recorded size."""
    man, npz = out / f"{_shard_name(j)}.json", out / f"{_shard_name(j)}.npz"
    try:
        meta = json.loads(man.read_text(encoding="utf-8"))
        return meta.get("config_hash") == config_hash and npz.stat().st_size == meta["npz_bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _make_shard(task: dict) -> dict:
    """Worker: simulate one shard's samples and write its .npz, then its manifest (spawn-safe, top level)."""
    from ultrarefiner.data.imaging import read_image, read_label
    from ultrarefiner.transforms.failure_simulation import FailurePolicy, SimulateSegmentationFailure

    out, j, cfg = Path(task["out"]), task["shard"], task["config"]
    policy = FailurePolicy(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["policy"].items()})
    sim = SimulateSegmentationFailure(policy)
    arrays: dict[str, np.ndarray] = {}
    records, errors, sample_source = [], [], []
    by_source: dict[int, list[int]] = {}
    n_local = 0
    for i in task["samples"]:
        by_source.setdefault(i * task["n_sources"] // cfg["target_samples"], []).append(i)
    for src, indices in sorted(by_source.items()):
        item = task["sources"][str(src)]
        try:
            image = read_image(item["image"])
            gt = read_label(item["label"])
            if gt.shape != image.shape:
                raise BadInputError(item["label"], f"mask size {gt.shape} differs from image size {image.shape}")
        except BadInputError as e:
            errors.append({"file": e.path, "reason": e.reason})
            continue
        gt = _resize_long(gt, cfg["resolution"], mask=True)
        if not gt.any():
            errors.append({"file": item["label"], "reason": "blank mask at the stored resolution; skipped"})
            continue
        local = n_local
        n_local += 1
        arrays[f"image_{local}"] = _resize_long(image, cfg["resolution"], mask=False)
        arrays[f"label_{local}"] = gt.astype(np.uint8)
        for i in indices:
            sim.set_random_state(seed=_sample_seed(cfg["seed"], i))
            coarse, info = sim.simulate(gt)
            k = len(sample_source)
            sample_source.append(local)
            arrays[f"coarse_{k}"] = np.round(coarse * 255).astype(np.uint8)
            records.append(
                {
                    "index": i,
                    "key": k,
                    "image": item["image"],
                    "label": item["label"],
                    "dataset": item.get("dataset"),
                    "class": item.get("class"),
                    "source_fold": item.get("fold"),
                    "heldout_fold": cfg["fold"],
                    "modes": info["modes"],
                    "dice": round(info["dice"], 5),
                    "iou": round(info["iou"], 5),
                    "bucket": info["bucket"],
                    "in_range": info["in_range"],
                }
            )
    arrays["sample_source"] = np.asarray(sample_source, np.int32)
    npz = out / f"{_shard_name(j)}.npz"

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(npz, _write)
    manifest = {
        "shard": j,
        "config_hash": task["config_hash"],
        "fold": cfg["fold"],
        "n_samples": len(records),
        "npz": npz.name,
        "npz_bytes": npz.stat().st_size,
        "samples": records,
        "errors": errors,
    }
    write_json(out / f"{_shard_name(j)}.json", manifest, indent=None)
    return {"shard": j, "n_samples": len(records), "n_planned": len(task["samples"]), "errors": errors}


def generate(
    data_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    datasets: list[str],
    target_samples: int,
    fold: int | None = None,
    seed: int = 0,
    shard_size: int = 1000,
    resolution: int = 256,
    num_workers: int = 1,
    policy: dict | None = None,
    preview: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Generate (or resume) the augmented set; returns the summary (also written to ``summary.json``)."""
    from ultrarefiner.transforms.failure_simulation import FailurePolicy

    started = time.time()
    out = output_folder(output_dir, datasets, fold)
    sources = training_sources(data_root, datasets, fold)
    if not sources:
        raise BadInputError(data_root, f"no training images with lesions for {', '.join(datasets)} (fold {fold})")
    config = {
        "version": FORMAT_VERSION,
        "datasets": sorted(set(datasets)),
        "fold": fold,
        "seed": int(seed),
        "target_samples": int(target_samples),
        "shard_size": int(shard_size),
        "resolution": int(resolution),
        "policy": FailurePolicy(**(policy or {})).as_dict(),
        "sources_sha": hashlib.sha256("\n".join(s["image"] for s in sources).encode()).hexdigest()[:16],
        "n_sources": len(sources),
    }
    config = json.loads(json.dumps(config))  # tuples -> lists, as they come back from disk
    h = _config_hash(config)
    cfg_path = out / "config.json"
    if cfg_path.is_file() and not overwrite:
        try:
            old = json.loads(cfg_path.read_text(encoding="utf-8"))
        except ValueError:
            old = None
        if old != config:
            diff = sorted(k for k in config if old is None or old.get(k) != config.get(k))
            raise BadInputError(
                cfg_path, f"made with other settings ({', '.join(diff)}); use another --output_dir or --overwrite"
            )
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # temp files of a killed run (shards, json): never read, safe to drop
    write_json(cfg_path, config)

    n_shards = math.ceil(target_samples / shard_size)
    todo = [j for j in range(n_shards) if overwrite or not shard_complete(out, j, h)]
    tasks = []
    for j in todo:
        samples = list(range(j * shard_size, min((j + 1) * shard_size, target_samples)))
        needed = {i * len(sources) // target_samples for i in samples}
        tasks.append(
            {
                "out": str(out),
                "shard": j,
                "samples": samples,
                "n_sources": len(sources),
                "sources": {str(s): sources[s] for s in sorted(needed)},
                "config": config,
                "config_hash": h,
            }
        )
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=target_samples, initial=target_samples - sum(len(t["samples"]) for t in tasks), unit="sample")
    try:
        if num_workers > 1 and len(tasks) > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(min(num_workers, len(tasks))) as pool:
                for res in pool.imap_unordered(_make_shard, tasks):
                    if bar is not None:
                        bar.update(res["n_planned"])
        else:
            for t in tasks:
                _make_shard(t)
                if bar is not None:
                    bar.update(len(t["samples"]))
    finally:
        if bar is not None:
            bar.close()
    summary = summarise(out, n_shards, h, config)
    summary.update(shards_made=len(tasks), shards_skipped=n_shards - len(tasks), seconds=round(time.time() - started))
    write_json(out / "summary.json", summary)
    if preview:
        write_preview(out, int(preview), out / "preview.png", seed=seed)
    return summary


def _manifests(out: Path, n_shards: int) -> list[dict]:
    metas = []
    for j in range(n_shards):
        with open(out / f"{_shard_name(j)}.json", encoding="utf-8") as f:
            metas.append(json.load(f))
    return metas


def summarise(out: Path, n_shards: int, config_hash: str, config: dict) -> dict:
    """Achieved distribution over all shards: buckets, modes, Dice per bucket, bad files."""
    buckets: Counter = Counter()
    modes: Counter = Counter()
    dices: dict[str, list[float]] = {}
    in_range, errors, n = 0, {}, 0
    for meta in _manifests(out, n_shards):
        for e in meta["errors"]:
            errors[e["file"]] = e["reason"]
        for r in meta["samples"]:
            n += 1
            buckets[r["bucket"]] += 1
            modes.update(r["modes"] or ["none"])
            dices.setdefault(r["bucket"], []).append(r["dice"])
            in_range += bool(r["in_range"])
    dice_stats = {
        b: {q: round(float(np.percentile(v, p)), 4) for q, p in (("min", 0), ("p05", 5), ("median", 50), ("max", 100))}
        for b, v in sorted(dices.items())
    }
    return {
        "folder": str(out),
        "datasets": config["datasets"],
        "fold": config["fold"],
        "n_samples": n,
        "target_samples": config["target_samples"],
        "n_sources": config["n_sources"],
        "bucket_fraction": {b: round(c / max(n, 1), 4) for b, c in sorted(buckets.items())},
        "bucket_counts": dict(sorted(buckets.items())),
        "in_range_fraction": round(in_range / max(n, 1), 4),
        "mode_counts": dict(sorted(modes.items())),
        "dice": dice_stats,
        "bad_files": [{"file": f, "reason": r} for f, r in sorted(errors.items())],
        "config_hash": config_hash,
    }


class AugmentedShards:
    """Map-style dataset over a generated folder (works with ``torch.utils.data.DataLoader``).

    Item: ``image`` (1, H, W) float32 in [0, 1], ``label`` (1, H, W) float32 0/1, ``coarse`` (1, H, W) float32 in
    [0, 1], ``coarse_dice``, ``coarse_iou``, ``coarse_bucket``, ``coarse_modes`` ("+"-joined, collate-safe),
    ``source`` (image path), ``dataset``. H, W vary per source: resize in ``transform``.

    Args:
        root: the generated folder (the one holding config.json).
        fold: the validation fold the phase-2 model is for; refuses a folder generated for another fold, so a
            fold-k model never trains on fold k's validation images. ``None`` skips the check.
        transform: callable applied to each item dict (e.g. a MONAI Compose).
    """

    def __init__(self, root: str | os.PathLike, fold: int | None = None, transform=None):
        self.root = Path(root)
        cfg_path = self.root / "config.json"
        if not cfg_path.is_file():
            raise BadInputError(self.root, "no config.json: not an augmented folder (run `ultrarefiner augment`)")
        self.config = json.loads(cfg_path.read_text(encoding="utf-8"))
        if fold is not None and self.config["fold"] != fold:
            raise BadInputError(self.root, f"generated for fold {self.config['fold']}, not fold {fold}")
        h = _config_hash(self.config)
        n_shards = math.ceil(self.config["target_samples"] / self.config["shard_size"])
        missing = [j for j in range(n_shards) if not shard_complete(self.root, j, h)]
        if missing:
            raise BadInputError(self.root, f"{len(missing)} unfinished shard(s), e.g. {missing[:5]}: rerun augment")
        self.records = [(m["shard"], r) for m in _manifests(self.root, n_shards) for r in m["samples"]]
        self.transform = transform
        self._open: dict[int, tuple[int, object]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def _npz(self, shard: int):
        pid = os.getpid()  # NpzFile handles must not cross a fork into DataLoader workers
        if shard not in self._open or self._open[shard][0] != pid:
            if len(self._open) > 8:
                self._open.clear()
            self._open[shard] = (pid, np.load(self.root / f"{_shard_name(shard)}.npz"))
        return self._open[shard][1]

    def __getitem__(self, idx: int) -> dict:
        shard, r = self.records[idx]
        z = self._npz(shard)
        src = int(z["sample_source"][r["key"]])
        item = {
            "image": z[f"image_{src}"][None].astype(np.float32) / 255.0,
            "label": z[f"label_{src}"][None].astype(np.float32),
            "coarse": z[f"coarse_{r['key']}"][None].astype(np.float32) / 255.0,
            "coarse_dice": float(r["dice"]),
            "coarse_iou": float(r["iou"]),
            "coarse_bucket": r["bucket"],
            "coarse_modes": "+".join(r["modes"]),
            "source": r["image"],
            "dataset": r["dataset"] or "",
        }
        return self.transform(item) if self.transform is not None else item


def _tile(image: np.ndarray, label: np.ndarray, coarse: np.ndarray, text: str, size: int) -> np.ndarray:
    h, w = image.shape
    s = size / max(h, w)
    nh, nw = max(int(h * s), 1), max(int(w * s), 1)
    tile = np.zeros((size, size, 3), np.uint8)
    img = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
    tile[:nh, :nw] = img[..., None]
    for m, colour in ((label > 0, (0, 255, 0)), (coarse > 127, (255, 0, 0))):
        mm = cv2.resize(m.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mm, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(tile, contours, -1, colour, 1)
    tile[size - 30 :] //= 3
    for row, line in enumerate((text[:40], text[40:80])):
        cv2.putText(tile, line, (3, size - 18 + 12 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1)
    return tile


def write_preview(out: Path, n: int, path: Path, seed: int = 0, tile: int = 224) -> Path:
    """Contact sheet of ``n`` samples, chosen to show every failure mode (and bucket) present at least once."""
    ds = AugmentedShards(out)
    rng = np.random.RandomState(seed)
    order = list(rng.permutation(len(ds)))
    picked: list[int] = []
    seen: set[str] = set()
    for idx in order:  # first one sample per unseen mode/bucket, then random ones
        r = ds.records[idx][1]
        tags = set(r["modes"]) | {r["bucket"]}
        if tags - seen:
            picked.append(idx)
            seen |= tags
        if len(picked) >= n:
            break
    chosen = set(picked)
    picked += [i for i in order if i not in chosen][: n - len(picked)]
    tiles = []
    for idx in picked:
        it = ds[int(idx)]
        text = f"{it['coarse_bucket']} D={it['coarse_dice']:.2f} {it['coarse_modes'] or 'unchanged'}"
        tiles.append(
            _tile((it["image"][0] * 255).astype(np.uint8), it["label"][0], (it["coarse"][0] * 255), text, tile)
        )
    cols = min(len(tiles), 6)
    rows = math.ceil(len(tiles) / cols)
    sheet = np.zeros((rows * tile, cols * tile, 3), np.uint8)
    for k, t in enumerate(tiles):
        sheet[(k // cols) * tile : (k // cols + 1) * tile, (k % cols) * tile : (k % cols + 1) * tile] = t
    return write_png(path, sheet)
