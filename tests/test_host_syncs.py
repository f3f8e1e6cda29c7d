"""Host syncs per training step (phase 2 and phase 3) and per inference batch, counted on the CPU.

``HostSyncCounter`` (``ultrarefiner.utils.sync_counter``) stands in for a GPU: it counts every operation that would
make the host wait for the device (``.item()``, ``bool(tensor)``, boolean-mask indexing, ``.cpu()`` of a device
tensor, ...). A training step may keep at most one (the logged loss); the steps here have none, so a ``.item()``
re-added anywhere in them fails these tests (each test also checks that the counter sees a deliberate one).

The trainers run as the bundles run them, with ``decollate=False``: MONAI's decollation turns every scalar of the
iteration output into a Python number with ``.item()``, one host sync per loss term and per sample. The bundle tests
build the real trainers of ``bundles/sam_refiner`` and ``bundles/ultrarefiner`` from their ``train.json`` and count a
whole iteration with every handler and metric of the config: the console report, the train metrics and the epoch loss
read on the device; TensorBoard's loss is read once per ``every`` iterations (``BufferedLossWriter``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.handlers import TensorBoardStatsHandler
from refiner_toy import write_toy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bundle_utils import phantom_overrides, preprocessed_phantoms
from ultrarefiner.data.refiner_data import SimulatedCoarseDataset
from ultrarefiner.engines.inference.ultra_predict import refine
from ultrarefiner.engines.training.bundle_engines import bundle_config
from ultrarefiner.engines.training.e2e_training import E2EPrepareBatch, E2ETrainStep, build_e2e_optimizer
from ultrarefiner.engines.training.refiner_training import precompute_embeddings
from ultrarefiner.engines.training.report import BufferedLossWriter, _loss_of
from ultrarefiner.losses import RefinerLoss, UltraRefinerLoss
from ultrarefiner.networks import SAMRefiner, TransUNet, UltraRefiner, build_tiny_sam
from ultrarefiner.networks.embedding_cache import EmbeddingCache
from ultrarefiner.utils.sync_counter import HostSyncCounter
from ultrarefiner.utils.transfer import to_device

S, H, W = 64, 96, 128  # TransUNet input side, native SAM image size
POINTS = {"use_point_prompt": True, "use_negative_point": True}  # exercises soft_depth and the point embeddings
CPU = {"device": "$torch.device('cpu')", "amp": False, "num_workers": 0}


@pytest.fixture(autouse=True)
def device_labelling(monkeypatch):
    """Connected components as a GPU computes them (the pooling loop on the device): on a CPU, prompts label with
    scipy on the host, which the counter, standing in for a GPU, would rightly count."""
    monkeypatch.setattr("ultrarefiner.networks.labelling._label_on_host", lambda fg: False)


def count_iteration(trainer: Engine, iteration: int, *device_state) -> HostSyncCounter:
    """A counter over the whole of iteration ``iteration`` (the step and the trainer's own per-iteration handlers)."""
    counter = HostSyncCounter(*device_state)
    trainer.add_event_handler(Events.ITERATION_STARTED(once=iteration), lambda _: counter.__enter__())
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=iteration), lambda _: counter.__exit__(None, None, None))
    return counter


