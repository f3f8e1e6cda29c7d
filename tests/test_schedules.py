"""Phase 3's learning-rate schedule (``engines.training.schedules.warmup_schedule``): linear warmup, then cosine or
constant, for each param group; bad settings are refused by name; a resumed run takes the schedule's length from its
own config and its position from the file, also from a file written without a schedule."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine

from ultrarefiner.engines.checkpoints.checkpoint import TrainingCheckpoints
from ultrarefiner.engines.training.schedules import warmup_schedule

PEAKS = (1e-4, 1e-5)  # phase 3's TransUNet and SAM groups


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in PEAKS])


def _rates(schedule: str, total: int, fraction: float) -> list[list[float]]:
    opt = _optimizer()
    sched = warmup_schedule(opt, total, warmup_fraction=fraction, schedule=schedule)
    rates = [[g["lr"] for g in opt.param_groups]]
    for _ in range(total):
        opt.step()
        sched.step()
        rates.append([g["lr"] for g in opt.param_groups])
    return rates


def test_cosine_warms_up_then_decays_to_zero_in_every_group():
    rates = _rates("cosine", total=20, fraction=0.1)  # 2 warmup steps
    first = [r[0] for r in rates]
    assert first[0] == 0.0 and first[1] == pytest.approx(PEAKS[0] / 2) and first[2] == pytest.approx(PEAKS[0])
    # half-way through the decay: half the peak; then 0 at the end
    assert first[11] == pytest.approx(PEAKS[0] * 0.5 * (1 + math.cos(math.pi * 9 / 18)))
    assert first[20] == pytest.approx(0.0, abs=1e-12)
    assert all(b <= a for a, b in zip(first[2:], first[3:], strict=False))
    for transunet, sam in rates[1:]:  # one factor for both groups: the 10x ratio stays
        assert sam == pytest.approx(transunet * PEAKS[1] / PEAKS[0])


def test_constant_after_warmup_and_without_warmup():
    rates = [r[0] for r in _rates("constant", total=20, fraction=0.25)]  # 5 warmup steps
    assert rates[0] == 0.0 and rates[4] == pytest.approx(0.8 * PEAKS[0])
    assert rates[5:] == pytest.approx([PEAKS[0]] * 16)
    assert [r[0] for r in _rates("constant", total=5, fraction=0.0)] == pytest.approx([PEAKS[0]] * 6)
    # any warmup above 0 is at least one step
    assert _rates("cosine", total=10, fraction=0.01)[0][0] == 0.0


@pytest.mark.parametrize("kwargs, match", [
    ({"schedule": "poly"}, "lr_schedule must be one of cosine, constant, got 'poly'"),
    ({"warmup_fraction": 1.0}, r"lr_warmup_fraction must be in \[0, 1\), got 1.0"),
    ({"warmup_fraction": -0.1}, "lr_warmup_fraction"),
    ({"total_steps": 0}, "at least one training iteration"),
])
def test_bad_settings_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        warmup_schedule(_optimizer(), **{"total_steps": 10, **kwargs})


ITERS = 3


def _train(ckpt_dir, epochs: int, with_schedule: bool = True) -> tuple[list[float], torch.optim.Optimizer, Engine]:
    """Train a linear layer ``epochs`` x ITERS steps with checkpoints; returns the rates each step used."""
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW([{"params": [net.weight], "lr": PEAKS[0]}, {"params": [net.bias], "lr": PEAKS[1]}])
    sched = warmup_schedule(opt, epochs * ITERS, warmup_fraction=0.2) if with_schedule else None
    used = []

    def step(engine, batch):
        used.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        net(batch).pow(2).mean().backward()
        opt.step()
        if sched is not None:
            sched.step()

    trainer = Engine(step)
    TrainingCheckpoints(ckpt_dir, net, opt, None, sched).attach(trainer)
    trainer.run([torch.ones(4, 2)] * ITERS, max_epochs=epochs)
    return used, opt, trainer


def test_resume_follows_this_runs_schedule_length(tmp_path):
    _train(tmp_path, epochs=2)
    used, opt, trainer = _train(tmp_path, epochs=4)  # extended on restart: resumes at iteration 6 of 12
    assert trainer.state.iteration == 12 and len(used) == 6
    # the steps after the resume use the 12-step schedule (3 warmup steps), not the finished 6-step one's 0
    fresh = _rates("cosine", total=12, fraction=0.2)
    assert used == pytest.approx([r[0] for r in fresh[6:12]])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert torch.load(tmp_path / "last.pt", weights_only=False)["lr_scheduler"]["t_total"] == 12


def test_resume_of_a_run_without_schedule_continues_the_schedule(tmp_path, caplog):
    _train(tmp_path, epochs=2, with_schedule=False)  # a phase-3 run of an older version: constant rate
    with caplog.at_level("WARNING"):
        used, _, _ = _train(tmp_path, epochs=4)
    assert "holds no learning-rate schedule" in caplog.text
    # step 7 of the 12-step schedule, not its warmup's 0 at step 1
    assert used == pytest.approx([r[0] for r in _rates("cosine", total=12, fraction=0.2)[6:12]])
    assert used[0] > 0.5 * PEAKS[0]
