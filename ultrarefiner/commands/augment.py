"""``python -m ultrarefiner augment``."""

from __future__ import annotations

from pathlib import Path

from ultrarefiner.commands.args import check_range
from ultrarefiner.errors import BadInputError
from ultrarefiner.utils.flags import as_flag, parse_list


def _floats(value, name: str, count: int) -> tuple[float, ...]:
    items = parse_list(value, name)
    try:
        numbers = tuple(float(v) for v in items)
    except ValueError as e:
        raise ValueError(f"--{name} must be {count} comma-separated numbers, got {value!r}") from e
    if len(numbers) != count:
        raise ValueError(f"--{name} must be {count} comma-separated numbers, got {value!r}")
    for v in numbers:
        check_range(v, name, 0.0, 1.0)
    return numbers


def augment(
    data_root: str = "./dataset/processed",
    output_dir: str = "./dataset/augmented",
    datasets: str | None = None,
    target_samples: int = 100000,
    use_sdf: bool = True,
    num_workers: int = 4,
    fold: int | None = None,
    seed: int = 0,
    shard_size: int = 1000,
    resolution: int = 256,
    mix: str = "0.10,0.55,0.35",
    mild: str = "0.80,0.95",
    heavy: str = "0.40,0.80",
    soft: bool = True,
    preview: int = 0,
    overwrite: bool = False,
) -> None:
    """Simulate segmentation failures from ground-truth masks: (image, mask, coarse mask) pairs for phase 2.

    Reads the datalists written by `preprocess` and uses training images only (never the test split); with
    --fold K, the items of validation fold K are left out too, so a phase-2 model for fold K never sees the images
    phase 3 validates it on. Writes O/<dataset names sorted, joined by _>/ (plus fold_K/ with --fold): compressed
    shards shard_NNNNN.npz with a manifest shard_NNNNN.json each (source, dataset, fold, modes, Dice, IoU,
    bucket), config.json and summary.json (achieved distribution, bad files). Re-running the same command resumes:
    finished shards are skipped, unfinished ones are redone. Bad source files are reported, not fatal. Output does
    not depend on --num_workers. Read the result with ultrarefiner.data.augmented.AugmentedShards.

    Args:
        data_root: output_root of `preprocess` (holds <NAME>/datalist.json).
        output_dir: where the augmented folder goes.
        datasets: comma-separated names, e.g. BUSI,BUSBRA (required).
        target_samples: number of simulated samples.
        use_sdf: the signed-distance simulator (the only one implemented; --nouse_sdf is refused).
        num_workers: processes generating shards in parallel.
        fold: validation fold K to leave out (default: all training items).
        seed: base seed; sample i uses a seed derived from (seed, i).
        shard_size: samples per shard.
        resolution: longest side (pixels) at which masks are stored and Dice is measured; 0 = native size.
        mix: fractions of perfect, mild and heavy samples (sum 1).
        mild: Dice range of the mild bucket, low,high.
        heavy: Dice range of the heavy bucket, low,high.
        soft: store soft probability maps (sigmoid of the corrupted signed distance), as the online simulation
            (option A without shards) and phase 3's TransUNet probabilities give the refiner; False stores 0/1
            masks (smaller shards).
        preview: write preview.png with this many samples (ground truth green, coarse red, modes and Dice).
        overwrite: regenerate everything, even finished shards or a folder made with other settings.
    """
    from ultrarefiner.data.augmented import generate

    root = Path(data_root)
    if not root.is_dir():
        raise BadInputError(root, "data_root is not a folder (run `python -m ultrarefiner preprocess` first)")
    names = parse_list(datasets, "datasets")
    if not names:
        known = sorted(p.parent.name for p in root.glob("*/datalist.json"))
        raise ValueError(f"--datasets is required; datalists under {root}: {', '.join(known) or 'none'}")
    if not use_sdf:
        raise ValueError("--use_sdf: only the signed-distance simulator is implemented; drop --nouse_sdf")
    check_range(target_samples, "target_samples", 1, 10**8, integer=True)
    check_range(num_workers, "num_workers", 1, 256, integer=True)
    if fold is not None:
        check_range(fold, "fold", 0, 99, integer=True)
    check_range(seed, "seed", 0, 2**32 - 1, integer=True)
    check_range(shard_size, "shard_size", 1, 100000, integer=True)
    check_range(resolution, "resolution", 0, 8192, integer=True)
    if 0 < resolution < 32:
        raise ValueError(f"--resolution must be 0 (native) or at least 32, got {resolution}")
    check_range(preview, "preview", 0, 200, integer=True)
    probs = _floats(mix, "mix", 3)
    if abs(sum(probs) - 1.0) > 1e-6:
        raise ValueError(f"--mix fractions must sum to 1, got {mix!r} (sum {sum(probs):.4f})")
    ranges = {}
    for name, value in (("mild", mild), ("heavy", heavy)):
        lo, hi = _floats(value, name, 2)
        if not lo < hi:
            raise ValueError(f"--{name} must be low,high with low < high, got {value!r}")
        ranges[name] = (lo, hi)
    if fold is None:
        print("note: no --fold: every training image is used; for cross-validation make one folder per --fold K")
    policy = dict(bucket_probs=probs, mild_range=ranges["mild"], heavy_range=ranges["heavy"],
                  soft=as_flag(soft, "soft"))
    summary = generate(
        root,
        output_dir,
        names,
        int(target_samples),
        fold=None if fold is None else int(fold),
        seed=int(seed),
        shard_size=int(shard_size),
        resolution=int(resolution),
        num_workers=int(num_workers),
        policy=policy,
        preview=int(preview),
        overwrite=as_flag(overwrite, "overwrite"),
    )
    fractions = ", ".join(f"{b} {v:.1%}" for b, v in summary["bucket_fraction"].items())
    print(f"{summary['n_samples']} samples from {summary['n_sources']} images in {summary['folder']}")
    print(f"buckets: {fractions}; in bucket range: {summary['in_range_fraction']:.1%}")
    print(f"shards made {summary['shards_made']}, skipped (already finished) {summary['shards_skipped']}")
    for bad in summary["bad_files"]:
        print(f"bad file (skipped): {bad['file']}: {bad['reason']}")
