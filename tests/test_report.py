"""Console report on a tiny real Ignite run; overlay pictures and the TensorBoard overlay handler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

from ultrarefiner.engines import ConsoleReport, TensorBoardOverlayHandler, overlay_contours, validation_metrics


def _mask(y0: int, x0: int, size: int = 8, n: int = 32) -> torch.Tensor:
    m = torch.zeros(1, n, n)
    m[0, y0 : y0 + size, x0 : x0 + size] = 1
    return torch.cat([1 - m, m])  # one-hot, as after AsDiscreted


def make_run(report_first: bool, capsys):
    """A 2-iteration-per-epoch trainer validating every epoch; validation Dice 0.5, 1.0, 0.5 over 3 epochs."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.01)
    label = _mask(8, 8)
    preds = {1: _mask(8, 12), 2: _mask(8, 8), 3: _mask(8, 12)}  # dice 0.5, 1.0, 0.5

    trainer = Engine(lambda engine, batch: [{"loss": torch.tensor(batch)}])

    def validate(engine, batch):
        return [{"pred": preds[trainer.state.epoch], "label": label, "image": torch.rand(1, 32, 32)}]

    evaluator = Engine(validate)
    for name, metric in validation_metrics().items():
        metric.attach(evaluator, name)
    evaluator.add_event_handler(Events.COMPLETED, lambda e: e.state.metrics.update(val_loss=0.25))

    @trainer.on(Events.EPOCH_COMPLETED)
    def train_metrics(engine):  # stands in for MONAI's key_train_metric
        engine.state.metrics["train_mean_dice"] = 0.1 * engine.state.epoch

    report = ConsoleReport(
        "transunet", "BUSI", fold=0, n_splits=5, n_train=40, n_val=10, evaluator=evaluator, optimizer=optimizer
    )
    if report_first:
        report.attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run([0]))  # ValidationHandler
    if not report_first:
        report.attach(trainer)
    trainer.run([0.5, 0.7], max_epochs=3)
    return report, capsys.readouterr().out


@pytest.mark.parametrize("report_first", [True, False])
def test_console_report(report_first, capsys):
    report, out = make_run(report_first, capsys)
    lines = out.splitlines()
    assert "Experiment: transunet | Dataset: BUSI | Fold 1/5" in out
    assert "Train samples: 40 | Val samples: 10" in out
    train = [ln for ln in lines if ln.startswith("[TRAIN]")]
    assert len(train) == 3
    assert "Loss: 0.6000" in train[0] and "Dice: 0.1000" in train[0] and "IoU: -" in train[0]
    assert "LR: 1.00e-02" in train[0]
    val = [i for i, ln in enumerate(lines) if ln.startswith("[VALIDATION]")]
    assert len(val) == 3
    for col in ("Dice", "IoU", "Precision", "Recall", "Accuracy", "Loss"):
        assert col in lines[val[0]]
    rows = [lines[i + 1] for i in val]
    assert rows[0].split() == ["0.5000", "0.3333", "0.5000", "0.5000", "0.9375", "0.2500", "★", "BEST"]
    assert "★ BEST" in rows[0] and "★ BEST" in rows[1] and "★ BEST" not in rows[2]
    assert rows[1].split()[0] == "1.0000"
    # each epoch: "Epoch k/3", then [TRAIN], then [VALIDATION], whatever the handler order
    for k, i in enumerate(val, 1):
        assert lines[i - 2] == f"Epoch {k}/3" and lines[i - 1].startswith("[TRAIN]")
    assert report.best == pytest.approx(1.0) and report.best_epoch == 2


def test_overlay_contours_colours():
    image = np.linspace(0, 1, 20 * 20, dtype=np.float32).reshape(20, 20)
    label = np.zeros((20, 20), bool)
    label[5:15, 5:15] = True
    pred = np.zeros((20, 20), bool)
    pred[5:15, 8:18] = True
    rgb = overlay_contours(image, label, pred)
    assert rgb.shape == (20, 20, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[10, 5]) == (0, 255, 0)  # GT left edge
    assert tuple(rgb[10, 17]) == (255, 0, 0)  # prediction right edge
    assert tuple(rgb[5, 10]) == (255, 255, 0)  # both top edges
    assert rgb[10, 10, 0] == rgb[10, 10, 1] == rgb[10, 10, 2]  # interior stays gray
    assert tuple(overlay_contours(image, None, None)[0, 0]) == (0, 0, 0)


