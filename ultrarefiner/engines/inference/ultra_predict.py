"""UltraRefiner inference: coarse and refined masks, optional iterative refinement and quality gate, outputs on disk.

``refine`` is the one prediction routine of phase 3 (validation, ``evaluate.json``, ``inference.json`` and
``python -m ultrarefiner predict``; ``refine_images`` and ``UltraPredictor`` run it on batches of images of different
sizes, with the same result per image):

1. TransUNet's coarse probability (224) prompts the refiner on the native image -> refined mask, and SAM's predicted
   IoU of the chosen candidate (``pred_iou``).
2. Iterative refinement (``iterations`` N > 0): the refined probability is fed back as the prompt (points, box and
   mask prompt re-derived from it) N times, reusing the image embedding; per image the pass with the highest
   predicted IoU is kept (the first refinement included), so iterating never lowers the predicted IoU.
3. Quality gate (``quality_gate``): SAM's IoU head estimates the IoU of its mask with the lesion. When that estimate
   is below ``gate_threshold`` (default 0.5: the refiner expects to miss at least half the lesion-or-prediction
   union), the refinement is not trusted and the coarse TransUNet mask is kept for that image. The rule uses the
   refiner's own confidence only; the coarse mask has no IoU estimate of its own.

Both extras are off by default: whether they help must be measured on real data (``evaluate.json`` reports them
next to the plain refinement).

Inference (``inference.json``, ``python -m ultrarefiner predict``) is a MONAI ``SupervisedEvaluator``: ``InputImages``
reads the images in data workers, ``UltraPredictor`` is its iteration (the per-image logic, on batches of images of
any sizes), writer transforms in its ``postprocessing`` save the masks (``SaveImaged``) and ``PredictionReport``
writes the report. Output layout (every file written atomically)::

    <output_dir>/coarse/<name>.png     TransUNet mask at native size (0/255)
    <output_dir>/refined/<name>.png    final refined mask (after iterations / gate when enabled)
    <output_dir>/overlays/<name>.png   image with the coarse (blue) and refined (red) contours
    <output_dir>/nifti/<name>_{coarse,refined}.nii.gz   on request
    <output_dir>/predictions.json      settings, per image: size, predicted IoU, chosen pass, gated; skipped files
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform

# the writers lived here until 0.1.3 of the bundle: configs that name them here keep working
from ultrarefiner.data.image_writers import AtomicNibabelWriter, AtomicPILWriter
from ultrarefiner.data.imaging import folder_image_files, read_image
from ultrarefiner.engines.evaluation.contours import COARSE_COLOUR, REFINED_COLOUR, overlay_coarse_refined
from ultrarefiner.errors import BadInputError, UltraRefinerError
from ultrarefiner.utils.amp import autocast
from ultrarefiner.utils.background_writes import BackgroundWrites
from ultrarefiner.utils.flags import as_flag
from ultrarefiner.utils.grouping import index_groups, take_rows
from ultrarefiner.utils.io import atomic_write, write_json
from ultrarefiner.utils.transfer import to_device, to_host

__all__ = [
    "COARSE_COLOUR",
    "REFINED_COLOUR",
    "AtomicNibabelWriter",
    "AtomicPILWriter",
    "CoarseRefinedOverlayd",
    "InputImages",
    "PredictionReport",
    "UltraPredictor",
    "input_datalist",
    "list_inputs",
    "overlay_coarse_refined",
    "refine",
    "refine_coarse",
    "refine_images",
    "refine_sizes",
    "run_inference",
    "selected_iou",
    "transunet_transform",
]

logger = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------------------ core
def selected_iou(outputs: dict) -> torch.Tensor:
    """(B,) SAM's predicted IoU of the selected candidate (eval mode: the argmax candidate)."""
    return (outputs["iou_predictions"].float() * outputs["selection_weights"].float()).sum(dim=1)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


