"""Overlay pictures (grayscale image, ground-truth contour green, prediction contour red) and a TensorBoard handler.

MONAI's ``TensorBoardImageHandler`` writes image, label and prediction as separate single-channel pictures; an
overlay needs composition, so ``overlay_contours`` builds the RGB picture and ``TensorBoardOverlayHandler`` writes
a few of them per validation run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from ultrarefiner.engines.evaluation.engine_fields import field, output_items

GREEN = (0, 255, 0)
RED = (255, 0, 0)
YELLOW = (255, 255, 0)


def contour(mask: np.ndarray) -> np.ndarray:
    """Inner boundary of a bool (H, W) mask: foreground pixels with a 4-neighbour outside the mask or the image."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def _gray_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:  # (C, H, W) -> first channel
        image = image[0]
    lo, hi = float(image.min(initial=0.0)), float(image.max(initial=0.0))
    if image.size and (lo < 0.0 or hi > 1.0):  # not in [0, 1]: stretch (e.g. uint8 range or normalised input)
        image = (image - lo) / max(hi - lo, 1e-8)
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


def overlay_contours(image: np.ndarray, label: np.ndarray | None, pred: np.ndarray | None) -> np.ndarray:
    """RGB uint8 (H, W, 3): ``image`` (H, W) in [0, 1] (other ranges are stretched) in gray, contour of the bool
    ``label`` in green and of ``pred`` in red; pixels on both contours are yellow."""
    gray = _gray_uint8(image)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    gt = contour(label) if label is not None else np.zeros(gray.shape, bool)
    pr = contour(pred) if pred is not None else np.zeros(gray.shape, bool)
    rgb[gt] = GREEN
    rgb[pr] = RED
    rgb[gt & pr] = YELLOW
    return rgb


def _mask(x: Any) -> np.ndarray:
    """(C, H, W) mask or one-hot -> bool (H, W) foreground."""
    x = np.asarray(torch.as_tensor(x).detach().float().cpu())
    return x[-1] > 0.5 if x.ndim == 3 else x > 0.5


class TensorBoardOverlayHandler:
    """Writes up to ``max_images`` overlays from the first batches of each evaluator run to TensorBoard.

    Reads ``image``, ``label`` and ``pred`` from the decollated engine output (MONAI evaluators keep all three), or
    from ``engine.state.batch`` when the output lacks them. Step: ``global_step_transform(evaluator)`` (e.g. the
    trainer's epoch), else the evaluator's epoch.
    """

    def __init__(
        self,
        summary_writer: Any = None,
        log_dir: str = "./runs",
        max_images: int = 4,
        tag: str = "val_overlay",
        image_key: str = "image",
        label_key: str = "label",
        pred_key: str = "pred",
        global_step_transform: Callable[[Engine], int] | None = None,
    ) -> None:
        """
        Arguments:
          summary_writer (SummaryWriter or None): writer to use; one on ``log_dir`` is created when None.
          log_dir (str): TensorBoard directory when no writer is given.
          max_images (int): overlays per validation run.
          tag (str): TensorBoard tag.
          image_key, label_key, pred_key (str): keys in the engine output / batch.
          global_step_transform (callable): evaluator -> step.
        """
        self._writer = summary_writer
        self.log_dir, self.max_images, self.tag = log_dir, max_images, tag
        self.image_key, self.label_key, self.pred_key = image_key, label_key, pred_key
        self.global_step_transform = global_step_transform
        self._pictures: list[np.ndarray] = []

    @property
    def writer(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        return self._writer

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self._pictures.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        if len(self._pictures) >= self.max_images:
            return
        batch = engine.state.batch
        for i, item in enumerate(output_items(engine.state.output)):
            if len(self._pictures) >= self.max_images:
                break
            image = field(item, batch, self.image_key, i, required=False)
            if image is None:
                continue
            label = field(item, batch, self.label_key, i, required=False)
            pred = field(item, batch, self.pred_key, i, required=False)
            img = np.asarray(torch.as_tensor(image).detach().float().cpu())
            self._pictures.append(
                overlay_contours(
                    img, _mask(label) if label is not None else None, _mask(pred) if pred is not None else None
                )
            )

    def _write(self, engine: Engine) -> None:
        if not self._pictures:
            return
        step = self.global_step_transform(engine) if self.global_step_transform else engine.state.epoch
        shape = self._pictures[0].shape
        pictures = [p for p in self._pictures if p.shape == shape]  # one grid needs one size
        self.writer.add_images(self.tag, np.stack(pictures), step, dataformats="NHWC")
        self.writer.flush()