def test_tensorboard_overlay_handler_writes_images(tmp_path):
    class Writer:
        def __init__(self):
            self.calls = []

        def add_images(self, tag, images, step, dataformats):
            self.calls.append((tag, images.shape, step, dataformats))

        def flush(self):
            pass

    writer = Writer()
    evaluator = Engine(lambda e, b: [{"image": torch.rand(1, 32, 32), "label": _mask(4, 4), "pred": _mask(6, 6)}] * 3)
    TensorBoardOverlayHandler(writer, max_images=4, global_step_transform=lambda e: 7).attach(evaluator)
    evaluator.run([0, 1])
    assert writer.calls == [("val_overlay", (4, 32, 32, 3), 7, "NHWC")]

    real = TensorBoardOverlayHandler(log_dir=str(tmp_path / "tb"), max_images=2)
    real.attach(evaluator)
    evaluator.run([0])
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_report_and_metrics_on_monai_engines(tmp_path, capsys):
    """The bundle wiring in small: SupervisedTrainer + ValidationHandler + SupervisedEvaluator on a tiny TransUNet."""
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import ValidationHandler
    from monai.losses import DiceCELoss
    from monai.transforms import Activationsd, AsDiscreted, Compose, CopyItemsd

    from ultrarefiner.engines import SegmentationMetricHandler
    from ultrarefiner.networks import TransUNet

    torch.manual_seed(0)
    data = [{"image": torch.rand(1, 1, 32, 32), "label": (torch.rand(1, 1, 32, 32) > 0.7).float()} for _ in range(2)]
    net = TransUNet(img_size=32, vit_depth=1).to(memory_format=torch.channels_last)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    post = Compose(
        [
            CopyItemsd(keys="pred", names="logits"),
            Activationsd(keys="pred", softmax=True),
            AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=[2, 2]),
        ]
    )
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=data,
        network=net,
        postprocessing=post,
        key_val_metric={"val_mean_dice": SegmentationMetricHandler("dice")},
        additional_metrics=validation_metrics(names=("iou", "precision", "recall", "accuracy"), loss_fn=loss),
    )
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=data,
        network=net,
        optimizer=opt,
        loss_function=loss,
        postprocessing=post,
        key_train_metric={"train_mean_dice": SegmentationMetricHandler("dice")},
        additional_metrics={"train_mean_iou": SegmentationMetricHandler("iou")},
        train_handlers=[
            ValidationHandler(validator=evaluator, interval=1, epoch_level=True),
            ConsoleReport("transunet", "BUSI", 2, 5, 2, 2, evaluator=evaluator, optimizer=opt),
        ],
    )
    trainer.run()
    out = capsys.readouterr().out
    assert "Fold 3/5" in out and out.count("[TRAIN]") == 2 and out.count("[VALIDATION]") == 2
    train = [ln for ln in out.splitlines() if ln.startswith("[TRAIN]")][0]
    assert " - " not in train and "IoU: " in train  # loss, Dice, IoU and LR all present
    rows = [ln for ln in out.splitlines() if ln.startswith(" " * 13)]
    assert len(rows) == 2 and all(len(r.split()) >= 6 and "-" not in r.split()[:6] for r in rows)
    assert "★ BEST" in rows[0]
    assert set(evaluator.state.metrics) >= {"val_mean_dice", "val_mean_iou", "val_loss", "val_accuracy"}
    assert evaluator.state.output[0]["pred"].shape == (2, 32, 32)


def test_batch_length_reads_shapes_of_any_batch_form():
    from ultrarefiner.engines.training.report import batch_length

    x = torch.zeros(4, 1, 8, 8)
    assert batch_length({"image": x, "label": x[:, :1]}) == 4  # collated dict
    assert batch_length([{"image": x[0]}, {"image": x[1]}, {"image": x[2]}]) == 3  # MONAI's decollated list
    assert batch_length((x, x)) == 4 and batch_length(x) == 4
    assert batch_length({"name": ["a", "b"], "image": x}) == 4  # the first tensor counts
    assert batch_length(0.5) is None and batch_length({"n": torch.tensor(2.0)}) is None and batch_length([]) is None


def test_console_report_times_each_pass(capsys):
    """The [TRAIN] line ends with the epoch's loop time and samples/s, the [VALIDATION] header with the validation
    run's; the samples are those of the batches seen (3 batches of 4; 5 decollated validation items)."""
    import re
    import time

    def step(engine, batch):
        time.sleep(0.02)
        return {"loss": batch["image"].mean()}

    trainer, evaluator = Engine(step), Engine(lambda e, b: time.sleep(0.01) or b)
    report = ConsoleReport("ultrarefiner", "BUSI", fold=0, n_splits=5, n_train=12, n_val=5, evaluator=evaluator)
    report.attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run([[{"image": torch.zeros(1, 8, 8)}]] * 5))
    trainer.run([{"image": torch.ones(4, 1, 8, 8)}] * 3, max_epochs=2)
    lines = capsys.readouterr().out.splitlines()
    train = [ln for ln in lines if ln.startswith("[TRAIN]")]
    val = [ln for ln in lines if ln.startswith("[VALIDATION]")]
    assert len(train) == len(val) == 2
    pace = re.compile(r"\| (\d+\.\d) s, (\d+\.\d) samples/s$")
    for line, n, least in [(train[1], 12, 0.06), (val[1], 5, 0.05)]:
        seconds, rate = map(float, pace.search(line).groups())
        # the time is printed to 0.1 s: the rate lies between the samples over its rounding bounds
        assert seconds >= round(least, 1) - 0.05 and n / (seconds + 0.05) <= rate <= n / (seconds - 0.05), line
    assert report._samples == {"train": 12, "val": 5}  # counted per pass, not summed over epochs
    assert "Loss: 1.0000" in train[0] and "LR: -" in train[0]