@torch.no_grad()
def refine(
    model: torch.nn.Module,
    image: torch.Tensor,
    sam_image: torch.Tensor,
    original_size: Sequence[int] | None = None,
    iterations: int = 0,
    quality_gate: bool = False,
    gate_threshold: float = 0.5,
    image_keys: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """
    Coarse and refined lesion probabilities at the SAM image's frame (module docstring).

    Arguments:
      model (UltraRefiner): in eval mode (or DDP-wrapped).
      image (torch.Tensor): (B,1,S,S) TransUNet input in [0,1].
      sam_image (torch.Tensor): (B,1|3,H,W) 0-255 native image (or encoder frame with ``original_size``).
      original_size: (H, W) shared by the batch; None: the SAM image's own size.
      iterations (int): extra passes with the refined mask as the prompt (0: off).
      quality_gate (bool): keep the coarse mask where the predicted IoU is below ``gate_threshold``.
      gate_threshold (float): see ``quality_gate``.
      image_keys: the SAM images' embedding-cache keys (``UltraRefiner.encode_image``); None: content digests.

    Returns:
      dict of float32 tensors: "coarse" (B,1,H,W) TransUNet probability resized to (H, W); "refined" (B,1,H,W)
      first refinement; "pred_iou" (B,) its predicted IoU; with iterations: "iterative" (B,1,H,W) best pass,
      "iterative_iou" (B,), "best_pass" (B,) (0 = first refinement); with the gate: "gated" (B,1,H,W), "gate" (B,)
      1 where the coarse mask was kept; always "final" (B,1,H,W) (gated, else iterative, else refined) and
      "final_iou" (B,) (the IoU estimate of the chosen refinement, before the gate).
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    net = _unwrap(model)
    net.eval()
    if original_size is None:
        original_size = tuple(int(s) for s in sam_image.shape[-2:])
    size = (int(original_size[0]), int(original_size[1]))
    embeddings = net.encode_image(sam_image, size, image_keys)
    out = net(image, image_embeddings=embeddings.float(), original_size=size)
    return _refine_after(net, out, embeddings, size, iterations, quality_gate, gate_threshold)


@torch.no_grad()
def refine_images(
    model: torch.nn.Module,
    image: torch.Tensor,
    sam_images: Sequence[torch.Tensor],
    original_sizes: Sequence[Sequence[int]],
    iterations: int = 0,
    quality_gate: bool = False,
    gate_threshold: float = 0.5,
    image_keys: Sequence[str] | None = None,
    frames: Sequence[torch.Tensor] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """
    ``refine`` for a batch of native images of different sizes: one encoder pass (``UltraRefiner.encode_images``;
    its cache misses when caching), one TransUNet pass, and one prompt and decoder pass (``refine_sizes``; one more
    per iteration).

    Arguments:
      model (UltraRefiner): in eval mode (or DDP-wrapped).
      image (torch.Tensor): (B,1,S,S) TransUNet input in [0,1].
      sam_images: B (1|3,H_i,W_i) native 0-255 images.
      original_sizes: B (H_i, W_i), the SAM images' sizes.
      iterations, quality_gate, gate_threshold, image_keys: see ``refine``.
      frames: the SAM images already in the encoder frame (``UltraRefiner.encode_images``); None: resized here.

    Returns:
      per image, its values of ``refine`` on that image alone: maps (1,H_i,W_i), scalars ().
    """
    net = _unwrap(model)
    net.eval()
    embeddings = net.encode_images(sam_images, image_keys, frames)
    coarse_probs = net.coarse_probability(net.transunet(image))
    return refine_sizes(net, coarse_probs, embeddings, original_sizes, iterations, quality_gate, gate_threshold)


@torch.no_grad()
def refine_coarse(
    model: torch.nn.Module,
    coarse_probs: torch.Tensor,
    image_embeddings: torch.Tensor,
    original_size: Sequence[int],
    iterations: int = 0,
    quality_gate: bool = False,
    gate_threshold: float = 0.5,
) -> dict[str, torch.Tensor]:
    """``refine`` from TransUNet's foreground probability (``UltraRefiner.coarse_probability``, (B,1,S,S)) and the
    SAM image embeddings of images of one size (``refine_sizes`` takes several sizes).
    Same outputs as ``refine``."""
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    net = _unwrap(model)
    size = (int(original_size[0]), int(original_size[1]))
    out = net.refiner(coarse=coarse_probs, image_embeddings=image_embeddings.float(), original_size=size)
    return _refine_after(net, {"coarse_probs": coarse_probs, **out}, image_embeddings, size, iterations,
                         quality_gate, gate_threshold)


@torch.no_grad()
def refine_sizes(
    model: torch.nn.Module,
    coarse_probs: torch.Tensor,
    image_embeddings: torch.Tensor,
    original_sizes: Sequence[Sequence[int]],
    iterations: int = 0,
    quality_gate: bool = False,
    gate_threshold: float = 0.5,
) -> list[dict[str, torch.Tensor]]:
    """``refine_coarse`` for a batch of images of any sizes: one prompt and decoder pass for the whole batch
    (``SAMRefiner.forward_sizes``), then, per iteration, one more with each image's refined mask at its own size as
    the prompt (``SAMRefiner.forward_items``); only the resizes run per image size.

    Returns:
      per image, the values of ``refine_coarse`` on that image alone: "coarse", "refined", "final" (1,H,W),
      "pred_iou" and "final_iou" (); with iterations "iterative" (1,H,W), "iterative_iou" and "best_pass" ();
      with the gate "gated" (1,H,W) and "gate" ().
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    net = _unwrap(model)
    sizes = [(int(h), int(w)) for h, w in original_sizes]
    embeddings = image_embeddings.float()
    out = net.refiner.forward_sizes(embeddings, coarse_probs, sizes)
    coarse: list[torch.Tensor] = [torch.empty(0)] * len(sizes)
    for size, idx in index_groups(sizes).items():
        framed = F.interpolate(take_rows(coarse_probs, idx).float(), size, mode="bilinear", align_corners=False)
        for j, i in enumerate(idx):
            coarse[i] = framed[j].clamp(0, 1)
    return _refine_passes(net, embeddings, coarse, [m.float() for m in out["masks"]], selected_iou(out), sizes,
                          iterations, quality_gate, gate_threshold)


def _refine_passes(net: torch.nn.Module, embeddings: torch.Tensor, coarse: list[torch.Tensor],
                   logits: list[torch.Tensor], iou: torch.Tensor, sizes: list[tuple[int, int]], iterations: int,
                   quality_gate: bool, gate_threshold: float) -> list[dict[str, torch.Tensor]]:
    """Per image, the outputs of ``refine`` from its first pass (``coarse`` (1,H,W) at its size, selected
    ``logits`` (1,H,W), ``iou`` (B,)): the iterations, one decoder pass for the batch each
    (``SAMRefiner.forward_items``), keeping the refinement SAM scores highest so far, then the gate."""
    best_iou, best_logits = iou, logits
    best_pass = torch.zeros_like(iou)
    prompts = [torch.sigmoid(m) for m in logits]
    for k in range(1, iterations + 1):
        step = net.refiner.forward_items(embeddings, prompts, sizes)
        step_iou = selected_iou(step)
        step_logits = [m.float() for m in step["masks"]]
        better = step_iou > best_iou
        best_logits = [torch.where(better[i], s, b) for i, (s, b) in enumerate(zip(step_logits, best_logits,
                                                                                   strict=True))]
        best_iou = torch.where(better, step_iou, best_iou)
        best_pass = torch.where(better, torch.full_like(best_pass, k), best_pass)
        prompts = [torch.sigmoid(m) for m in step_logits]
    results = []
    for i in range(len(sizes)):
        final = torch.sigmoid(best_logits[i])
        r = {"coarse": coarse[i], "refined": torch.sigmoid(logits[i]), "pred_iou": iou[i]}
        if iterations:
            r.update(iterative=final, iterative_iou=best_iou[i], best_pass=best_pass[i])
        if quality_gate:
            keep_coarse = best_iou[i] < gate_threshold
            final = torch.where(keep_coarse, coarse[i], final)
            r.update(gated=final, gate=keep_coarse.float())
        results.append({**r, "final": final, "final_iou": best_iou[i]})
    return results


def _refine_after(net: torch.nn.Module, out: dict, embeddings: torch.Tensor, size: tuple[int, int], iterations: int,
                  quality_gate: bool, gate_threshold: float) -> dict[str, torch.Tensor]:
    """The outputs of ``refine`` from the first pass ``out`` over images of one size, batched: ``_refine_passes``
    per image, stacked ((B,1,H,W) maps, (B,) scalars)."""
    coarse = F.interpolate(out["coarse_probs"].float(), size, mode="bilinear", align_corners=False).clamp(0, 1)
    per_image = _refine_passes(net, embeddings.float(), list(coarse), list(out["masks"].float()), selected_iou(out),
                               [size] * coarse.shape[0], iterations, quality_gate, gate_threshold)
    return {k: torch.stack([r[k] for r in per_image]) for k in per_image[0]}


# ------------------------------------------------------------------------------------------------ pictures
# ------------------------------------------------------------------------------------------------ inputs
def list_inputs(source: str | os.PathLike | Iterable[str | os.PathLike],
                exclude: str | Iterable[str] | None = None) -> list[Path]:
    """One image file, a folder (``imaging.folder_image_files``: its image files, hidden ones left out, sorted, not
    recursive, those matching the file-name patterns ``exclude`` left out) or a list of files."""
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            return folder_image_files(p, "input", exclude)
        if not p.exists():
            raise BadInputError(p, "input not found")
        return [p]
    return [Path(s) for s in source]


def _output_names(paths: Sequence[Path]) -> list[str]:
    """File stems, made unique (``a.png`` and ``a.jpg`` -> ``a_png``, ``a_jpg``)."""
    stems = [p.stem for p in paths]
    dup = {s for s in stems if stems.count(s) > 1}
    names = [f"{p.stem}_{p.suffix.lstrip('.').lower()}" if p.stem in dup else p.stem for p in paths]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out


def input_datalist(source: str | os.PathLike | Iterable[str | os.PathLike],
                   exclude: str | Iterable[str] | None = None) -> list[dict[str, str]]:
    """``[{"image": path, "name": output name}]`` of ``list_inputs(source, exclude)``: the outputs of an image are
    named ``<name>.png`` (its stem, made unique)."""
    paths = list_inputs(source, exclude)
    return [{"image": str(p), "name": n} for p, n in zip(paths, _output_names(paths), strict=True)]


def transunet_transform(img_size: int) -> Any:
    """The TransUNet input of a (1, H, W) image: min-max to [0, 1], anti-aliased bilinear resize to img_size (as the
    evaluation pipeline; ``inference.json`` writes the same chain out as its ``preprocessing``)."""
    from monai.transforms import Compose, Resize, ScaleIntensity

    return Compose([ScaleIntensity(), Resize((img_size, img_size), mode="bilinear", anti_aliasing=True)])


class InputImages(torch.utils.data.Dataset):
    def __init__(self, data: Sequence[dict[str, str]], transform: Any, geometry: Any, tta: str = "none") -> None:
        """
        Input images read in data workers, for ``UltraPredictor``: per item its TransUNet input and its SAM encoder
        frame(s) (the flipped image's too with flip TTA). An unreadable file comes back as an item with a "reason"
        instead of the arrays; it never stops the run.

        Arguments:
          data: ``input_datalist`` items {"image": path, "name": output name}.
          transform: (1, H, W) float image -> (1, S, S) TransUNet input (``preprocessing`` of inference.json).
          geometry (SamGeometry): the refiner's, for its encoder frame.
          tta: ``none`` or ``flip``.

        Items: {"index", "image", "name"} plus "pixels" (H, W) uint8, "small" (1, S, S) float32, "frame" (h, w)
        uint8 or None (and "small_flipped", "frame_flipped" with flip TTA); or plus "reason".
        """
        self.data, self.transform, self.geometry, self.tta = list(data), transform, geometry, tta == "flip"

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"index": index, **self.data[index]}
        try:
            image = read_image(item["image"])
            if min(image.shape) < 2:
                return {**item, "reason": f"image too small {image.shape}"}
            return {**item, **self.sample(image)}
        except BadInputError as e:
            return {**item, "reason": e.reason}
        except Exception as e:  # a broken file must not stop the run
            return {**item, "reason": f"{type(e).__name__}: {e}"}

    def sample(self, image: np.ndarray) -> dict[str, Any]:
        """The arrays of one (H, W) uint8 image."""
        from ultrarefiner.engines.inference.refine_folder import encoder_frame

        native = torch.from_numpy(np.array(image, dtype=np.uint8))[None]  # (1, H, W) uint8, own copy
        small = torch.as_tensor(self.transform(native.float()), dtype=torch.float32).clamp(0, 1)
        out = {"pixels": native[0].numpy(), "small": small.as_subclass(torch.Tensor),
               "frame": encoder_frame(self.geometry, native[0].numpy())}
        if self.tta:  # the flipped pass is the whole pipeline on the flipped image
            flipped = np.ascontiguousarray(np.fliplr(native[0].numpy()))
            out["frame_flipped"] = encoder_frame(self.geometry, flipped)
            small = self.transform(torch.from_numpy(flipped)[None].float())
            out["small_flipped"] = torch.as_tensor(small, dtype=torch.float32).clamp(0, 1).as_subclass(torch.Tensor)
        return out

    def size_batches(self, batch_size: int) -> list[list[int]]:
        """Index batches (a ``batch_sampler``) in (size, input order) order: equal sizes share the refiner's decoder
        pass. A file whose header cannot be read goes last; its worker reports why."""
        from ultrarefiner.data.imaging import image_size

        def key(i: int) -> tuple[int, int, int]:
            try:
                return (*image_size(self.data[i]["image"]), i)
            except BadInputError:
                return (1 << 30, 1 << 30, i)

        order = sorted(range(len(self.data)), key=key)
        return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


