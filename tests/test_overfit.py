"""Each phase learns: overfitting one small fixed batch on the CPU drives the loss down by half and the batch Dice
above 0.9 within a bounded number of steps.

Every piece comes from the bundles' own ``train.json`` (network, loss, optimizer, prepare_batch, iteration_update,
post-processing, train metric, even the ``DataLoader`` and ``SupervisedTrainer`` definitions); only the dataset is
swapped for one fixed batch (not shuffled), so each epoch is one step on the same samples, and the handlers
(validation, checkpoints, logging) are dropped. Phase 1 is TransUNet at 64 px with ViT depth 2 (the demo's size) on
synthetic phantoms; phase 2 the default refiner, LiteMedSAM from its packaged weights with the frozen encoder's
embeddings cached (each image is encoded once, ~2-3 s on one thread); phase 3 that TransUNet and LiteMedSAM end to
end from random TransUNet weights (``from_scratch``). Runs are seeded and single-threaded, hence reproducible; the
step bounds leave room over the steps taken now (phase 1: 19 of 60, phase 2: 5 of 20, phase 3: 18 of 40).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.engines import SupervisedTrainer
from refiner_toy import write_toy
from torch.utils.data import Dataset

from ultrarefiner.data.synthetic import make_phantom
from ultrarefiner.engines.evaluation.metrics import batch_metrics
from ultrarefiner.engines.training.bundle_engines import bundle_config
from ultrarefiner.utils.io import write_png

CPU = "$torch.device('cpu')"
TRANSUNET = {"img_size": 64, "vit_depth": 2}  # the demo's TransUNet (ultrarefiner/demo_configs)
DICE = 0.9


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread (restored afterwards): the bounds below are sized for it on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FixedBatch(Dataset):
    """The same prepared samples every epoch."""

    def __init__(self, samples: Sequence[dict]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return dict(self.samples[index])


def bundle_parser(bundle: str, **overrides) -> ConfigParser:
    """The bundle's ``train.json`` on the CPU (``bundle_config``: what tests and benchmarks build trainers from)."""
    return bundle_config(bundle, {"device": CPU, "amp": False, "num_workers": 0, **overrides})


def fixed_batch_trainer(parser: ConfigParser, samples: Sequence[dict], max_steps: int) -> SupervisedTrainer:
    """The bundle's ``train#trainer`` over one fixed batch of ``samples``: one step per epoch, at most
    ``max_steps``. Network weights are seeded (TransUNet starts from random initialisation)."""
    parser.update({"train#dataset": FixedBatch(samples), "batch_size": len(samples), "train#dataloader#shuffle": False,
                   "epochs": max_steps, "epoch_length": None, "train#handlers": []})
    torch.manual_seed(0)
    return parser.get_parsed_content("train#trainer")


def overfit(trainer: SupervisedTrainer) -> list[tuple[float, float]]:
    """Runs ``trainer`` until the loss is at most half the first step's and the train Dice (the bundle's
    ``train_mean_dice`` over the batch, from the step's forward pass) exceeds ``DICE``, or to its last epoch.

    Returns:
      (loss, Dice) per step.
    """
    history: list[tuple[float, float]] = []

    def record(engine: SupervisedTrainer) -> None:
        output = engine.state.output  # a list of per-sample dicts when the trainer decollates
        loss = float((output[0] if isinstance(output, list) else output)["loss"])
        history.append((loss, float(engine.state.metrics["train_mean_dice"])))
        if loss <= history[0][0] / 2 and history[-1][1] > DICE:
            engine.terminate()

    trainer.add_event_handler(Events.EPOCH_COMPLETED, record)
    trainer.run()
    return history


def assert_learned(history: list[tuple[float, float]], max_steps: int) -> None:
    (first_loss, first_dice), (last_loss, last_dice) = history[0], history[-1]
    shown = [(round(a, 4), round(b, 3)) for a, b in history]
    assert first_dice < DICE, f"the batch was solved before training: {shown}"
    assert last_loss <= first_loss / 2 and last_dice > DICE, f"not learned within {max_steps} steps: {shown}"
    assert all(np.isfinite(a) for a, _ in history), shown


def dice(pred: torch.Tensor, label: torch.Tensor) -> float:
    """Mean Dice of probabilities (thresholded at 0.5) against a 0/1 label, (B,1,H,W) each."""
    return float(batch_metrics((pred > 0.5).float(), label, ["dice"])["dice"].mean())


