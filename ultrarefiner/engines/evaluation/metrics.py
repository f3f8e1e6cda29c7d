"""The segmentation metric set of all three bundles: Dice, IoU (Jaccard), Precision, Recall, Accuracy, HD95, NSD.

Binary foreground metrics per image, from MONAI's confusion matrix (``get_confusion_matrix``) and boundary
distances (``get_edge_surface_distance``, computed once per image for HD95 and NSD); on images where prediction
and label are both non-empty they equal MONAI's ``DiceMetric``, ``MeanIoU``, ``ConfusionMatrixMetric`` (precision,
sensitivity, accuracy), ``HausdorffDistanceMetric(percentile=95)`` and ``SurfaceDiceMetric`` (normalised surface
Dice, NSD, with a tolerance of ``NSD_TOLERANCE`` = 2 pixels of the frame the metric is computed in, as MedSAM's 2D
evaluation; the fraction of both boundaries within the tolerance of the other). Empty masks are defined, never
NaN:

- Dice, IoU, Precision, Recall: a 0/0 ratio is 1 when prediction and label are both empty, else 0 (an empty
  prediction on a lesion has precision 0; a prediction on an empty label has recall 0).
- NSD: 1 when both are empty, 0 when exactly one is.
- HD95 (pixels): 0 when both are empty; the image diagonal sqrt(H**2 + W**2) when exactly one is empty (worse
  than any distance between two masks in the image).
- Accuracy: always defined.

Inputs are binary masks (B, 1, H, W) or (1, H, W); two-channel one-hot inputs (B, 2, H, W) are reduced to the
foreground channel. The same definitions serve the Ignite metrics of the validation loops
(``SegmentationMetricHandler``, ``validation_metrics``) and the per-image CSV of evaluation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import CumulativeIterationMetric, get_confusion_matrix
from monai.metrics.utils import do_metric_reduction, get_edge_surface_distance
from monai.networks.utils import one_hot
from monai.utils import MetricReduction

from ultrarefiner.engines.evaluation.metric_names import METRIC_NAMES

# MONAI's surface metrics pass get_mask_edges an argument that MONAI itself deprecated: one filter for the process
# (warnings.catch_warnings around each call is not thread-safe, and refine computes metrics on writer threads)
warnings.filterwarnings("ignore", message=r".*always_return_as_numpy.*", category=FutureWarning)

NSD_TOLERANCE = 2.0  # pixels
# Ignite names of the validation metrics; "val_mean_dice" is the key metric of the bundles.
HANDLER_NAMES = {
    "dice": "mean_dice",
    "iou": "mean_iou",
    "precision": "precision",
    "recall": "recall",
    "accuracy": "accuracy",
    "hd95": "hd95",
    "nsd": "nsd",
}


def _foreground(x: torch.Tensor) -> torch.Tensor:
    """(B, 1|2, H, W) -> bool (B, 1, H, W): the mask itself or the foreground channel of a one-hot pair."""
    x = torch.as_tensor(x)
    if x.ndim != 4 or x.shape[1] not in (1, 2):
        raise ValueError(
            f"expected a binary mask (B, 1, H, W), (1, H, W) or one-hot (B, 2, H, W), got {tuple(x.shape)}"
        )
    return x[:, -1:] > 0.5


def _ratio(num: torch.Tensor, den: torch.Tensor, both_empty: torch.Tensor) -> torch.Tensor:
    safe = torch.where(den > 0, num / den.clamp(min=1), both_empty.float())
    return safe.float()


def _surface_metrics(pred: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image HD95 (pixels) and NSD of bool (B, 1, H, W) masks, with one boundary-distance computation per image.

    MONAI's ``compute_hausdorff_distance`` and ``compute_surface_dice`` both start with the same
    ``get_edge_surface_distance(pred, label, symmetric=True)`` (euclidean, no spacing), which is nearly all of their
    cost; each image's distances are computed once here and reduced as those two functions reduce them: HD95 the
    larger of the two directions' 95th percentiles (``torch.quantile``), NSD the fraction of both boundaries within
    ``NSD_TOLERANCE`` (no sub-pixel areas). Tested equal to them. Empty masks as in the module docstring (MONAI's
    functions are NaN or inf there)."""
    n = pred.shape[0]
    hd95, nsd = torch.empty(n), torch.empty(n)
    diagonal = math.hypot(*pred.shape[-2:])
    for i in range(n):
        p_any, l_any = bool(pred[i].any()), bool(label[i].any())
        if not (p_any and l_any):
            hd95[i] = 0.0 if p_any == l_any else diagonal
            nsd[i] = 1.0 if p_any == l_any else 0.0
            continue
        _, distances, _ = get_edge_surface_distance(pred[i, 0].float(), label[i, 0].float(), symmetric=True)
        hd95[i] = torch.max(torch.stack([torch.quantile(d, 0.95) for d in distances]))
        nsd[i] = sum((d <= NSD_TOLERANCE).sum() for d in distances) / sum(len(d) for d in distances)
    return {"hd95": hd95, "nsd": nsd}


