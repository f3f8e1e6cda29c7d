"""Host-to-device copies without a host sync: ``to_device`` and the bundles' loaders and engines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ultrarefiner.engines.training.bundle_engines import bundle_config
from ultrarefiner.utils.sync_counter import HostSyncCounter
from ultrarefiner.utils.transfer import pins_for, to_device, to_host


def test_to_device_copies_asynchronously(monkeypatch):
    host, other = torch.arange(6.0).reshape(2, 3), torch.ones(2)  # (on a CPU ``.to`` returns the tensor itself)
    with HostSyncCounter() as syncs:
        moved = to_device(host, "cpu")
        other.to("cpu")  # the blocking move it replaces
    assert torch.equal(moved, host)
    assert [e.kind for e in syncs.events] == ["to device"], syncs.report()
    # bound for CUDA, an unpinned host tensor is pinned first (asynchronous copies need page-locked memory)
    calls: list[str] = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: calls.append("pin") or t.clone())
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: calls.append(f"to {k}") or t)
    to_device(host, torch.device("cuda"))
    assert calls == ["pin", "to {'non_blocking': True}"]
    assert pins_for("cuda:1") and not pins_for("cpu")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_to_host_copies_each_dtype_once(device):
    """Maps of different sizes and dtypes come back as numpy arrays of their own shapes and values, in order, with
    one copy per dtype (the CPU stand-in also counts each copy's numpy view)."""
    made = [torch.arange(12.0).reshape(3, 4), torch.ones(2, 2, dtype=torch.bool), torch.full((5,), 7.0),
            torch.eye(3)[:, :2]]  # the last one not contiguous
    made[1][0, 1] = False
    on_device = [t.to(device) for t in made]
    with HostSyncCounter(*on_device) as syncs:
        host = to_host(on_device)
    assert [e.kind for e in syncs.events] == ["to host"] * (4 if device == "cpu" else 2), syncs.report()
    for h, t in zip(host, made, strict=True):
        assert isinstance(h, np.ndarray) and h.shape == tuple(t.shape) and h.dtype == t.numpy().dtype
        assert np.array_equal(h, t.numpy())
    host[0][0, 0] = -1.0  # disjoint views of one buffer: writing one leaves the others intact
    assert host[2][0] == 7.0 and host[3][0, 0] == 1.0
    assert to_host([]) == []


BUNDLES = {"transunet": ("train", "inference"), "sam_refiner": ("train", "inference"), "ultrarefiner": ("train",)}


@pytest.mark.parametrize("bundle", BUNDLES)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_bundle_loaders_pin_and_engines_copy_asynchronously_on_cuda(bundle, device):
    """The train and validation loaders pin their batches on CUDA and the engines move them with non_blocking: the
    copies are queued, not waited for (``ultrarefiner.utils.transfer``). On a CPU nothing is pinned."""
    overrides = {"device": f"$torch.device('{device}')"}
    for config in BUNDLES[bundle]:
        parser = bundle_config(bundle, overrides, f"{config}.json")
        loaders = ["train#dataloader", "validate#dataloader"] if config == "train" else ["dataloader"]
        engines = ["train#trainer", "validate#evaluator"] if config == "train" else ["evaluator"]
        for loader in loaders:
            assert parser.get_parsed_content(f"{loader}#pin_memory") is (device == "cuda"), (config, loader)
        for engine in engines:
            assert parser[engine]["non_blocking"] is True, (config, engine)

