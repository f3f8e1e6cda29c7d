"""The segmentation metrics of every report, by name. A module of its own, without MONAI: ``refine`` without labels
writes its report without importing MONAI's metrics (and with them its handlers and MLflow, seconds of start-up)."""

METRIC_NAMES = ("dice", "iou", "precision", "recall", "accuracy", "hd95", "nsd")
