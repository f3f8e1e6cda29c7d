"""Helpers that run MONAI bundle commands the way users do (``python -m monai.bundle ...``) in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO.parent / "shared" / "monai" / "meta_schema_20240725.json"


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
