"""``python -m ultrarefiner export-bundle``."""

from __future__ import annotations

import json


def export_bundle(
    bundle: str = "bundles/transunet",
    output: str = "dist",
    ckpt_file: str | None = None,
    overrides: dict | str | None = None,
    spatial_shape: tuple | list | str | None = None,
    schema: str | None = None,
    verify: bool = True,
    zip: bool = True,
) -> None:
    """Export a bundle as a self-contained MONAI Model Zoo folder and zip, then verify it.

    Writes <output>/<name>/ (configs, docs, LICENSE, large_files.yml, models/ when present) and
    <output>/<name>_v<version>.zip, after the Zoo readiness check (metadata versions and changelog, network
    data format, data licence, large files, required packages), `monai.bundle verify_metadata`,
    `verify_net_in_out` of `network_def` and `ckpt_export` (a TorchScript trace into the export's models/, loaded
    back with torch.jit.load) on the exported copy. large_files.yml keeps only files that are packaged or have a
    url (the Model Zoo's CI downloads every listed file).

    Args:
        bundle: the bundle folder.
        output: destination folder.
        ckpt_file: weights to package as models/model.pt (default: the bundle's own, if any).
        overrides: JSON object of config overrides for the checks only, e.g. '{"img_size": 32, "vit_depth": 1}'.
        spatial_shape: network spatial shape for the checks when overrides change it, e.g. 32,32.
        schema: local metadata schema file (default: the copy shipped in ultrarefiner/zoo/ for the
            metadata's schema URL, else MONAI downloads it).
        verify: run the checks (--noverify to only copy).
        zip: also write the zip (--nozip to skip).
    """
    from pathlib import Path

    from ultrarefiner.utils.flags import as_flag, parse_list
    from ultrarefiner.zoo.export import export_bundle as run_export

    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides)
        except json.JSONDecodeError as e:
            raise ValueError(f"--overrides must be a JSON object, got {overrides!r} ({e})") from e
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"--overrides must be a JSON object, got {overrides!r}")
    shape = [int(s) for s in parse_list(spatial_shape, "spatial_shape")] if spatial_shape else None
    result = run_export(Path(bundle), Path(output), ckpt_file, overrides, shape, schema, as_flag(verify, "verify"),
                        as_flag(zip, "zip"))
    print(f"exported {result.folder}")
    if result.zip:
        print(f"zip      {result.zip}")
    for warning in result.readiness.warnings:
        print(f"warning: {warning}")
    for check, outcome in result.checks.items():
        print(f"{check}: {outcome}")
