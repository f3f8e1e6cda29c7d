"""The shared training and evaluation steps (``engines.training.step``) on a tiny model: MONAI's iteration events in
order, per-group and global clipping, the sync-free non-finite skip, the one AMP decision, and each phase's step
overriding only its hook."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from monai.utils import optional_import

from ultrarefiner.engines.training.e2e_training import E2EEvalStep, E2ETrainStep
from ultrarefiner.engines.training.inferer_step import InfererEvalStep, InfererTrainStep
from ultrarefiner.engines.training.refiner_training import RefinerEvalStep, RefinerTrainStep
from ultrarefiner.engines.training.step import EvalStep, TrainStep
from ultrarefiner.utils.amp import autocast
from ultrarefiner.utils.sync_counter import HostSyncCounter

REPO = Path(__file__).resolve().parents[1]
EVENTS = [IterationEvents.FORWARD_COMPLETED, IterationEvents.LOSS_COMPLETED, IterationEvents.BACKWARD_COMPLETED,
          IterationEvents.MODEL_COMPLETED]


class TwoPart(torch.nn.Module):
    """Two linear parts, one optimizer param group each."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


class LinearStep(TrainStep):
    """The tiny phase: records what the hook sees."""

    def __init__(self, scale_a: float = 1.0, nan_at: set[int] = frozenset(), **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale_a, self.nan_at, self.seen = scale_a, nan_at, []

    def forward_and_loss(self, engine: Engine, batch: tuple) -> dict:
        x, y = batch
        net = engine.network
        a = net.a(x)
        a = a * self.scale_a - (a * (self.scale_a - 1)).detach()  # same value, a's gradients scaled by scale_a
        pred = a + net.b(x)
        self.seen.append({"autocast": torch.is_autocast_enabled("cpu"), "pred_dtype": pred.dtype,
                          "training": net.training})
        loss = self.compute_loss(engine, pred, y)
        if engine.state.iteration in self.nan_at:
            loss = loss * float("nan")
        return {Keys.IMAGE: x, Keys.LABEL: y, Keys.PRED: pred.detach(), Keys.LOSS: loss}


class RecordingLoss(torch.nn.MSELoss):
    """MSE that records the dtype of its input and whether it ran under autocast."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.dtype, bool]] = []

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.seen.append((pred.dtype, torch.is_autocast_enabled("cpu")))
        return super().forward(pred, target)


def batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(n)]


def trainer(step: TrainStep, optimizer: str = "sgd", n: int = 2, model: TwoPart | None = None) -> SupervisedTrainer:
    model = model or TwoPart()
    groups = [{"params": model.a.parameters(), "name": "a"}, {"params": model.b.parameters(), "name": "b"}]
    opt = (torch.optim.SGD(groups, lr=1.0) if optimizer == "sgd"
           else torch.optim.AdamW(groups, lr=1e-2, fused=optimizer == "fused"))
    return SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=batches(n), network=model,
                             optimizer=opt, loss_function=RecordingLoss(), prepare_batch=lambda b, d, nb, **k: b,
                             iteration_update=step, decollate=False, amp=False)


def test_events_fire_in_order_with_monai_outputs():
    engine = trainer(LinearStep(), n=1)
    fired: list[tuple] = []
    for event in EVENTS:
        engine.add_event_handler(event, lambda e, ev=event: fired.append(
            (ev, set(e.state.output), all(p.grad is not None for p in e.network.parameters()))))
    weights = [p.detach().clone() for p in engine.network.parameters()]
    engine.run()
    assert [f[0] for f in fired] == EVENTS
    assert all({Keys.IMAGE, Keys.LABEL, Keys.PRED, Keys.LOSS} <= keys for _, keys, _ in fired)
    assert [has_grad for *_, has_grad in fired] == [False, False, True, True]  # backward after LOSS_COMPLETED
    out = engine.state.output
    assert not out[Keys.LOSS].requires_grad and out[Keys.LOSS].dtype == torch.float32
    assert engine._process_function.seen[0]["training"]
    assert all(not torch.equal(w, p) for w, p in zip(weights, engine.network.parameters(), strict=True))


def _update_norms(step: TrainStep) -> dict[str, float]:
    """Norm of each group's SGD (lr 1) update: the clipped gradient."""
    engine = trainer(step, n=1)
    before = {n: p.detach().clone() for n, p in engine.network.named_parameters()}
    engine.run()
    after = {n: p.detach() for n, p in engine.network.named_parameters()}
    return {g: float(torch.linalg.vector_norm(torch.cat([(before[n] - after[n]).flatten() for n in before
                                                         if n.startswith(g)]))) for g in ("a", "b")}


def test_clipping_per_group_and_global():
    raw = _update_norms(LinearStep(scale_a=1e3))
    assert raw["a"] > 100 and 0.5 < raw["b"] < 4  # a's gradients dwarf b's
    per_group = _update_norms(LinearStep(scale_a=1e3, max_grad_norm=5.0, clip_per_group=True))
    assert per_group["a"] == pytest.approx(5.0, rel=1e-4)
    assert per_group["b"] == pytest.approx(raw["b"], rel=1e-4)  # b is under the norm: left as it is
    total = _update_norms(LinearStep(scale_a=1e3, max_grad_norm=5.0, clip_per_group=False))
    assert (total["a"] ** 2 + total["b"] ** 2) ** 0.5 == pytest.approx(5.0, rel=1e-4)
    assert total["b"] < raw["b"] / 100  # shrunk with a's
    engine = trainer(LinearStep(max_grad_norm=1.0, clip_per_group=True), n=1)
    engine.run()
    assert {"grad_norm_a", "grad_norm_b"} <= set(engine.state.output)
    engine = trainer(LinearStep(max_grad_norm=1.0), n=1)
    engine.run()
    assert "grad_norm" in engine.state.output


@pytest.mark.parametrize("optimizer, syncs", [("fused", 0), ("sgd", 1)])
@pytest.mark.parametrize("clip", [1.0, None])
def test_nonfinite_step_is_skipped_on_the_device(optimizer, syncs, clip, caplog):
    step = LinearStep(nan_at={2}, max_grad_norm=clip, skip_nonfinite=True)
    engine = trainer(step, optimizer, n=3)
    saved: dict = {}
    counter: list[HostSyncCounter] = []

    def snapshot(e: Engine) -> None:
        saved["weights"] = [p.detach().clone() for p in e.network.parameters()]
        saved["state"] = {id(p): {k: v.clone() for k, v in s.items()} for p, s in e.optimizer.state.items()}
        counter.append(HostSyncCounter(e.network, e.optimizer).__enter__())

    def check(e: Engine) -> None:
        counter[0].__exit__(None, None, None)
        assert all(torch.equal(w, p) for w, p in zip(saved["weights"], e.network.parameters(), strict=True))
        for p, s in e.optimizer.state.items():
            assert all(torch.equal(v, s[k]) for k, v in saved["state"][id(p)].items())

    engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), snapshot)
    engine.add_event_handler(Events.ITERATION_COMPLETED(once=2), check)
    with caplog.at_level("WARNING", logger="ultrarefiner.engines.training.step"):
        engine.run()
    assert counter[0].count == syncs, counter[0].report()  # fused: decided on the device; SGD: one flag read
    assert engine.state.iteration == 3 and step.skipped_steps == 1
    assert "1 optimizer step(s) skipped" in caplog.text  # read once, at the end of the epoch
    assert not torch.equal(saved["weights"][0], next(engine.network.parameters()))  # iteration 3 trained again