# ------------------------------------------------------------------------------------------------ predictor
class UltraPredictor:
    def __init__(
        self,
        network: torch.nn.Module,
        device: torch.device | str = "cpu",
        img_size: int | None = None,
        iterations: int = 0,
        quality_gate: bool = False,
        gate_threshold: float = 0.5,
        amp: bool = False,
        batch_size: int | None = None,
        num_workers: int = 2,
        tta: str = "none",
        optimize: str | None = "auto",
    ) -> None:
        """
        Coarse and refined lesion probabilities of batches of input images; the iteration of the inference
        ``SupervisedEvaluator`` of ``inference.json`` (``iteration_update``), whose writer transforms save them.

        Images of any sizes share a batch: TransUNet sees them at its input size and SAM's image encoder in its
        own frame (data workers resize them); the refiner's prompts and decoder run once for the batch (and once
        more per iteration), and outputs are resized back per image size. Results equal batch 1 up to float
        rounding.

        Arguments:
          network (UltraRefiner): with its weights loaded.
          device: where the network runs.
          img_size (int or None): TransUNet input side of ``predict_array``; None: ``network.transunet.img_size``.
          iterations, quality_gate, gate_threshold: see ``refine`` (off by default).
          amp (bool): bfloat16 autocast (CUDA only).
          batch_size (int or None): images per forward pass; None: 8 on CUDA, 1 on the CPU.
          num_workers (int): data workers reading and resizing the images.
          tta (str): ``none`` or ``flip``: mean of the pipeline's probabilities (coarse and refined) on the image
            and on its left-right flip (flipped back); with iterations or the gate each pass applies them, and the
            image counts as gated when either pass kept its coarse mask.
          optimize (str): speed option of SAM's image encoder (``fast_inference.fast_encoder``) and of TransUNet
            (``fast_inference.fast_segmenter``: bf16 and channels_last only).
        """
        from ultrarefiner.commands.args import check_range
        from ultrarefiner.engines.inference.fast_inference import (
            check_tta,
            default_batch_size,
            fast_encoder,
            fast_segmenter,
            resolve_optimize,
        )

        self.network = network.to(device).eval()
        self.device = torch.device(device)
        self.transform = transunet_transform(img_size or getattr(_unwrap(network).transunet, "img_size", 224))
        self.iterations, self.gate_threshold = int(iterations), gate_threshold
        self.quality_gate = as_flag(quality_gate, "quality_gate")
        self.amp = as_flag(amp, "amp")
        batch_size = default_batch_size(self.device) if batch_size is None else batch_size
        self.batch_size = check_range(batch_size, "batch_size", 1, 1024, integer=True)
        self.num_workers = check_range(num_workers, "num_workers", 0, 64, integer=True)
        self.tta = check_tta(tta)
        self.optimize = resolve_optimize(optimize, self.device)
        self.refiner = _unwrap(network).refiner
        self.encoder = fast_encoder(self.refiner.sam.image_encoder, self.device, self.optimize)
        self.coarse_net = fast_segmenter(_unwrap(network).transunet, self.device, self.optimize)
        self.dataset = InputImages([], self.transform, self.refiner.geometry, self.tta)

    def settings(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "quality_gate": self.quality_gate,
                "gate_threshold": self.gate_threshold if self.quality_gate else None, "tta": self.tta}

    def predict_array(self, image: np.ndarray) -> dict[str, Any]:
        """(H, W) uint8 image -> dict of numpy arrays (coarse/refined probabilities, (H, W)) and scalars."""
        return self.predict_batch([self.dataset.sample(image)])[0]

    @torch.no_grad()  # not inference_mode: jit_freeze traces the encoder on its first call
    def predict_batch(self, samples: Sequence[dict]) -> list[dict[str, Any]]:
        """Predictions of ``InputImages`` samples (images of any sizes): one TransUNet and one encoder pass for the
        batch (and its flips with TTA), then the refiner's prompts and decoder (once, and once more per iteration:
        ``refine_sizes``); results as ``predict_array``."""
        from ultrarefiner.engines.inference.fast_inference import flip_tta_mean
        from ultrarefiner.engines.inference.refine_folder import encoder_batch

        if not samples:
            return []
        dev, net = self.device, _unwrap(self.network)
        flips = (False, True) if self.tta == "flip" else (False,)
        passes = [(s, f) for f in flips for s in samples]
        small = to_device(torch.stack([s["small_flipped" if f else "small"] for s, f in passes]), dev)
        with autocast(dev, self.amp):
            embeddings = self.encoder(encoder_batch(self.refiner, passes, dev))
            coarse_probs = net.coarse_probability(self.coarse_net(small))
            per_pass = refine_sizes(self.network, coarse_probs, embeddings, [s["pixels"].shape for s, _ in passes],
                                    self.iterations, self.quality_gate, self.gate_threshold)
        b = len(samples)
        maps, scalars = [], []
        for i in range(b):
            o = per_pass[i]
            coarse, final = o["coarse"][0], o["final"][0]
            pred_iou, final_iou = o["pred_iou"], o["final_iou"]
            gate = o.get("gate")
            if self.tta == "flip":  # the flipped pass's maps are flipped back, then averaged
                f = per_pass[i + b]
                coarse, final = flip_tta_mean(coarse, f["coarse"][0]), flip_tta_mean(final, f["final"][0])
                pred_iou, final_iou = 0.5 * (pred_iou + f["pred_iou"]), 0.5 * (final_iou + f["final_iou"])
                gate = torch.maximum(gate, f["gate"]) if gate is not None else None
            maps.append((coarse, final))
            scalars.append(torch.stack([pred_iou.float(), final_iou.float(),
                                        (gate if gate is not None else torch.zeros_like(pred_iou)).float(),
                                        o.get("best_pass", torch.zeros_like(pred_iou)).float()]))
        # the batch's maps and scalars in one copy (one host sync), not two maps and four numbers per image
        host = to_host([m.float() for pair in maps for m in pair] + [torch.stack(scalars)])
        values = host[-1].tolist()
        results = []
        for i, (pred_iou, final_iou, gate, best_pass) in enumerate(values):
            result = {"coarse": host[2 * i], "refined": host[2 * i + 1], "pred_iou": pred_iou,
                      "final_iou": final_iou}
            if "best_pass" in per_pass[i]:
                result["best_pass"] = int(best_pass)
            if "gate" in per_pass[i]:
                result["gated"] = gate > 0
            results.append(result)
        return results

    def __call__(self, engine: Any, batch: Sequence[dict]) -> list[dict[str, Any]]:
        """One evaluator iteration over a batch of ``InputImages`` items: per item its prediction, the "coarse"
        and "refined" probabilities as (1, H, W) MetaTensors named after the item (for ``SaveImaged``); an empty
        dict for an unreadable item. Fires the iteration events the evaluator's postprocessing runs on."""
        from monai.data import MetaTensor
        from monai.engines.utils import IterationEvents

        good = [s for s in batch if "reason" not in s]
        results = iter(self.predict_batch(good) if good else [])
        outputs: list[dict[str, Any]] = []
        for s in batch:
            if "reason" in s:
                outputs.append({})
                continue
            res = next(results)
            meta = {"filename_or_obj": f"{s['name']}.png"}  # SaveImaged names the file after its stem
            outputs.append({**res, **{k: MetaTensor(torch.from_numpy(res[k])[None], meta=dict(meta))
                                      for k in ("coarse", "refined")}})
        engine.state.output = outputs
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


