"""Helpers that run MONAI bundle commands the way users do (``python -m monai.bundle ...``) in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ultrarefiner.zoo.export import DEFAULT_SCHEMA as SCHEMA  # the copy shipped in the package: no download

REPO = Path(__file__).resolve().parents[1]


def _args(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        out += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    return out


def bundle_cmd(
    command: str,
    bundle: str,
    configs: list[str] | None = None,
    overrides: dict | None = None,
    cwd: Path | None = None,
    timeout: int = 900,
    python: list[str] | None = None,
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle <command> --config_file [...] --bundle_root bundles/<bundle> --k v ...``."""
    cmd = bundle_argv(command, bundle, configs, overrides, python)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or REPO, timeout=timeout)


def bundle_argv(
    command: str,
    bundle: str,
    configs: list[str] | None = None,
    overrides: dict | None = None,
    python: list[str] | None = None,
) -> list[str]:
    """The argument list of ``bundle_cmd`` (``python`` replaces ``[sys.executable, "-m", "monai.bundle"]``, e.g. with
    a ``torch.distributed.run`` prefix)."""
    root = REPO / "bundles" / bundle
    files = [str(root / "configs" / c) for c in (configs or [])]
    cmd = (python or [sys.executable, "-m", "monai.bundle"]) + [command]
    if files:
        cmd += ["--config_file", files[0] if len(files) == 1 else json.dumps(files)]
    cmd += ["--bundle_root", str(root), "--meta_file", str(root / "configs" / "metadata.json")]
    cmd += ["--logging_file", str(root / "configs" / "logging.conf")] if command == "run" else []
    return cmd + _args(overrides or {})


def verify_metadata(bundle: str) -> subprocess.CompletedProcess:
    root = REPO / "bundles" / bundle
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "verify_metadata",
        "--meta_file",
        str(root / "configs" / "metadata.json"),
        "--filepath",
        str(SCHEMA),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)


def assert_ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, f"exit {res.returncode}\nSTDOUT:\n{res.stdout[-6000:]}\nSTDERR:\n{res.stderr[-6000:]}"


def assert_best_is_reported(best: dict, last: dict, output: str) -> None:
    """``best.pt`` holds the best validation Dice of the run and its epoch, as the console report printed them (the
    first column of each epoch's ``[VALIDATION]`` table, 4 decimals); ``last.pt`` records the same best."""
    lines = output.splitlines()
    dice = [float(lines[i + 1].split()[0]) for i, line in enumerate(lines[:-1]) if line.startswith("[VALIDATION] Dice")]
    assert len(dice) == last["epoch"], f"one validation table per epoch expected:\n{output[-3000:]}"
    assert best["metric_name"] == "val_mean_dice" and abs(best["metric"] - max(dice)) <= 5e-5, (best["metric"], dice)
    assert dice[best["epoch"] - 1] == max(dice), (best["epoch"], dice)
    assert (last["best_metric"], last["best_epoch"]) == (best["metric"], best["epoch"])


def kill_when_written(cmd: list[str], path: Path, timeout: float = 300, settle: float = 2) -> None:
    """Start ``cmd`` (cwd: the repository), wait until it writes ``path`` (or exits), let it run ``settle`` more
    seconds, then SIGKILL its whole process group: an interrupted training run."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and not path.is_file() and proc.poll() is None:
            time.sleep(0.5)
        time.sleep(settle)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def preprocessed_phantoms(root: Path, n_benign: int = 6, n_malignant: int = 4) -> Path:
    """A synthetic BUSI tree (96x128 phantoms) preprocessed into ``root/processed`` with 2 folds and a 25% test
    split, as the bundle tests train on; returns ``root``."""
    from ultrarefiner.data.preprocess import preprocess
    from ultrarefiner.data.synthetic import write_busi_tree

    write_busi_tree(root / "raw", n_benign=n_benign, n_malignant=n_malignant, n_normal=1, seed=5, size=(96, 128))
    preprocess(root / "raw", root / "processed", ["BUSI"], n_splits=2, test_ratio=0.25, num_workers=1)
    return root


def phantom_overrides(data: Path, tiny: dict, **extra) -> dict:
    """Bundle overrides for ``preprocessed_phantoms`` data under ``data``, plus a test's tiny settings."""
    return {"data_root": str(data / "processed"), "ckpt_root": str(data / "ckpt"),
            "model_path": str(data / "models" / "model.pt"), "n_splits": 2, **tiny, **extra}
