"""Phase 3: end-to-end training of ``UltraRefiner`` (TransUNet + SAM refiner) with MONAI's ``SupervisedTrainer``.

- ``build_e2e_optimizer``: one optimizer with two parameter groups, TransUNet (``transunet_lr``, 1e-4) and SAM
  (``sam_lr``, 1e-5), built once with EVERY parameter of each part (frozen ones included: they have no gradient
  and are skipped), so the group layout never changes and optimizer-state resume works (no ``add_param_group``).
- ``E2EPrepareBatch``: a MONAI ``prepare_batch`` turning a batch dict into
  ``(image, target, (), {"sam_image" | "image_embeddings", "original_size"})``.
- ``E2EIteration``: the ``iteration_update`` of ``SupervisedTrainer``: forward under bf16 autocast (CUDA by
  default), ``UltraRefinerLoss``, backward, per-group gradient clipping, a step skipped on non-finite gradients,
  and the usual ``IterationEvents`` (so decollation, postprocessing, metrics and handlers work unchanged).
- ``create_e2e_trainer``: a ``SupervisedTrainer`` wired with the two.

End-to-end training without clipping and with a high SAM learning rate degraded TransUNet in a published
implementation: clipping is on by default and the SAM group gets a 10x lower learning rate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents, PrepareBatch
from monai.utils import CommonKeys as Keys
from torch import nn

__all__ = ["E2EIteration", "E2EPrepareBatch", "build_e2e_optimizer", "clip_gradients", "create_e2e_trainer"]

logger = logging.getLogger(__name__)

_OPTIMIZERS = ("adamw", "adam", "sgd")


def build_e2e_optimizer(
    model: nn.Module,
    transunet_lr: float = 1e-4,
    sam_lr: float = 1e-5,
    weight_decay: float = 1e-4,
    optimizer: str = "adamw",
    train_iou_head: bool | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Optimizer with the param groups "transunet" and "sam" (in that order).

    Arguments:
      model: an ``UltraRefiner`` (``model.transunet``, ``model.refiner``).
      transunet_lr: learning rate of TransUNet.
      sam_lr: learning rate of the SAM refiner (trainable prompt encoder, mask decoder, LoRA adapters).
      weight_decay: decoupled (AdamW) or L2 (Adam/SGD) weight decay of both groups.
      optimizer: ``adamw`` (default), ``adam`` or ``sgd``.
      train_iou_head: train SAM's IoU head (``mask_decoder.iou_prediction_head``). None: only when the segmentation
        loss reaches it (the refiner's ``selection_grad``); pass True when the loss has an IoU term
        (``refined_iou_weight > 0``). Otherwise the head is frozen and left out: a zero-weighted IoU term still
        gives it zero gradients, on which weight decay alone would drift the predictions that evaluation's candidate
        choice and the quality gate read. Frozen parameters stay in their group (a fixed layout for resume); with
        ``requires_grad`` off they never get a gradient, and the optimizer skips them.
      kwargs: further optimizer arguments (betas, momentum, ...). Adam/AdamW default to ``fused=True`` where
        torch has the fused kernel for every parameter's device (CUDA, CPU, ...): one kernel per step instead of a
        Python loop, and :class:`E2EIteration` can skip a non-finite step on the device (``found_inf``), without
        reading the gradient norms back to the host.

    Returns:
      torch.optim.Optimizer whose ``param_groups[i]["name"]`` is "transunet" / "sam".
    """
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
    if train_iou_head is None:
        train_iou_head = bool(getattr(model.refiner, "selection_grad", False))
    if not train_iou_head:
        model.refiner.sam.mask_decoder.iou_prediction_head.requires_grad_(False)
    transunet_params = list(model.transunet.parameters())
    sam_params = list(model.refiner.parameters())
    if {id(p) for p in transunet_params} & {id(p) for p in sam_params}:
        raise ValueError("TransUNet and the refiner share parameters; param groups would overlap")
    groups = [{"params": transunet_params, "lr": transunet_lr, "name": "transunet"},
              {"params": sam_params, "lr": sam_lr, "name": "sam"}]
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer]
    if optimizer != "sgd" and "foreach" not in kwargs:
        kwargs.setdefault("fused", _fused_supported(transunet_params + sam_params))
    opt = cls(groups, lr=transunet_lr, weight_decay=weight_decay, **kwargs)
    n_train = {g["name"]: sum(p.numel() for p in g["params"] if p.requires_grad) for g in opt.param_groups}
    logger.info(f"ultrarefiner optimizer {optimizer}: transunet lr {transunet_lr:g}, sam lr {sam_lr:g}, "
                f"trainable {n_train}")
    return opt


