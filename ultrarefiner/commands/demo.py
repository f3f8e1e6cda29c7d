"""``python -m ultrarefiner demo``."""

from __future__ import annotations

from pathlib import Path

from ultrarefiner.commands.args import check_range


def demo(output_dir: str = "./demo_output", raw_root: str | None = None, n_images: int = 24, seed: int = 0) -> None:
    """Run the pipeline on the embedded synthetic phantoms (or on --raw_root): synthesize, preprocess, report.

    Args:
        output_dir: where raw phantoms (raw/), processed data (processed/) and reports go.
        raw_root: use real data in this folder (R/BUSI/..., as for preprocess) instead of phantoms.
        n_images: number of phantom images (benign : malignant : normal = 3 : 2 : 1).
        seed: phantom seed.
    """
    from ultrarefiner.commands.preprocess import preprocess
    from ultrarefiner.data.synthetic import write_busi_tree

    check_range(n_images, "n_images", 12, 10000, integer=True)
    out = Path(output_dir)
    if raw_root is None:
        raw_root = str(out / "raw")
        n = int(n_images)
        write_busi_tree(raw_root, n_benign=n // 2, n_malignant=n // 3, n_normal=n - n // 2 - n // 3, seed=int(seed))
        print(f"Synthetic phantoms written to {Path(raw_root).resolve()}")
    preprocess(
        raw_root=raw_root,
        output_root=str(out / "processed"),
        datasets="BUSI" if (Path(raw_root) / "BUSI").is_dir() else None,
    )
