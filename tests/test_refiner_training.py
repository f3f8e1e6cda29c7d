"""Phase-2 engine pieces with a tiny SAM: cache parity, one encoder call per (image, flip), gradients, evaluator.

The trainer and evaluator are the bundle's own (``bundles/sam_refiner/configs/train.json`` through ``bundle_config``)
with the test's refiner, cache and dataset swapped in."""

from __future__ import annotations

import copy
from unittest.mock import patch

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from refiner_toy import SIZE, write_predictions, write_toy
from torch.utils.data import DataLoader

from ultrarefiner.data.refiner_data import (
    MixedRefinerDataset,
    PredictionCoarseDataset,
    SimulatedCoarseDataset,
    load_encoder_image,
)
from ultrarefiner.engines.inference.fast_inference import FrozenEncoder
from ultrarefiner.engines.training.bundle_engines import bundle_config, bundle_evaluator
from ultrarefiner.engines.training.refiner_training import (
    RefinerPrepareBatch,
    _cache_keys,
    encoder_inputs,
    precompute_embeddings,
    refine_batch,
)
from ultrarefiner.networks.embedding_cache import EmbeddingCache
from ultrarefiner.networks.sam_refiner import SAMRefiner
from ultrarefiner.networks.sam_weights import build_tiny_sam


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("refiner_training")
    datalist = write_toy(root, n_train=5)  # one image per fold: fold 0's refiner trains on 4 images
    return {"datalist": datalist, "pred": write_predictions(datalist, root / "pred")}


def make_refiner(preprocessing: str = "sam", **kwargs) -> SAMRefiner:
    return SAMRefiner(build_tiny_sam(img_size=256, seed=0), preprocessing=preprocessing, **kwargs)


def count_encoder_images(refiner: SAMRefiner) -> list[int]:
    calls: list[int] = []
    refiner.sam.image_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    return calls


CPU = {"device": "$torch.device('cpu')", "amp": False, "num_workers": 0}


def refiner_trainer(refiner, dataset, cache=None, epochs=1, iterations=None, batch_size=2, **overrides):
    """The bundle's ``train#trainer`` over ``dataset`` (in order) with the test's refiner and cache; of the bundle's
    handlers only the per-epoch dataset one (new flips / masks each epoch)."""
    return bundle_config("sam_refiner", {
        **CPU, "network": refiner, "cache": cache, "train#dataset": dataset, "train#dataloader#shuffle": False,
        "batch_size": batch_size, "epochs": epochs, "epoch_length": iterations,
        "train#handlers": [{"_target_": "ultrarefiner.engines.training.refiner_training.DatasetEpochHandler",
                            "datasets": "@train#dataset"}], **overrides,
    }).get_parsed_content("train#trainer")


def run_trainer(refiner, dataset, cache=None, epochs=1, iterations=None, batch_size=2, **overrides):
    losses: list[float] = []
    trainer = refiner_trainer(refiner, dataset, cache, epochs, iterations, batch_size, **overrides)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    trainer.run()
    return trainer, losses


@pytest.mark.parametrize("preprocessing", ["sam", "medsam"])
def test_cache_gives_the_same_losses(toy, preprocessing):
    ds = SimulatedCoarseDataset.from_datalist(toy["datalist"], 0, make_refiner(preprocessing).geometry, seed=1)
    plain = make_refiner(preprocessing)
    cached, exact = copy.deepcopy(plain), copy.deepcopy(plain)
    _, ref = run_trainer(plain, ds, iterations=2)
    cache = EmbeddingCache(cached.sam.image_encoder)
    _, got = run_trainer(cached, ds, cache, iterations=2)
    assert len(ref) == len(got) == 2
    assert torch.allclose(torch.tensor(got), torch.tensor(ref), rtol=2e-3, atol=1e-4)  # float16 storage
    _, got32 = run_trainer(exact, ds, EmbeddingCache(exact.sam.image_encoder, dtype=torch.float32),
                           iterations=1)
    assert abs(got32[0] - ref[0]) < 1e-5


def test_encoder_input_is_sams_own(toy):
    """The zero-padded encoder-frame batch gives SAM's normalise-then-pad input for every content size."""
    ref = make_refiner("sam")
    ds = SimulatedCoarseDataset.from_datalist(toy["datalist"], 0, ref.geometry, flip_prob=0.0)
    batch = RefinerPrepareBatch()(next(iter(DataLoader(ds, batch_size=2))), "cpu")
    x = encoder_inputs(ref, batch["image"], batch["input_size"], batch["original_size"])
    for i in range(2):
        content = load_encoder_image(batch["source"][i], False, ref.geometry)[None]
        assert torch.equal(x[i : i + 1], ref.preprocess_image(content, resized=True))


