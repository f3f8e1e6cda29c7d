"""Export a bundle as a self-contained MONAI Model Zoo folder and zip, verified with MONAI's own commands.

``export_bundle`` copies what the Zoo takes (``configs/``, ``docs/``, ``LICENSE``, ``large_files.yml``, ``models/``
when present, ``scripts/`` if a bundle has one), fills ``hash_val`` of the packaged large files, then runs on the
copy, as a user would: ``check_bundle`` (readiness), ``python -m monai.bundle verify_metadata`` (schema),
``verify_net_in_out`` and ``ckpt_export`` (a TorchScript trace written into the export's ``models/``, with the
registry's ``trace_overrides``, then loaded back with ``torch.jit.load`` as the Model Zoo's CI does). Entries of
``large_files.yml`` whose file is neither packaged nor published (empty url) are left out of the export: the Zoo's
CI would fail to download them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ultrarefiner.errors import BadInputError
from ultrarefiner.utils.io import FILE_MODE, staged_folder
from ultrarefiner.zoo.readiness import LARGE_FILE_BYTES, Report, check_bundle, read_large_files
from ultrarefiner.zoo.registry import BundleEntry, get_entry

__all__ = ["DEFAULT_SCHEMA", "ExportResult", "export_bundle", "find_schema"]

logger = logging.getLogger(__name__)

COPIED = ("configs", "docs", "scripts", "LICENSE", "large_files.yml", "large_files.yaml", "large_files.json")
SKIPPED = {".gitkeep", "__pycache__", ".DS_Store"}
HASH_TYPE = "sha256"
BUNDLE_PHASES = {"transunet": 1, "sam_refiner": 2, "ultrarefiner": 3}  # whose checkpoint each bundle packages
# Local copies of MONAI's bundle metadata schemas, so that verify_metadata runs offline (package data, file name as
# in the metadata's "schema" URL). meta_schema_20240725.json: unchanged copy of
# https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json
# (Project MONAI, Apache-2.0).
SCHEMA_DIR = Path(__file__).resolve().parent
DEFAULT_SCHEMA = SCHEMA_DIR / "meta_schema_20240725.json"


@dataclass
class ExportResult:
    folder: Path
    zip: Path | None
    readiness: Report
    checks: dict[str, str] = field(default_factory=dict)  # check -> "passed" / "skipped: why"


def find_schema(meta: Mapping[str, Any], explicit: str | os.PathLike | None = None) -> Path | None:
    """A local copy of the metadata schema: ``explicit``, ``$MONAI_META_SCHEMA``, or the copy shipped in this package
    under the schema file name of the metadata's ``schema`` URL (``SCHEMA_DIR``). None: let MONAI download it."""
    name = str(meta.get("schema", "")).rsplit("/", 1)[-1]
    candidates = [explicit, os.environ.get("MONAI_META_SCHEMA")]
    if name:
        candidates.append(SCHEMA_DIR / name)
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    if explicit:
        raise BadInputError(explicit, "metadata schema file not found")
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _copy_tree(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, ignore=lambda _d, names: [n for n in names if n in SKIPPED or n.endswith(".pyc")])
    else:
        shutil.copy2(src, dst)


def _update_large_files(folder: Path) -> None:
    """Fills the hash of every packaged file that large_files.yml lists and adds entries for unlisted files over
    25 MB (url kept as given)."""
    entries = read_large_files(folder)
    by_path = {str(e.get("path")): e for e in entries if isinstance(e, dict)}
    for path in sorted((folder / "models").glob("*")) if (folder / "models").is_dir() else []:
        rel = path.relative_to(folder).as_posix()
        # listed files get the hash of what is packaged, whatever their size; unlisted ones over 25 MB are added
        if path.is_file() and (rel in by_path or path.stat().st_size > LARGE_FILE_BYTES):
            entry = by_path.setdefault(rel, {"path": rel, "url": ""})
            entry.update(hash_val=_sha256(path), hash_type=HASH_TYPE)
    # a file neither packaged nor published cannot be fetched: listed, it would fail the Zoo CI's download step
    by_path = {rel: e for rel, e in by_path.items() if e.get("url") or (folder / rel).is_file()}
    for old in ("large_files.yml", "large_files.yaml", "large_files.json"):
        (folder / old).unlink(missing_ok=True)
    if not by_path:
        return
    header = ("# Files over 25 MB, fetched with: python -m monai.bundle download_large_files --bundle_path <bundle>\n"
              "# An empty url means the file is not published yet (shipped in this export's models/ instead).\n")
    (folder / "large_files.yml").write_text(header + yaml.safe_dump({"large_files": list(by_path.values())},
                                                                     sort_keys=False), encoding="utf-8")