def phantom_items(folder: Path, n: int = 2, size: tuple[int, int] = (96, 128)) -> list[dict]:
    """``n`` synthetic phantoms (benign, malignant, ...) as PNG datalist items."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        image, masks = make_phantom(rng, ("benign", "malignant")[i % 2], size=size)
        items.append({"image": str(write_png(folder / f"image_{i}.png", image)),
                      "label": str(write_png(folder / f"label_{i}.png", masks[0].astype(np.uint8) * 255))})
    return items


# ------------------------------------------------------------------------------------------------ phase 1
def test_transunet_overfits_one_batch(tmp_path):
    """The bundle's recipe (SGD, lr 0.01, momentum 0.9, Dice + CE) from random weights."""
    max_steps = 60
    parser = bundle_parser("transunet", **TRANSUNET)
    transform = parser.get_parsed_content("validate#preprocessing")  # no augmentation: the batch stays fixed
    samples = [transform(item) for item in phantom_items(tmp_path)]
    trainer = fixed_batch_trainer(parser, samples, max_steps)
    assert_learned(overfit(trainer), max_steps)


# ------------------------------------------------------------------------------------------------ phase 2
def test_refiner_overfits_one_batch(tmp_path):
    """LiteMedSAM (packaged weights, frozen encoder, embedding cache) with the bundle's AdamW (lr 1e-4), loss
    (BCE + Dice + IoU + change penalty) and RefinerTrainStep, on simulated coarse masks of two phantoms."""
    from ultrarefiner.engines.training.refiner_training import refine_batch

    max_steps = 20
    parser = bundle_parser("sam_refiner", datalist=str(write_toy(tmp_path, n_train=5)), flip_prob=0.0)
    dataset = parser.get_parsed_content("train#dataset")  # option A: failures simulated on the fold's images
    samples = [dataset[i] for i in range(2)]
    trainer = fixed_batch_trainer(parser, samples, max_steps)
    step = parser.get_parsed_content("train#iteration")  # the trainer's own RefinerTrainStep (resolved once)
    assert step.cache is not None and not trainer.network.encoder_trainable()
    history = overfit(trainer)
    assert_learned(history, max_steps)
    assert step.cache.misses == 2 and step.cache.hits == 2 * (len(history) - 1)  # each image encoded once
    # the trained refiner's eval-mode prediction (argmax candidate) from the cached embeddings
    batch = trainer.prepare_batch(next(iter(trainer.data_loader)), torch.device("cpu"))
    with torch.no_grad():
        masks = refine_batch(trainer.network.eval(), batch, step.cache)["masks"]
    assert dice(torch.sigmoid(masks), batch["label"]) > DICE


# ------------------------------------------------------------------------------------------------ phase 3
def test_ultrarefiner_overfits_one_batch_end_to_end(tmp_path):
    """TransUNet from random weights + LiteMedSAM through the differentiable prompts, with the bundle's
    UltraRefinerLoss (0.3 coarse + 0.7 refined), two-group AdamW and E2ETrainStep. The learning rates (1e-3 / 3e-4)
    are raised from phase 3's fine-tuning values (1e-4 / 1e-5, meant for trained phase-1/phase-2 weights) for a
    random TransUNet."""
    max_steps = 40
    # the bundle's training chain (SAM image squashed into the encoder square, label at 256) without its random
    # flip and intensity jitter (transforms 10-13)
    no_augmentation = {f"train#preprocessing#transforms#{i}#prob": 0.0 for i in (10, 11, 12, 13)}
    parser = bundle_parser("ultrarefiner", **TRANSUNET, from_scratch=True, transunet_lr=1e-3, sam_lr=3e-4,
                           **no_augmentation)
    transform = parser.get_parsed_content("train#preprocessing")
    samples = [transform(item) for item in phantom_items(tmp_path)]
    trainer = fixed_batch_trainer(parser, samples, max_steps)
    net = trainer.network
    assert net.cache_embeddings and [g["name"] for g in trainer.optimizer.param_groups] == ["transunet", "sam"]
    _, target, _, _ = trainer.prepare_batch(next(iter(trainer.data_loader)), torch.device("cpu"))
    # coarse Dice of each step's forward (train mode, the batch in its fixed order)
    coarse: list[float] = []
    net.register_forward_hook(lambda m, args, out: coarse.append(dice(out["coarse_probs"], target["coarse_target"])))
    history = overfit(trainer)
    assert_learned(history, max_steps)  # Dice of the refined masks
    assert net.cache_stats() == {"hits": 2 * (len(history) - 1), "misses": 2}  # each SAM image encoded once
    # TransUNet learned too, from the coarse loss and through the prompts (random init: coarse Dice ~0.1)
    assert len(coarse) == len(history) and coarse[0] < 0.3 and coarse[-1] > 0.6, coarse
