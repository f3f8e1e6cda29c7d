"""MONAI Label infer tasks: thin wrappers over ``ultrarefiner.zoo.serving`` that speak MONAI Label's request format.

Every task returns a single-channel PNG of the image's native (H, W), uint8, 1 = lesion, 0 = background, and a
JSON with what was done (label fractions, prompts, latency).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from ultrarefiner.zoo.serving import BundlePredictor, InteractivePredictor, read_mask, write_mask

logger = logging.getLogger(__name__)

LABELS = {"lesion": 1}


def _write_result(mask: np.ndarray) -> str:
    """The mask as a temporary PNG; MONAI Label deletes it after sending."""
    with tempfile.NamedTemporaryFile(suffix=".png", delete=False) as f:
        path = f.name
    write_mask(mask.astype(np.uint8), path)
    return path


def _as_list(value: Any) -> list:
    """Request values arrive as JSON lists or as JSON text from form fields."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        value = json.loads(value)
    return list(value)


def _fraction(mask: np.ndarray) -> float:
    return round(float(mask.mean()), 6)


class _PredictorTask(InferTask):
    """An infer task served by a predictor object (``is_ready()``, ``checkpoint``) from ``ultrarefiner.zoo``."""

    def is_valid(self) -> bool:
        return self.predictor.is_ready()

    def get_path(self, validate: bool = True) -> str | None:
        path = self.predictor.checkpoint
        return str(path) if path.is_file() or not validate else None


class BundleSegmentation(_PredictorTask):
    def __init__(self, predictor: BundlePredictor, description: str) -> None:
        """
        An automatic model: the bundle's own inference config run on the requested image.

        Arguments:
          predictor: the bundle runner; its first output is the label returned unless the request names another
            with ``"output_name"``; all outputs' lesion fractions (and their Dice with the first) go in the JSON.
          description: shown by ``/info/``.
        """
        super().__init__(type=InferType.SEGMENTATION, labels=dict(LABELS), dimension=2, description=description,
                         config={"output_name": list(predictor.outputs)})
        self.predictor = predictor

    def __call__(self, request: Mapping[str, Any]) -> tuple[str, dict]:
        start = time.time()
        masks = self.predictor.predict(request["image"])
        names = list(masks)
        name = request.get("output_name") or names[0]
        name = name[0] if isinstance(name, list) else name
        if name not in masks:
            raise ValueError(f"output_name {name!r} is not one of {names}")
        first = masks[names[0]]
        result = {
            "output_name": name,
            "fractions": {k: _fraction(m) for k, m in masks.items()},
            "dice_to_" + names[0]: {
                k: round(2.0 * float((m & first).sum()) / max(1.0, float(m.sum() + first.sum())), 6)
                for k, m in masks.items() if k != names[0]
            },
            "shape": list(masks[name].shape),
            "latency_s": round(time.time() - start, 3),
        }
        return _write_result(masks[name]), result


class SamRefinerInteractive(_PredictorTask):
    def __init__(self, predictor: InteractivePredictor, description: str) -> None:
        """
        The interactive SAM refiner.

        Request keys (MONAI Label's 2D conventions, pixels of the image as stored, x = column, y = row):
          ``foreground``/``background``: ``[[x, y], ...]`` clicks; ``roi``: ``[x0, y0, x1, y1]`` box; an uploaded
          ``label`` file (the current mask, any 2D image format): SAM's mask prompt. Any mix; at least one.
        """
        super().__init__(type=InferType.DEEPGROW, labels=dict(LABELS), dimension=2, description=description,
                         config={"use_label_prompt": True})
        self.predictor = predictor

    def __call__(self, request: Mapping[str, Any]) -> tuple[str, dict]:
        start = time.time()
        label = None
        use_label = str(request.get("use_label_prompt", True)).lower() not in ("false", "0", "no")
        if request.get("label") and use_label:
            label = read_mask(request["label"])
        box = _as_list(request.get("roi"))
        mask, info = self.predictor.predict(
            request["image"],
            foreground=[p[:2] for p in _as_list(request.get("foreground"))],
            background=[p[:2] for p in _as_list(request.get("background"))],
            box=box[:4] if box else None,
            label=label,
        )
        info.update(fraction=_fraction(mask), shape=list(mask.shape), latency_s=round(time.time() - start, 3))
        return _write_result(mask), info