def batch_metrics(
    pred: torch.Tensor, label: torch.Tensor, names: Sequence[str] = METRIC_NAMES
) -> dict[str, torch.Tensor]:
    """Per-image metrics of a batch: name -> float tensor (B,). ``pred``/``label``: (B, 1|2, H, W).

    The values stay on the device of ``pred`` unless HD95 or NSD is asked for (MONAI computes them on the host; all
    values are then on the CPU): the training metrics (Dice, IoU) of a GPU trainer accumulate without a host sync per
    iteration and are read once, when the epoch's mean is computed. Counts are exact in float32 on any device (up
    to 2**24 pixels per image), so the values are the same everywhere.
    """
    unknown = set(names) - set(METRIC_NAMES)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; known: {METRIC_NAMES}")
    # MetaTensors (MONAI's post-processing makes them) as plain tensors: same values, a quarter of the host time
    pred, label = pred.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor)
    p, y = _foreground(pred), _foreground(label)
    if {"hd95", "nsd"} & set(names):
        p, y = p.cpu(), y.cpu()
    else:
        y = y.to(p.device)  # a host label with a device prediction: moved, not read back
    if p.shape != y.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and label {tuple(y.shape)} differ in shape")
    cm = get_confusion_matrix(p.float(), y.float(), include_background=True)[:, 0]  # (B, 4): tp, fp, tn, fn
    tp, fp, tn, fn = cm.unbind(-1)
    both_empty = (tp + fp + fn) == 0
    values = {
        "dice": lambda: _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        "iou": lambda: _ratio(tp, tp + fp + fn, both_empty),
        "precision": lambda: _ratio(tp, tp + fp, both_empty),
        "recall": lambda: _ratio(tp, tp + fn, both_empty),
        "accuracy": lambda: ((tp + tn) / (tp + fp + tn + fn)).float(),
    }
    out = {n: values[n]() for n in names if n in values}
    if {"hd95", "nsd"} & set(names):
        surface = _surface_metrics(p, y)  # both from one boundary-distance computation per image
        out.update({n: surface[n] for n in names if n in surface})
    return {n: out[n] for n in names}


def segmentation_metrics(
    pred: torch.Tensor, label: torch.Tensor, names: Sequence[str] = METRIC_NAMES
) -> dict[str, float | torch.Tensor]:
    """Dice, IoU, Precision, Recall, Accuracy and HD95 of binary masks.

    Arguments:
      pred, label: one image (1, H, W) -> dict of floats; or a batch (B, 1, H, W) -> dict of (B,) tensors.
        Values > 0.5 are foreground; (.., 2, H, W) one-hot inputs use channel 1.
      names: which metrics to compute (HD95 and NSD are the slow ones).
    """
    pred, label = torch.as_tensor(pred), torch.as_tensor(label)
    single = pred.ndim == 3
    if single:
        pred, label = pred.unsqueeze(0), label.unsqueeze(0)
    out = batch_metrics(pred, label, names)
    return {k: float(v[0]) for k, v in out.items()} if single else out


class SegmentationMetric(CumulativeIterationMetric):
    """One metric of the set as a MONAI cumulative metric: buffers per-image values, ``aggregate`` is their mean.

    ``ignore_empty``: images with an empty label are left out of the mean (their value is NaN), as in MONAI's
    ``DiceMetric`` and ``MeanIoU`` (``ignore_empty=True``, their default; 0 when no image has a lesion): with it,
    ``dice`` and ``iou`` equal MONAI's ``MeanDice``/``MeanIoUHandler(include_background=False)`` on binary
    one-hot pairs, without their host reads (MONAI's Dice reads ``label.sum() > 0`` of every image back to the
    host, and its IoU copies a NaN from the host: a sync per image, per iteration on a GPU).
    """

    def __init__(self, metric_name: str = "dice", ignore_empty: bool = False) -> None:
        """
        Arguments:
          metric_name (str): one of ``METRIC_NAMES``.
          ignore_empty (bool): leave images with an empty label out of the mean (MONAI's convention).
        """
        super().__init__()
        if metric_name not in METRIC_NAMES:
            raise ValueError(f"unknown metric {metric_name!r}; known: {METRIC_NAMES}")
        self.metric_name, self.ignore_empty = metric_name, ignore_empty

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if y is None:
            raise ValueError("a label is required")
        values = batch_metrics(y_pred, y, (self.metric_name,))[self.metric_name]
        if self.ignore_empty:
            empty = ~_foreground(y.as_subclass(torch.Tensor)).flatten(1).any(1)
            values = values.masked_fill(empty.to(values.device), float("nan"))
        return values.unsqueeze(1)  # (B, 1)

    def aggregate(self) -> torch.Tensor:
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            raise ValueError(f"no values to aggregate for {self.metric_name}")
        if self.ignore_empty:
            return do_metric_reduction(data.float(), MetricReduction.MEAN)[0]  # MONAI's mean of the non-NaN values
        return data.float().mean()