# ------------------------------------------------------------------------------------------------ outputs
class CoarseRefinedOverlayd(MapTransform):
    def __init__(self, keys: KeysCollection = ("coarse", "refined"), image_key: str = "pixels",
                 overlay_key: str = "overlay", allow_missing_keys: bool = False) -> None:
        """
        The image with the contours of its coarse (blue) and refined (red) masks, for ``SaveImaged``.

        Arguments:
          keys: the coarse and the refined mask, (1, H, W) bool MetaTensors.
          image_key: the (H, W) uint8 image.
          overlay_key: written: (3, H, W) uint8 MetaTensor with the coarse mask's metadata.
          allow_missing_keys: skip items without the masks (unreadable inputs).
        """
        super().__init__(keys, allow_missing_keys)
        self.image_key, self.overlay_key = image_key, overlay_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai.data import MetaTensor

        d = dict(data)
        masks = [d[k] for k in self.key_iterator(d)]
        if not masks:
            return d
        coarse, refined = (np.asarray(torch.as_tensor(m)[0]) for m in masks)
        rgb = overlay_coarse_refined(np.asarray(d[self.image_key], np.float32) / 255.0, coarse, refined)
        meta = dict(getattr(masks[0], "meta", {}))
        d[self.overlay_key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(np.moveaxis(rgb, -1, 0))), meta=meta)
        return d


