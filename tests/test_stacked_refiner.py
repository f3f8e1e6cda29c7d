"""``StackedInputRefiner(optimize=...)``, the sam_refiner bundle's inference network: in eval mode its LiteMedSAM
encoder runs through ``fast_inference.fast_encoder`` (jit_freeze, the stem on row slabs) with the plain network's
masks, and a frozen encoder never outlives the weights it was frozen from. Packaged LiteMedSAM weights, on a CPU."""

from __future__ import annotations

import copy

import pytest
import torch

import ultrarefiner
from ultrarefiner.engines.inference.fast_inference import FrozenEncoder
from ultrarefiner.networks import StackedInputRefiner


@pytest.fixture(scope="module")
def refiner() -> torch.nn.Module:
    return ultrarefiner.create_model("sam_refiner")  # zero-shot LiteMedSAM: packaged weights, frozen encoder


@pytest.fixture(scope="module")
def stacked_input() -> torch.Tensor:
    """(1, 2, H, W): an 8-bit-like image / 255 with a bright blob, and a coarse mask that misses part of it."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(180.0), torch.arange(220.0), indexing="ij")
    blob = (((yy - 90) / 40) ** 2 + ((xx - 100) / 55) ** 2 < 1).float()
    image = (0.25 + 0.5 * blob + 0.1 * torch.rand(180, 220, generator=g)).clamp(0, 1)
    coarse = ((((yy - 95) / 35) ** 2 + ((xx - 110) / 45) ** 2) < 1).float()
    return torch.stack([image, coarse])[None]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= 1e-3 * max(b.abs().max().item(), 1.0)


def test_optimized_network_gives_the_plain_masks_through_the_frozen_encoder(refiner, stacked_input):
    plain = StackedInputRefiner(copy.deepcopy(refiner)).eval()
    fast = StackedInputRefiner(copy.deepcopy(refiner), optimize="jit_freeze").eval()
    with torch.no_grad():
        expected, first = plain(stacked_input), fast(stacked_input)
        assert isinstance(fast._fast[stacked_input.device], FrozenEncoder)
        calls = []
        fast.refiner.sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))  # after the snapshot
        again = fast(stacked_input)
    assert first.shape == expected.shape == (1, 1, 180, 220)
    assert _close(first, expected) and _close(again, expected)
    assert not calls  # the eager encoder did not run: the frozen copy did


def test_new_weights_or_training_drop_the_frozen_encoder(refiner, stacked_input):
    fast = StackedInputRefiner(copy.deepcopy(refiner), optimize="jit_freeze").eval()
    with torch.no_grad():
        before = fast(stacked_input)
    assert fast._fast and not copy.deepcopy(fast)._fast  # a copy freezes its own
    state = {k: v.clone() for k, v in fast.state_dict().items()}
    neck = next(k for k in state if k.startswith("sam.image_encoder.neck") and k.endswith("weight"))
    # other encoder weights (noise: the neck's layer norms would undo a plain scaling); a stale snapshot would keep
    # the old embeddings
    state[neck] += 0.2 * state[neck].std() * torch.randn(state[neck].shape, generator=torch.Generator().manual_seed(0))
    fast.load_state_dict(state)
    assert not fast._fast
    reference = StackedInputRefiner(copy.deepcopy(refiner)).eval()
    reference.load_state_dict(state)
    with torch.no_grad():
        after, expected = fast(stacked_input), reference(stacked_input)
    assert _close(after, expected) and not _close(after, before)
    fast.train()
    assert not fast._fast
    fast.eval()
    with torch.no_grad():
        assert _close(fast(stacked_input), expected) and fast._fast


def test_plain_encoder_without_optimize_in_training_and_for_a_bad_option(refiner, stacked_input):
    assert StackedInputRefiner(refiner)._fast_encoder(torch.device("cpu")) is None
    training = StackedInputRefiner(refiner, optimize="jit_freeze").train()
    assert training._fast_encoder(torch.device("cpu")) is None
    refiner.eval()
    with pytest.raises(ValueError, match=r"optimize \(or None\) must be one of auto, none"):
        StackedInputRefiner(refiner, optimize="fastest")
