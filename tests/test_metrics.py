"""Metric set: known HD95 cases, empty-mask definitions, agreement with MONAI, Ignite handlers on an evaluator."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine
from monai.metrics import ConfusionMatrixMetric, DiceMetric, HausdorffDistanceMetric, MeanIoU, SurfaceDiceMetric

from ultrarefiner.engines import SegmentationMetricHandler, segmentation_metrics, validation_metrics
from ultrarefiner.engines.evaluation.metrics import NSD_TOLERANCE


def square(y: int, x: int, size: int = 10, shape: tuple[int, int] = (48, 48)) -> torch.Tensor:
    m = torch.zeros(1, *shape)
    m[0, y : y + size, x : x + size] = 1
    return m


def test_hd95_two_squares_offset_by_known_distance():
    a, b = square(10, 10), square(10, 15)  # same square moved 5 px right
    m = segmentation_metrics(a, b)
    assert m["hd95"] == pytest.approx(5.0)
    assert m["dice"] == pytest.approx(0.5) and m["iou"] == pytest.approx(1 / 3)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx(1 - 100 / 48**2)
    assert segmentation_metrics(square(10, 10), square(17, 10))["hd95"] == pytest.approx(7.0)
    assert segmentation_metrics(a, a)["hd95"] == 0.0
    # NSD at 2 px: boundaries 1 px apart are all within tolerance, 5 px apart only where the edges overlap
    assert segmentation_metrics(square(10, 10), square(11, 10))["nsd"] == pytest.approx(1.0)
    assert 0.0 < m["nsd"] < 0.8


def test_empty_cases_are_defined():
    empty, lesion = torch.zeros(1, 30, 40), square(5, 5, shape=(30, 40))
    both = segmentation_metrics(empty, empty)
    assert both == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "accuracy": 1.0, "hd95": 0.0,
                    "nsd": 1.0}
    missed = segmentation_metrics(empty, lesion)  # empty prediction on a lesion
    assert missed["hd95"] == pytest.approx(math.hypot(30, 40)) == pytest.approx(50.0)
    assert missed["dice"] == missed["iou"] == missed["precision"] == missed["recall"] == 0.0
    false_alarm = segmentation_metrics(lesion, empty)
    assert false_alarm["hd95"] == pytest.approx(50.0)
    assert false_alarm["precision"] == false_alarm["recall"] == 0.0
    assert missed["nsd"] == false_alarm["nsd"] == 0.0
    assert all(math.isfinite(v) for m in (both, missed, false_alarm) for v in m.values())


@pytest.mark.filterwarnings("ignore::FutureWarning")  # raised inside MONAI's own HausdorffDistanceMetric
def test_batch_and_one_hot_inputs_agree_with_monai():
    torch.manual_seed(0)
    pred = torch.stack([square(4, 6, 12, (40, 40)), square(20, 20, 8, (40, 40)), square(5, 5, 15, (40, 40))])
    label = torch.stack([square(6, 8, 10, (40, 40)), square(18, 22, 9, (40, 40)), square(10, 12, 15, (40, 40))])
    ours = segmentation_metrics(pred, label)
    assert ours["dice"].shape == (3,)
    assert torch.allclose(ours["dice"], DiceMetric(include_background=True, reduction="none")(pred, label)[:, 0])
    assert torch.allclose(ours["iou"], MeanIoU(include_background=True, reduction="none")(pred, label)[:, 0])
    for name, monai_name in (("precision", "precision"), ("recall", "sensitivity"), ("accuracy", "accuracy")):
        cm = ConfusionMatrixMetric(include_background=True, metric_name=monai_name, reduction="none")
        cm(pred, label)
        assert torch.allclose(ours[name], cm.aggregate()[0][:, 0]), name
    hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(pred, label)[:, 0]
    assert torch.allclose(ours["hd95"], hd.float())
    nsd = SurfaceDiceMetric(class_thresholds=[2.0], include_background=True, reduction="none")(pred, label)[:, 0]
    assert torch.allclose(ours["nsd"], nsd.float())
    one_hot = segmentation_metrics(torch.cat([1 - pred, pred], 1), torch.cat([1 - label, label], 1))
    assert all(torch.allclose(one_hot[k], ours[k]) for k in ours)
    with pytest.raises(ValueError, match="binary mask"):
        segmentation_metrics(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_ignite_handlers_on_an_evaluator():
    a, b, empty = square(10, 10), square(10, 15), torch.zeros(1, 48, 48)
    batches = [
        {"pred": [torch.cat([1 - a, a]), torch.cat([1 - empty, empty])], "label": [torch.cat([1 - b, b])] * 2},
        {"pred": [torch.cat([1 - b, b])], "label": [torch.cat([1 - b, b])]},
    ]
    evaluator = Engine(
        lambda engine, batch: [{"pred": p, "label": y} for p, y in zip(batch["pred"], batch["label"], strict=True)]
    )
    SegmentationMetricHandler("dice").attach(evaluator, "val_mean_dice")
    metrics = validation_metrics(names=("iou", "precision", "recall", "accuracy", "hd95"))
    assert set(metrics) == {"val_mean_iou", "val_precision", "val_recall", "val_accuracy", "val_hd95"}
    for name, metric in metrics.items():
        metric.attach(evaluator, name)
    state = evaluator.run(batches)
    assert state.metrics["val_mean_dice"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert state.metrics["val_precision"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert state.metrics["val_hd95"] == pytest.approx((5.0 + math.hypot(48, 48) + 0.0) / 3)
    assert state.metric_details["val_mean_dice"].shape == (3, 1)


def test_batch_one_hot_matches_per_item_monai_postprocessing():
    """The TransUNet trainer post-processes whole batches (decollate=False); the result must equal MONAI's per-item
    Activationsd(softmax) + AsDiscreted(argmax, to_onehot) on the decollated items."""
    from monai.data import decollate_batch
    from monai.transforms import Activationsd, AsDiscreted, Compose

    from ultrarefiner.engines.evaluation.metrics import BatchOneHotd

    g = torch.Generator().manual_seed(0)
    batch = {"pred": torch.randn(3, 2, 8, 9, generator=g),
             "label": torch.randint(0, 2, (3, 1, 8, 9), generator=g).float()}
    ours = BatchOneHotd(num_classes=2)(batch)
    post = Compose([Activationsd(keys="pred", softmax=True),
                    AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=[2, 2])])
    items = [post(i) for i in decollate_batch(batch)]
    assert torch.equal(ours["pred"], torch.stack([i["pred"] for i in items]))
    assert torch.equal(ours["label"], torch.stack([i["label"] for i in items]))
    with pytest.raises(ValueError, match="logits"):
        BatchOneHotd(num_classes=3)(batch)


def test_batch_metrics_of_metatensors_are_plain_and_equal():
    """MONAI's post-processing hands the train metrics MetaTensors: same values, plain tensors out."""
    from monai.data import MetaTensor

    from ultrarefiner.engines.evaluation.metrics import batch_metrics

    g = torch.Generator().manual_seed(0)
    pred, label = (torch.rand(3, 1, 16, 16, generator=g) > 0.5).float(), (torch.rand(3, 1, 16, 16, generator=g) > 0.5)
    plain = batch_metrics(pred, label.float(), ("dice", "iou"))
    meta = batch_metrics(MetaTensor(pred), MetaTensor(label.float()), ("dice", "iou"))
    for k in plain:
        assert type(meta[k]) is torch.Tensor and torch.equal(meta[k], plain[k])