class PredictionReport:
    def __init__(self, output_dir: str | os.PathLike, predictor: UltraPredictor, threshold: float = 0.5,
                 keys: Sequence[str] = ("coarse", "refined", "overlay"), writes: BackgroundWrites | None = None
                 ) -> None:
        """
        ``<output_dir>/predictions.json`` of an inference run (module docstring), written when the evaluator
        completes and every file it lists is on disk: settings, per image its size, predicted IoU (chosen pass,
        gate), written files and mask areas, and the skipped files with the reason. Raises ``UltraRefinerError``
        when no input could be predicted.

        Arguments:
          output_dir: where the writers put the files (paths in the report are relative to it).
          predictor: the evaluator's ``UltraPredictor`` (its settings go into the report).
          threshold: the probability threshold of the written masks.
          keys: written images whose paths (``saved_to`` of ``SaveImaged``) the entries list; NIfTI copies
            ``<key>_nifti`` are listed when present.
          writes: the writers' ``BackgroundWrites``, if any: after each iteration its backlog is bounded (a failed
            write stops the run, naming the file), and the report waits for all of them.
        """
        self.output_dir, self.predictor, self.threshold = Path(output_dir), predictor, threshold
        self.keys = list(keys)
        self.writes = writes
        self.entries: dict[int, dict] = {}
        self.skipped: dict[int, dict] = {}

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)
        if self.writes is not None:
            engine.add_event_handler(Events.EXCEPTION_RAISED, self._failed)

    def _reset(self, engine: Any) -> None:
        """Empty the report, and fail at once, naming the folder, when nothing can be written there (the writer
        transforms' own errors reach the caller only as the text of MONAI's "cannot find a suitable writer")."""
        self.entries, self.skipped = {}, {}
        probe = atomic_write(self.output_dir / ".write_check", lambda tmp: None)
        probe.unlink()

    def _failed(self, engine: Any, error: BaseException) -> None:
        """The run failed: the writes already started still finish (each is atomic); the error goes on (ignite
        hands an exception to its EXCEPTION_RAISED handlers instead of raising it)."""
        self.writes.close()
        raise error

    def _saved(self, value: Any) -> str:
        return Path(value.meta["saved_to"]).relative_to(self.output_dir).as_posix()

    def _collect(self, engine: Any) -> None:
        for item, out in zip(engine.state.batch, engine.state.output, strict=True):
            if "reason" in item:
                logger.warning(f"skipped {item['image']}: {item['reason']}")
                self.skipped[item["index"]] = {"image": item["image"], "reason": item["reason"]}
                continue
            h, w = item["pixels"].shape
            entry = {"image": item["image"], "height": int(h), "width": int(w),
                     "pred_iou": round(out["pred_iou"], 6)}
            entry.update({k: self._saved(out[k]) for k in self.keys})
            entry.update(coarse_area=int(out["coarse"].sum()), refined_area=int(out["refined"].sum()))
            if self.predictor.iterations:
                entry.update(final_iou=round(out["final_iou"], 6), best_pass=out["best_pass"])
            if self.predictor.quality_gate:
                entry["gated"] = out["gated"]
            entry.update({f"{k}_nifti": self._saved(out[f"{k}_nifti"]) for k in ("coarse", "refined")
                          if f"{k}_nifti" in out})
            self.entries[item["index"]] = entry
        if self.writes is not None:
            self.writes.wait()

    def report(self) -> dict[str, Any]:
        images = [self.entries[i] for i in sorted(self.entries)]
        skipped = [self.skipped[i] for i in sorted(self.skipped)]
        settings = {**self.predictor.settings(), "threshold": self.threshold}
        return {"settings": settings, "n_images": len(images), "n_skipped": len(skipped), "images": images,
                "skipped": skipped}

    def _write(self, engine: Any) -> None:
        if self.writes is not None:
            self.writes.wait(0)
        report = self.report()
        path = self.output_dir / "predictions.json"
        write_json(path, report)
        n = report["n_images"] + report["n_skipped"]
        if report["skipped"]:
            logger.warning(f"{report['n_skipped']} of {n} input files skipped (listed in {path})")
        if not report["images"]:
            raise UltraRefinerError(f"no input image could be predicted ({report['n_skipped']} skipped: "
                                    + "; ".join(f"{s['image']}: {s['reason']}" for s in report["skipped"][:5]) + ")")
        logger.info(f"predicted {report['n_images']} image(s) into {self.output_dir}")