def test_without_skip_a_nonfinite_step_reaches_the_weights():
    engine = trainer(LinearStep(nan_at={1}), n=1)
    engine.run()
    assert not all(torch.isfinite(p).all() for p in engine.network.parameters())


def test_autocast_is_decided_once_for_cuda_only(monkeypatch):
    assert isinstance(autocast("cuda", True), torch.autocast) and autocast("cuda", True).fast_dtype == torch.bfloat16
    for device, enabled, cpu in (("cpu", True, False), ("cuda", False, False), (None, True, False)):
        with autocast(device, enabled, cpu=cpu):
            assert not torch.is_autocast_enabled("cpu")
    with autocast("cpu", True, cpu=True):  # the explicit CPU opt-in (fast inference's bf16 encoder)
        assert torch.is_autocast_enabled("cpu")
    # the step asks the one function, with the engine's device and its own amp flag
    calls: list[tuple] = []
    real = autocast

    def spy(device, enabled=True, dtype=torch.bfloat16, cpu=False):
        calls.append((torch.device(device).type, enabled, dtype))
        return real(device, enabled, dtype, cpu)

    monkeypatch.setattr("ultrarefiner.engines.training.step.autocast", spy)
    step = LinearStep(amp=True)
    trainer(step, n=1).run()
    assert calls == [("cpu", True, torch.bfloat16)] and step.seen[0]["autocast"] is False
    with pytest.raises(ValueError, match="GradScaler"):
        LinearStep(amp_dtype=torch.float16)