def _fused_supported(params: Sequence[torch.Tensor]) -> bool:
    """torch has a fused Adam kernel for every trainable parameter (floating point, on a supported device)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    trainable = [p for p in params if p.requires_grad]
    return bool(trainable) and all(p.is_floating_point() and p.device.type in devices for p in trainable)


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """The optimizer skips its own step when ``optimizer.found_inf`` is 1 (as under ``GradScaler``): fused Adam and
    AdamW, which also leave their step counts unchanged. (Fused SGD would leave a first momentum buffer unset.)"""
    return isinstance(optimizer, torch.optim.Adam) and all(g.get("fused") for g in optimizer.param_groups)


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float,
                   per_group: bool = True) -> dict[str, torch.Tensor]:
    """Clip gradient norms to ``max_norm``, per param group (default: SAM's gradients cannot shrink TransUNet's
    and the reverse) or over all parameters.

    Returns:
      {group name (or "all"): norm before clipping (0-dim tensor)}; groups without gradients are left out.
    """
    groups = optimizer.param_groups if per_group else [{"params": [p for g in optimizer.param_groups
                                                                   for p in g["params"]], "name": "all"}]
    norms = {}
    for i, group in enumerate(groups):
        params = [p for p in group["params"] if p.grad is not None]
        if params:
            norms[group.get("name", str(i))] = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norms


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def _shared_size(value: object) -> tuple[int, int]:
    """One (H, W) from a collated ``original_size``: (B,2) tensor, [H (B,), W (B,)] list, or one pair."""
    # Python lists: collated sizes are host data, and no tensor value is read back
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(torch.is_tensor(v) for v in value):
        sizes = list(zip(*(torch.as_tensor(v).reshape(-1).tolist() for v in value), strict=True))
    else:
        sizes = [tuple(s) for s in torch.as_tensor(value).reshape(-1, 2).tolist()]
    if len(set(sizes)) > 1:
        raise ValueError(f"the SAM images of a batch must share one original_size, got {[list(s) for s in sizes]}; "
                         "use batch size 1, or feed the SAM images in one common frame (e.g. the 'sam_square' "
                         "geometry)")
    return int(sizes[0][0]), int(sizes[0][1])


def check_unit_range(image: torch.Tensor) -> None:
    """Refuse a TransUNet input above 1 (a 0-255 image). Reads the values: call it on host data (the collated batch
    before it moves to the device); on a device tensor it would be a host sync."""
    if image.is_floating_point() and image.numel() and float(image.detach().amax()) > 1.0 + 1e-3:
        raise ValueError("TransUNet's image must be in [0,1] (max > 1: a 0-255 image?); only sam_image is on "
                         "the 0-255 scale")


class E2EPrepareBatch(PrepareBatch):
    def __init__(
        self,
        image_key: str = "image",
        sam_image_key: str | None = "sam_image",
        label_key: str = "label",
        coarse_label_key: str | None = None,
        embeddings_key: str | None = None,
        original_size_key: str | None = None,
        sam_image_scale: float = 1.0,
        sam_image_to_device: bool = False,
        sam_image_id_key: str | None = "sam_image_id",
    ) -> None:
        """
        Batch dict -> ``(image, target, (), network kwargs)`` for ``UltraRefiner``.

        Arguments:
          image_key: (B,1,224,224) TransUNet input in [0,1].
          sam_image_key: (B,1|3,H,W) SAM image (native, one size per batch); None when ``embeddings_key`` is used.
          label_key: (B,1,H,W) label at the refined output's resolution (the coarse label is derived from it unless
            ``coarse_label_key`` is given).
          coarse_label_key: optional (B,1,224,224) label for the coarse loss.
          embeddings_key: precomputed (B,256,64,64) SAM embeddings (then ``original_size_key`` is required).
          original_size_key: collated native (H, W) per sample (must agree within the batch); None: the SAM image's
            own size. With a SAM image in the encoder frame it gives the native size.
          sam_image_scale: factor to the 0-255 scale (255 for the [0,1] images of ``data.pipeline``).
          sam_image_to_device: move the SAM image to the device. False (default) keeps it on the CPU, where the
            exact SAM/MedSAM resize and the cache key are computed anyway (only cache misses reach the GPU); set
            True with ``image_resize="torch"`` refiners.
          sam_image_id_key: per-sample identities of the SAM images (file digest, frame, flip: ``e2e_setup.SamFramed``
            and the training flips write them), handed to the network as ``image_keys`` for its embedding cache.
            A batch without them is keyed by the image content (a digest per image, hashed on the host).

        Note: the refiner decodes at one original size per batch. With mixed native sizes, train with batch size 1
        or give the SAM images (and labels) in one common frame, e.g. the 1024x1024 ``sam_square`` geometry of
        MedSAM (``original_size_key`` None: the prompts then map the whole 224 mask onto the whole square).
        """
        if sam_image_key is None and embeddings_key is None:
            raise ValueError("give sam_image_key or embeddings_key")
        if embeddings_key is not None and original_size_key is None:
            raise ValueError("embeddings_key needs original_size_key")
        self.image_key, self.sam_image_key, self.label_key = image_key, sam_image_key, label_key
        self.coarse_label_key, self.embeddings_key = coarse_label_key, embeddings_key
        self.original_size_key = original_size_key
        self.sam_image_scale = sam_image_scale
        self.sam_image_to_device = sam_image_to_device
        self.sam_image_id_key = sam_image_id_key

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | dict[str, torch.Tensor], tuple, dict[str, Any]]:
        """
        Returns:
          image (B,1,S,S) on ``device``; target: the label (B,1,H,W), or {"target", "coarse_target"} when
          ``coarse_label_key`` is set; (); {"sam_image" or "image_embeddings", "original_size"} and "image_keys"
          when the batch has ``sam_image_id_key``.
        """
        def to(x: torch.Tensor) -> torch.Tensor:
            return _plain(x).to(device=device, non_blocking=non_blocking, **kwargs)

        missing = [k for k in (self.image_key, self.label_key, self.coarse_label_key,
                               self.embeddings_key or self.sam_image_key, self.original_size_key)
                   if k is not None and k not in batchdata]
        if missing:
            raise KeyError(f"batch lacks key(s) {missing}; it has {sorted(batchdata)}")
        net_kwargs: dict[str, Any] = {"original_size": None}
        if self.original_size_key is not None:
            net_kwargs["original_size"] = _shared_size(batchdata[self.original_size_key])
        if self.embeddings_key is not None:
            net_kwargs["image_embeddings"] = to(batchdata[self.embeddings_key])
        else:
            sam_image = _plain(batchdata[self.sam_image_key])
            if self.sam_image_scale != 1.0:
                sam_image = sam_image.float() * self.sam_image_scale
            net_kwargs["sam_image"] = to(sam_image) if self.sam_image_to_device else sam_image
            ids = batchdata.get(self.sam_image_id_key) if self.sam_image_id_key else None
            if ids is not None:
                scale = "" if self.sam_image_scale == 1.0 else f"-x{self.sam_image_scale:g}"
                net_kwargs["image_keys"] = [f"{i}{scale}" for i in ids]
        image = _plain(batchdata[self.image_key])
        check_unit_range(image)  # every batch, on the host: the network reads its input back on its first call only
        target: torch.Tensor | dict[str, torch.Tensor] = to(batchdata[self.label_key])
        if self.coarse_label_key is not None:
            target = {"target": target, "coarse_target": to(batchdata[self.coarse_label_key])}
        return to(image), target, (), net_kwargs


class E2EIteration:
    def __init__(
        self,
        max_grad_norm: float | None = 1.0,
        clip_per_group: bool = True,
        amp: bool | None = None,
        amp_dtype: torch.dtype = torch.bfloat16,
        skip_nonfinite: bool = True,
        log_interval: int = 100,
    ) -> None:
        """
        ``iteration_update`` of a MONAI ``SupervisedTrainer`` for ``UltraRefiner``.

        Uses the engine's ``prepare_batch`` (``E2EPrepareBatch``), ``network``, ``optimizer`` and ``loss_function``
        (``UltraRefinerLoss``: called as ``loss(outputs, target)`` or ``loss(outputs, **target)`` for a dict
        target; a dict result's "loss" is optimised and its other entries are logged). The trainer's own
        ``amp``/``GradScaler`` are not used: leave ``amp=False`` there.

        Arguments:
          max_grad_norm (float or None): gradient clipping norm (None: no clipping).
          clip_per_group (bool): clip each param group separately (``clip_gradients``).
          amp (bool or None): autocast the forward pass; None: on CUDA devices only.
          amp_dtype (torch.dtype): bfloat16 (float16 would need a GradScaler, not provided).
          skip_nonfinite (bool): skip the optimizer step when a gradient norm is NaN/inf (needs clipping, which
            computes the norms). The weights and the optimizer state stay as they were. With fused Adam/AdamW
            (``build_e2e_optimizer``'s default) the optimizer skips on the device; any other optimizer reads one
            flag back to the host per step. Skipped steps are counted on the device (``skipped_steps`` reads the
            count) and logged every ``log_interval`` iterations and at the end of each epoch.
          log_interval (int): iterations between the reads of the skipped-step count (each a host sync).
        """
        if amp_dtype != torch.bfloat16:
            raise ValueError(f"amp_dtype must be torch.bfloat16 (no GradScaler here), got {amp_dtype}")
        self.max_grad_norm = max_grad_norm
        self.clip_per_group = clip_per_group
        self.amp = amp
        self.amp_dtype = amp_dtype
        self.skip_nonfinite = skip_nonfinite
        self.log_interval = max(1, int(log_interval))
        self._skipped: torch.Tensor | int = 0  # device count: read back only every log_interval iterations
        self._logged = 0

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for non-finite gradients so far (reads the device count: a host sync)."""
        return int(self._skipped)

    def _log_skips(self, engine: SupervisedTrainer) -> None:
        total = self.skipped_steps
        if total > self._logged:
            logger.warning(f"iteration {engine.state.iteration}: {total - self._logged} optimizer step(s) skipped for "
                           f"a non-finite gradient norm since the last report ({total} so far)")
        self._logged = total

    def __call__(self, engine: SupervisedTrainer, batchdata: Any) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        if getattr(engine, "accumulation_steps", 1) != 1:
            raise ValueError("E2EIteration does not implement gradient accumulation; use accumulation_steps=1")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets, args, kwargs = batch if len(batch) == 4 else (*batch, (), {})
        label = targets["target"] if isinstance(targets, Mapping) else targets
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: label}
        device = torch.device(engine.state.device) if engine.state.device is not None else inputs.device
        amp = device.type == "cuda" if self.amp is None else self.amp

        engine.network.train()
        # set_to_none: parameters without a gradient this step are skipped by the optimizer (no decay, no momentum)
        engine.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=self.amp_dtype, enabled=amp):
            outputs = engine.network(inputs, *args, **kwargs)
        engine.state.output[Keys.PRED] = outputs["masks"].detach()
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        # the loss casts to float32 itself; outside autocast so its reductions stay in float32
        losses = (engine.loss_function(outputs, **targets) if isinstance(targets, Mapping)
                  else engine.loss_function(outputs, targets))
        loss = losses["loss"] if isinstance(losses, Mapping) else losses
        engine.state.output[Keys.LOSS] = loss.detach()
        if isinstance(losses, Mapping):
            engine.state.output.update({f"loss_{k}": v.detach() for k, v in losses.items() if k != "loss"})
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        norms = {}
        if self.max_grad_norm is not None:
            norms = clip_gradients(engine.optimizer, self.max_grad_norm, self.clip_per_group)
            engine.state.output.update({f"grad_norm_{k}": v.detach() for k, v in norms.items()})
        if self.skip_nonfinite and norms:
            self._gated_step(engine.optimizer, norms)
            state = engine.state
            if state.iteration % self.log_interval == 0 or (state.epoch_length and
                                                              state.iteration % state.epoch_length == 0):
                self._log_skips(engine)
        else:
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


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


def create_e2e_trainer(
    model: nn.Module,
    loss_function: Callable,
    optimizer: torch.optim.Optimizer,
    train_data_loader: Iterable,
    device: str | torch.device,
    max_epochs: int = 1,
    prepare_batch: PrepareBatch | None = None,
    max_grad_norm: float | None = 1.0,
    amp: bool | None = None,
    epoch_length: int | None = None,
    train_handlers: Sequence | None = None,
    **kwargs: Any,
) -> SupervisedTrainer:
    """``SupervisedTrainer`` with ``E2EPrepareBatch`` (default keys) and ``E2EIteration``; other keyword arguments
    (postprocessing, key_train_metric, decollate, ...) go to ``SupervisedTrainer``."""
    return SupervisedTrainer(
        device=device,
        max_epochs=max_epochs,
        train_data_loader=train_data_loader,
        network=model,
        optimizer=optimizer,
        loss_function=loss_function,
        epoch_length=epoch_length,
        prepare_batch=prepare_batch or E2EPrepareBatch(),
        iteration_update=E2EIteration(max_grad_norm=max_grad_norm, amp=amp),
        train_handlers=train_handlers,
        amp=False,
        **kwargs,
    )
