"""One training step and one evaluation step for every phase, as MONAI ``iteration_update`` callables.

:class:`TrainStep` owns everything an iteration does around the phase's model, in ``SupervisedTrainer._iteration``'s
order: prepare the batch, train mode, ``zero_grad``, the bf16 autocast (``ultrarefiner.utils.amp.autocast``, the
package's one AMP decision), the loss in float32 (:meth:`TrainStep.compute_loss`), backward, gradient clipping over
all parameters or per optimizer param group, the skip of a step with non-finite gradients (decided on the device,
no host sync with fused Adam/AdamW), the optimizer step and MONAI's ``IterationEvents`` (FORWARD_COMPLETED,
LOSS_COMPLETED, BACKWARD_COMPLETED, MODEL_COMPLETED). A phase overrides only :meth:`TrainStep.forward_and_loss`, as
nnU-Net's trainer variants override one hook. :class:`EvalStep` does the same for evaluation (eval mode, no grad,
autocast, events) around the phase's :meth:`EvalStep.forward`.

The engines run with MONAI's own ``amp=False``: the step's ``amp`` argument decides.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from monai.networks.utils import eval_mode
from monai.utils import CommonKeys as Keys

from ultrarefiner.utils.amp import autocast, check_amp_dtype, float32_region

__all__ = ["EvalStep", "TrainStep", "clip_gradients", "fused_adam_supported", "fused_supported", "gradient_norms",
           "to_float32"]

logger = logging.getLogger(__name__)


def _device(engine: Engine) -> torch.device:
    device = getattr(engine.state, "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


def _groups(optimizer: torch.optim.Optimizer, per_group: bool) -> list[tuple[str, list[torch.Tensor]]]:
    """(name, parameters with a gradient) per param group, or one "all" group; groups without gradients left out."""
    groups = [(g.get("name", str(i)), g["params"]) for i, g in enumerate(optimizer.param_groups)]
    if not per_group:
        groups = [("all", [p for _, params in groups for p in params])]
    out = []
    for name, params in groups:
        with_grad = [p for p in params if p.grad is not None]
        if with_grad:
            out.append((name, with_grad))
    return out


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float,
                   per_group: bool = True) -> dict[str, torch.Tensor]:
    """Clip gradient norms to ``max_norm`` per param group (SAM's gradients cannot shrink TransUNet's and the
    reverse) or over all parameters.

    Returns:
      {group name (or "all"): 0-dim norm before clipping}; groups without gradients are left out.
    """
    return {name: torch.nn.utils.clip_grad_norm_(params, max_norm) for name, params in _groups(optimizer, per_group)}


def gradient_norms(optimizer: torch.optim.Optimizer, per_group: bool = True) -> dict[str, torch.Tensor]:
    """The norms :func:`clip_gradients` reports, without clipping (for the non-finite check alone)."""
    return {name: torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach()) for p in params]))
            for name, params in _groups(optimizer, per_group)}


def to_float32(value: Any) -> Any:
    """Floating tensors (alone or as the values of a mapping) in float32; anything else as is."""
    if torch.is_tensor(value):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, Mapping):
        return {k: to_float32(v) for k, v in value.items()}
    return value


def fused_supported(params: Iterable[torch.Tensor]) -> bool:
    """torch has a fused Adam/AdamW/SGD kernel for every trainable parameter (floating point, on a supported device:
    CUDA, CPU, ...). Fused, a step is one kernel; torch's default on CUDA (``foreach``) is about 200 dispatches for the
    refiner's 132 tensors, its default on a CPU a Python loop over them."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    trainable = [p for p in params if p.requires_grad]
    return bool(trainable) and all(p.is_floating_point() and p.device.type in devices for p in trainable)


fused_adam_supported = fused_supported  # the name the bundles' configs and phase 3 use


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """The optimizer skips its own step when ``optimizer.found_inf`` is 1 (as under ``GradScaler``): fused Adam and
    AdamW, which also leave their step counts unchanged, and fused SGD once its momentum buffers exist (skipping its
    first step, fused SGD would leave the buffers it has just allocated uninitialised: that step reads the flag)."""
    if not all(g.get("fused") for g in optimizer.param_groups):
        return False
    if isinstance(optimizer, torch.optim.Adam):
        return True
    return isinstance(optimizer, torch.optim.SGD) and all(
        g["momentum"] == 0 or all(optimizer.state.get(p, {}).get("momentum_buffer") is not None for p in g["params"])
        for g in optimizer.param_groups)