def test_loss_runs_in_float32_outside_an_enclosing_autocast():
    step = LinearStep()
    engine = trainer(step, n=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        engine.run()
    assert step.seen[0]["autocast"] and step.seen[0]["pred_dtype"] == torch.bfloat16  # the forward: bf16
    assert engine.loss_function.seen == [(torch.float32, False)]  # the loss: float32, autocast suspended


def test_engine_amp_is_refused():
    engine = trainer(LinearStep(), n=1)
    engine.amp = True
    with pytest.raises(ValueError, match="amp=False"):
        engine.run()


class LinearEval(EvalStep):
    def forward(self, engine: Engine, batch: tuple) -> dict:
        x, y = batch
        self.state = (engine.network.training, torch.is_grad_enabled())
        return {Keys.IMAGE: x, Keys.LABEL: y, Keys.PRED: engine.network(x)}


def test_eval_step_runs_in_eval_mode_without_grad():
    model = TwoPart().train()
    step = LinearEval()
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=batches(1), network=model,
                                    prepare_batch=lambda b, d, nb, **k: b, iteration_update=step, decollate=False)
    fired: list = []
    for event in (IterationEvents.FORWARD_COMPLETED, IterationEvents.MODEL_COMPLETED):
        evaluator.add_event_handler(event, lambda e, ev=event: fired.append(ev))
    evaluator.run()
    assert step.state == (False, False) and model.training  # eval mode inside, restored after
    assert fired == [IterationEvents.FORWARD_COMPLETED, IterationEvents.MODEL_COMPLETED]
    assert evaluator.state.output[Keys.PRED].shape == (8, 1)


PHASE_STEPS = [(InfererTrainStep, TrainStep, "forward_and_loss"), (RefinerTrainStep, TrainStep, "forward_and_loss"),
               (E2ETrainStep, TrainStep, "forward_and_loss"), (InfererEvalStep, EvalStep, "forward"),
               (RefinerEvalStep, EvalStep, "forward"), (E2EEvalStep, EvalStep, "forward")]


@pytest.mark.parametrize("cls, base, hook", PHASE_STEPS, ids=[c.__name__ for c, _, _ in PHASE_STEPS])
def test_each_phase_overrides_only_its_hook(cls, base, hook):
    assert issubclass(cls, base)
    overridden = {name for name, value in vars(cls).items() if callable(value) and name != "__init__"}
    assert overridden == {hook}
    assert getattr(cls, hook) is not getattr(base, hook)


def _engines(node, path=""):
    """(path, block) of every ``SupervisedTrainer`` / ``SupervisedEvaluator`` definition in a config."""
    if isinstance(node, dict):
        if node.get("_target_") in ("SupervisedTrainer", "SupervisedEvaluator"):
            yield path, node
        for key, value in node.items():
            yield from _engines(value, f"{path}#{key}".lstrip("#"))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _engines(value, f"{path}#{i}")


@pytest.mark.parametrize("bundle", ["transunet", "sam_refiner", "ultrarefiner"])
def test_bundles_run_the_shared_steps_with_monai_amp_off(bundle):
    configs = REPO / "bundles" / bundle / "configs"
    train = json.loads((configs / "train.json").read_text())
    for section, engine, base in (("train", "trainer", TrainStep), ("validate", "evaluator", EvalStep)):
        assert train[section][engine]["iteration_update"] == f"@{section}#iteration"
        target, name = train[section]["iteration"]["_target_"].rsplit(".", 1)
        cls, ok = optional_import(target, name=name)
        assert ok and issubclass(cls, base)
    found = 0
    for path in sorted(configs.glob("*.json")):
        config = json.loads(path.read_text())
        for where, block in _engines(config):
            found += 1
            assert block.get("amp", False) is False and "amp_kwargs" not in block, f"{path.name}: {where}"
        assert not [k for k in config if k.endswith(("#amp", "#amp_kwargs"))], path.name  # no override turns it on
    assert found >= 2


def test_autocast_is_called_in_one_place():
    """``torch.autocast`` appears in the package only inside ``ultrarefiner.utils.amp``."""
    package = REPO / "ultrarefiner"
    sites = [f"{p.relative_to(REPO)}:{i}" for p in package.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"torch\.autocast\(", line)]
    assert sites and all(s.startswith("ultrarefiner/utils/amp.py:") for s in sites), sites


class TypeRecorder(TwoPart):
    """TwoPart that records the class of what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[type] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(type(x))
        return super().forward(x)


def test_phase1_step_trains_on_plain_tensors_from_metatensor_batches():
    """MONAI's loaders give MetaTensors; a MetaTensor sends every operation of the forward pass through Python
    (``__torch_function__``): the step hands the network, the loss and the output plain tensors, same values."""
    from monai.data import MetaTensor
    from monai.inferers import SimpleInferer

    model = TypeRecorder()
    meta = [(MetaTensor(x, meta={"filename_or_obj": "a.png"}), MetaTensor(y)) for x, y in batches(2)]
    engine = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=meta, network=model,
                               optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_function=RecordingLoss(),
                               prepare_batch=lambda b, d, nb, **k: b, inferer=SimpleInferer(),
                               iteration_update=InfererTrainStep(amp=False), decollate=False, amp=False)
    engine.run()
    assert model.seen == [torch.Tensor, torch.Tensor]
    out = engine.state.output
    assert all(type(out[k]) is torch.Tensor for k in (Keys.IMAGE, Keys.LABEL, Keys.PRED, Keys.LOSS))
    assert torch.equal(out[Keys.IMAGE], meta[1][0].as_tensor())