def test_each_image_flip_encoded_once_across_epochs(toy):
    refiner = make_refiner("sam")
    calls = count_encoder_images(refiner)
    ds = SimulatedCoarseDataset.from_datalist(toy["datalist"], 0, refiner.geometry, samples_per_image=2, seed=5)
    cache = EmbeddingCache(refiner.sam.image_encoder)
    _, losses = run_trainer(refiner, ds, cache, epochs=2, batch_size=4)
    assert len(losses) == 4  # 8 samples per epoch (4 images x 2), 2 epochs
    keys = {k for e in range(2) for k in _epoch_keys(ds, e)}
    assert sum(calls) == len(keys) == cache.misses and cache.hits == 16 - len(keys)
    assert len(keys) <= 2 * 4  # at most (image, flip) pairs
    # a new encoder call only for keys never seen: precomputing everything leaves none for training
    fresh = make_refiner("sam")
    calls = count_encoder_images(fresh)
    cache = EmbeddingCache(fresh.sam.image_encoder)
    assert precompute_embeddings(fresh, cache, ds, batch_size=3, optimize="none") == 8 and calls == [3, 3, 2]
    lean = SimulatedCoarseDataset.from_datalist(toy["datalist"], 0, fresh.geometry, samples_per_image=2, seed=5,
                                                with_image=False)
    run_trainer(fresh, lean, cache, epochs=2, batch_size=4)
    assert sum(calls) == 8 and cache.misses == 8


def test_precompute_on_a_cpu_runs_a_frozen_copy_one_image_at_a_time(toy):
    """The CPU default: batch 1 through a TorchScript-frozen copy of the encoder (the module itself never runs),
    giving the embeddings the eager encoder gives, under the same keys."""
    refiner = make_refiner("sam")
    ds = SimulatedCoarseDataset.from_datalist(toy["datalist"], 0, refiner.geometry, samples_per_image=2, seed=5)
    fast, plain = EmbeddingCache(refiner.sam.image_encoder), EmbeddingCache(refiner.sam.image_encoder)
    calls = count_encoder_images(refiner)
    traced: list[tuple[int, ...]] = []
    real_freeze = FrozenEncoder._freeze
    with patch.object(FrozenEncoder, "_freeze", lambda self, x: traced.append(tuple(x.shape)) or real_freeze(self, x)):
        assert precompute_embeddings(refiner, fast, ds) == 8
    # one trace at batch 1 (the copy keeps the module's hooks: its only call is the trace's), then the frozen graph
    assert len(calls) == len(traced) == 1 and traced[0][0] == 1
    assert precompute_embeddings(refiner, plain, ds, batch_size=8, optimize="none") == 8 and calls[-1:] == [8]
    keys = [k for k, _, _ in ds.encoder_sources()]
    assert set(fast._memory) == set(plain._memory) == set(_cache_keys(refiner, keys))
    for k in plain._memory:
        assert torch.allclose(fast._memory[k].float(), plain._memory[k].float(), atol=2e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="optimize"):
        precompute_embeddings(refiner, EmbeddingCache(refiner.sam.image_encoder), ds, optimize="bf16")


def test_disk_cache_survives_a_restart(toy, tmp_path):
    refiner = make_refiner("sam")
    ds = SimulatedCoarseDataset.from_datalist(toy["datalist"], 0, refiner.geometry, with_image=False)
    assert precompute_embeddings(refiner, EmbeddingCache(refiner.sam.image_encoder, tmp_path), ds) == 8
    calls = count_encoder_images(refiner)
    again = EmbeddingCache(refiner.sam.image_encoder, tmp_path)
    assert all(k in again for k, _, _ in ds.encoder_sources())
    assert precompute_embeddings(refiner, again, ds) == 0
    run_trainer(refiner, ds, again, iterations=1)
    assert sum(calls) == 0 and again.misses == 0 and again.hits == 2


def _epoch_keys(ds, epoch: int) -> list[str]:
    ds.set_epoch(epoch)
    keys = [ds[i]["image_key"] for i in range(len(ds))]
    ds.set_epoch(0)
    return keys


def test_image_free_batches_reload_on_a_miss(toy):
    refiner = make_refiner("sam")
    lean = SimulatedCoarseDataset.from_datalist(toy["datalist"], 0, refiner.geometry, with_image=False, seed=2)
    full = SimulatedCoarseDataset.from_datalist(toy["datalist"], 0, refiner.geometry, seed=2)
    prep = RefinerPrepareBatch()
    refiner.eval()
    with torch.no_grad():
        a = refine_batch(refiner, prep(next(iter(DataLoader(lean, batch_size=2))), "cpu"),
                         EmbeddingCache(refiner.sam.image_encoder, dtype=torch.float32))
        b = refine_batch(refiner, prep(next(iter(DataLoader(full, batch_size=2))), "cpu"))
    assert torch.allclose(a["masks"], b["masks"], atol=1e-4)
    with pytest.raises(ValueError, match="pass an embedding cache"):
        refine_batch(refiner, prep(next(iter(DataLoader(lean, batch_size=2))), "cpu"))