class SegmentationMetricHandler(IgniteMetricHandler):
    """Ignite metric for SupervisedTrainer/SupervisedEvaluator (``key_val_metric``/``additional_metrics``).

    Expects ``[y_pred, y]`` from ``output_transform`` (default ``from_engine(["pred", "label"])``): decollated lists of
    (C, H, W) or batches (B, C, H, W), C = 1 (mask) or 2 (one-hot after ``AsDiscreted``).
    """

    def __init__(
        self, metric_name: str = "dice", output_transform: Callable | None = None, save_details: bool = True,
        ignore_empty: bool = False,
    ) -> None:
        """
        Arguments:
          metric_name (str): one of ``METRIC_NAMES``.
          output_transform (callable): engine output -> [y_pred, y].
          save_details (bool): keep per-image values in ``engine.state.metric_details``.
          ignore_empty (bool): leave images with an empty label out of the mean (``SegmentationMetric``).
        """
        super().__init__(
            metric_fn=SegmentationMetric(metric_name, ignore_empty),
            output_transform=output_transform or from_engine(["pred", "label"]),
            save_details=save_details,
        )


def logits_and_label_index(output: Any, logits_key: str = "logits", label_key: str = "label") -> tuple[list, list]:
    """Engine output -> ([logits], [label]) for a loss taking class-index labels (``to_onehot_y=True``): labels
    one-hot encoded by post-processing, (C > 1, H, W), are turned back into (1, H, W) indices."""
    logits, labels = from_engine([logits_key, label_key])(output)
    labels = [y.argmax(0, keepdim=True) if y.shape[0] > 1 else y for y in labels]
    return logits, labels


def validation_metrics(
    prefix: str = "val_",
    names: Sequence[str] = ("dice", "iou", "precision", "recall", "accuracy"),
    output_transform: Callable | None = None,
    loss_fn: Callable | None = None,
    loss_output_transform: Callable | None = None,
) -> dict[str, IgniteMetricHandler]:
    """Ignite metrics named ``{prefix}mean_dice``, ``{prefix}mean_iou``, ``{prefix}precision``, ``{prefix}recall``,
    ``{prefix}accuracy`` (and ``{prefix}hd95`` if in ``names``), for a bundle's ``additional_metrics``.

    ``loss_fn`` adds ``{prefix}loss`` (MONAI's loss metric over ``loss_output_transform``, default
    ``logits_and_label_index``): the evaluator's ``pred`` is usually discretised by post-processing, so keep the raw
    logits under another key (``CopyItemsd(keys="pred", names="logits")`` as the first post-processing step).
    """
    out: dict[str, IgniteMetricHandler] = {
        f"{prefix}{HANDLER_NAMES[n]}": SegmentationMetricHandler(n, output_transform) for n in names
    }
    if loss_fn is not None:
        out[f"{prefix}loss"] = IgniteMetricHandler(
            loss_fn=loss_fn, output_transform=loss_output_transform or logits_and_label_index
        )
    return out


class BatchOneHotd:
    """Training post-processing of a whole collated batch (trainer ``decollate=False``): ``pred`` logits (B, C, H, W)
    -> one-hot argmax, ``label`` class indices (B, 1, H, W) -> one-hot (B, C, H, W), as ``Activationsd(softmax) +
    AsDiscreted(argmax, to_onehot)`` per item. Decollating a batch into per-item MetaTensors and post-processing each
    costs ~120 ms per batch of 24 at 224 px on one CPU core, several times a TransUNet step on a GPU; this is two
    tensor ops on the device.
    """

    def __init__(self, num_classes: int = 2, pred_key: str = "pred", label_key: str = "label") -> None:
        self.num_classes, self.pred_key, self.label_key = num_classes, pred_key, label_key

    def __call__(self, data: Any) -> dict:
        d = dict(data)
        pred = torch.as_tensor(d[self.pred_key]).detach()
        if pred.ndim != 4 or pred.shape[1] != self.num_classes:
            raise ValueError(f"expected {self.pred_key} logits (B, {self.num_classes}, H, W), got {tuple(pred.shape)}")
        d[self.pred_key] = one_hot(pred.argmax(1, keepdim=True), self.num_classes, dim=1)
        d[self.label_key] = one_hot(torch.as_tensor(d[self.label_key]).long(), self.num_classes, dim=1)
        return d
