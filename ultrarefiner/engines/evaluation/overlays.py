"""Overlay pictures (grayscale image, ground-truth contour green, prediction contour red) and a TensorBoard handler.

MONAI's ``TensorBoardImageHandler`` writes image, label and prediction as separate single-channel pictures; an
overlay needs composition, so ``overlay_contours`` (``contours``) builds the RGB picture and
``TensorBoardOverlayHandler`` writes a few of them per validation run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from ultrarefiner.engines.evaluation.contours import overlay_contours
from ultrarefiner.engines.evaluation.engine_fields import field, output_items


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
