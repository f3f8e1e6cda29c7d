"""UltraRefiner inference: coarse and refined masks, optional iterative refinement and quality gate, outputs on disk.

``refine`` is the one prediction routine of phase 3 (validation, ``evaluate.json``, ``inference.json`` and
``python -m ultrarefiner predict``):

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

Output layout of ``UltraPredictor.predict`` (all files written atomically)::

    <output_dir>/coarse/<name>.png     TransUNet mask at native size (0/255)
    <output_dir>/refined/<name>.png    final refined mask (after iterations / gate when enabled)
    <output_dir>/overlays/<name>.png   image with the coarse (blue) and refined (red) contours
    <output_dir>/nifti/<name>_{coarse,refined}.nii.gz   on request
    <output_dir>/predictions.json      settings, per image: size, predicted IoU, chosen pass, gated; skipped files
"""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ultrarefiner.data.imaging import IMAGE_SUFFIXES, read_image
from ultrarefiner.errors import BadInputError, UltraRefinerError
from ultrarefiner.utils.flags import as_flag
from ultrarefiner.utils.io import atomic_write, write_json, write_png

__all__ = [
    "COARSE_COLOUR",
    "REFINED_COLOUR",
    "UltraPredictor",
    "list_inputs",
    "load_network",
    "load_ultrarefiner",
    "overlay_coarse_refined",
    "refine",
    "refine_coarse",
    "selected_iou",
]

logger = logging.getLogger(__name__)

GT_COLOUR = (0, 255, 0)
COARSE_COLOUR = (0, 128, 255)
REFINED_COLOUR = (255, 0, 0)


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
    embeddings = net.encode_image(sam_image, size)
    out = net(image, image_embeddings=embeddings.float(), original_size=size)
    return _refine_after(net, out, embeddings, size, iterations, quality_gate, gate_threshold)


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
    SAM image embeddings, for batched prediction: TransUNet and the image encoder run on a whole batch of images
    of any sizes, this per image size. Same outputs as ``refine``."""
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    net = _unwrap(model)
    size = (int(original_size[0]), int(original_size[1]))
    out = net.refiner(coarse=coarse_probs, image_embeddings=image_embeddings.float(), original_size=size)
    return _refine_after(net, {"coarse_probs": coarse_probs, **out}, image_embeddings, size, iterations,
                         quality_gate, gate_threshold)


def _refine_after(net: torch.nn.Module, out: dict, embeddings: torch.Tensor, size: tuple[int, int], iterations: int,
                  quality_gate: bool, gate_threshold: float) -> dict[str, torch.Tensor]:
    """The outputs of ``refine`` from the first pass ``out``: coarse at the native size, iterations, gate."""
    coarse = F.interpolate(out["coarse_probs"].float(), size, mode="bilinear", align_corners=False).clamp(0, 1)
    logits = out["masks"].float()
    iou = selected_iou(out)
    result = {"coarse": coarse, "refined": torch.sigmoid(logits), "pred_iou": iou}
    best_logits, best_iou = logits, iou
    if iterations:
        best_pass = torch.zeros_like(iou)
        prompt = torch.sigmoid(logits)
        for k in range(1, iterations + 1):
            step = net.refiner(coarse=prompt, image_embeddings=embeddings.float(), original_size=size)
            step_iou = selected_iou(step)
            step_logits = step["masks"].float()
            better = step_iou > best_iou
            best_logits = torch.where(better[:, None, None, None], step_logits, best_logits)
            best_iou = torch.where(better, step_iou, best_iou)
            best_pass = torch.where(better, torch.full_like(best_pass, k), best_pass)
            prompt = torch.sigmoid(step_logits)
        result.update(iterative=torch.sigmoid(best_logits), iterative_iou=best_iou, best_pass=best_pass)
    final = torch.sigmoid(best_logits)
    if quality_gate:
        keep_coarse = best_iou < gate_threshold
        final = torch.where(keep_coarse[:, None, None, None], coarse, final)
        result.update(gated=final, gate=keep_coarse.float())
    result.update(final=final, final_iou=best_iou)
    return result


# ------------------------------------------------------------------------------------------------ pictures
def overlay_coarse_refined(image: np.ndarray, coarse: np.ndarray | None, refined: np.ndarray | None,
                           label: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 (H, W, 3): ``image`` (H, W) gray ([0, 1] or stretched), contours of the bool masks: ground truth
    green, coarse blue, refined red (drawn in that order, so the refined contour is on top)."""
    from ultrarefiner.engines.evaluation.overlays import _gray_uint8, contour

    gray = _gray_uint8(image)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    for mask, colour in ((label, GT_COLOUR), (coarse, COARSE_COLOUR), (refined, REFINED_COLOUR)):
        if mask is not None:
            rgb[contour(np.asarray(mask, bool))] = colour
    return rgb


