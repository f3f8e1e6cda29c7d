"""Component labelling: the device loop and its CUDA graphs give scipy's components.

The CUDA tests run only where a GPU is present (``benchmarks/gpu_throughput.sh`` runs them first); on a CPU the
device loop itself is checked against scipy, and the graph cache's switches.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ultrarefiner.networks import labelling
from ultrarefiner.networks.labelling import LabelGraphs, component_labels, propagate_labels

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal background, and the label maps are a relabelling of each other (per sample)."""
    for x, y in zip(a.flatten(1).cpu(), b.flatten(1).cpu(), strict=True):
        if not torch.equal(x > 0, y > 0):
            return False
        pairs = torch.unique(torch.stack([x, y]), dim=1)
        if not (pairs.shape[1] == len(torch.unique(x)) == len(torch.unique(y))):
            return False
    return True


def masks(seed: int = 0, shape: tuple[int, int, int, int] = (4, 1, 64, 80)) -> torch.Tensor:
    """Blobby random masks with several components each, plus an empty and a full one."""
    g = torch.Generator().manual_seed(seed)
    noise = F.avg_pool2d(torch.rand(shape, generator=g), 7, stride=1, padding=3)
    fg = noise > noise.flatten(1).quantile(0.6, dim=1).view(-1, 1, 1, 1)
    fg[0] = False
    fg[1] = True
    return fg


def serpentine(n: int = 41) -> torch.Tensor:
    """A one-pixel snake through an n x n square: one component whose geodesic length (about n^2 / 2) is far above
    H + W."""
    m = torch.zeros(n, n, dtype=torch.bool)
    m[::2] = True
    for r in range(1, n, 2):
        m[r, n - 1 if r % 4 == 1 else 0] = True
    return m[None, None]


def test_device_loop_finds_scipys_components():
    fg = masks()
    loop, host = propagate_labels(fg.float()), component_labels(fg)
    assert same_partition(loop, host)
    assert len(torch.unique(host[2])) > 3  # several components, not a trivially connected mask
    assert loop[0].eq(0).all() and len(torch.unique(loop[1])) == 1  # empty; one component filling the image
    # labels are the largest flat index + 1 of each component: the full mask's label is H * W
    assert loop[1].max() == 64 * 80


def test_device_loop_limit_is_documented():
    """H + W steps do not cover a long snake (the docstring's caveat): scipy finds one component, the loop more."""
    fg = serpentine()
    assert len(torch.unique(component_labels(fg))) == 2
    assert len(torch.unique(propagate_labels(fg.float()))) > 2


def test_graph_switches(monkeypatch):
    assert LabelGraphs().usable(torch.ones(1, 1, 4, 4)) is False  # a CPU tensor: never graphed
    monkeypatch.setenv("ULTRAREFINER_CUDA_GRAPHS", "0")
    assert LabelGraphs().enabled is False
    monkeypatch.setenv("ULTRAREFINER_CUDA_GRAPHS", "1")
    graphs = LabelGraphs()
    assert graphs.enabled
    with pytest.warns(RuntimeWarning, match="without a CUDA graph"):
        graphs._disable("a test")
    assert graphs.enabled is False


@CUDA
def test_cuda_graphs_label_like_the_loop():
    graphs = LabelGraphs(max_graphs=2, capture_after=1)
    outs = []
    for seed, shape in enumerate([(4, 1, 64, 80), (4, 1, 64, 80), (2, 1, 128, 128), (1, 1, 50, 30)]):
        fg = masks(seed, shape).cuda()
        out = graphs(fg.float())
        assert torch.equal(out, propagate_labels(fg.float()))
        assert same_partition(out, component_labels(fg.cpu()))
        outs.append((fg, out))
    assert graphs.enabled and len(graphs._graphs) == 2  # least recently used dropped
    fg0, out0 = outs[0]
    assert torch.equal(out0, propagate_labels(fg0.float()))  # outputs are copies: later replays did not touch them
    with torch.inference_mode():
        inside = graphs(fg0.float())
    assert torch.equal(graphs(fg0.float()), inside)  # captured inside inference mode, replayed outside it too
    assert torch.equal(component_labels(fg0), out0)  # the public entry point takes the graphed path on CUDA
    assert labelling._GRAPHS.enabled, "the process-wide graphs were turned off (see the warning)"


@CUDA
def test_cuda_graph_replay_launches_once():
    from torch.profiler import ProfilerActivity, profile

    fg = masks(3).cuda()
    component_labels(fg)
    component_labels(fg)  # the shape came back: captured
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        component_labels(fg)
    launches = sum(e.count for e in prof.key_averages() if e.key in ("aten::max_pool2d", "aten::mul"))
    assert launches == 0, f"{launches} eager pooling/multiplication calls: the graph was not replayed"
    assert math.isfinite(float(component_labels(fg).sum()))


@CUDA
def test_cuda_graph_is_captured_when_a_shape_comes_back():
    graphs = LabelGraphs(capture_after=2)
    fg = masks(4).cuda().float()
    first = graphs(fg)
    assert not graphs._graphs  # a one-off shape is not worth a capture
    assert torch.equal(graphs(fg), first) and len(graphs._graphs) == 1
    assert torch.equal(graphs(fg), first)


def test_graph_capture_waits_for_a_shape_to_come_back():
    """The call counting that decides a capture (CPU: the counting alone)."""
    graphs = LabelGraphs(max_graphs=1, capture_after=3)
    assert [graphs._due("a"), graphs._due("a"), graphs._due("a")] == [False, False, True]
    assert graphs._due("b") is False and "a" not in graphs._calls  # counted afresh if its graph is dropped later
    for i in range(100):
        graphs._due(i)
    assert len(graphs._calls) == 64  # bounded: many one-off shapes do not grow it
