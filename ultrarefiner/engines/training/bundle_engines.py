"""The bundles' own engines, built in-process: what tests and benchmarks train and time.

``bundle_trainer("sam_refiner", {...})`` parses ``bundles/sam_refiner/configs/train.json`` with ``monai.bundle``'s
``ConfigParser``, applies the overrides (a tiny network, the device, an in-memory dataset or batch list, no
handlers) and returns its ``train#trainer``: the same ``SupervisedTrainer``, step, loss, optimizer and metrics as
``python -m monai.bundle run``, so a test or a benchmark cannot drift from what the bundle runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.engines import SupervisedEvaluator, SupervisedTrainer

__all__ = ["bundle_config", "bundle_evaluator", "bundle_trainer"]


def bundle_config(bundle: str | Path, overrides: Mapping[str, Any] | None = None,
                  config: str = "train.json") -> ConfigParser:
    """A bundle's config with ``overrides`` applied, unresolved.

    Arguments:
      bundle: a bundle folder, or the name of one of this checkout's ``bundles/`` (``transunet``, ``sam_refiner``,
        ``ultrarefiner``).
      overrides: ``{"id#path": value}``: config text (``"$expr"``, ``"@ref"``) or Python objects (a network, a
        dataset, a list of batches) that replace those entries as they are.
      config: file under ``configs/``.
    """
    path = Path(bundle)
    if not (path / "configs").is_dir():  # a name (``ultrarefiner`` is also the package folder in a checkout)
        from ultrarefiner.walkthrough import bundles_root

        path = bundles_root() / str(bundle)
    parser = ConfigParser()
    parser.read_config(str(path / "configs" / config))
    parser.update(dict(overrides or {}))
    return parser


def bundle_trainer(bundle: str | Path, overrides: Mapping[str, Any] | None = None) -> SupervisedTrainer:
    """The bundle's ``train#trainer`` (``configs/train.json``) with ``overrides`` (see :func:`bundle_config`)."""
    return bundle_config(bundle, overrides).get_parsed_content("train#trainer")


def bundle_evaluator(bundle: str | Path, overrides: Mapping[str, Any] | None = None) -> SupervisedEvaluator:
    """The bundle's validation ``validate#evaluator`` (``configs/train.json``) with ``overrides``."""
    return bundle_config(bundle, overrides).get_parsed_content("validate#evaluator")
