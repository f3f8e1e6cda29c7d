"""Phase 3: end-to-end training of ``UltraRefiner`` (TransUNet + SAM refiner) with MONAI's ``SupervisedTrainer``.

- ``build_e2e_optimizer``: one optimizer with two parameter groups, TransUNet (``transunet_lr``, 1e-4) and SAM
  (``sam_lr``, 1e-5), built once with EVERY parameter of each part (frozen ones included: they have no gradient
  and are skipped), so the group layout never changes and optimizer-state resume works (no ``add_param_group``).
- ``E2EPrepareBatch``: a MONAI ``prepare_batch`` turning a batch dict into
  ``(image, target, (), {"sam_image" | "image_embeddings", "original_size"})``.
- ``E2ETrainStep``: phase 3's hook of the shared ``TrainStep`` (``engines.training.step``): the network's forward
  and ``UltraRefinerLoss``; the step clips per param group and skips a step on non-finite gradients.
- ``E2EEvalStep``: phase 3's hook of ``EvalStep``: ``ultra_predict.refine`` on a native-frame batch; on an
  uncollated batch of images of different sizes (the bundle's validation), one encoder, TransUNet and decoder pass.

End-to-end training without clipping and with a high SAM learning rate degraded TransUNet in a published
implementation: clipping is on by default and the SAM group gets a 10x lower learning rate.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine
from monai.engines.utils import PrepareBatch
from monai.utils import CommonKeys as Keys
from torch import nn

from ultrarefiner.engines.evaluation.e2e_evaluation import PRED_KEYS
from ultrarefiner.engines.evaluation.engine_fields import is_item_list
from ultrarefiner.engines.inference.ultra_predict import refine, refine_images
from ultrarefiner.engines.training.step import EvalStep, TrainStep, fused_adam_supported
from ultrarefiner.utils.flags import as_flag

__all__ = ["E2EEvalStep", "E2EPrepareBatch", "E2ETrainStep", "build_e2e_optimizer"]

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
        Python loop, and :class:`E2ETrainStep` can skip a non-finite step on the device (``found_inf``), without
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
        kwargs.setdefault("fused", fused_adam_supported(transunet_params + sam_params))
    opt = cls(groups, lr=transunet_lr, weight_decay=weight_decay, **kwargs)
    n_train = {g["name"]: sum(p.numel() for p in g["params"] if p.requires_grad) for g in opt.param_groups}
    logger.info(f"ultrarefiner optimizer {optimizer}: transunet lr {transunet_lr:g}, sam lr {sam_lr:g}, "
                f"trainable {n_train}")
    return opt


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
        sam_frame_key: str | None = "sam_frame",
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
          sam_frame_key: uncollated batches only: the native SAM images already resized into the encoder frame by
            the data workers (``e2e_setup.SamFramed``'s ``frame_key``), used when every item has one.

        Note: a collated batch decodes at one original size. With mixed native sizes, train with batch size 1
        or give the SAM images (and labels) in one common frame, e.g. the 1024x1024 ``sam_square`` geometry of
        MedSAM (``original_size_key`` None: the prompts then map the whole 224 mask onto the whole square). For
        evaluation, an uncollated batch (a list of item dicts) takes native images of any sizes (``__call__``).
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
        self.sam_frame_key = sam_frame_key

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
            return x.as_subclass(torch.Tensor).to(device=device, non_blocking=non_blocking, **kwargs)

        if is_item_list(batchdata):
            return self._prepare_items(batchdata, to)
        missing = self._missing(batchdata)
        if missing:
            raise KeyError(f"batch lacks key(s) {missing}; it has {sorted(batchdata)}")
        net_kwargs: dict[str, Any] = {"original_size": None}
        if self.original_size_key is not None:
            net_kwargs["original_size"] = _shared_size(batchdata[self.original_size_key])
        if self.embeddings_key is not None:
            net_kwargs["image_embeddings"] = to(batchdata[self.embeddings_key])
        else:
            sam_image = self._sam_image(batchdata)
            net_kwargs["sam_image"] = to(sam_image) if self.sam_image_to_device else sam_image
            ids = batchdata.get(self.sam_image_id_key) if self.sam_image_id_key else None
            if ids is not None:
                net_kwargs["image_keys"] = self._cache_keys(ids)
        image = batchdata[self.image_key].as_subclass(torch.Tensor)
        check_unit_range(image)  # every batch, on the host: the network reads its input back on its first call only
        target: torch.Tensor | dict[str, torch.Tensor] = to(batchdata[self.label_key])
        if self.coarse_label_key is not None:
            target = {"target": target, "coarse_target": to(batchdata[self.coarse_label_key])}
        return to(image), target, (), net_kwargs

    def _missing(self, item: Mapping[str, Any]) -> list[str]:
        return [k for k in (self.image_key, self.label_key, self.coarse_label_key,
                            self.embeddings_key or self.sam_image_key, self.original_size_key)
                if k is not None and k not in item]

    def _sam_image(self, item: Mapping[str, Any]) -> torch.Tensor:
        sam_image = item[self.sam_image_key].as_subclass(torch.Tensor)
        return sam_image.float() * self.sam_image_scale if self.sam_image_scale != 1.0 else sam_image

    def _cache_keys(self, ids: Sequence[str]) -> list[str]:
        """The SAM images' identities as cache keys: a rescaled image is another input, with its own key."""
        scale = "" if self.sam_image_scale == 1.0 else f"-x{self.sam_image_scale:g}"
        return [f"{i}{scale}" for i in ids]

    def _prepare_items(self, items: Sequence[Mapping[str, Any]], to: Any
                       ) -> tuple[torch.Tensor, list[torch.Tensor], tuple, dict[str, Any]]:
        """An uncollated batch (``monai.data.utils.no_collation``: images of different native sizes, for
        ``E2EEvalStep``) -> (image (B,1,S,S) on the device, [label (1,H_i,W_i)] on the device, (),
        {"sam_images": [(1|3,H_i,W_i)] on the host, "original_sizes": [(H_i, W_i)], "image_keys": [str] or None,
        "frames": the workers' encoder frames [(1,h'_i,w'_i)] or None})."""
        if self.embeddings_key is not None or self.coarse_label_key is not None:
            raise ValueError("an uncollated batch takes native SAM images and one label (evaluation): collate it "
                             "to use embeddings_key or coarse_label_key")
        for i, item in enumerate(items):
            missing = self._missing(item)
            if missing:
                raise KeyError(f"batch item {i} lacks key(s) {missing}; it has {sorted(item)}")
        image = torch.stack([item[self.image_key].as_subclass(torch.Tensor) for item in items])
        check_unit_range(image)
        sam_images = [self._sam_image(item) for item in items]
        if self.original_size_key is not None:
            sizes = [tuple(int(v) for v in torch.as_tensor(item[self.original_size_key]).reshape(2).tolist())
                     for item in items]
        else:
            sizes = [tuple(int(v) for v in im.shape[-2:]) for im in sam_images]
        for i, (im, size) in enumerate(zip(sam_images, sizes, strict=True)):
            if tuple(im.shape[-2:]) != size:
                raise ValueError(f"batch item {i}: an uncollated batch takes native SAM images, got {tuple(im.shape)} "
                                 f"for original_size {size}")
        ids = [item.get(self.sam_image_id_key) for item in items] if self.sam_image_id_key else []
        keys = self._cache_keys(ids) if ids and all(i is not None for i in ids) else None
        frames = None
        if self.sam_frame_key and self.sam_image_scale == 1.0 and all(self.sam_frame_key in it for it in items):
            frames = [item[self.sam_frame_key].as_subclass(torch.Tensor) for item in items]
        if self.sam_image_to_device:
            sam_images = [to(im) for im in sam_images]
        labels = [to(item[self.label_key]) for item in items]
        return to(image), labels, (), {"sam_images": sam_images, "original_sizes": sizes, "image_keys": keys,
                                       "frames": frames}


