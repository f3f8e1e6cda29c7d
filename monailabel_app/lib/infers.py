"""MONAI Label infer tasks: thin wrappers over ``ultrarefiner.zoo.serving`` that speak MONAI Label's request format.

Every task returns a single-channel PNG of the image's native (H, W), uint8, 1 = lesion, 0 = background, and a
JSON with what was done (label fractions, prompts, latency). A bad request raises ``RequestError`` (MONAI Label's
``INVALID_INPUT``), which the app answers with a 4xx and the message.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from ultrarefiner.errors import BadInputError
from ultrarefiner.zoo.serving import BundlePredictor, InteractivePredictor, load_image_uint8, read_mask, write_mask

logger = logging.getLogger(__name__)

LABELS = {"lesion": 1}


class RequestError(MONAILabelException):
    """A request the task cannot serve as asked (MONAI Label's ``INVALID_INPUT``); ``status_code`` is the HTTP
    status the app answers with: 400 bad parameters, 404 unknown model or image, 422 unreadable image file."""

    def __init__(self, msg: str, status_code: int = 400) -> None:
        super().__init__(MONAILabelError.INVALID_INPUT, msg)
        self.status_code = status_code

    def __str__(self) -> str:
        return self.msg


def _write_result(mask: np.ndarray) -> str:
    """The mask as a temporary PNG; MONAI Label deletes it after sending."""
    with tempfile.NamedTemporaryFile(suffix=".png", delete=False) as f:
        path = f.name
    write_mask(mask.astype(np.uint8), path)
    return path


def _as_list(request: Mapping[str, Any], key: str) -> list:
    """A request value given as a JSON list, or as JSON text (form fields); [] when absent."""
    value = request.get(key)
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RequestError(f"{key}: not JSON ({value!r})") from e
    if not isinstance(value, (list, tuple)):
        raise RequestError(f"{key}: a list is expected, got {value!r}")
    return list(value)


def _points(request: Mapping[str, Any], key: str) -> list[list[float]]:
    """``[[x, y], ...]`` clicks (extra coordinates, e.g. a slice index, are dropped)."""
    points = []
    for p in _as_list(request, key):
        try:
            points.append([float(p[0]), float(p[1])])
        except (TypeError, ValueError, IndexError, KeyError) as e:
            raise RequestError(f"{key}: clicks are [[x, y], ...] in image pixels, got {p!r}") from e
    return points


def _fraction(mask: np.ndarray) -> float:
    return round(float(mask.mean()), 6)


def _read_image(path: str) -> None:
    """Decodes the image once so that a truncated or garbage file is a 422 naming it, not an error inside a model."""
    try:
        load_image_uint8(path)
    except BadInputError as e:
        raise RequestError(f"image {os.path.basename(path)}: {e.reason}", 422) from e


class _PredictorTask(InferTask):
    """An infer task served by a predictor object (``is_ready()``, ``checkpoint``) from ``ultrarefiner.zoo``."""

    predictor: BundlePredictor | InteractivePredictor

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
        names = list(self.predictor.outputs)
        name = request.get("output_name") or names[0]
        name = name[0] if isinstance(name, list) else name
        if name not in names:
            raise RequestError(f"output_name {name!r} is not one of {names}")
        _read_image(request["image"])
        masks = self.predictor.predict(request["image"])
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
        An interactive SAM refiner.

        Request keys (MONAI Label's 2D conventions, pixels of the image as stored, x = column, y = row):
          ``foreground``/``background``: ``[[x, y], ...]`` clicks; ``roi``: ``[x0, y0, x1, y1]`` box; an uploaded
          ``label`` file (the current mask, any 2D image format): SAM's mask prompt. Any mix; at least one, checked
          before the image is read or encoded. The JSON says whether the image embedding came from the cache
          (``embedding_cached``) and how many encodings the model has run (``encoder_calls``).
        """
        super().__init__(type=InferType.DEEPGROW, labels=dict(LABELS), dimension=2, description=description,
                         config={"use_label_prompt": True})
        self.predictor = predictor

    def warm_up(self) -> float:
        """Builds the refiner, freezes its image encoder and runs both once on a synthetic image
        (``InteractivePredictor.warm_up``), so that the first request pays only its own image encoding (the first
        pass, and the trace of the frozen encoder, are seconds on a CPU); returns the seconds taken."""
        start = time.time()
        self.predictor.warm_up()
        return time.time() - start

    def __call__(self, request: Mapping[str, Any]) -> tuple[str, dict]:
        start = time.time()
        foreground, background = _points(request, "foreground"), _points(request, "background")
        box = _as_list(request, "roi")
        try:
            box = [float(v) for v in box[:4]] if box else []
            if box and len(box) < 4:
                raise ValueError(box)
        except (TypeError, ValueError) as e:
            raise RequestError(f"roi: a box is [x0, y0, x1, y1] in image pixels, got {request.get('roi')!r}") from e
        use_label = str(request.get("use_label_prompt", True)).lower() not in ("false", "0", "no")
        label = None
        if request.get("label") and use_label:
            try:
                label = read_mask(request["label"])
            except BadInputError as e:
                raise RequestError(f"label: the uploaded file is {e.reason}", 422) from e
        if not (foreground or background or box or (label is not None and label.any())):
            raise RequestError("no prompt: give foreground/background clicks [[x, y], ...], an roi box "
                               "[x0, y0, x1, y1] or a non-empty label file")
        _read_image(request["image"])
        try:
            mask, info = self.predictor.predict(request["image"], foreground=foreground, background=background,
                                                box=box or None, label=label)
        except ValueError as e:  # prompts that do not fit the image (outside it, wrong label size, empty box)
            raise RequestError(str(e)) from e
        info.update(fraction=_fraction(mask), shape=list(mask.shape), encoder_calls=self.predictor.encoder_calls,
                    latency_s=round(time.time() - start, 3))
        return _write_result(mask), info