def _bundle_cmd(command: str, folder: Path, args: Sequence[str], overrides: Mapping[str, Any], cwd: Path,
                timeout: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", command, *args]
    for k, v in overrides.items():
        cmd += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    logger.info("running %s", " ".join(cmd))
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout)


def _require(res: subprocess.CompletedProcess, what: str, folder: Path) -> None:
    if res.returncode != 0:
        raise BadInputError(folder, f"{what} failed (exit {res.returncode}):\n{(res.stdout + res.stderr)[-4000:]}")


def export_bundle(
    bundle: str | os.PathLike,
    output: str | os.PathLike = "dist",
    ckpt_file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    spatial_shape: Sequence[int] | None = None,
    schema: str | os.PathLike | None = None,
    verify: bool = True,
    make_zip: bool = True,
    timeout: int = 900,
) -> ExportResult:
    """Writes ``<output>/<name>/`` and ``<output>/<name>_v<version>.zip`` and verifies them.

    Arguments:
      bundle: the bundle folder (``bundles/<name>``).
      output: destination; an existing ``<output>/<name>`` is replaced.
      ckpt_file: weights to package as ``models/model.pt`` (default: the bundle's own ``models/model.pt``).
      overrides: config overrides for the checks only, e.g. ``{"img_size": 32, "vit_depth": 1}`` for tiny test
        weights; the exported configs are not changed.
      spatial_shape: network input/output spatial shape for the checks when ``overrides`` change it (a copy of the
        metadata with this shape is used; the exported one is not changed).
      schema: local metadata schema file (default: ``find_schema``; MONAI downloads it when none is found).
      verify: run readiness, ``verify_metadata``, ``verify_net_in_out`` and ``ckpt_export``.
      make_zip: also write the zip.
      timeout: seconds allowed per MONAI command.

    Returns:
      ExportResult with the folder, the zip and the outcome of each check.

    Raises:
      BadInputError: not a bundle, readiness errors, or a failing MONAI check (the message carries its output).
    """
    src = Path(bundle).resolve()
    meta_path = src / "configs" / "metadata.json"
    if not meta_path.is_file():
        raise BadInputError(src, "not a bundle: configs/metadata.json missing")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    entry = get_entry(src.name)
    overrides = dict(overrides or {})

    dest = Path(output).resolve() / src.name
    weights = Path(ckpt_file).resolve() if ckpt_file else src / "models" / "model.pt"
    if ckpt_file and not weights.is_file():
        raise BadInputError(weights, "checkpoint not found")
    if weights.is_file():  # a truncated or wrong-phase file is named now, before anything is built
        from ultrarefiner.engines.checkpoints.checkpoint import (  # torch: only when needed
            read_checkpoint,
            require_phase,
        )

        phase = BUNDLE_PHASES.get(src.name)
        obj = read_checkpoint(weights)
        if phase is not None:
            require_phase(weights, obj, phase, f"bundles/{src.name}")
        del obj

    result = ExportResult(folder=dest, zip=None, readiness=Report())
    zip_path = dest.parent / f"{src.name}_v{meta.get('version', '0')}.zip"
    zip_tmp = None
    try:
        # built and checked out of sight: a failed export leaves an earlier export (folder and zip) untouched
        with staged_folder(dest) as folder:
            _fill(folder, src, weights, bool(ckpt_file))
            if verify:
                result.readiness = check_bundle(folder)
                if not result.readiness.ok:
                    raise BadInputError(src, "not ready for the Model Zoo:\n" + result.readiness.text())
                _verify(folder, meta, entry, overrides, spatial_shape, schema, timeout, result, weights)
            _update_large_files(folder)
            if make_zip:
                fd, zip_tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{zip_path.name}.", suffix=".tmp")
                os.close(fd)
                _write_zip(Path(zip_tmp), folder, src.name)
        if zip_tmp is not None:
            os.chmod(zip_tmp, FILE_MODE)
            os.replace(zip_tmp, zip_path)
            result.zip = zip_path
        elif zip_path.exists():  # an earlier export's zip no longer matches the folder
            logger.warning(f"removed {zip_path}: it held an earlier export (--nozip)")
            zip_path.unlink()
    finally:
        if zip_tmp is not None and os.path.exists(zip_tmp):
            os.remove(zip_tmp)
    return result