def run_inference(bundle: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run ``<bundle>/configs/inference.json`` (its evaluator, as ``python -m monai.bundle run`` does) with
    ``overrides`` of its ids (values may be objects, e.g. ``network``); returns the predictions.json report.

    Raises:
        BadInputError: the config is missing, or declares no id of ``overrides`` (an older bundle: its config would
            add the option and never read it).
    """
    from monai.bundle import ConfigParser

    config = Path(bundle) / "configs" / "inference.json"
    if not config.is_file():
        raise BadInputError(config, "bundle config not found")
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(bundle)
    unknown = [k for k in (overrides or {}) if k not in parser]
    if unknown:
        raise BadInputError(config, f"declares no {', '.join(unknown)}: a bundle older than this package? Use the "
                                    f"bundle of this package's version, or leave those options out")
    for k, v in (overrides or {}).items():
        parser[k] = v
    try:
        parser.get_parsed_content("evaluator").run()
    except RuntimeError as e:  # MONAI wraps what a transform raised: a failed write or bad input is the user's
        cause = _user_error(e)
        if cause is None:
            raise
        raise cause from e
    return parser.get_parsed_content("report").report()


def _user_error(error: BaseException) -> BaseException | None:
    """The ``UltraRefinerError`` or ``OSError`` behind MONAI's wrapping exceptions, if any."""
    from ultrarefiner.utils.options import exception_chain

    return next((e for e in exception_chain(error) if isinstance(e, (UltraRefinerError, OSError))), None)