def test_counter_counts_what_would_sync():
    weight = torch.randn(4, requires_grad=True)  # stands for a parameter on the GPU
    host = torch.tensor([[3, 4], [3, 4]])  # a collated batch on the host
    image, mask = torch.ones(2, 3), torch.zeros(2, 3)  # more host data (``.to`` on the CPU returns the tensor itself)
    with HostSyncCounter(weight) as syncs:
        assert host.reshape(-1, 2).tolist() == [[3, 4], [3, 4]] and bool((host == host[0]).all())  # host: free
        torch.arange(3).tolist()  # a host factory: free
        y = weight * 2
        y.sum().item()
        bool((y > 0).any())
        y[y > 0]
        y.nonzero()
        y.detach().cpu()
        y.detach().numpy()
        int(host.to("cpu", non_blocking=True)[0, 0])  # moved to the device asynchronously, then read
        moved = image.to("cpu")  # a blocking host-to-device copy: PyTorch synchronises the stream after it
        moved.to("cpu")  # already on the device: no copy from the host
        MetaTensor(moved).as_subclass(torch.Tensor).to("cpu")  # the same device data as another object: free
        torch.tensor([1.0, 2.0], device="cpu")  # built on the host, copied blocking
        torch.as_tensor(mask, device="cpu")
        torch.zeros(2, device="cpu")  # made on the device: free
    kinds = [e.op for e in syncs.events]
    assert syncs.count == 10, syncs.report()
    assert kinds.count("aten._local_scalar_dense.default") == 3 and "cpu" in kinds and "numpy" in kinds
    assert [e.op for e in syncs.events if e.kind == "to device"] == [
        "to (blocking)", "tensor(device=...)", "as_tensor(device=...)"], syncs.report()


# ------------------------------------------------------------------------------------------------ phase 2
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy(tmp_path_factory.mktemp("host_syncs"), n_train=5)


class _ItemLoss(RefinerLoss):
    """A refiner loss that reads its value back, as a logging line inside the step would."""

    def forward(self, *args, **kwargs):
        terms = super().forward(*args, **kwargs)
        terms["loss_value"] = terms["loss"].item()
        return terms


def _phase2_syncs(toy, loss: RefinerLoss, **refiner_kwargs) -> HostSyncCounter:
    refiner = SAMRefiner(build_tiny_sam(img_size=256, seed=0), preprocessing="sam", **refiner_kwargs)
    data = SimulatedCoarseDataset.from_datalist(toy, 0, refiner.geometry, seed=1)
    cache = EmbeddingCache(refiner.sam.image_encoder)
    precompute_embeddings(refiner, cache, data)  # a warm cache: the steady state of training
    # the bundle's trainer (AdamW, step, metrics) with the curriculum on, without handlers
    trainer = bundle_config("sam_refiner", {
        **CPU, "network": refiner, "cache": cache, "loss": loss, "curriculum": True, "train#dataset": data,
        "train#dataloader#shuffle": False, "batch_size": 2, "epochs": 1, "epoch_length": 2, "train#handlers": [],
    }).get_parsed_content("train#trainer")
    syncs = count_iteration(trainer, 2, refiner, trainer.optimizer)
    trainer.run()
    assert cache.misses == len(data.encoder_sources()) and torch.isfinite(trainer.state.output["loss"])
    return syncs


@pytest.mark.parametrize("prompts", [{}, POINTS], ids=["box_mask", "points"])
def test_phase2_step_keeps_the_device_busy(toy, prompts):
    syncs = _phase2_syncs(toy, RefinerLoss(), **prompts)
    assert syncs.count <= 1, syncs.report()
    assert syncs.count == 0, syncs.report()  # nothing is read back: the handlers fetch the loss when they log it
    if not prompts:
        with_item = _phase2_syncs(toy, _ItemLoss())
        assert with_item.count == syncs.count + 1, with_item.report()