class E2ETrainStep(TrainStep):
    def __init__(
        self,
        max_grad_norm: float | None = 1.0,
        clip_per_group: bool = True,
        amp: bool = True,
        amp_dtype: torch.dtype = torch.bfloat16,
        skip_nonfinite: bool = True,
        log_interval: int = 100,
    ) -> None:
        """
        Phase 3's hook of :class:`TrainStep`: the ``iteration_update`` of a ``SupervisedTrainer`` over
        ``UltraRefiner``, with ``E2EPrepareBatch`` and ``UltraRefinerLoss`` (called as ``loss(outputs, target)``,
        or ``loss(outputs, **target)`` for a dict target; a dict result's "loss" is optimised and its other entries
        are logged as ``loss_<name>``). Output also ``grad_norm_<group>`` per param group when clipping.

        Arguments:
          max_grad_norm: gradient clipping norm (None: no clipping).
          clip_per_group: clip each param group (TransUNet, SAM) separately.
          amp, amp_dtype, skip_nonfinite, log_interval: see :class:`TrainStep` (with fused Adam/AdamW,
            ``build_e2e_optimizer``'s default, a non-finite step is skipped on the device).
        """
        super().__init__(amp, amp_dtype, max_grad_norm, clip_per_group, skip_nonfinite, log_interval)

    def forward_and_loss(self, engine: Engine, batch: Any) -> dict[str, Any]:
        inputs, targets, args, kwargs = batch if len(batch) == 4 else (*batch, (), {})
        outputs = engine.network(inputs, *args, **kwargs)
        losses = (self.compute_loss(engine, outputs, **targets) if isinstance(targets, Mapping)
                  else self.compute_loss(engine, outputs, targets))
        label = targets["target"] if isinstance(targets, Mapping) else targets
        result = {Keys.IMAGE: inputs, Keys.LABEL: label, Keys.PRED: outputs["masks"].detach()}
        if isinstance(losses, Mapping):
            result.update({f"loss_{k}": v.detach() for k, v in losses.items() if k != "loss"})
            losses = losses["loss"]
        result[Keys.LOSS] = losses
        return result