# ------------------------------------------------------------------------------------------------ loading
def load_network(network: torch.nn.Module, ckpt_path: str | os.PathLike, obj: Any = None) -> torch.nn.Module:
    """Load phase-3 weights (``best.pt``/``last.pt``/``models/model.pt``) into ``network`` (strict); returns it.
    ``obj``: the file's content when the caller has already read it (it is not read again)."""
    from ultrarefiner.engines.checkpoints.checkpoint import load_weights, weights_of

    path = Path(ckpt_path)
    if obj is not None:
        weights = weights_of(obj)
    elif not path.is_file():
        raise BadInputError(path, "UltraRefiner checkpoint not found (train bundles/ultrarefiner first, or pass "
                                  "--ckpt_path / --checkpoint)")
    else:
        weights = load_weights(path)
    own = network.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:  # a count and a few names, not the thousands of a whole state_dict
        raise BadInputError(path, f"does not match the configured UltraRefiner (network_kwargs?): "
                                  f"{_few(missing)} missing, {_few(unexpected)} unexpected weights")
    try:
        network.load_state_dict(weights, strict=True)
    except RuntimeError as e:  # shape mismatches: MONAI-style one line per tensor, keep the first few
        lines = str(e).splitlines()
        raise BadInputError(path, f"does not match the configured UltraRefiner (network_kwargs?): "
                                  f"{' '.join(lines[:4])[:600]}") from e
    return network


def _few(names: Sequence[str], n: int = 3) -> str:
    """``"12 (a, b, c, ...)"``: a count and the first names."""
    shown = ", ".join(names[:n]) + (", ..." if len(names) > n else "")
    return f"{len(names)} ({shown})" if names else "0"