# ------------------------------------------------------------------------------------------------ phase 3
def _images(b: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B,1,S,S) [0,1] TransUNet input, (B,1,H,W) 0-255 native image and (B,1,H,W) label of one scene."""
    g = torch.Generator().manual_seed(0)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    label = ((((xs - 60) / 30) ** 2 + ((ys - 45) / 20) ** 2) < 1).float()[None, None].repeat(b, 1, 1, 1)
    native = (0.3 + 0.4 * label + 0.2 * torch.rand(b, 1, H, W, generator=g)).clamp(0, 1)
    small = F.interpolate(native, (S, S), mode="bilinear", align_corners=False, antialias=True)
    return small, native * 255, label


def _ultrarefiner(**refiner_kwargs) -> UltraRefiner:
    torch.manual_seed(0)
    transunet = TransUNet(img_size=S, vit_depth=1, hidden_size=32, num_heads=2, mlp_dim=64, block_units=(1, 1, 1),
                          decoder_channels=(32, 16, 16, 8), dropout=0.0)
    with torch.no_grad():  # about a quarter of the pixels foreground: real prompts, not p ~ 0.5 everywhere
        logits = transunet(_images()[0])
        transunet.segmentation_head[0].bias[1] -= (logits[:, 1] - logits[:, 0]).flatten().quantile(0.75)
    refiner = SAMRefiner(build_tiny_sam(img_size=256, encoder_depth=1, seed=0), preprocessing="medsam",
                         **refiner_kwargs)
    return UltraRefiner(transunet, refiner)


def _e2e_trainer(model: UltraRefiner, optimizer: torch.optim.Optimizer, loss=None,
                 iterations: int = 3) -> tuple[SupervisedTrainer, E2ETrainStep]:
    """The phase-3 bundle's trainer (step, metrics, post-processing) with the test's model, optimizer and loss, over
    ``iterations`` copies of one batch, without handlers; and its step."""
    small, native, label = _images()
    batch = {"image": small, "sam_image": native, "label": label, "sam_image_id": ["scan-a", "scan-b"],
             "original_size": torch.tensor([[H, W], [H, W]])}
    parser = bundle_config("ultrarefiner", {
        **CPU, "network": model, "optimizer": optimizer, "loss": loss or UltraRefinerLoss(), "epochs": 1,
        "epoch_length": iterations, "train#dataloader": [batch] * iterations, "train#handlers": [],
        "train#prepare_batch": E2EPrepareBatch(original_size_key="original_size"),
    })
    return parser.get_parsed_content("train#trainer"), parser.get_parsed_content("train#iteration")


class _ItemUltraLoss(UltraRefinerLoss):
    def forward(self, *args, **kwargs):
        terms = super().forward(*args, **kwargs)
        float(terms["loss"])
        return terms


@pytest.mark.parametrize("prompts", [{}, POINTS], ids=["box_mask", "points"])
def test_phase3_step_keeps_the_device_busy(prompts):
    model = _ultrarefiner(**prompts)
    optimizer = build_e2e_optimizer(model)
    assert all(g["fused"] for g in optimizer.param_groups)  # skips a non-finite step on the device
    trainer, _ = _e2e_trainer(model, optimizer)
    syncs = count_iteration(trainer, 2, model, optimizer)
    trainer.run()
    assert syncs.count <= 1, syncs.report()
    assert syncs.count == 0, syncs.report()
    assert model.cache_stats() == {"hits": 4, "misses": 2}  # keyed by sam_image_id: no image digest
    if not prompts:
        model = _ultrarefiner()
        optimizer = build_e2e_optimizer(model)
        trainer, _ = _e2e_trainer(model, optimizer, _ItemUltraLoss())
        with_item = count_iteration(trainer, 2, model, optimizer)
        trainer.run()
        assert with_item.count == 1, with_item.report()


def test_phase3_step_with_a_non_fused_optimizer_reads_one_flag():
    model = _ultrarefiner()
    optimizer = build_e2e_optimizer(model, fused=False)
    trainer, _ = _e2e_trainer(model, optimizer)
    syncs = count_iteration(trainer, 2, model, optimizer)
    trainer.run()
    assert syncs.count == 1 and "_gated_step" in syncs.events[0].where, syncs.report()


class _NaNLoss(UltraRefinerLoss):
    """Non-finite gradients at the iterations in ``bad``."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__()
        self.bad, self.calls = bad, 0

    def forward(self, *args, **kwargs):
        terms = super().forward(*args, **kwargs)
        self.calls += 1
        if self.calls in self.bad:
            terms["loss"] = terms["loss"] * float("nan")
        return terms


