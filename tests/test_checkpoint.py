"""TrainingCheckpoints: resume restores model/optimizer/scheduler/epoch; a longer restarted schedule restarts the LR
from its closed form instead of staying at the finished schedule's 0; best.pt is written atomically."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events
from torch.optim.lr_scheduler import PolynomialLR

from ultrarefiner.engines.checkpoints.checkpoint import TrainingCheckpoints, load_weights
from ultrarefiner.errors import BadInputError

ITERS = 3  # iterations per epoch


def _run(ckpt_dir, epochs: int) -> tuple[Engine, torch.optim.Optimizer, torch.nn.Module]:
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    sched = PolynomialLR(opt, total_iters=epochs * ITERS, power=0.9)

    def step(engine, batch):
        opt.zero_grad()
        loss = net(batch).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        return loss.item()

    trainer = Engine(step)
    evaluator = Engine(lambda e, b: None)
    score = lambda e: e.state.metrics.update(val_mean_dice=-float(net.bias.detach()))  # noqa: E731
    evaluator.add_event_handler(Events.COMPLETED, score)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run([0]))
    TrainingCheckpoints(ckpt_dir, net, opt, evaluator, sched, network_kwargs={"k": 1}).attach(trainer)
    trainer.run([torch.ones(4, 2)] * ITERS, max_epochs=epochs)
    return trainer, opt, net


def test_resume_extends_schedule_from_closed_form(tmp_path):
    _, opt, _ = _run(tmp_path, epochs=2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)  # the 2-epoch schedule finished
    last = torch.load(tmp_path / "last.pt", weights_only=False)
    assert last["epoch"] == 2 and last["network_kwargs"] == {"k": 1}

    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"partial")  # what a kill during atomic_write leaves
    trainer, opt, _ = _run(tmp_path, epochs=4)  # restart with a longer schedule: resumes at epoch 2
    assert not list(tmp_path.glob(".*.tmp"))
    assert trainer.state.epoch == 4
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)  # ended at the new schedule's end...
    resumed = torch.load(tmp_path / "last.pt", weights_only=False)
    assert resumed["lr_scheduler"]["total_iters"] == 4 * ITERS


def test_resumed_lr_is_the_new_schedules_value(tmp_path):
    _run(tmp_path, epochs=2)
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    sched = PolynomialLR(opt, total_iters=4 * ITERS, power=0.9)
    trainer = Engine(lambda e, b: None)
    TrainingCheckpoints(tmp_path, net, opt, None, sched).attach(trainer)
    seen = {}
    trainer.add_event_handler(Events.STARTED, lambda e: seen.update(lr=opt.param_groups[0]["lr"]))
    trainer.run([0] * ITERS, max_epochs=2)  # already done: only the resume happens
    # ...and not stuck at 0: at step 6 of 12 the poly schedule gives 0.01 * (1 - 6/12)^0.9
    assert seen["lr"] == pytest.approx(0.01 * 0.5**0.9)


def test_best_checkpoint_and_bad_files(tmp_path):
    _run(tmp_path, epochs=2)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["metric_name"] == "val_mean_dice" and set(best["model"]) == {"weight", "bias"}
    assert set(load_weights(tmp_path / "best.pt")) == {"weight", "bias"}
    assert not list(tmp_path.glob("*.tmp*"))
    (tmp_path / "broken.pt").write_bytes(b"\x00garbage")
    with pytest.raises(BadInputError, match="broken.pt"):
        load_weights(tmp_path / "broken.pt")
    with pytest.raises(BadInputError, match="missing.pt"):
        load_weights(tmp_path / "missing.pt")