class E2EEvalStep(EvalStep):
    def __init__(
        self,
        iterations: int = 0,
        quality_gate: bool = False,
        gate_threshold: float = 0.5,
        amp: bool = True,
        amp_dtype: torch.dtype = torch.bfloat16,
        image_key: str = "image_native",
    ) -> None:
        """
        Phase 3's hook of :class:`EvalStep`: the ``iteration_update`` of a ``SupervisedEvaluator`` over
        ``UltraRefiner`` in the native frame (train.json's ``validate#prepare_batch``). Takes a collated batch of
        one image size (batch 1, then MONAI decollates the output), or an uncollated list of items of any sizes
        (``monai.data.utils.no_collation``, the evaluator's ``decollate`` off: the bundle's validation), for which
        it returns the per-item outputs itself.

        Output: ``pred`` (final refined probability), ``coarse``, ``refined`` (and ``iterative``/``gated`` when
        enabled, ``gate``, ``best_pass``), ``label`` (native), ``image`` (native, [0,1]) and ``pred_iou``.

        Arguments:
          iterations, quality_gate, gate_threshold: see ``ultra_predict.refine``.
          amp, amp_dtype: see :class:`EvalStep`.
          image_key: key of the raw batch's native image in [0,1], output as ``image`` (overlays).
        """
        super().__init__(amp, amp_dtype)
        self.iterations, self.gate_threshold = int(iterations), gate_threshold
        self.quality_gate = as_flag(quality_gate, "quality_gate")
        self.image_key = image_key

    def forward(self, engine: Engine, batch: Any) -> dict[str, Any] | list[dict[str, Any]]:
        inputs, label, _, kwargs = batch
        if "sam_images" in kwargs:  # uncollated: per image, what a batch-1 evaluator would have decollated
            per_image = refine_images(engine.network, inputs, kwargs["sam_images"], kwargs["original_sizes"],
                                      self.iterations, self.quality_gate, self.gate_threshold,
                                      kwargs.get("image_keys"), kwargs.get("frames"))
            return [_eval_output(item.get(self.image_key, inputs[i]), y, out)
                    for i, (item, y, out) in enumerate(zip(engine.state.batch, label, per_image, strict=True))]
        out = refine(engine.network, inputs, kwargs.get("sam_image"), kwargs.get("original_size"),
                     self.iterations, self.quality_gate, self.gate_threshold, kwargs.get("image_keys"))
        # the raw batch (ignite's state.batch) holds the native image
        return _eval_output(engine.state.batch.get(self.image_key, inputs), label, out)


def _eval_output(image: Any, label: Any, out: Mapping[str, Any]) -> dict[str, Any]:
    """``E2EEvalStep``'s output from ``refine``'s (one batch, or one image of ``refine_images``)."""
    output = {Keys.IMAGE: image, Keys.LABEL: label, Keys.PRED: out["final"], "pred_iou": out["pred_iou"]}
    return {**output, **{k: out[k] for k in (*PRED_KEYS, "gate", "best_pass") if k in out}}