def test_ignore_empty_equals_monai_mean_dice_and_iou_without_host_reads():
    """The phase-1 bundle's Dice and IoU (``ignore_empty``): MONAI's ``MeanDice``/``MeanIoUHandler`` values on
    one-hot pairs (images without a lesion left out; 0 when none has one), computed without a host read per image."""
    from monai.handlers import MeanDice, MeanIoUHandler, from_engine
    from monai.networks.utils import one_hot

    from ultrarefiner.engines.evaluation.metrics import SegmentationMetric
    from ultrarefiner.utils.sync_counter import HostSyncCounter

    g = torch.Generator().manual_seed(0)
    label = (torch.rand(6, 1, 16, 16, generator=g) > 0.7).float()
    label[1] = 0  # no lesion, empty prediction
    label[2] = 0  # no lesion, a false positive
    pred = (torch.rand(6, 1, 16, 16, generator=g) > 0.6).float()
    pred[1] = 0
    pred[4] = 0  # a missed lesion
    batches = [(one_hot(pred[i:i + 3], 2), one_hot(label[i:i + 3], 2)) for i in (0, 3)]
    pairs = from_engine(["pred", "label"])
    for ours, theirs in ((SegmentationMetricHandler("dice", ignore_empty=True),
                          MeanDice(include_background=False, output_transform=pairs)),
                         (SegmentationMetricHandler("iou", ignore_empty=True),
                          MeanIoUHandler(include_background=False, output_transform=pairs))):
        values = []
        for handler in (ours, theirs):
            engine = Engine(lambda e, b: {"pred": b[0], "label": b[1]})
            handler.attach(engine, "m")
            values.append(engine.run(batches).metrics["m"])
        assert values[0] == pytest.approx(values[1], abs=1e-6) and 0 < values[0] < 1
        with HostSyncCounter() as syncs:  # the metric's update on device tensors (stand-in: moved first)
            p, y = (t.to("cpu", non_blocking=True) for t in batches[0])
            ours.metric_fn(p, y)
        assert syncs.count == 0, syncs.report()
    none = SegmentationMetric("dice", ignore_empty=True)
    none(one_hot(pred[1:2], 2), one_hot(label[1:2], 2))
    assert float(none.aggregate()) == 0.0  # MONAI's value when no image has a lesion


@pytest.mark.filterwarnings("ignore::FutureWarning")  # raised inside MONAI's own surface metrics
def test_hd95_and_nsd_from_one_distance_computation_equal_monai_on_irregular_masks():
    """HD95 and NSD share one boundary-distance computation per image (``_surface_metrics``): the values equal
    MONAI's ``compute_hausdorff_distance`` and ``compute_surface_dice``, each of which computes it on its own, on
    irregular masks of several components, some touching the image border."""
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    gen = torch.Generator().manual_seed(3)

    def blobs(n: int) -> torch.Tensor:
        noise = torch.rand(n, 1, 12, 15, generator=gen)
        smooth = F.interpolate(noise, size=(61, 77), mode="bicubic", align_corners=False)
        return (smooth > 0.62).float()

    pred, label = blobs(10), blobs(10)
    keep = (pred.flatten(1).sum(1) > 0) & (label.flatten(1).sum(1) > 0)
    pred, label = pred[keep], label[keep]
    assert len(pred) >= 8 and bool((pred[:, :, 0] + label[:, :, 0]).sum() > 0)  # the border is reached
    ours = segmentation_metrics(pred, label, ("hd95", "nsd"))
    hd = compute_hausdorff_distance(pred, label, include_background=True, percentile=95)[:, 0]
    nsd = compute_surface_dice(pred, label, class_thresholds=[NSD_TOLERANCE], include_background=True)[:, 0]
    assert torch.equal(ours["hd95"], hd.float()) and torch.equal(ours["nsd"], nsd.float())
    assert len(set(ours["nsd"].tolist())) > 3  # varied cases, not one value
    assert list(segmentation_metrics(pred, label, ("nsd", "dice"))) == ["nsd", "dice"]  # asked order kept
