"""Is a bundle ready for the MONAI Model Zoo? Checks beyond the metadata schema, for any bundle folder.

``check_bundle`` returns errors (the Zoo would refuse the bundle or its users could not run it) and warnings
(worth fixing, not blocking). The schema itself, ``verify_net_in_out`` and ``ckpt_export`` are run by
``ultrarefiner.zoo.export`` with MONAI's own commands.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

__all__ = ["LARGE_FILE_BYTES", "Report", "check_bundle", "config_imports", "read_large_files"]

LARGE_FILE_BYTES = 25 * 1024 * 1024  # the Model Zoo keeps larger files out of its repository: large_files.yml
REQUIRED_FILES = ("configs/metadata.json", "configs/inference.json", "docs/README.md", "docs/data_license.txt",
                  "LICENSE")
# metadata has version fields of their own; fire runs `python -m monai.bundle` itself, so it is there too
BASE_PACKAGES = ("monai", "torch", "numpy", "fire")
LINE_LENGTH = 120


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def text(self) -> str:
        lines = [f"error: {e}" for e in self.errors] + [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines) if lines else "ready"


def _released(value: object) -> str | None:
    """None when ``value`` is a released version (PEP 440, no local ``+cu121`` part, no dev release), else why."""
    try:
        v = Version(str(value))
    except InvalidVersion:
        return "not a PEP 440 version"
    if v.local:
        return f"has the local build suffix '+{v.local}'"
    if v.is_devrelease:
        return "is a development release"
    return None


def read_large_files(bundle: Path) -> list[dict]:
    """Entries of ``large_files.yml``/``.yaml``/``.json`` (MONAI's ``download_large_files`` format), [] when absent."""
    for name in ("large_files.yml", "large_files.yaml", "large_files.json"):
        path = bundle / name
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                data = json.load(f) if path.suffix == ".json" else yaml.safe_load(f)
            entries = (data or {}).get("large_files") if isinstance(data, dict) else None
            if not isinstance(entries, list):
                raise ValueError(f"{path}: expected a top-level 'large_files' list")
            return entries
    return []


def _check_metadata(meta: dict, where: str, report: Report) -> None:
    version = meta.get("version")
    if version is None:
        report.errors.append(f"{where}: no 'version'")
    else:
        if why := _released(version):
            report.errors.append(f"{where}: version {version!r} {why}")
        if str(version) not in (meta.get("changelog") or {}):
            report.errors.append(f"{where}: changelog has no entry for version {version!r}")
    for key in ("monai_version", "pytorch_version", "numpy_version"):
        if key not in meta:
            report.errors.append(f"{where}: no {key!r}")
        elif why := _released(meta[key]):
            report.errors.append(f"{where}: {key} {meta[key]!r} {why}")
    packages = meta.get("required_packages_version")
    if not isinstance(packages, dict):
        report.errors.append(f"{where}: 'required_packages_version' must be an object of package: version")
    else:
        for name, value in packages.items():
            if why := _released(value):
                report.errors.append(f"{where}: required package {name} {value!r} {why}")
    fmt = meta.get("network_data_format") or {}
    for part, key in (("inputs", "image"), ("outputs", "pred")):
        tensor = (fmt.get(part) or {}).get(key)
        if not isinstance(tensor, dict):
            report.errors.append(f"{where}: network_data_format has no {part}#{key}")
            continue
        channels = tensor.get("channel_def")
        if not isinstance(channels, dict) or not channels:
            report.errors.append(f"{where}: network_data_format {part}#{key} has no channel_def")
        elif len(channels) != tensor.get("num_channels"):
            report.errors.append(f"{where}: {part}#{key} channel_def names {len(channels)} channels, "
                                 f"num_channels is {tensor.get('num_channels')}")


def _check_large_files(bundle: Path, report: Report) -> None:
    try:
        entries = read_large_files(bundle)
    except (ValueError, yaml.YAMLError, json.JSONDecodeError) as e:
        report.errors.append(str(e))
        return
    listed = set()
    for i, entry in enumerate(entries):
        missing = [k for k in ("path", "url", "hash_val", "hash_type") if not isinstance(entry, dict) or k not in entry]
        if missing:
            report.errors.append(f"large_files.yml entry {i}: missing {missing}")
            continue
        listed.add(str(entry["path"]))
        if not entry["url"]:
            report.warnings.append(f"large_files.yml: {entry['path']} has no url yet (weights not published)")
    for path in sorted((bundle / "models").glob("*")) if (bundle / "models").is_dir() else []:
        rel = path.relative_to(bundle).as_posix()
        if path.is_file() and path.stat().st_size > LARGE_FILE_BYTES and rel not in listed:
            report.errors.append(f"{rel} is over 25 MB and not listed in large_files.yml")


def _check_python(bundle: Path, report: Report) -> None:
    """Code inside a bundle must pass the Zoo's black/isort/flake8 at line length 120 (ruff's equivalents here)."""
    files = sorted(str(p) for p in bundle.rglob("*.py"))
    if not files:
        return
    ruff = [sys.executable, "-m", "ruff"] if shutil.which("ruff") is None else ["ruff"]
    isolated = ["--isolated", "--line-length", str(LINE_LENGTH)]  # not this repository's rule set
    for cmd, what in (([*ruff, "check", *isolated, "--select", "E,F,W,I", *files], "flake8/isort"),
                      ([*ruff, "format", "--check", *isolated, *files], "black")):
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            report.errors.append(f"bundle Python code is not {what}-clean:\n{(res.stdout + res.stderr)[-3000:]}")


def config_imports(config_files: Iterable[Path]) -> list[str]:
    """Modules named by ``"$import x"`` / ``"$from x import y"`` in the configs' ``imports`` lists."""
    modules: list[str] = []
    for path in config_files:
        with open(path, encoding="utf-8") as f:
            imports = json.load(f).get("imports", [])
        for item in imports:
            m = re.match(r"\$\s*(?:import|from)\s+([\w.]+)", str(item))
            if m and m.group(1) not in modules:
                modules.append(m.group(1))
    return modules


def _top_level_imports(files: Iterable[Path]) -> set[str]:
    """Top-level module names imported anywhere in ``files`` (function-level imports too: code paths need them)."""
    names: set[str] = set()
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names)


