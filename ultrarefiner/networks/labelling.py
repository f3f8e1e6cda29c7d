"""8-connected component labels of binary masks, without a host sync on a GPU.

- CPU tensors: ``scipy.ndimage.label`` in one pass (the propagation loop below costs H + W max-pools, 0.1-0.3 s per
  image on a CPU core).
- Device tensors (and under tracing): max-label propagation, ``propagate_labels``: each foreground pixel starts with
  its own id (flat index + 1) and takes the largest id of its 3x3 foreground neighbourhood, H + W times. No
  data-dependent stop, so no host sync; but 2 (H + W) small kernels, 512 for the 128x128 working frame of the
  prompts: about a tenth of the operations of a whole phase-3 training step, which on a fast GPU is bound by the
  host's launch rate.
- On CUDA that loop runs as one CUDA graph per (device, shape), captured when a shape comes back (the second call:
  a capture costs about three loops, a sync and a cache flush, which a one-off shape, e.g. an image size seen once
  by ``refine``, would not repay): one replay instead of 512 launches, the same kernels. The first replay of each
  graph is compared with the plain loop (one host sync, once); a capture that fails or disagrees turns graphs off
  for the process with a warning, and the plain loop runs.
  ``ULTRAREFINER_CUDA_GRAPHS=0`` turns them off from the start; nothing is captured while the caller is itself
  being captured or compiled (the loop then becomes part of the caller's graph).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..utils.amp import float32_region

__all__ = ["LabelGraphs", "component_labels", "propagate_labels"]

_EIGHT = np.ones((3, 3), dtype=bool)


def propagate_labels(keep: torch.Tensor) -> torch.Tensor:
    """Max-label propagation over the foreground ``keep`` (B,1,H,W) float 0/1; returns (B,1,H,W) float labels.

    Exact for every component whose geodesic eccentricity from its largest id is at most H + W (any convex or
    star-shaped component; not a long spiral).
    """
    h, w = keep.shape[-2:]
    ids = torch.arange(1, h * w + 1, device=keep.device, dtype=torch.float32).view(1, 1, h, w)
    lab = ids * keep
    for _ in range(h + w):
        lab = F.max_pool2d(lab, 3, stride=1, padding=1) * keep
    return lab


class LabelGraphs:
    """``propagate_labels`` as CUDA graphs, one per (device, shape), captured at a shape's ``capture_after``-th call,
    at most ``max_graphs`` of them (least recently used first out; each holds about three label maps of its shape).
    Thread-safe: a graph's static input and output are shared, so one replay at a time."""

    def __init__(self, max_graphs: int = 16, capture_after: int = 2) -> None:
        self.max_graphs, self.capture_after = max_graphs, max(1, capture_after)
        self.enabled = os.environ.get("ULTRAREFINER_CUDA_GRAPHS", "1").strip().lower() not in ("0", "false", "no")
        self._graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = OrderedDict()
        self._calls: OrderedDict[tuple, int] = OrderedDict()  # calls per shape not yet captured (bounded)
        self._lock = threading.Lock()

    def usable(self, keep: torch.Tensor) -> bool:
        """CUDA, graphs on, and not inside someone else's capture, compilation or trace."""
        return (self.enabled and keep.is_cuda and not torch.cuda.is_current_stream_capturing()
                and not torch.compiler.is_compiling() and not torch.jit.is_tracing())

    def __call__(self, keep: torch.Tensor) -> torch.Tensor:
        """(B,1,H,W) float 0/1 on CUDA -> the labels of ``propagate_labels`` (a new tensor)."""
        key = (keep.device, tuple(keep.shape), keep.dtype)
        # inference_mode(False): the static tensors must stay writable by later calls made outside inference mode
        with self._lock, torch.cuda.device(keep.device), torch.inference_mode(False), torch.no_grad():
            entry = self._graphs.get(key)
            if entry is None:
                if not self._due(key):
                    return propagate_labels(keep)
                entry = self._capture(key, keep)
                if entry is None:
                    return propagate_labels(keep)
            else:
                self._graphs.move_to_end(key)
            graph, static_in, static_out = entry
            static_in.copy_(keep)
            graph.replay()
            return static_out.clone()

    def _due(self, key: tuple) -> bool:
        """Counts a call of a shape without a graph; True when the shape has come ``capture_after`` times."""
        calls = self._calls.pop(key, 0) + 1
        if calls >= self.capture_after:
            return True
        self._calls[key] = calls
        while len(self._calls) > 64 * self.max_graphs:
            self._calls.popitem(last=False)
        return False

    def _capture(self, key: tuple, keep: torch.Tensor
                 ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor] | None:
        static_in = keep.detach().clone()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), float32_region(keep.device):
                propagate_labels(static_in)  # warm-up outside the capture, as CUDA graphs require
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a data-loader thread pinning memory meanwhile must not invalidate the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"), float32_region(keep.device):
                static_out = propagate_labels(static_in)
            graph.replay()
            agrees = torch.equal(static_out, propagate_labels(keep))  # once per graph: a host sync
        except RuntimeError as e:
            self._disable(f"capturing it failed ({e})")
            return None
        if not agrees:
            self._disable("its first replay disagreed with the plain loop")
            return None
        if len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        entry = (graph, static_in, static_out)
        self._graphs[key] = entry
        return entry

    def _disable(self, why: str) -> None:
        self.enabled = False
        self._graphs.clear()
        warnings.warn(f"component labelling on CUDA runs without a CUDA graph from now on: {why}. It stays correct "
                      "and launches 2 (H + W) kernels per call instead of one graph.", RuntimeWarning, stacklevel=3)


_GRAPHS = LabelGraphs()


def _label_on_host(fg: torch.Tensor) -> bool:
    """CPU tensors are labelled by scipy (not under tracing: a traced graph needs the loop)."""
    return fg.device.type == "cpu" and not torch.jit.is_tracing()


def component_labels(fg: torch.Tensor) -> torch.Tensor:
    """8-connected component labels of a binary mask (no gradient; no host sync on a GPU).

    See the module docstring for how. The ids differ between the CPU (scipy: 1..n) and the device (the largest flat
    index + 1 of each component); the components are the same.

    Arguments:
      fg (torch.Tensor): (B,1,H,W) bool.

    Returns:
      torch.Tensor: (B,1,H,W) float labels, 0 on the background, one id per component.
    """
    if _label_on_host(fg):
        arr = fg.detach().numpy()
        lab = np.stack([ndimage.label(a[0], structure=_EIGHT)[0] for a in arr])[:, None]
        return torch.from_numpy(lab.astype(np.float32))
    keep = fg.float()
    if _GRAPHS.usable(keep):
        return _GRAPHS(keep)
    return propagate_labels(keep)
