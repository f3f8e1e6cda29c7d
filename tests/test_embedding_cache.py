"""EmbeddingCache: hits, persistence, invalidation on new weights, frozen-encoder guard."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ultrarefiner.networks.embedding_cache import EmbeddingCache


def encoder() -> nn.Module:
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.GELU(), nn.Conv2d(8, 8, 1))
    return enc.requires_grad_(False)


def test_hits_and_equal_values(tmp_path):
    enc = encoder()
    cache = EmbeddingCache(enc, cache_dir=tmp_path)
    x = torch.rand(3, 3, 32, 32)
    a = cache(x)
    assert (cache.hits, cache.misses) == (0, 3)
    b = cache(torch.stack([x[2], x[0]]))
    assert (cache.hits, cache.misses) == (2, 3)
    assert torch.allclose(b, torch.stack([a[2], a[0]]))
    assert torch.allclose(a, enc(x), atol=1e-2)  # float16 storage
    flipped = cache(torch.flip(x[:1], dims=[-1]))  # a flipped image is another entry
    assert cache.misses == 4 and not torch.allclose(flipped, a[:1])


def test_disk_cache_survives_restart_and_new_weights_invalidate(tmp_path):
    enc = encoder()
    x = torch.rand(2, 3, 32, 32)
    EmbeddingCache(enc, cache_dir=tmp_path)(x)
    again = EmbeddingCache(enc, cache_dir=tmp_path)
    again(x)
    assert (again.hits, again.misses) == (2, 0)
    with torch.no_grad():
        enc[0].weight.add_(0.1)
    again.refresh()
    again(x)
    assert again.misses == 2  # new weights, new fingerprint


def test_memory_bound_and_frozen_guard():
    cache = EmbeddingCache(encoder(), max_items=2)
    cache(torch.rand(3, 3, 32, 32))
    assert len(cache._memory) == 2
    with pytest.raises(ValueError, match="frozen encoder"):
        EmbeddingCache(nn.Conv2d(3, 4, 1))


def test_dataset_keys_and_content_keys_share_one_cache(tmp_path, monkeypatch):
    """One class for both callers: training asks by dataset key through ``embed`` (each distinct missing key computed
    once, no image hashed), inference by content through ``forward``; both land in the same fingerprinted store."""
    import ultrarefiner.networks.embedding_cache as ec

    enc = encoder()
    cache = EmbeddingCache(enc, cache_dir=tmp_path)
    x = torch.rand(2, 3, 32, 32)
    monkeypatch.setattr(ec, "content_keys", lambda images: pytest.fail("dataset keys must not hash images"))
    asked = []
    out = cache.embed(["a", "b", "a"], lambda idx: asked.append(idx) or enc(x[[0, 1, 0]][idx]), "cpu")
    assert asked == [[0, 1]] and (cache.hits, cache.misses) == (1, 2) and out.dtype == torch.float32
    assert torch.allclose(out, enc(x[[0, 1, 0]]), atol=1e-2) and "a" in cache and "c" not in cache
    # the disk layout: keyed by the weights' fingerprint and the entries' format
    assert (tmp_path / f"{cache.fingerprint}-v{ec.DISK_FORMAT}" / "a.pt").is_file()
    again = cache.embed(["b"], lambda idx: pytest.fail("a cached key was recomputed"), "cpu", dtype=torch.float16)
    assert again.dtype == torch.float16 and torch.equal(again[0], out[1].half())
    monkeypatch.undo()
    by_content = cache(x)  # forward: keyed by content, computed once, then a hit
    assert cache.misses == 4 and torch.equal(cache(x), by_content) and cache.hits == 4


def test_entries_of_the_train_mode_era_are_not_read(tmp_path):
    """Before the frozen encoder was kept in eval mode (0.1.8), phase 3 wrote train-mode embeddings into
    ``<cache_dir>/<fingerprint>/``. Same weights, same fingerprint: such an entry must be recomputed, not returned."""
    enc = encoder()
    cache = EmbeddingCache(enc, cache_dir=tmp_path)
    x = torch.rand(1, 3, 32, 32)
    old = tmp_path / cache.fingerprint
    old.mkdir()
    torch.save(torch.full((8, 8, 8), 7.0).half(), old / "a.pt")  # what the old layout held, wrong values
    out = cache.embed(["a"], lambda idx: enc(x[idx]), "cpu")
    assert cache.misses == 1 and torch.allclose(out, enc(x), atol=1e-2)


def test_entries_bound_for_cuda_are_pinned_once(monkeypatch):
    """A CUDA copy from pageable memory makes the host wait for the GPU: host entries bound for CUDA are pinned on
    first use and kept pinned, not pinned again at every step (a 2 MB host copy each). Pinning needs a GPU, so a
    stand-in marks the copies it makes; the CUDA-only test below checks the real thing."""
    import ultrarefiner.networks.embedding_cache as ec

    pinned: list[int] = []

    def pin_memory(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        out.pinned_here = True
        pinned.append(id(out))
        return out

    monkeypatch.setattr(ec, "pins_for", lambda device: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t: getattr(t, "pinned_here", False))
    enc = encoder()
    cache = EmbeddingCache(enc)
    x = torch.rand(2, 3, 32, 32)
    keys = ["a", "b"]
    first = cache.embed(keys, lambda idx: enc(x[idx]), "cpu")
    assert len(pinned) == 2 and all(cache._memory[k].is_pinned() for k in keys)
    again = cache.embed(["b", "a", "b"], lambda idx: pytest.fail("all cached"), "cpu")
    assert len(pinned) == 2  # kept pinned: no new copy
    assert torch.equal(again, first[[1, 0, 1]]) and again.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_hits_are_pinned_and_copied_without_a_sync():
    from ultrarefiner.utils.sync_counter import HostSyncCounter

    enc = encoder().cuda()
    cache = EmbeddingCache(enc)
    x = torch.rand(2, 3, 32, 32, device="cuda")
    first = cache(x, keys=["a", "b"])
    with HostSyncCounter(enc) as syncs:
        again = cache(x, keys=["a", "b"])
    assert all(cache._memory[k].is_pinned() for k in ("a", "b"))
    assert syncs.count == 0 and torch.equal(again, first), syncs.report()