def _source_files(distribution: str) -> list[Path]:
    """The .py files of an installed distribution's top-level packages/modules (editable installs included)."""
    from importlib import metadata

    owners = metadata.packages_distributions()
    tops = [m for m, dists in owners.items() if canonicalize_name(distribution) in map(canonicalize_name, dists)]
    files: list[Path] = []
    for top in tops:
        spec = importlib.util.find_spec(top)
        if spec is None or spec.origin is None:
            continue
        origin = Path(spec.origin)
        files += sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]
    return files


def _requirement_closure(names: Iterable[str]) -> set[str]:
    """The distributions ``names`` install (their non-extra requirements, recursively, as installed here)."""
    from importlib import metadata

    todo, seen = [canonicalize_name(n) for n in names], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for spec in requires:
            try:
                req = Requirement(spec)
            except InvalidRequirement:
                continue
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def _check_packages(bundle: Path, meta: dict, report: Report) -> None:
    """Zoo CI installs MONAI, torch, numpy and ``required_packages_version`` with pip, nothing else. So every module
    the configs import, and every import in the code of a listed package that declares no dependencies of its own,
    must come with one of those (a listed package brings its declared dependencies, e.g. ``ultrarefiner`` timm)."""
    from importlib import metadata

    listed = {canonicalize_name(k): v for k, v in (meta.get("required_packages_version") or {}).items()}
    owners = metadata.packages_distributions()
    configs = sorted(p for p in (bundle / "configs").glob("*.json") if p.name != "metadata.json")
    modules = {m.split(".")[0] for m in config_imports(configs)} - set(sys.stdlib_module_names)
    for name in listed:
        try:
            if not metadata.requires(name):
                modules |= _top_level_imports(_source_files(name))
        except metadata.PackageNotFoundError:
            report.warnings.append(f"required package {name} is not installed here")
    covered = _requirement_closure([*BASE_PACKAGES, *listed])
    for module in sorted(modules):
        dists = {canonicalize_name(d) for d in owners.get(module, [])}
        if not dists:
            report.warnings.append(f"module {module!r} is imported but no installed distribution provides it")
        elif not dists & covered:
            name = sorted(dists)[0]
            report.errors.append(f"{module!r} is imported but {name} is not in required_packages_version (nor "
                                 f'installed by a listed package): add "{name}": "{metadata.version(name)}"')
    for name, value in listed.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if str(value) != installed:
            report.warnings.append(f"required package {name}: metadata says {value}, installed here {installed}")


def check_bundle(bundle_dir: str | os.PathLike, check_imports: bool = True) -> Report:
    """Model Zoo readiness of one bundle folder (see module docstring).

    Arguments:
      bundle_dir: the bundle (``configs/``, ``docs/``, ``models/``, ``LICENSE``, ``large_files.yml``).
      check_imports: check that required_packages_version covers what the configs and listed code import.
    """
    bundle = Path(bundle_dir)
    report = Report()
    for rel in REQUIRED_FILES:
        if not (bundle / rel).is_file():
            report.errors.append(f"{bundle / rel}: missing")
    meta_path = bundle / "configs" / "metadata.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            report.errors.append(f"{meta_path}: not JSON ({e})")
            meta = None
        if meta is not None:
            _check_metadata(meta, str(meta_path), report)
            if check_imports:
                _check_packages(bundle, meta, report)
    _check_large_files(bundle, report)
    _check_python(bundle, report)
    return report
