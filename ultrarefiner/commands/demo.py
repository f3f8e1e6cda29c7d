"""``python -m ultrarefiner demo``."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ultrarefiner.commands.args import check_range


def python_on_path(folder: Path) -> dict[str, str]:
    """Environment whose ``python`` is exactly this interpreter (the walkthrough says ``python -m ...``).

    ``folder/python`` is a wrapper script that execs ``sys.executable`` as it was started, not a symlink: Python finds
    its virtual environment from the path it is started by (``pyvenv.cfg`` next to it or one folder up), so a link
    elsewhere to a venv's python (itself a link to the base interpreter) starts the base interpreter outside the venv,
    where ultrarefiner is not installed.
    """
    if not sys.executable:
        raise RuntimeError("sys.executable is empty: cannot tell which python runs the demo")
    folder = Path(folder).absolute()  # PATH entries must not depend on the subprocesses' working directory
    folder.mkdir(parents=True, exist_ok=True)
    wrapper = folder / "python"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n', encoding="utf-8")
    wrapper.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{folder}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_walkthrough(workdir: str | os.PathLike, raw_root: str | None = None, log=print) -> float:
    """Run the README walkthrough with the demo's tiny settings in ``workdir``; returns the wall time (s).

    The phantoms (or ``raw_root``) must be under ``<workdir>/dataset/raw`` unless ``raw_root`` is given.
    """
    from ultrarefiner.walkthrough import tiny_script

    script = tiny_script()
    if raw_root is not None:
        script = script.replace("--raw_root ./dataset/raw", f"--raw_root {Path(raw_root).resolve()}")
    workdir = Path(workdir)
    start = time.time()
    # the wrapper lies in the demo folder, not /tmp: /tmp may be mounted noexec
    with tempfile.TemporaryDirectory(prefix=".ultrarefiner_bin_", dir=workdir.absolute()) as bindir:
        env = python_on_path(Path(bindir))
        # bash -e: the first failing step stops the demo with its own error on screen
        res = subprocess.run(["bash", "-e", "-x", "-c", script], cwd=workdir, env=env)
    if res.returncode:
        raise RuntimeError(f"the walkthrough stopped with exit status {res.returncode} (see the output above)")
    return time.time() - start


def demo(
    output_dir: str = "./demo_output",
    raw_root: str | None = None,
    n_images: int = 24,
    seed: int = 0,
    prepare_only: bool = False,
) -> None:
    """Run all three phases on the embedded synthetic phantoms in a few minutes on a CPU, then predict.

    Runs the README walkthrough (preprocess, TransUNet on 5 folds, evaluation, out-of-fold predictions, augmented
    data, SAM refiner, end-to-end UltraRefiner, coarse-vs-refined evaluation, predict) with tiny networks and 2
    iterations per epoch, inside output_dir, and prints the coarse-vs-refined table and the overlay pictures.

    Args:
        output_dir: working folder (dataset/, checkpoints/, predictions/, models/ are created inside).
        raw_root: use real data in this folder (R/BUSI/..., as for preprocess) instead of phantoms.
        n_images: number of phantom images (benign : malignant : normal = 3 : 2 : 1).
        seed: phantom seed.
        prepare_only: stop after preprocessing (prints the preparation report).
    """
    from ultrarefiner.commands.preprocess import preprocess
    from ultrarefiner.data.synthetic import write_busi_tree

    check_range(n_images, "n_images", 12, 10000, integer=True)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if raw_root is None:
        raw = out / "dataset" / "raw"
        n = int(n_images)
        write_busi_tree(raw, n_benign=n // 2, n_malignant=n // 3, n_normal=n - n // 2 - n // 3, seed=int(seed))
        print(f"Synthetic phantoms written to {raw.resolve()}")
    if prepare_only:
        src = Path(raw_root) if raw_root else out / "dataset" / "raw"
        preprocess(raw_root=str(src), output_root=str(out / "dataset" / "processed"),
                   datasets="BUSI" if (src / "BUSI").is_dir() else None)
        return
    wall = run_walkthrough(out, raw_root)
    print_results(out, wall)


def print_results(out: Path, wall: float) -> None:
    """The coarse-vs-refined table of the test split and where the pictures are."""
    from ultrarefiner.engines.e2e_evaluation import E2EReport

    eval_dir = out / "checkpoints" / "ultra_refiner" / "fold_0" / "eval_test"
    summary = json.loads((eval_dir / "summary.json").read_text(encoding="utf-8"))
    print()
    print(E2EReport(eval_dir).table(summary))
    overlays = sorted((out / "predictions" / "ultrarefiner" / "overlays").glob("*.png"))
    print(f"\nOverlay pictures (coarse and refined contours), {len(overlays)} images:")
    for p in overlays[:5]:
        print(f"  {p.resolve()}")
    print(f"  ... in {(out / 'predictions' / 'ultrarefiner' / 'overlays').resolve()}")
    print(f"Evaluation overlays (best and worst cases): {(eval_dir / 'overlays').resolve()}")
    print(f"Demo finished in {wall / 60:.1f} min; tiny random-init networks, so the numbers only show the plumbing.")