@pytest.mark.parametrize("fused", [True, False])
def test_nonfinite_step_leaves_weights_and_state_unchanged(fused, caplog):
    model = _ultrarefiner()
    optimizer = build_e2e_optimizer(model, fused=fused)
    trainer, step = _e2e_trainer(model, optimizer, _NaNLoss({2}), iterations=2)
    saved: dict = {}

    def snapshot(engine: Engine) -> None:
        saved["weights"] = {k: v.detach().clone() for k, v in model.named_parameters()}  # (buffers: BN statistics)
        saved["state"] = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}

    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), snapshot)
    with caplog.at_level(logging.WARNING, logger="ultrarefiner.engines.training.step"):
        trainer.run()
    assert not torch.isfinite(trainer.state.output["loss"])
    after = dict(model.named_parameters())
    assert all(torch.equal(v, after[k]) for k, v in saved["weights"].items())
    for p, s in optimizer.state.items():
        assert all(torch.equal(v, s[k]) for k, v in saved["state"][id(p)].items())
    assert step.skipped_steps == 1
    assert "1 optimizer step(s) skipped" in caplog.text  # read at the end of the epoch
    # the next finite step trains again
    trainer.state.max_epochs = 2
    trainer.run()
    assert step.skipped_steps == 1
    assert not torch.equal(model.transunet.pos_embed, saved["weights"]["transunet.pos_embed"])


# ------------------------------------------------------------------------------------------------ inference
def test_refiner_forward_on_a_batch():
    """``refine_folder``'s batched call: host uint8 images (the exact resize runs on the host), coarse masks on the
    device, eval mode."""
    refiner = SAMRefiner(build_tiny_sam(img_size=256, seed=0), preprocessing="sam").eval()
    _, native, label = _images(4)
    image = native.round().to(torch.uint8)
    coarse = F.avg_pool2d(label, 5, stride=1, padding=2)
    with torch.inference_mode():
        refiner(image=image, coarse=coarse)
        with HostSyncCounter(refiner) as syncs:
            out = refiner(image=image, coarse=to_device(coarse, "cpu"))
            masks = (out["masks"][:, 0] > 0).cpu()  # the one final fetch
    assert syncs.count == 1 and masks.shape == (4, H, W), syncs.report()


def test_ultrarefiner_predict_on_a_batch():
    built = _ultrarefiner()
    model = UltraRefiner(built.transunet, built.refiner, cache_embeddings=False).eval()
    small, native, _ = _images(3)
    with torch.inference_mode():
        refine(model, small, native)  # the first call checks the TransUNet input's range
        with HostSyncCounter(model) as syncs:
            out = refine(model, to_device(small, "cpu"), native, iterations=1, quality_gate=True)
    assert syncs.count == 0, syncs.report()
    assert out["final"].shape == (3, 1, H, W)


def test_predict_batch_fetches_its_results_in_one_copy():
    """``UltraPredictor.predict_batch`` on images of four sizes with the quality gate: the two maps of every image
    and the predicted IoUs and gate decisions of the whole batch come to the host in one copy (``to_host``: a copy
    and its numpy view, which the CPU stand-in counts apart), whatever the batch size; 4 per image + 1 before, and
    28 before that."""
    import numpy as np

    from ultrarefiner.engines.inference.ultra_predict import UltraPredictor

    built = _ultrarefiner()
    model = UltraRefiner(built.transunet, built.refiner, cache_embeddings=False).eval()
    predictor = UltraPredictor(model, "cpu", quality_gate=True, optimize="none")
    rng = np.random.default_rng(0)
    samples = [predictor.dataset.sample(rng.integers(0, 255, size, dtype=np.uint8))
               for size in ((40, 48), (36, 50), (44, 40), (30, 30))]
    predictor.predict_batch(samples)
    for batch in (samples, samples[:1]):
        with HostSyncCounter(model) as syncs:
            out = predictor.predict_batch(batch)
        assert [(e.kind, e.op) for e in syncs.events] == [("to host", "cpu"), ("to host", "numpy")], syncs.report()
        assert all("to_host" in e.where for e in syncs.events), syncs.report()
    assert all(isinstance(o["pred_iou"], float) and isinstance(o["gated"], bool) for o in out)


