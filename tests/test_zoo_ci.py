"""The MONAI Model Zoo's CI on each exported bundle, offline, written with MONAI's own APIs.

Project-MONAI/model-zoo checks a bundle with ``ci/prepare_schema.py``, ``pip install -r $(ci/get_bundle_requirements.py
-b <bundle>)`` and ``ci/verify_bundle.py -b <bundle> -m full`` (``ci/run_premerge_gpu.sh``); its pre-commit hooks
format the JSON files. The Zoo's code is not copied here. Each bundle is exported as shipped
(``ultrarefiner.zoo.export.export_bundle``, unmodified configs at the metadata's sizes), then every assertion mirrors
one Zoo step:

- ``verify_bundle_directory`` / ``utils.download_large_files``: every ``large_files.yml`` entry is packaged and
  passes ``monai.apps.utils.check_hash`` (what ``download_url`` checks before it would download; offline, nothing
  is fetched); necessary files ``configs/metadata.json``, ``LICENSE``; preferred files ``models/model.pt``,
  ``configs/inference.json``.
- ``_produce_fake_weights``: ``network_def`` parsed from ``inference.json`` + ``read_meta(metadata.json)`` at random
  init, its ``state_dict`` saved as ``models/model.pt`` (weights the bundle ships must first load into it strictly,
  as ``ckpt_export`` would load them).
- ``verify_version_changes``: ``version`` has a ``changelog`` entry.
- ``prepare_schema`` + ``verify_metadata_format``: ``monai.bundle.verify_metadata`` against the offline copy
  ``ultrarefiner/zoo/meta_schema_20240725.json`` placed at ``eval/schema.json``, as ``prepare_schema`` places it.
- ``verify_bundle_properties``: ``supported_apps`` names no app, so the Zoo checks no app properties; the inference
  workflow is still created and initialised with ``monai.bundle.create_workflow`` and ``configs/logging.conf``, as
  ``check_properties`` does.
- ``verify_data_shape``: ``monai.bundle.verify_net_in_out(net_id="network_def")`` with the metadata unchanged, plus
  what it leaves out: the output spatial shape (``"*"``: the input's) and value range.
- ``verify_torchscript``: every bundle here is in the Zoo's ``exclude_verify_torchscript_list`` (its ``network_def``
  is not scriptable); its docs/README.md must say so and why. A ``models/model.ts`` that ``large_files.yml`` lists
  must load with ``torch.jit.load`` (tests/test_export_bundle.py exports and loads the traced ones).
- ``get_bundle_requirements``: the ``name==version`` lines it writes from the metadata are valid pinned requirements
  (tests/test_wheel_install.py installs them).
- config parsing: every config the bundle runs (``inference.json``; ``train.json`` alone and with each other config
  on top, as the Zoo's unit tests merge them) reads with ``ConfigParser.read_config`` + ``read_meta`` and ``parse``,
  and every ``@`` reference names an existing id.
- pre-commit ``pretty-format-json --no-sort-keys --indent=4``: each ``configs/*.json`` is as that hook writes it.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("transunet", "sam_refiner", "ultrarefiner")
ANY_SIZE = (48, 64)  # spatial size fed where the metadata says "*" (non-square: catches swapped axes)


def export(name: str, dest: Path) -> Path:
    """The bundle as the Zoo receives it (checks of its own are tests/test_export_bundle.py's)."""
    from ultrarefiner.zoo.export import export_bundle

    return export_bundle(REPO / "bundles" / name, dest, verify=False, make_zip=False).folder


def parser_for(files: list[Path], meta: Path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.read_meta(str(meta))
    return parser


def check_large_files(bundle: Path) -> None:
    """download_large_files, offline: each listed file is there with its hash (download_url would skip it)."""
    from monai.apps.utils import check_hash

    path = bundle / "large_files.yml"
    entries = yaml.safe_load(path.read_text())["large_files"] if path.is_file() else []
    for e in entries:
        file = bundle / e["path"]
        assert file.is_file(), f"{e['path']} is listed (url {e['url']!r}) but not packaged: the Zoo cannot fetch it"
        assert check_hash(file, e.get("hash_val") or None, e.get("hash_type") or "md5"), e
        if file.suffix == ".ts":
            torch.jit.load(str(file), map_location="cpu")


def fake_weights(bundle: Path) -> torch.nn.Module:
    """The Zoo's ``_produce_fake_weights``: network_def at random init saved as models/model.pt (returned, eval)."""
    meta = bundle / "configs" / "metadata.json"
    net = parser_for([bundle / "configs" / "inference.json"], meta).get_parsed_content("network_def")
    weights = bundle / "models" / "model.pt"
    shipped = None
    if weights.is_file():
        from ultrarefiner.zoo.export import _weights_under_model

        shipped = torch.load(weights, map_location="cpu", weights_only=True)
        if _weights_under_model(weights):  # a self-describing model.pt (a trained bundle's): export passes
            shipped = shipped["model"]  # --key_in_ckpt model to ckpt_export, as the bundle's CheckpointLoader reads it
    torch.save(net.state_dict(), weights)
    if shipped is not None:  # shipped weights load into the Zoo's network_def (ckpt_export's strict load)
        net.load_state_dict(shipped, strict=True)
    return net.eval()


def check_output_shape(net: torch.nn.Module, meta: dict) -> None:
    """What verify_net_in_out does not check: output spatial shape and value range of the metadata."""
    fmt = meta["network_data_format"]
    (inp,), (out,) = fmt["inputs"].values(), fmt["outputs"].values()
    spatial = [ANY_SIZE[i % 2] if s == "*" else int(s) for i, s in enumerate(inp["spatial_shape"])]
    lo, hi = inp["value_range"] or (0.0, 1.0)
    x = lo + (hi - lo) * torch.rand(1, inp["num_channels"], *spatial, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = net(x.to(getattr(torch, inp["dtype"])))
    expected = [spatial[i] if s == "*" else int(s) for i, s in enumerate(out["spatial_shape"])]
    assert list(y.shape) == [1, out["num_channels"], *expected], y.shape
    if out["value_range"]:
        assert float(y.min()) >= out["value_range"][0] and float(y.max()) <= out["value_range"][1]


def config_sets(bundle: Path) -> list[list[Path]]:
    """inference.json; train.json alone and under each other config (evaluate, multi_gpu_train), as run."""
    configs = bundle / "configs"
    others = sorted(p for p in configs.glob("*.json") if p.stem not in ("metadata", "inference", "train"))
    return [[configs / "inference.json"], [configs / "train.json"]] + [[configs / "train.json", p] for p in others]


def check_references(files: list[Path], meta: Path) -> None:
    from monai.bundle import ReferenceResolver

    parser = parser_for(files, meta)
    parser.parse(reset=True)  # macros and relative ids resolved, every item built (not instantiated)
    refs = ReferenceResolver.find_refs_in_config(parser.get(), id="")
    missing = sorted(r for r in refs if r not in parser)
    assert not missing, f"{[f.name for f in files]}: references to missing ids {missing}"


def check_torchscript_exclusion_documented(bundle: Path) -> None:
    readme = (bundle / "docs" / "README.md").read_text(encoding="utf-8")
    assert "exclude_verify_torchscript_list" in readme, "the TorchScript exclusion is not documented"
    section = readme[readme.index("exclude_verify_torchscript_list") - 1500:][:3000]
    assert re.search(r"not scriptable|torch\.jit\.script", section), "the exclusion's reason is not given"


@pytest.mark.parametrize("name", BUNDLES)
def test_zoo_verify_bundle_full(name, tmp_path, monkeypatch):
    from monai.bundle import create_workflow, verify_metadata, verify_net_in_out

    from ultrarefiner.zoo.export import DEFAULT_SCHEMA

    monkeypatch.setenv("MONAI_META_SCHEMA", str(DEFAULT_SCHEMA))
    bundle = export(name, tmp_path / "models")
    meta_file = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8"))

    check_large_files(bundle)
    torch.manual_seed(0)
    net = fake_weights(bundle)
    for rel in ("configs/metadata.json", "LICENSE", "models/model.pt", "configs/inference.json"):
        assert (bundle / rel).is_file(), rel
    assert meta["version"] in meta["changelog"]

    (bundle / "eval").mkdir()
    shutil.copyfile(DEFAULT_SCHEMA, bundle / "eval" / "schema.json")
    verify_metadata(meta_file=str(meta_file), filepath=str(bundle / "eval" / "schema.json"))

    assert not meta.get("supported_apps"), "an app is listed: the Zoo would check its bundle_properties.py"
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        workflow = create_workflow(workflow_type="inference", config_file=str(bundle / "configs" / "inference.json"),
                                   meta_file=str(meta_file), logging_file=str(bundle / "configs" / "logging.conf"),
                                   bundle_root=str(bundle))
        assert "network_def" in workflow.parser
    finally:  # logging.conf reconfigures the root logger: give pytest's back
        root.handlers[:], root.level = handlers, level

    verify_net_in_out(net_id="network_def", meta_file=str(meta_file),
                      config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle), device="cpu")
    check_output_shape(net, meta)
    check_torchscript_exclusion_documented(bundle)

    from packaging.requirements import Requirement

    lines = [f"monai=={meta['monai_version']}", f"torch=={meta['pytorch_version']}", f"numpy=={meta['numpy_version']}"]
    lines += [f"{k}=={v}" for k, v in meta["required_packages_version"].items()]
    for line in lines:
        assert str(Requirement(line).specifier).startswith("=="), line

    for files in config_sets(bundle):
        check_references(files, meta_file)


@pytest.mark.parametrize("name", BUNDLES)
def test_configs_are_formatted_as_the_zoo_hook_writes_them(name):
    """pre-commit's pretty-format-json --no-sort-keys --indent=4 (ensure_ascii, trailing newline)."""
    for path in sorted((REPO / "bundles" / name / "configs").glob("*.json")):
        text = path.read_text(encoding="utf-8")
        assert text == json.dumps(json.loads(text), indent=4) + "\n", f"{path}: run the Zoo's pretty-format-json"
