"""Counting the operations that make the host wait for the accelerator (host syncs).

A CUDA step is fast only while Python runs ahead of the GPU, queueing kernels. Any operation whose *result the host
needs* stops that: the host waits until every queued kernel has run. Such syncs hide in innocent code:
``loss.item()``, ``float(t)``, ``bool(t.any())`` in an ``if``, ``torch.equal``/``allclose``, boolean-mask indexing
``x[mask]`` and ``nonzero``/``unique``/``masked_select`` (their output *shape* depends on the data), and copies of
device tensors to the host (``.cpu()``, ``.numpy()``, ``.tolist()``).

:class:`HostSyncCounter` catches them as they are dispatched (``TorchDispatchMode`` for ATen operators plus a
``TorchFunctionMode`` for the Python-level conversions that never reach ATen on a CPU tensor), so that a test can
bound the number of syncs per training step on any machine:

* on an accelerator the count is exact: ``aten._local_scalar_dense`` (``.item()``, ``bool()``, ``float()``,
  ``int()``), ``aten.equal``/``is_nonzero``/``allclose``, data-dependent-shape operators, and ``_to_copy``/``copy_``
  from a non-CPU tensor to the CPU;
* on a CPU-only machine nothing syncs, and ``.cpu()`` or ``.to(device)`` of a CPU tensor is a no-op, so the counter
  stands in for the GPU by tracking which tensors *would* live on the device: the model's parameters, buffers and
  optimizer state (``device_state``), whatever goes through ``.to(device)``/``.cuda()``, factories called with a
  device (``torch.zeros(3)`` without ``device=`` makes a host tensor), and every output of an operator with such an
  input. Reading a value of one of them counts: the scalar reads and data-dependent
  operators above, and ``.cpu()``/``.numpy()``/``.tolist()``/``__array__`` of it (``.to("cpu")`` cannot be told
  from a same-device ``.to(device)`` on the CPU: it is counted on a GPU only). Host data (a DataLoader's batch
  before it is moved, sizes and flags computed from it) is read freely, as it can be on a GPU machine.

Every ``.to(device)`` counts as a move to the device, also ``.to("cpu")`` of a cache entry stored on the host, so
the stand-in errs towards counting too much: code that passes on the CPU also passes on a GPU.

Moves *to* the device sync too unless they are asynchronous: PyTorch ends a host-to-device copy made with
``non_blocking=False`` (the default of ``.to``/``.cuda``, and what ``torch.tensor(data, device=...)`` and
``torch.as_tensor(host, device=...)`` do) with a stream synchronisation, so the host waits for every kernel queued
before it, e.g. the previous step's backward. Such a move of a host tensor counts ("to device"). A
``non_blocking=True`` copy is asynchronous only from pinned memory, which a CPU cannot make: the loaders
(``pin_memory`` on CUDA) and the embedding cache (pinned entries on CUDA) provide it, and are tested for it apart.

Example::

    with HostSyncCounter(model, optimizer) as syncs:
        step(engine, batch)
    assert syncs.count <= 1, syncs.report()
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["HostSyncCounter", "SyncEvent"]

_aten = torch.ops.aten
# the host reads a value of the tensor
_VALUE_READS = {_aten._local_scalar_dense.default, _aten.equal.default, _aten.is_nonzero.default,
                _aten.allclose.default}
# the output's shape depends on the data: its size has to be read back before the output can be allocated
_DATA_DEPENDENT = {_aten.nonzero.default, _aten.masked_select.default, _aten._unique.default, _aten._unique2.default,
                   _aten.unique_dim.default, _aten.unique_consecutive.default, _aten.unique_dim_consecutive.default,
                   _aten.bincount.default, _aten.repeat_interleave.Tensor, _aten.repeat_interleave.self_Tensor,
                   _aten.argwhere.default}
_BOOL_INDEXED = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}
_COPIES = {_aten._to_copy.default, _aten.copy_.default, _aten.copy.default}
# Python-level conversions of a CPU tensor, invisible to the dispatcher (``.cpu()`` of a CPU tensor returns itself).
# ``.to("cpu")`` is left out: on the CPU it cannot be told from a same-device ``.to(device)`` (counted on a GPU).
_CONVERSIONS = {torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.tolist, torch.Tensor.__array__}
# factories that make a host tensor when called without ``device``
_HOST_FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.as_tensor,
                   torch.linspace, torch.eye, torch.rand, torch.randn, torch.randint, torch.randperm,
                   torch.from_numpy}
_SKIP_FILES = (str(Path(torch.__file__).parent), __file__)


@dataclass(frozen=True)
class SyncEvent:
    """One host sync: what (``op``: the operator or method), why (``kind``) and where (first frame outside torch)."""

    kind: str
    op: str
    where: str


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _optimizer_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """State tensors of an optimizer that live with the parameters: torch's optimizers keep ``step`` on the host
    unless ``capturable`` or ``fused`` (and read it there), so those are left out."""
    out = []
    for group in optimizer.param_groups:
        device_step = group.get("capturable", False) or group.get("fused", False)
        for p in group["params"]:
            out += [v for k, v in optimizer.state.get(p, {}).items()
                    if isinstance(v, torch.Tensor) and (k != "step" or device_step)]
    return out


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()):
        if not frame.filename.startswith(_SKIP_FILES):
            return f"{frame.filename}:{frame.lineno} {frame.name}"
    return "?"


def _non_blocking(func, args: tuple, kwargs: dict) -> bool:
    """The ``non_blocking`` flag of a ``Tensor.to``/``Tensor.cuda`` call, given by keyword or by position."""
    if func is torch.Tensor.cuda:
        return bool(kwargs.get("non_blocking", len(args) > 2 and args[2]))
    return bool(torch._C._nn._parse_to(*args[1:], **kwargs)[2])


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, owner: HostSyncCounter) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in _CONVERSIONS and args and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu"
                and self.owner.made(args[0])):
            self.owner._record("to host", func.__name__)
        moves = func in (torch.Tensor.to, torch.Tensor.cuda) and (
            func is torch.Tensor.cuda or torch._C._nn._parse_to(*args[1:], **kwargs)[0] is not None)
        if moves and not _non_blocking(func, args, kwargs) and not self.owner.made(args[0]):
            self.owner._record("to device", f"{func.__name__} (blocking)")
        elif (func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None
                and not any(self.owner.made(t) for t in _tensors(args))):
            self.owner._record("to device", f"{func.__name__}(device=...)")
        out = func(*args, **kwargs)
        if moves:
            for t in _tensors(out):  # moved to "the device": a no-op on the CPU, so it is marked here
                self.owner._made[t] = True
        elif (func in _HOST_FACTORIES and kwargs.get("device") is None and not _tensors((args, kwargs))
                and torch.get_default_device().type == "cpu"):
            for t in _tensors(out):  # ``torch.arange(n)`` without a device is a host tensor on any machine
                self.owner._made.pop(t, None)
        return out


class HostSyncCounter(TorchDispatchMode):
    """Context manager counting host syncs (module docstring); ``count``, ``events`` and :meth:`report` after it.

    Arguments:
      device_state: modules (parameters and buffers), optimizers (their state) and tensors that live on the device;
        the CPU stand-in counts reads of them like reads of tensors produced in the region.
      stacks: record where each sync happens (``SyncEvent.where``; costs a stack walk per sync).
    """

    def __init__(self, *device_state: torch.nn.Module | torch.optim.Optimizer | torch.Tensor,
                 stacks: bool = True) -> None:
        super().__init__()
        self.stacks = stacks
        self.events: list[SyncEvent] = []
        self._made: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._functions = _FunctionCounter(self)
        for obj in device_state:
            if isinstance(obj, torch.nn.Module):
                tensors = [*obj.parameters(), *obj.buffers()]
            elif isinstance(obj, torch.optim.Optimizer):
                tensors = _optimizer_state(obj)
            else:
                tensors = _tensors(obj)
            for t in tensors:
                self._made[t] = True

    @property
    def count(self) -> int:
        return len(self.events)

    def made(self, t: torch.Tensor) -> bool:
        """Whether ``t`` was produced inside the counted region (stands for a device tensor on the CPU)."""
        return t in self._made

    def report(self) -> str:
        """The count, then one line per distinct (kind, operator, location) with its number of syncs."""
        seen = Counter(self.events)
        lines = [f"{self.count} host sync(s)"] + [f"  {n:4d} x {e.kind:10s} {e.op:34s} {e.where}"
                                                  for e, n in seen.items()]
        return "\n".join(lines)

    def _record(self, kind: str, op: str) -> None:
        self.events.append(SyncEvent(kind, op, _caller() if self.stacks else ""))

    def _counts(self, tensors: list[torch.Tensor]) -> bool:
        """Whether reading these tensors needs the device: one is on an accelerator or (CPU stand-in) made here."""
        return any(t.device.type != "cpu" or self.made(t) for t in tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors((args, kwargs))
        if func in _VALUE_READS and self._counts(inputs):
            self._record("value read", str(func))
        elif func in _DATA_DEPENDENT and self._counts(inputs):
            if not (func in (_aten.repeat_interleave.Tensor, _aten.repeat_interleave.self_Tensor)
                    and kwargs.get("output_size") is not None):
                self._record("data shape", str(func))
        elif func in _BOOL_INDEXED and self._counts(inputs):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
                self._record("data shape", f"{func} (boolean mask)")
        out = func(*args, **kwargs)
        if func in _COPIES:
            src = args[1] if func is not _aten._to_copy.default else args[0]
            dst = out if func is _aten._to_copy.default else args[0]
            if isinstance(src, torch.Tensor) and dst.device.type == "cpu" and (
                    src.device.type != "cpu" or (self.made(src) and not self.made(dst) and dst is not out)):
                self._record("to host", str(func))  # the second case: a device tensor copied into a host one
        # device data in, device data out; a factory (no tensor input) makes a device tensor unless the function
        # mode finds it was called without a device
        if not inputs or any(self.made(t) for t in inputs):
            # on an accelerator, a host output of device inputs (a copy to the CPU) is host data: reading it is free
            on_accelerator = any(t.device.type != "cpu" for t in inputs)
            for t in _tensors(out):
                if not (on_accelerator and t.device.type == "cpu"):
                    self._made[t] = True
        return out

    def _as_subclass(self, inner: Callable) -> Callable:
        """``Tensor.as_subclass`` that keeps a device tensor's mark: the new object (MetaTensor <-> Tensor) aliases
        the same data, but neither mode sees the call."""

        def as_subclass(tensor: torch.Tensor, cls: type) -> torch.Tensor:
            out = inner(tensor, cls)
            if self.made(tensor):
                self._made[out] = True
            return out

        return as_subclass

    def __enter__(self) -> HostSyncCounter:
        self._saved_as_subclass = torch.Tensor.as_subclass
        torch.Tensor.as_subclass = self._as_subclass(self._saved_as_subclass)
        self._functions.__enter__()
        try:
            super().__enter__()
        except BaseException:
            self._functions.__exit__(None, None, None)
            torch.Tensor.as_subclass = self._saved_as_subclass
            raise
        return self

    def __exit__(self, exc_type, exc_value, tb) -> None:
        try:
            super().__exit__(exc_type, exc_value, tb)
        finally:
            self._functions.__exit__(exc_type, exc_value, tb)
            torch.Tensor.as_subclass = self._saved_as_subclass
