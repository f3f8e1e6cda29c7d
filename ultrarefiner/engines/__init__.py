"""Ignite/MONAI engines, by stage: ``training`` (steps, set-up, handlers), ``evaluation`` (metrics, reports),
``inference`` (predictors, ``refine``), ``checkpoints`` (run files and the refiner format)."""
from .evaluation.metrics import SegmentationMetricHandler as SegmentationMetricHandler
from .evaluation.metrics import segmentation_metrics as segmentation_metrics
from .evaluation.metrics import validation_metrics as validation_metrics
from .evaluation.overlays import TensorBoardOverlayHandler as TensorBoardOverlayHandler
from .evaluation.overlays import overlay_contours as overlay_contours
from .training.report import ConsoleReport as ConsoleReport
