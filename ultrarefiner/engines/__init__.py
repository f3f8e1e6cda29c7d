from .metrics import SegmentationMetricHandler as SegmentationMetricHandler
from .metrics import segmentation_metrics as segmentation_metrics
from .metrics import validation_metrics as validation_metrics
from .overlays import TensorBoardOverlayHandler as TensorBoardOverlayHandler
from .overlays import overlay_contours as overlay_contours
from .report import ConsoleReport as ConsoleReport