class TrainStep:
    def __init__(
        self,
        amp: bool = True,
        amp_dtype: torch.dtype = torch.bfloat16,
        max_grad_norm: float | None = None,
        clip_per_group: bool = False,
        skip_nonfinite: bool = False,
        log_interval: int = 100,
    ) -> None:
        """
        ``iteration_update`` of a MONAI ``SupervisedTrainer`` (module docstring); subclasses implement
        :meth:`forward_and_loss`.

        Arguments:
          amp: bf16 autocast of the forward pass on CUDA (``ultrarefiner.utils.amp.autocast``); no effect elsewhere.
          amp_dtype: bfloat16 (float16 would need a GradScaler, which this step does not have).
          max_grad_norm: gradient-norm clipping (None or 0: none).
          clip_per_group: clip (and report) each optimizer param group separately instead of all parameters.
          skip_nonfinite: skip the optimizer step when a gradient norm is NaN/inf; the weights and the optimizer
            state stay as they were. Fused Adam/AdamW, and fused SGD after its first step, skip on the device
            (``found_inf``); any other optimizer costs one host read per step. Skipped steps are counted on the
            device and logged every ``log_interval`` iterations and at the end of each epoch.
          log_interval: iterations between the reads of the skipped-step count (each a host sync).
        """
        self.amp, self.amp_dtype = bool(amp), check_amp_dtype(amp_dtype)
        self.max_grad_norm, self.clip_per_group = max_grad_norm, clip_per_group
        self.skip_nonfinite, self.log_interval = skip_nonfinite, max(1, int(log_interval))
        self._skipped: torch.Tensor | int = 0  # a device count: read back only every log_interval iterations
        self._logged = 0

    # ------------------------------------------------------------------------------------------ the phase's hook
    def forward_and_loss(self, engine: Engine, batch: Any) -> dict[str, Any]:
        """The phase's forward pass (run under the step's autocast) and loss (through :meth:`compute_loss`).

        Arguments:
          engine: the trainer (``network``, ``loss_function``, ``inferer``, ``state``).
          batch: ``engine.prepare_batch``'s output on the device.

        Returns:
          the iteration's output in MONAI keys: ``loss`` (0-dim, with its graph), ``pred``, ``label`` and anything
          else the handlers read (detached).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement forward_and_loss")

    def compute_loss(self, engine: Engine, outputs: Any, *args: Any, **kwargs: Any) -> Any:
        """``engine.loss_function(outputs, *args, **kwargs)`` in float32: outside any autocast, with the network's
        (possibly bf16) ``outputs`` cast to float32 first."""
        with float32_region(_device(engine)):
            return engine.loss_function(to_float32(outputs), *args, **kwargs)

    # ------------------------------------------------------------------------------------------ the iteration
    def __call__(self, engine: Engine, batchdata: Any) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        if getattr(engine, "accumulation_steps", 1) != 1:
            raise ValueError(f"{type(self).__name__} does not implement gradient accumulation; use "
                             "accumulation_steps=1")
        if getattr(engine, "amp", False):
            raise ValueError(f"{type(self).__name__} decides AMP itself (its amp argument): build the trainer with "
                             "amp=False")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        engine.network.train()
        # set_to_none: a parameter without a gradient this step is skipped by the optimizer (no decay, no momentum)
        engine.optimizer.zero_grad(set_to_none=True)
        with autocast(_device(engine), self.amp, self.amp_dtype):
            out = self.forward_and_loss(engine, batch)
        loss = out[Keys.LOSS]
        engine.state.output = {**out, Keys.LOSS: loss.detach()}
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        self._optimizer_step(engine)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _optimizer_step(self, engine: Engine) -> None:
        norms: dict[str, torch.Tensor] = {}
        if self.max_grad_norm:
            norms = clip_gradients(engine.optimizer, self.max_grad_norm, self.clip_per_group)
            engine.state.output.update({("grad_norm" if k == "all" else f"grad_norm_{k}"): v.detach()
                                        for k, v in norms.items()})
        elif self.skip_nonfinite:
            norms = gradient_norms(engine.optimizer, self.clip_per_group)
        if not (self.skip_nonfinite and norms):
            engine.optimizer.step()
            return
        self._gated_step(engine.optimizer, norms)
        state = engine.state
        epoch_end = bool(state.epoch_length) and state.iteration % state.epoch_length == 0
        if state.iteration % self.log_interval == 0 or epoch_end:
            self._log_skips(engine)

    def _gated_step(self, optimizer: torch.optim.Optimizer, norms: Mapping[str, torch.Tensor]) -> None:
        """``optimizer.step()`` unless a norm is non-finite; the decision stays on the device where it can."""
        device = next(iter(norms.values())).device
        nonfinite = ~torch.stack([torch.isfinite(v.detach().to(device)) for v in norms.values()]).all()
        self._skipped = self._skipped + nonfinite.long()
        if _skips_on_device(optimizer):
            optimizer.found_inf = nonfinite.float()  # type: ignore[attr-defined]  # read by Adam's fused step
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
        elif not bool(nonfinite):  # the one host read of a step with a non-fused optimizer
            optimizer.step()

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for non-finite gradients so far (reads the device count: a host sync)."""
        return int(self._skipped)

    def _log_skips(self, engine: Engine) -> None:
        total = self.skipped_steps
        if total > self._logged:
            logger.warning(f"iteration {engine.state.iteration}: {total - self._logged} optimizer step(s) skipped for "
                           f"a non-finite gradient norm since the last report ({total} so far)")
        self._logged = total


class EvalStep:
    def __init__(self, amp: bool = True, amp_dtype: torch.dtype = torch.bfloat16) -> None:
        """
        ``iteration_update`` of a MONAI ``SupervisedEvaluator`` (module docstring); subclasses implement
        :meth:`forward`.

        Arguments:
          amp: bf16 autocast on CUDA (``ultrarefiner.utils.amp.autocast``); no effect elsewhere.
          amp_dtype: autocast dtype (bfloat16).
        """
        self.amp, self.amp_dtype = bool(amp), check_amp_dtype(amp_dtype)

    def forward(self, engine: Engine, batch: Any) -> dict[str, Any]:
        """The phase's forward pass (eval mode, no grad, the step's autocast) on ``engine.prepare_batch``'s output.

        Returns:
          the iteration's output in MONAI keys (``pred``, ``label``, ``image``, ...).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def __call__(self, engine: Engine, batchdata: Any) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        if getattr(engine, "amp", False):
            raise ValueError(f"{type(self).__name__} decides AMP itself (its amp argument): build the evaluator with "
                             "amp=False")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        mode = getattr(engine, "mode", eval_mode)  # SupervisedEvaluator: eval_mode (or train_mode), both no-grad
        with mode(engine.network), autocast(_device(engine), self.amp, self.amp_dtype):
            engine.state.output = self.forward(engine, batch)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