def test_refine_batch_fetches_its_masks_in_one_copy():
    """``refine``'s ``BatchRefiner`` on four sizes: the predicted IoUs in one copy and the masks in another (bool
    and float: one copy per dtype), whatever the batch size."""
    import numpy as np

    from ultrarefiner.engines.inference.refine_folder import BatchRefiner, encoder_frame

    refiner = SAMRefiner(build_tiny_sam(img_size=64, seed=0), checkpoint=None, preprocessing="medsam").eval()
    runner = BatchRefiner(refiner, torch.device("cpu"), optimize="none")
    rng = np.random.default_rng(0)
    samples = []
    for h, w in ((40, 48), (36, 50), (44, 40), (30, 30)):
        image = rng.integers(0, 255, (h, w), dtype=np.uint8)
        coarse = np.zeros((h, w), np.uint8)
        coarse[h // 4 : h // 2, w // 4 : w // 2] = 255
        samples.append({"pixels": image, "coarse": coarse, "frame": encoder_frame(refiner.geometry, image)})
    runner(samples)
    for batch in (samples, samples[:1]):
        with HostSyncCounter(refiner) as syncs:
            out = runner(batch)
        assert len(out) == len(batch) and out[0][0].shape == (40, 48) and out[0][0].dtype == bool
        copies = [e for e in syncs.events if e.op == "cpu"]
        assert len(copies) == 2 and syncs.count == 4, syncs.report()  # + the numpy view / tolist of each copy


# ------------------------------------------------------------------------------------------------ bundle trainers
TB_EVERY = 3  # TensorBoard's loss read-back interval in these runs (the configs say 20): one read in the window
ITERATIONS = 8  # 1: warm-up (caches, lazy state); 2-5: counted as configured; 6-7: with a handler doing .item();
CLEAN, DIRTY = range(2, 6), range(6, 8)  # 8: left out, the epoch's end (E2ETrainStep reads its skipped steps)


class _Bundles:
    """Synthetic phantoms and the phase-1/phase-2 checkpoints phase 3 starts from, as the bundle tests write them."""

    def __init__(self, root: Path) -> None:
        from test_bundle_transunet import TINY as TINY_TRANSUNET
        from test_bundle_ultrarefiner import TINY, write_phase1, write_phase2

        self.root = preprocessed_phantoms(root, n_benign=4, n_malignant=3)
        write_phase1(root / "ckpt")
        write_phase2(root / "ckpt")
        self.tiny = {
            "transunet": {k: v for k, v in TINY_TRANSUNET.items() if k != "epoch_length"},
            "sam_refiner": {"sam_def": "$ultrarefiner.networks.build_tiny_sam(img_size=64)", "sam_checkpoint": "",
                            "batch_size": 2, "num_workers": 0},
            "ultrarefiner": TINY,
        }

    def trainer(self, bundle: str) -> tuple[ConfigParser, SupervisedTrainer]:
        """The bundle's ``train#trainer`` on the CPU: one epoch of ``ITERATIONS`` without validation (interval 2)."""
        overrides = phantom_overrides(self.root, self.tiny[bundle], epochs=1, epoch_length=ITERATIONS, val_interval=2,
                                      device="$torch.device('cpu')", amp=False, resume=False,
                                      output_dir=str(self.root / "out" / bundle))
        parser = bundle_config(bundle, overrides)
        tb = [i for i, h in enumerate(parser["train"]["handlers"]) if h.get("_target_") == "TensorBoardStatsHandler"]
        assert len(tb) == 1 and parser["train"]["trainer"]["decollate"] is False
        assert parser[f"train#handlers#{tb[0]}#iteration_event_writer#every"] == 20
        parser[f"train#handlers#{tb[0]}#iteration_event_writer#every"] = TB_EVERY
        return parser, parser.get_parsed_content("train#trainer")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> _Bundles:
    return _Bundles(tmp_path_factory.mktemp("bundle_syncs"))


def _assert_amortised(counts: list[int], every: int) -> None:
    """At most one sync per iteration, and only the loss read once per ``every`` iterations: the window holds at
    most ceil(n / every) of them. A per-iteration ``.item()`` anywhere exceeds it."""
    assert max(counts) <= 1 and sum(counts) <= math.ceil(len(counts) / every), counts


def _count_iterations(parser: ConfigParser, trainer: SupervisedTrainer) -> tuple[dict[int, int], HostSyncCounter,
                                                                                 dict[int, float]]:
    """Syncs per iteration (``CLEAN`` and ``DIRTY``; from the first ITERATION_STARTED handler to the last
    ITERATION_COMPLETED one, the data loading left out), the counter, and every iteration's loss read afterwards."""
    counter = HostSyncCounter(parser.get_parsed_content("network"), parser.get_parsed_content("optimizer"))
    counts: dict[int, int] = {}
    losses: dict[int, float] = {}
    counted = set(CLEAN) | set(DIRTY)

    def start(engine: Engine) -> None:
        if engine.state.iteration in counted:
            counts[engine.state.iteration] = counter.count
            counter.__enter__()

    def stop(engine: Engine) -> None:
        if engine.state.iteration in counted:
            counter.__exit__(None, None, None)
            counts[engine.state.iteration] = counter.count - counts[engine.state.iteration]
        losses[engine.state.iteration] = float(engine.state.output["loss"])  # not counted: for the comparisons

    trainer.add_event_handler(Events.ITERATION_STARTED, start)
    started = trainer._event_handlers[Events.ITERATION_STARTED]  # ignite has no public prepend: before the config's
    started.insert(0, started.pop())
    # the regression the test guards against: a handler reading a device value at every iteration
    trainer.add_event_handler(Events.ITERATION_COMPLETED(event_filter=lambda _, i: i in DIRTY),
                              lambda engine: engine.state.output["loss"].item())
    trainer.add_event_handler(Events.ITERATION_COMPLETED, stop)
    return counts, counter, losses


@pytest.mark.parametrize("bundle", ["transunet", "sam_refiner", "ultrarefiner"])
def test_bundle_trainer_reads_back_once_per_n_iterations(bundles, bundle, capsys):
    """The real phase-1 / phase-2 / phase-3 trainer with every handler and metric of its train.json: no host sync in an
    iteration but TensorBoard's periodic read of the buffered losses; the console, TensorBoard and the epoch loss
    show the same numbers as reading every loss."""
    parser, trainer = bundles.trainer(bundle)
    counts, counter, losses = _count_iterations(parser, trainer)
    trainer.run()
    clean, dirty = [counts[i] for i in CLEAN], [counts[i] for i in DIRTY]
    _assert_amortised(clean, TB_EVERY)
    tb_read = [int(i % TB_EVERY == 0) for i in range(ITERATIONS + 1)]  # the buffered losses of iterations 1-3, 4-6
    assert clean == [tb_read[i] for i in CLEAN], counter.report()
    with pytest.raises(AssertionError):  # self-check: one .item() per iteration is caught
        _assert_amortised(dirty, TB_EVERY)
    assert dirty == [tb_read[i] + 1 for i in DIRTY], counter.report()
    # the numbers: the mean loss of the console and of the epoch-loss metric, and TensorBoard's curve
    mean = sum(losses[i] for i in range(1, ITERATIONS + 1)) / ITERATIONS
    assert trainer.state.metrics["train_epoch_loss"] == mean
    assert f"[TRAIN]      Loss: {mean:.4f} | Dice: " in capsys.readouterr().out
    events = EventAccumulator(str(Path(parser.get_parsed_content("log_dir"))))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train_loss")}
    assert logged == pytest.approx({i: losses[i] for i in range(1, ITERATIONS + 1)}, rel=1e-6)  # (float32 events)
    assert 0.0 <= trainer.state.metrics["train_mean_dice"] <= 1.0


class _Writer:
    """A SummaryWriter's scalars, recorded."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("every", [1, 3])
def test_buffered_loss_writer_writes_what_the_default_writer_writes(every):
    """Every iteration's loss (same tag, value and step as MONAI's writer reading ``.item()`` at each iteration), read
    once per ``every`` iterations, the rest at the end of each epoch."""
    weight = torch.randn(3)  # stands for a device parameter
    losses = iter(torch.rand(14, generator=torch.Generator().manual_seed(0)).tolist())

    def trainer() -> Engine:
        return Engine(lambda engine, batch: {"loss": (weight * 0 + next(losses)).sum() / 3})

    reference, buffered = _Writer(), _Writer()
    plain = trainer()
    TensorBoardStatsHandler(summary_writer=reference, output_transform=_loss_of, tag_name="train_loss",
                            epoch_log=False).attach(plain)
    plain.run(range(7), max_epochs=1)
    losses = iter(torch.rand(14, generator=torch.Generator().manual_seed(0)).tolist())
    engine = trainer()
    TensorBoardStatsHandler(summary_writer=buffered, iteration_event_writer=BufferedLossWriter(every=every),
                            epoch_log=False).attach(engine)
    reads: list[int] = []
    with HostSyncCounter(weight) as syncs:
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda _: reads.append(syncs.count))
        engine.run(range(7), max_epochs=1)
    assert buffered.scalars == reference.scalars and len(reference.scalars) == 7
    assert reads[-1] == 7 // every and syncs.count == math.ceil(7 / every), syncs.report()  # + the epoch's end
    with pytest.raises(ValueError, match="every"):
        BufferedLossWriter(every=0)


@pytest.mark.parametrize("bundle", ["transunet", "sam_refiner", "ultrarefiner"])
def test_bundle_optimizers_are_fused(bundles, bundle):
    """One fused AdamW (SGD in phase 1) kernel per step (torch's default would be ~200 foreach dispatches on CUDA, a
    Python loop over the parameters on a CPU); phases 1 and 3 also skip a non-finite step on the device with it."""
    parser, _ = bundles.trainer(bundle)
    optimizer = parser.get_parsed_content("optimizer")
    kind = torch.optim.SGD if bundle == "transunet" else torch.optim.AdamW
    assert isinstance(optimizer, kind) and all(g["fused"] for g in optimizer.param_groups)


@pytest.mark.parametrize("bad", [1, 2], ids=["first_step", "later_step"])
def test_fused_sgd_skips_a_nonfinite_step(bad):
    """Phase 1's fused SGD skips a non-finite step on the device (``found_inf``), weights and momentum unchanged,
    except before its first successful step: there it reads the flag, since fused SGD would leave the momentum
    buffers it has just allocated uninitialised when it skips."""
    from ultrarefiner.engines.training.step import TrainStep, gradient_norms

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, fused=True)
    step = TrainStep(skip_nonfinite=True)
    x = torch.randn(8, 4)
    for i in (1, 2, 3):
        before = [p.detach().clone() for p in net.parameters()]
        momentum = [optimizer.state.get(p, {}).get("momentum_buffer") for p in net.parameters()]
        momentum = [None if m is None else m.clone() for m in momentum]
        optimizer.zero_grad()
        with HostSyncCounter(net, optimizer) as syncs:
            (net(x).square().mean() * (float("nan") if i == bad else 1.0)).backward()
            step._gated_step(optimizer, gradient_norms(optimizer))
        first = momentum[0] is None  # no successful step yet: no momentum buffers
        assert syncs.count == int(first) and first == (i == 1 or bad == 1 and i == 2), syncs.report()
        after = [p.detach() for p in net.parameters()]
        if i == bad:
            assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
            now = [optimizer.state.get(p, {}).get("momentum_buffer") for p in net.parameters()]
            assert all((m is None and n is None) or torch.equal(m, n) for m, n in zip(momentum, now, strict=True))
        else:
            assert all(torch.isfinite(a).all() and not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert step.skipped_steps == 1
