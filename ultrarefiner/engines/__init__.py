"""Ignite/MONAI engines, by stage: ``training`` (steps, set-up, handlers), ``evaluation`` (metrics, reports),
``inference`` (predictors, ``refine``), ``checkpoints`` (run files and the refiner format).

The bundle components below are exported lazily (PEP 562): importing a submodule, e.g. ``refine``'s
``engines.inference.refine_folder``, does not import MONAI's handlers (and with them MLflow), about 4 s of a
command's start on a laptop CPU."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SegmentationMetricHandler": ".evaluation.metrics",
    "segmentation_metrics": ".evaluation.metrics",
    "validation_metrics": ".evaluation.metrics",
    "TensorBoardOverlayHandler": ".evaluation.overlays",
    "overlay_contours": ".evaluation.contours",
    "ConsoleReport": ".training.report",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