def test_gradients_reach_decoder_not_frozen_encoder(toy):
    refiner = make_refiner("sam")
    ds = SimulatedCoarseDataset.from_datalist(toy["datalist"], 0, refiner.geometry)
    encoder_before = copy.deepcopy(refiner.sam.image_encoder.state_dict())
    decoder_before = copy.deepcopy(refiner.sam.mask_decoder.state_dict())
    grads: dict[str, float] = {}

    def record(engine):
        grads.update({n: float(p.grad.abs().sum()) for n, p in refiner.named_parameters() if p.grad is not None})

    trainer = refiner_trainer(refiner, ds, EmbeddingCache(refiner.sam.image_encoder), iterations=1, grad_clip=1.0)
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, record)
    trainer.run()
    decoder_grads = [v for n, v in grads.items() if n.startswith("sam.mask_decoder.")]
    assert decoder_grads and sum(decoder_grads) > 0
    assert any(n.startswith("sam.prompt_encoder.") and v > 0 for n, v in grads.items())
    assert not any(n.startswith("sam.image_encoder.") for n in grads)
    after = refiner.sam.image_encoder.state_dict()
    assert all(torch.equal(after[k], v) for k, v in encoder_before.items())
    moved = refiner.sam.mask_decoder.state_dict()
    assert any(not torch.equal(moved[k], v) for k, v in decoder_before.items())
    out = trainer.state.output  # the bundle's trainer does not decollate
    assert out["pred"].shape == out["label"].shape == (2, 1, 64, 64)
    assert 0 <= out["pred"].min() <= out["pred"].max() <= 1
    assert {"loss", "loss_bce", "loss_dice", "loss_iou", "loss_change", "input_dice", "coarse", "grad_norm"} <= set(out)
    with pytest.raises(ValueError, match="frozen"):  # LoRA makes the encoder trainable: no cache
        EmbeddingCache(make_refiner("sam", use_lora=True).sam.image_encoder)


def test_mixed_training_and_native_evaluation(toy):
    refiner = make_refiner("sam")
    g = refiner.geometry
    sim = SimulatedCoarseDataset.from_datalist(toy["datalist"], 0, g, with_image=False)
    real = PredictionCoarseDataset(toy["pred"], 0, g, with_image=False)
    mixed = MixedRefinerDataset(sim, real, real_ratio=0.5, length=4)
    cache = EmbeddingCache(refiner.sam.image_encoder)
    trainer, losses = run_trainer(refiner, mixed, cache, epochs=1, batch_size=4)
    assert len(losses) == 1 and losses[0] > 0 and isinstance(trainer, SupervisedTrainer)
    val = PredictionCoarseDataset(toy["pred"], 0, g, split="val", frame="native")
    evaluator = bundle_evaluator("sam_refiner", {**CPU, "network": refiner, "cache": cache, "validate#dataset": val,
                                                 "validate#handlers": []})
    evaluator.run()
    out = evaluator.state.output[0]
    assert out["pred"].shape == out["label"].shape == (1, *SIZE)  # native resolution
    assert 0 < evaluator.state.metrics["val_mean_dice"] <= 1
    with pytest.raises(ValueError, match="geometry"):  # a dataset made for another refiner's encoder frame
        refiner_trainer(make_refiner("medsam"), sim).run()


def test_cache_serves_fp16_store_under_bf16_autocast():
    """The trainer runs the cache lookup inside a bf16 autocast (AMP on CUDA): a fp16 store must come back in the
    requested dtype (stacking fp16 under a bf16 autocast raises 'Unexpected floating ScalarType' in torch)."""
    encoder = torch.nn.Conv2d(1, 4, 1).requires_grad_(False)
    cache = EmbeddingCache(encoder)  # stores float16
    emb = torch.randn(2, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cache.embed(["a", "b"], lambda idx: emb[idx], "cpu", dtype=torch.bfloat16)
        again = cache.embed(["b", "a"], lambda idx: pytest.fail("cached keys were recomputed"), "cpu",
                            dtype=torch.float32)
    assert out.dtype == torch.bfloat16 and again.dtype == torch.float32
    assert torch.allclose(again, emb.flip(0), atol=1e-2)
