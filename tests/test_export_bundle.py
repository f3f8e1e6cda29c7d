"""``python -m ultrarefiner export-bundle``: Model Zoo readiness and a verified, self-contained export.

The export runs MONAI's ``verify_metadata`` (against the schema copy in ``ultrarefiner/zoo``), ``verify_net_in_out``
and ``ckpt_export`` on the exported copy, with tiny settings for the checks (tiny weights packaged here).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
# Per bundle: config overrides and network spatial shape that make the checks fast. A bundle joins the export
# test when its configs exist; give it an entry here then (without one it is checked at full size).
TINY = {
    "transunet": ({"img_size": 32, "vit_depth": 1}, [32, 32]),
    # "torch" resize: the exact (numpy) MedSAM resize would be frozen into the trace as a constant
    "sam_refiner": ({"sam_def": "$ultrarefiner.networks.build_tiny_sam(img_size=256, seed=0)", "image_resize": "torch"},
                    [64, 64]),
    "ultrarefiner": ({"img_size": 32, "vit_depth": 1, "sam_model_type": "tiny", "sam_def#img_size": 256,
                      "image_resize": "torch"}, [64, 64]),
}


def tiny_weights(bundle: Path, overrides: dict, path: Path) -> Path:
    """Random weights of the bundle's own ``network_def`` with the tiny overrides."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle), **overrides})
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


def test_metadata_schema_is_shipped_for_every_bundle(monkeypatch):
    """verify_metadata runs offline: every bundle's schema URL has its unchanged copy in the package (no download)."""
    from ultrarefiner.zoo.export import DEFAULT_SCHEMA, find_schema

    monkeypatch.delenv("MONAI_META_SCHEMA", raising=False)
    digest = hashlib.sha256(DEFAULT_SCHEMA.read_bytes()).hexdigest()
    assert digest == "d95c74c2915faef04ff6a2d6bd865da922bc8cd5afb4a0719b2dc6e1220528e7"  # MONAI-extra-test-data 0.8.1
    for meta_file in sorted((REPO / "bundles").glob("*/configs/metadata.json")):
        meta = json.loads(meta_file.read_text())
        assert find_schema(meta) == DEFAULT_SCHEMA, meta_file


@pytest.mark.parametrize("name", ["transunet", "sam_refiner", "ultrarefiner"])
def test_export_bundle(name, tmp_path):
    bundle = REPO / "bundles" / name
    if not (bundle / "configs" / "inference.json").is_file():
        pytest.skip(f"bundles/{name} has no configs yet")
    overrides, shape = TINY.get(name, ({}, None))
    ckpt = tiny_weights(bundle, overrides, tmp_path / "tiny.pt")
    cmd = [sys.executable, "-m", "ultrarefiner", "export-bundle", "--bundle", str(bundle), "--output",
           str(tmp_path / "dist"), "--ckpt_file", str(ckpt), "--overrides", json.dumps(overrides)]  # default schema
    cmd += ["--spatial_shape", ",".join(map(str, shape))] if shape else []
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    for check in ("verify_metadata: passed", "verify_net_in_out: passed", "ckpt_export: passed"):
        assert check in res.stdout
    assert "(torch.jit.load)" in res.stdout  # the Zoo loads a shipped model.ts

    out = tmp_path / "dist" / name
    for rel in ("configs/inference.json", "configs/metadata.json", "docs/README.md", "docs/data_license.txt",
                "LICENSE", "large_files.yml", "models/model.pt", "models/model.ts"):
        assert (out / rel).is_file(), rel
    assert not list(out.rglob(".gitkeep")) and not list(out.rglob("__pycache__"))
    entries = {e["path"]: e for e in yaml.safe_load((out / "large_files.yml").read_text())["large_files"]}
    assert all(e["url"] or (out / p).is_file() for p, e in entries.items())  # the Zoo CI downloads the others
    torch.jit.load(str(out / "models" / "model.ts"))
    digest = hashlib.sha256((out / "models" / "model.pt").read_bytes()).hexdigest()
    assert entries["models/model.pt"]["hash_val"] == digest and entries["models/model.pt"]["hash_type"] == "sha256"
    assert (bundle / "configs" / "metadata.json").read_bytes() == (out / "configs" / "metadata.json").read_bytes()

    version = json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
    with zipfile.ZipFile(tmp_path / "dist" / f"{name}_v{version}.zip") as zf:
        names = set(zf.namelist())
    assert {f"{name}/configs/metadata.json", f"{name}/models/model.ts", f"{name}/large_files.yml"} <= names

    if name == "transunet":  # the TorchScript export computes what the packaged weights compute
        from ultrarefiner.networks import TransUNet

        net = TransUNet(in_channels=1, num_classes=2, **overrides).eval()
        net.load_state_dict(torch.load(ckpt, weights_only=True))
        x = torch.rand(1, 1, *shape)
        with torch.no_grad():
            assert torch.allclose(torch.jit.load(str(out / "models" / "model.ts"))(x), net(x), atol=1e-4)


def test_transunet_is_zoo_ready():
    from ultrarefiner.zoo.readiness import check_bundle

    report = check_bundle(REPO / "bundles" / "transunet")
    assert report.ok, report.text()


def test_readiness_reports_what_the_zoo_would_refuse(tmp_path):
    from ultrarefiner.zoo.readiness import check_bundle

    bundle = tmp_path / "transunet"
    shutil.copytree(REPO / "bundles" / "transunet", bundle, ignore=shutil.ignore_patterns("*.pt", "*.ts"))
    meta_path = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["version"] = "0.2.0"  # no changelog entry
    meta["pytorch_version"] = "2.14.1+cu121"
    del meta["required_packages_version"]["ultrarefiner"]  # its declared dependencies would bring the rest along
    meta["required_packages_version"]["pytorch-ignite"] = "0.5.5.dev3"
    del meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    meta_path.write_text(json.dumps(meta))
    (bundle / "docs" / "data_license.txt").unlink()
    (bundle / "large_files.yml").write_text("large_files:\n  - path: models/other.pt\n    url: ''\n")
    with open(bundle / "models" / "big.pt", "wb") as f:
        f.truncate(26 * 1024 * 1024)
    (bundle / "scripts").mkdir()
    (bundle / "scripts" / "bad.py").write_text("import os,sys\nx=1\n")

    errors = "\n".join(check_bundle(bundle).errors)
    for expected in ("changelog has no entry for version '0.2.0'", "local build suffix '+cu121'",
                     "pytorch-ignite '0.5.5.dev3' is a development release", "outputs#pred has no channel_def",
                     "data_license.txt: missing", "missing ['hash_val', 'hash_type']",
                     "models/big.pt is over 25 MB",
                     "'ultrarefiner' is imported but ultrarefiner is not in required_packages_version",
                     "not flake8/isort-clean", "not black-clean"):
        assert expected in errors, f"{expected!r} not in:\n{errors}"


def test_export_refuses_a_folder_that_is_not_a_bundle(tmp_path):
    res = subprocess.run([sys.executable, "-m", "ultrarefiner", "export-bundle", "--bundle", str(tmp_path),
                          "--output", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "configs/metadata.json missing" in res.stderr and str(tmp_path) in res.stderr