def _fill(folder: Path, src: Path, weights: Path, own_weights: bool) -> None:
    """Copy what the Zoo takes from bundle ``src`` into ``folder``, with ``weights`` as ``models/model.pt``."""
    for name in COPIED:
        if (src / name).exists():
            _copy_tree(src / name, folder / name)
    (folder / "models").mkdir()
    for path in sorted((src / "models").glob("*")) if (src / "models").is_dir() else []:
        if path.is_file() and path.name not in SKIPPED and not (own_weights and path.name == "model.pt"):
            shutil.copy2(path, folder / "models" / path.name)
    if weights.is_file():
        shutil.copy2(weights, folder / "models" / "model.pt")


def _write_zip(path: Path, folder: Path, name: str) -> None:
    """``folder``'s files under ``<name>/`` (the export's final folder name, whatever ``folder`` is called)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(folder.rglob("*")):
            if file.is_file():  # weights barely compress: store them
                stored = file.parent.name == "models"
                zf.write(file, f"{name}/{file.relative_to(folder).as_posix()}",
                         compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)


def _weights_under_model(path: Path) -> bool:
    """A self-describing ``models/model.pt`` (``{"kind", "model", "network_kwargs", ...}``) keeps its weights under
    ``model``; a plain state_dict (the Zoo's fake weights) and a refiner checkpoint (which the sam_refiner's
    ``network_def`` loads whole) do not need ``--key_in_ckpt``."""
    from ultrarefiner.engines.checkpoints.checkpoint import read_checkpoint
    from ultrarefiner.engines.checkpoints.refiner_checkpoint import is_refiner_checkpoint

    obj = read_checkpoint(path, mmap=True)  # metadata only
    return isinstance(obj, dict) and isinstance(obj.get("model"), dict) and not is_refiner_checkpoint(obj)


def _verify(folder: Path, meta: dict, entry: BundleEntry, overrides: dict, spatial_shape: Sequence[int] | None,
            schema: str | os.PathLike | None, timeout: int, result: ExportResult,
            source_weights: Path | None = None) -> None:
    net_id = entry.net_id
    meta_file = folder / "configs" / "metadata.json"
    schema_path = find_schema(meta, schema)
    with tempfile.TemporaryDirectory(prefix="ultrarefiner_export_") as tmp:
        schema_arg = schema_path or Path(tmp) / "schema.json"  # absent: verify_metadata downloads it there
        res = _bundle_cmd("verify_metadata", folder, ["--meta_file", str(meta_file), "--filepath", str(schema_arg)],
                          {}, folder, timeout)
        _require(res, "verify_metadata", folder)
        result.checks["verify_metadata"] = "passed"

        check_meta = meta_file
        if spatial_shape:
            m = json.loads(meta_file.read_text(encoding="utf-8"))
            for part in ("inputs", "outputs"):
                for tensor in m["network_data_format"][part].values():
                    if isinstance(tensor, dict) and "spatial_shape" in tensor:
                        tensor["spatial_shape"] = [int(s) for s in spatial_shape]
            check_meta = Path(tmp) / "metadata.json"
            check_meta.write_text(json.dumps(m), encoding="utf-8")
        inference = folder / "configs" / "inference.json"
        common = ["--meta_file", str(check_meta), "--config_file", str(inference), "--bundle_root", str(folder)]
        res = _bundle_cmd("verify_net_in_out", folder, ["--net_id", net_id, *common], overrides, folder, timeout)
        _require(res, "verify_net_in_out", folder)
        result.checks["verify_net_in_out"] = "passed"

        weights = folder / "models" / "model.pt"
        if not weights.is_file():
            result.checks["ckpt_export"] = "skipped: no models/model.pt (weights not published yet)"
            return
        ts = folder / "models" / "model.ts"
        args = ["--net_id", net_id, "--filepath", str(ts), "--ckpt_file", str(weights), *common]
        args += ["--use_trace", "true"] if entry.use_trace else []
        args += ["--key_in_ckpt", "model"] if _weights_under_model(weights) else []
        trace = {k: v for k, v in entry.trace_overrides.items() if not (spatial_shape and k == "input_shape")}
        res = _bundle_cmd("ckpt_export", folder, args, {**trace, **overrides}, folder, timeout)
        _require(res, "ckpt_export of these weights", source_weights or weights)  # the weights failed, not the folder
        import torch  # only here: the rest of the export needs no torch in this process

        torch.jit.load(str(ts), map_location="cpu")  # the Zoo loads a shipped model.ts: it must load
        result.checks["ckpt_export"] = f"passed: {ts.relative_to(folder)} (torch.jit.load)"