def load_ultrarefiner(
    checkpoint: str | os.PathLike,
    bundle: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    overrides: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """UltraRefiner with the weights of ``checkpoint``, for inference (no embedding cache).

    The architecture comes from the checkpoint's ``network_kwargs`` (``best.pt``/``last.pt`` of the bundle), else
    from ``<bundle>/configs/inference.json`` (``network_kwargs``, with ``overrides`` of its ids) for a plain
    ``models/model.pt``.
    """
    from ultrarefiner.engines.checkpoints.checkpoint import read_checkpoint, require_phase
    from ultrarefiner.engines.training.e2e_setup import build_ultrarefiner

    path = Path(checkpoint)
    obj = read_checkpoint(path, "UltraRefiner checkpoint")
    require_phase(path, obj, 3, "UltraRefiner prediction")
    kwargs = obj.get("network_kwargs") if isinstance(obj, dict) else None
    if not (isinstance(kwargs, dict) and "transunet" in kwargs):
        if bundle is None:
            raise BadInputError(path, "holds no network_kwargs; give the bundle whose inference.json describes it")
        from monai.bundle import ConfigParser

        config = Path(bundle) / "configs" / "inference.json"
        if not config.is_file():
            raise BadInputError(config, "bundle config not found")
        parser = ConfigParser()
        parser.read_config(str(config))
        for k, v in (overrides or {}).items():
            parser[k] = v
        kwargs = parser.get_parsed_content("network_kwargs")
    model = build_ultrarefiner(kwargs, cache_embeddings=False)
    return load_network(model, path, obj).to(device).eval()


# ------------------------------------------------------------------------------------------------ predictor
def list_inputs(source: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """One image file, a folder (its image files, sorted, not recursive) or a list of files."""
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise BadInputError(p, f"no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            return files
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


def _write_nifti(path: Path, mask: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(mask.T[:, :, None]).astype(np.uint8), np.eye(4))  # x = column
    data = gzip.compress(img.to_bytes())
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


class _InputDataset(torch.utils.data.Dataset):
    """Reads one input image in a data worker: its TransUNet input and its SAM encoder frame(s) (the flipped image's
    too with flip TTA); an unreadable file comes back as {"index", "reason"}."""

    def __init__(self, paths: Sequence[Path], transform: Any, geometry: Any, tta: bool) -> None:
        self.paths, self.transform, self.geometry, self.tta = list(paths), transform, geometry, tta

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        try:
            image = read_image(path)
            if min(image.shape) < 2:
                return {"index": index, "reason": f"image too small {image.shape}"}
            return {"index": index, **self.sample(image)}
        except BadInputError as e:
            return {"index": index, "reason": e.reason}
        except Exception as e:  # a broken file must not stop the run
            return {"index": index, "reason": f"{type(e).__name__}: {e}"}

    def sample(self, image: np.ndarray) -> dict[str, Any]:
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


def _as_list(batch: list) -> list:
    return batch


class UltraPredictor:
    def __init__(
        self,
        network: torch.nn.Module,
        device: torch.device | str = "cpu",
        img_size: int | None = None,
        iterations: int = 0,
        quality_gate: bool = False,
        gate_threshold: float = 0.5,
        threshold: float = 0.5,
        amp: bool = False,
        nifti: bool = False,
        batch_size: int | None = None,
        num_workers: int = 2,
        tta: str = "none",
        optimize: str | None = "auto",
    ) -> None:
        """
        Predict coarse and refined masks of image files and write them (module docstring).

        Images of any sizes share a batch: TransUNet sees them at its input size and SAM's image encoder in its
        own frame (data workers resize them); the refiner's prompts and decoder run per image size, and outputs are
        resized back per image. Results equal batch 1 up to float rounding.

        Arguments:
          network (UltraRefiner): with its weights loaded.
          device: where the network runs.
          img_size (int or None): TransUNet input side; None: ``network.transunet.img_size``.
          iterations, quality_gate, gate_threshold: see ``refine`` (off by default).
          threshold (float): probability threshold of the written masks.
          amp (bool): bfloat16 autocast (CUDA only).
          nifti (bool): also write NIfTI masks.
          batch_size (int or None): images per forward pass; None: 8 on CUDA, 1 on the CPU.
          num_workers (int): data workers reading and resizing the images.
          tta (str): ``none`` or ``flip``: mean of the pipeline's probabilities (coarse and refined) on the image
            and on its left-right flip (flipped back); with iterations or the gate each pass applies them, and the
            image counts as gated when either pass kept its coarse mask.
          optimize (str): SAM image encoder speed option (``fast_inference.fast_encoder``).
        """
        from monai.transforms import Compose, Resize, ScaleIntensity

        from ultrarefiner.commands.args import check_range
        from ultrarefiner.engines.inference.fast_inference import (
            check_tta,
            default_batch_size,
            fast_encoder,
            resolve_optimize,
        )

        self.network = network.to(device).eval()
        self.device = torch.device(device)
        size = img_size or getattr(_unwrap(network).transunet, "img_size", 224)
        # the evaluation pipeline's TransUNet input: min-max to [0, 1], anti-aliased bilinear resize
        self.transform = Compose([ScaleIntensity(), Resize((size, size), mode="bilinear", anti_aliasing=True)])
        self.iterations, self.gate_threshold, self.threshold = int(iterations), gate_threshold, threshold
        self.quality_gate = as_flag(quality_gate, "quality_gate")
        self.amp, self.nifti = as_flag(amp, "amp"), as_flag(nifti, "nifti")
        batch_size = default_batch_size(self.device) if batch_size is None else batch_size
        self.batch_size = check_range(batch_size, "batch_size", 1, 1024, integer=True)
        self.num_workers = check_range(num_workers, "num_workers", 0, 64, integer=True)
        self.tta = check_tta(tta)
        self.optimize = resolve_optimize(optimize, self.device)
        self.refiner = _unwrap(network).refiner
        self.encoder = fast_encoder(self.refiner.sam.image_encoder, self.device, self.optimize)
        self.dataset = _InputDataset([], self.transform, self.refiner.geometry, self.tta == "flip")

    def settings(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "quality_gate": self.quality_gate,
                "gate_threshold": self.gate_threshold if self.quality_gate else None, "threshold": self.threshold,
                "tta": self.tta}

    def predict_array(self, image: np.ndarray) -> dict[str, Any]:
        """(H, W) uint8 image -> dict of numpy arrays (coarse/refined probabilities, (H, W)) and scalars."""
        return self.predict_batch([self.dataset.sample(image)])[0]

    @torch.no_grad()  # not inference_mode: jit_freeze traces the encoder on its first call
    def predict_batch(self, samples: Sequence[dict]) -> list[dict[str, Any]]:
        """Predictions of ``_InputDataset`` samples (images of any sizes): one TransUNet and one encoder pass for the
        batch (and its flips with TTA), then the refiner per image size; results as ``predict_array``."""
        from ultrarefiner.engines.inference.fast_inference import flip_tta_mean
        from ultrarefiner.engines.inference.refine_folder import encoder_input

        dev, net = self.device, _unwrap(self.network)
        flips = (False, True) if self.tta == "flip" else (False,)
        passes = [(s, f) for f in flips for s in samples]
        small = torch.stack([s["small_flipped" if f else "small"] for s, f in passes]).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp and dev.type == "cuda"):
            embeddings = self.encoder(torch.cat([encoder_input(self.refiner, s, f, dev) for s, f in passes]))
            coarse_probs = net.coarse_probability(net.transunet(small))
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (s, _) in enumerate(passes):
            groups.setdefault(tuple(s["pixels"].shape), []).append(i)
        per_pass: list[dict[str, torch.Tensor]] = [{} for _ in passes]
        for size, idx in groups.items():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp and dev.type == "cuda"):
                out = refine_coarse(self.network, coarse_probs[idx], embeddings[idx], size, self.iterations,
                                    self.quality_gate, self.gate_threshold)
            for j, i in enumerate(idx):
                per_pass[i] = {k: v[j] for k, v in out.items()}
        b = len(samples)
        results = []
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
            result = {"coarse": coarse.cpu().numpy(), "refined": final.cpu().numpy(), "pred_iou": float(pred_iou),
                      "final_iou": float(final_iou)}
            if "best_pass" in o:
                result["best_pass"] = int(o["best_pass"])
            if gate is not None:
                result["gated"] = bool(gate > 0)
            results.append(result)
        return results

    def _batches(self, paths: Sequence[Path]) -> list[list[int]]:
        """Index batches in (size, input order) order: equal sizes share the refiner's decoder pass. A file whose
        header cannot be read goes last; its worker reports why."""
        from ultrarefiner.data.imaging import image_size

        def key(i: int) -> tuple[int, int, int]:
            try:
                return (*image_size(paths[i]), i)
            except BadInputError:
                return (1 << 30, 1 << 30, i)

        order = sorted(range(len(paths)), key=key)
        return [order[k : k + self.batch_size] for k in range(0, len(order), self.batch_size)]

    def predict(self, inputs: str | os.PathLike | Iterable[str | os.PathLike], output_dir: str | os.PathLike) -> dict:
        """Predict every input image, write the outputs and ``predictions.json``; returns that report.

        Unreadable files are listed under "skipped" with the reason (and logged); they never stop the run. Raises
        ``UltraRefinerError`` when no input could be predicted.
        """
        from tqdm import tqdm

        out = Path(output_dir)
        paths = list_inputs(inputs)
        names = _output_names(paths)
        dataset = _InputDataset(paths, self.transform, self.refiner.geometry, self.tta == "flip")
        batches = self._batches(paths)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=_as_list,
                                             num_workers=min(self.num_workers, len(batches)))
        entries: dict[int, dict] = {}
        skipped: dict[int, dict] = {}
        bar = tqdm(total=len(paths), desc="predict", leave=False, disable=None)
        for batch in loader:
            for s in batch:
                if "reason" in s:
                    path = paths[s["index"]]
                    logger.warning(f"skipped {path}: {s['reason']}")
                    skipped[s["index"]] = {"image": str(path), "reason": s["reason"]}
            good = [s for s in batch if "reason" not in s]
            for s, res in zip(good, self.predict_batch(good) if good else [], strict=True):
                entries[s["index"]] = self._write(out, paths[s["index"]], names[s["index"]], s["pixels"], res)
            bar.update(len(batch))
        bar.close()
        images = [entries[i] for i in sorted(entries)]
        skipped_list = [skipped[i] for i in sorted(skipped)]
        report = {"settings": self.settings(), "n_images": len(images), "n_skipped": len(skipped_list),
                  "images": images, "skipped": skipped_list}
        write_json(out / "predictions.json", report)
        if skipped_list:
            logger.warning(f"{len(skipped_list)} of {len(paths)} input files skipped (listed in "
                           f"{out / 'predictions.json'})")
        if not images:
            raise UltraRefinerError(f"no input image could be predicted ({len(skipped_list)} skipped: "
                                    f"{'; '.join(s['image'] + ': ' + s['reason'] for s in skipped_list[:5])})")
        logger.info(f"predicted {len(images)} image(s) into {out}")
        return report

    def _write(self, out: Path, path: Path, name: str, image: np.ndarray, res: dict[str, Any]) -> dict[str, Any]:
        """Masks, overlay (and NIfTI) of one image, atomically; its report entry."""
        coarse, refined = res["coarse"] > self.threshold, res["refined"] > self.threshold
        entry = {"image": str(path), "height": int(image.shape[0]), "width": int(image.shape[1]),
                 "pred_iou": round(res["pred_iou"], 6), "coarse": f"coarse/{name}.png",
                 "refined": f"refined/{name}.png", "overlay": f"overlays/{name}.png",
                 "coarse_area": int(coarse.sum()), "refined_area": int(refined.sum())}
        if self.iterations:
            entry.update(final_iou=round(res["final_iou"], 6), best_pass=res["best_pass"])
        if self.quality_gate:
            entry["gated"] = res["gated"]
        write_png(out / entry["coarse"], coarse.astype(np.uint8) * 255)
        write_png(out / entry["refined"], refined.astype(np.uint8) * 255)
        write_png(out / entry["overlay"], overlay_coarse_refined(image.astype(np.float32) / 255.0, coarse, refined))
        if self.nifti:
            for kind, mask in (("coarse", coarse), ("refined", refined)):
                rel = f"nifti/{name}_{kind}.nii.gz"
                _write_nifti(out / rel, mask)
                entry[f"{kind}_nifti"] = rel
        return entry
