"""Refine any segmenter's masks: a folder of images and a folder of coarse masks in, refined masks and a report out.

``refine_folder`` is the engine of ``python -m ultrarefiner refine``. Images and coarse masks (and optional ground
truth labels) are matched by file stem; every image is refined at its native size by a ``SAMRefiner`` (the shipped
phase-2 refiner, a phase-2 checkpoint, or LiteMedSAM zero-shot) prompted by its coarse mask. Data workers read and
check the files; each image is resized into the encoder frame and each coarse mask to the encoder's side, so a batch
of any image sizes shares one encoder, prompt and decoder pass; only the final resize runs per image size
(``BatchRefiner``). Optional left-right flip test-time augmentation (``tta="flip"``).

Output layout (every file written atomically, with the umask's normal permissions)::

    <output_dir>/masks/<stem>.png       refined mask (0/255, native size); <stem>.nii.gz (0/1) with nifti
    <output_dir>/overlays/<stem>.png    the image in gray: label green, coarse blue, refined red contours
    <output_dir>/progress.jsonl         one JSON record per finished image (appended as images finish)
    <output_dir>/report.csv             one row per image: predicted IoU, areas, coarse/refined metrics with labels
    <output_dir>/report.json            settings, summary (with labels: refined vs coarse, paired bootstrap 95% CI),
                                        per-image rows, skipped samples
    <output_dir>/skipped.csv            samples of this run that could not be refined: stem, file, reason

Resuming: an image whose ``masks/<stem>.png`` exists and that has a record in ``progress.jsonl`` is not refined
again (unless labels are given now and its record has no metrics); the report is always rebuilt from
``progress.jsonl``, so it covers every image refined into ``output_dir``. A folder holding results of another
refiner is refused rather than mixed. Coarse masks must have the image's size (resize them first). Bad samples
(unreadable files, a missing or blank coarse mask, sizes that differ) are listed in ``skipped.csv`` and never stop
the run; it fails only when no image at all has a result.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import shlex
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ultrarefiner
from ultrarefiner.data.imaging import (
    MASK_SUFFIXES,
    class_map_note,
    exclude_patterns,
    file_stem,
    folder_image_files,
    image_files,
    image_size,
    lesion_classes,
    mask_parts,
    read_classes,
    read_image,
    read_labels,
    read_mask,
    read_soft_mask,
    transposed_hint,
)
from ultrarefiner.engines.evaluation.comparison import blank_labels_note, compare_columns, summarise
from ultrarefiner.engines.evaluation.contours import overlay_coarse_refined
from ultrarefiner.engines.evaluation.metric_names import METRIC_NAMES
from ultrarefiner.errors import BadInputError, BadOptionError, UltraRefinerError
from ultrarefiner.hub import create_model
from ultrarefiner.utils.amp import autocast
from ultrarefiner.utils.background_writes import BackgroundWrites
from ultrarefiner.utils.grouping import index_groups
from ultrarefiner.utils.io import PICTURE_PNG_LEVEL, atomic_write, write_csv, write_png
from ultrarefiner.utils.transfer import to_device, to_host

__all__ = ["DEFAULT_REFINER", "BatchRefiner", "encoder_batch", "encoder_frame", "encoder_input", "files_by_stem",
           "format_summary", "checkpoint_list", "read_samples", "refine_folder", "resolve_refiner",
           "resolve_refiners"]

logger = logging.getLogger(__name__)

# the shipped phase-2 refiner (bundles/sam_refiner/models/model.pt of the repository)
DEFAULT_REFINER = Path(ultrarefiner.__file__).resolve().parents[1] / "bundles" / "sam_refiner" / "models" / "model.pt"
ZERO_SHOT = "zero-shot LiteMedSAM (packaged weights)"
THRESHOLD = 0.5  # probability threshold of coarse and refined masks (refined: logit > 0)
PROGRESS, REPORT_CSV, REPORT_JSON, SKIPPED_CSV = "progress.jsonl", "report.csv", "report.json", "skipped.csv"


# ------------------------------------------------------------------------------------------------ file writing
def _write_nifti(path: Path, mask: np.ndarray) -> None:
    import nibabel as nib

    # same orientation as ``predict``: x = column, y = row, one slice; labels 0/1
    img = nib.Nifti1Image(np.ascontiguousarray(mask.T[:, :, None]).astype(np.uint8), np.eye(4))
    data = gzip.compress(img.to_bytes())
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


# ------------------------------------------------------------------------------------------------ refiner
def resolve_refiner(checkpoint: str | os.PathLike | None = None, zero_shot: bool = False) -> Path | None:
    """The refiner checkpoint to load: ``checkpoint``, else the shipped ``DEFAULT_REFINER``; None for zero-shot.

    Raises:
      UltraRefinerError: both ``checkpoint`` and ``zero_shot``.
      BadInputError: the checkpoint (or the shipped refiner) does not exist; the message says what to pass.
    """
    if checkpoint and zero_shot:
        raise UltraRefinerError("--checkpoint and --zero_shot exclude each other: give one of them")
    if zero_shot:
        return None
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise BadInputError(path, "refiner checkpoint not found")
        return path
    path = Path(DEFAULT_REFINER)
    if not path.is_file():
        raise BadInputError(path, "the shipped phase-2 refiner is not there (not trained/exported yet): pass "
                                  "--checkpoint F (a sam_refiner best.pt or models/model.pt) or --zero_shot "
                                  "(LiteMedSAM's packaged weights, no refiner training)")
    return path


def checkpoint_list(checkpoint: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[str]:
    """``--checkpoint`` as a list of paths: one path, a comma-separated string, or a list/tuple (an ensemble)."""
    if checkpoint is None or checkpoint == "":
        return []
    if isinstance(checkpoint, (str, os.PathLike)):
        items = [c.strip() for c in str(checkpoint).split(",")]
    else:
        items = [str(c).strip() for c in checkpoint]
    if any(not c for c in items):
        raise BadOptionError(f"--checkpoint has an empty entry: {checkpoint!r} (separate the files of an ensemble "
                             f"with commas)")
    return items


def resolve_refiners(checkpoint: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                     zero_shot: bool = False) -> list[Path | None]:
    """``resolve_refiner`` of each file of ``checkpoint`` (``checkpoint_list``): the members of an ensemble.

    Raises:
      BadOptionError: the same file listed twice (its weight would double silently).
    """
    paths = checkpoint_list(checkpoint)
    if len(paths) <= 1:
        return [resolve_refiner(paths[0] if paths else None, zero_shot)]
    resolved = [resolve_refiner(c, zero_shot) for c in paths]
    seen: set[Path] = set()
    for path in resolved:
        if path.resolve() in seen:
            raise BadOptionError(f"--checkpoint lists {path} twice: each ensemble member once")
        seen.add(path.resolve())
    return resolved


def _refiner_name(checkpoints: Sequence[Path | None]) -> str:
    names = [ZERO_SHOT if c is None else f"checkpoint {c.resolve()}" for c in checkpoints]
    if len(names) == 1:
        return names[0]
    return f"ensemble of {len(names)} refiners (mean probability): " + "; ".join(names)


# ------------------------------------------------------------------------------------------------ inputs
def files_by_stem(folder: Path, what: str, postfix: str = "",
                  suffixes: tuple[str, ...] = MASK_SUFFIXES) -> dict[str, list[Path]]:
    """Mask files of ``folder`` (picture files and 2D NIfTI) by stem (a list: ``a.png`` and ``a.nii.gz`` share
    one); the folder must exist.

    ``postfix``: only files named ``<stem><postfix>.*`` count, under ``<stem>`` (MONAI's ``SaveImage`` writes
    ``<stem>_seg.png``, BUSI names its masks ``<stem>_mask.png``). ``<folder>/<stem>/<stem><postfix>.*`` counts too:
    ``SaveImage`` writes a folder per image unless ``separate_folder=False``."""
    if not folder.is_dir():
        raise BadInputError(folder, f"{what} folder not found")
    out: dict[str, list[Path]] = {}
    for f in image_files(folder, suffixes):
        stem = file_stem(f)
        if stem.endswith(postfix) and len(stem) > len(postfix):
            out.setdefault(stem[: len(stem) - len(postfix)], []).append(f)
    for sub in sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for f in image_files(sub, suffixes):
            if file_stem(f) == sub.name + postfix:
                out.setdefault(sub.name, []).append(f)
    return out


def postfix_hint(stems: Sequence[str], names: Sequence[str], option: str) -> str:
    """``"; ... set --<option> <p>"`` when files that match no stem are named ``<stem><p>``, ``p`` starting with a
    separator (the commonest among up to 200 of them, e.g. MONAI's ``_seg``: ``case10`` is no ``case1`` with a
    postfix), else ``""``."""
    known, found = set(stems), Counter()
    for name in list(names)[:200]:
        prefix = next((k for k in range(len(name) - 1, 0, -1) if name[:k] in known and not name[k].isalnum()), None)
        if prefix is not None:
            found[name[prefix:]] += 1
    if not found:
        return ""
    postfix = found.most_common(1)[0][0]
    return f"; files named <stem>{postfix}.* are there: set --{option} {shlex.quote(postfix)}"


def _match(images: Path, masks: Path, labels: Path | None, mask_postfix: str = "", label_postfix: str = "",
           exclude: Sequence[str] = ()) -> tuple[list[dict], list[dict]]:
    """Items {stem, image, mask[, label[, label_parts]]} and skipped samples {stem, file, reason}; masks and labels
    are named ``<image stem><postfix>.*``; with a label postfix, ``<stem><postfix>_<k>.*`` are further lesions of the
    label (``imaging.mask_parts``: BUSI's ``_mask_1``), read into it. Images whose names match the patterns
    ``exclude`` are left out."""
    files = folder_image_files(images, "images", exclude)
    stems = [f.stem for f in files]
    roles = [("mask", masks, mask_postfix, "coarse mask", "mask_postfix")]
    if labels is not None:
        roles.append(("label", labels, label_postfix, "label", "label_postfix"))
    found, hints = {}, {}
    for key, folder, postfix, what, option in roles:
        found[key] = files_by_stem(folder, f"{what}s", postfix)
        orphans = sorted(set(found[key]) - set(stems))
        unmatched = set(stems) - set(found[key])
        hints[key] = postfix_hint(stems, [o + postfix for o in orphans], option) if unmatched else ""
        if orphans:
            logger.warning(f"{len(orphans)} {what}(s) without an image in {images} (ignored), e.g. "
                           f"{', '.join(o + postfix for o in orphans[:3])}{hints[key]}")
    parts = mask_parts(labels, label_postfix) if labels is not None else {}  # the folder exists: files_by_stem
    items, skipped = [], []
    for f in files:
        if stems.count(f.stem) > 1:  # a.png and a.jpg would write the same outputs
            skipped.append(dict(stem=f.stem, file=str(f), reason="several image files share this stem"))
            continue
        item = {"stem": f.stem, "image": str(f)}
        for key, folder, postfix, what, _ in roles:
            candidates = found[key].get(f.stem, [])
            if len(candidates) != 1:
                reason = (f"no {what} named {f.stem}{postfix}.* in {folder}{hints[key]}" if not candidates
                          else f"several {what} files for this stem: {', '.join(c.name for c in candidates)}")
                skipped.append(dict(stem=f.stem, file=str(f), reason=reason))
                break
            item[key] = str(candidates[0])
        else:
            if f.stem in parts:
                item["label_parts"] = [str(p) for p in parts[f.stem]]
            items.append(item)
    return items, skipped


def encoder_frame(geometry: Any, image: np.ndarray) -> np.ndarray | None:
    """(H, W) uint8 image -> (h, w) uint8 in the refiner's encoder frame by its exact reference resize (what
    ``SAMRefiner.preprocess_image`` does to the native image; the three gray channels resize alike, so one is kept).
    None when the refiner resizes on its device (``image_resize="torch"``): the native image is sent then."""
    if geometry.image_resize != "exact":
        return None
    return np.ascontiguousarray(geometry.resize_uint8(np.repeat(image[..., None], 3, axis=-1))[..., 0])


class _SampleDataset(torch.utils.data.Dataset):
    """Reads and checks one sample in a data worker; a bad sample comes back as {stem, file, reason}.
    ``mask_classes``, ``label_classes``: the coarse masks, the labels are class maps, lesion where they hold one of
    these values (``imaging.read_classes``); empty: the mask rule (``read_soft_mask``, ``read_labels``)."""

    def __init__(self, items: Sequence[dict], mask_classes: Sequence[int] = (),
                 label_classes: Sequence[int] = ()) -> None:
        self.items = list(items)
        self.mask_classes, self.label_classes = tuple(mask_classes), tuple(label_classes)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        try:
            return self._load(item)
        except BadInputError as e:
            return dict(stem=item["stem"], file=e.path, reason=e.reason)
        except Exception as e:  # anything else a broken file triggers must not stop the run
            return dict(stem=item["stem"], file=item["image"], reason=f"{type(e).__name__}: {e}")

    def _load(self, item: dict) -> dict[str, Any]:
        def bad(file: str, reason: str) -> dict[str, str]:
            return dict(stem=item["stem"], file=file, reason=reason)

        image = read_image(item["image"])
        if min(image.shape) < 2:
            return bad(item["image"], f"image too small {image.shape}")
        if self.mask_classes:
            lesion, note = read_classes(item["mask"], self.mask_classes)
            coarse = lesion.astype(np.uint8) * np.uint8(255)
        else:  # uint8 0..255 (mask_levels): binary 0/255, or probability * 255
            coarse, note = read_soft_mask(item["mask"]), ""
        if coarse.shape != image.shape:
            return bad(item["mask"], f"coarse mask size {coarse.shape} differs from the image size {image.shape}"
                                     f"{transposed_hint(item['mask'], coarse.shape, image.shape)}")
        if int(coarse.max()) <= 255 * THRESHOLD:
            # a multi-class segmenter's 0/2 map reads blank too: say so, not just "blank"
            if not self.mask_classes:
                note = class_map_note(item["mask"], soft=True, classes_option="mask_classes")
            return bad(item["mask"], f"blank coarse mask: {note or f'no pixel above {THRESHOLD}'}, nothing to refine")
        out = {**item, "pixels": image, "coarse": coarse}
        if "label" in item:
            label = read_labels([item["label"], *item.get("label_parts", [])], self.label_classes, "label_classes")
            if label.shape != image.shape:
                return bad(item["label"], f"label size {label.shape} differs from the image size {image.shape}"
                                          f"{transposed_hint(item['label'], label.shape, image.shape)}")
            out["truth"] = label
        return out


def read_samples(images: str | os.PathLike, masks: str | os.PathLike, labels: str | os.PathLike | None = None,
                 limit: int | None = None, mask_postfix: str = "", label_postfix: str = "",
                 mask_classes: Sequence[int] = (), label_classes: Sequence[int] = ()) -> tuple[list[dict], list[dict]]:
    """The samples ``refine`` would refine, read in this process by its own rules (``_match``, ``_SampleDataset``):
    the good ones (``pixels``, ``coarse``, ``truth`` with labels), and the skipped ones with their reasons.
    ``limit``: only the first ``limit`` matched samples are read (benchmarks, studies)."""
    items, skipped = _match(Path(images), Path(masks), Path(labels) if labels is not None else None, mask_postfix,
                            label_postfix)
    dataset = _SampleDataset(items[:limit], mask_classes, label_classes)
    loaded = [dataset[i] for i in range(len(dataset))]
    return [s for s in loaded if "reason" not in s], skipped + [s for s in loaded if "reason" in s]


def _as_list(batch: list) -> list:
    return batch


def _size_batches(items: Sequence[dict], batch_size: int) -> tuple[list[list[int]], list[dict]]:
    """Index batches of ``batch_size`` images in (size, name) order, sizes read from the file headers: a batch takes
    any sizes (one encoder, prompt and decoder pass); images of one size kept together share their final resize."""
    sized: list[tuple[tuple[int, int], int]] = []
    skipped = []
    for i, item in enumerate(items):
        try:
            sized.append((image_size(item["image"]), i))
        except BadInputError as e:
            skipped.append(dict(stem=item["stem"], file=e.path, reason=e.reason))
    order = [i for _, i in sorted(sized)]
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)], skipped


# ------------------------------------------------------------------------------------------------ progress
def _read_progress(path: Path) -> dict[str, dict]:
    """Latest record per stem; a line cut short by a crash is ignored (that image is simply refined again)."""
    records: dict[str, dict] = {}
    if not path.is_file():
        return records
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            records[str(rec["stem"])] = rec
        except (json.JSONDecodeError, KeyError, TypeError):
            logger.warning(f"{path}:{n}: unreadable progress line ignored")
    return records


# ------------------------------------------------------------------------------------------------ refinement
def encoder_input(refiner: torch.nn.Module, sample: dict, flipped: bool, device: torch.device) -> torch.Tensor:
    """(1,3,S,S) encoder input of a sample: its worker-resized ``frame`` (``frame_flipped``), else the frame
    resized here, on the CPU; or its native ``pixels`` (flipped) when the refiner resizes on its device."""
    from ultrarefiner.engines.inference.fast_inference import hflip

    key = "frame_flipped" if flipped else "frame"
    frame = sample.get(key)
    if key not in sample:
        frame = encoder_frame(refiner.geometry, np.fliplr(sample["pixels"]) if flipped else sample["pixels"])
    if frame is not None:
        return refiner.preprocess_image(to_device(torch.from_numpy(frame)[None, None], device), resized=True)
    native = to_device(torch.from_numpy(np.ascontiguousarray(sample["pixels"]))[None, None], device)
    return refiner.preprocess_image(hflip(native) if flipped else native)


def encoder_batch(refiner: torch.nn.Module, passes: Sequence[tuple[dict, bool]], device: torch.device
                  ) -> torch.Tensor:
    """(B,3,S,S) encoder input of (sample, flipped) passes: ``encoder_input`` of each, with the worker-resized frames
    of one shape stacked and preprocessed together (one call per frame shape, not per image: the frames of BUSI's
    639 image sizes come in a few dozen shapes at LiteMedSAM's 256 px, one at MedSAM's squashed 1024)."""
    frames = [s.get("frame_flipped" if f else "frame") for s, f in passes]
    parts: list[torch.Tensor] = [torch.empty(0)] * len(passes)
    for shape, idx in index_groups(None if f is None else f.shape for f in frames).items():
        if shape is None or len(idx) == 1:  # no worker frame, or a shape of its own
            for i in idx:
                parts[i] = encoder_input(refiner, *passes[i], device)
            continue
        stack = torch.from_numpy(np.stack([frames[i] for i in idx]))[:, None]
        for i, x in zip(idx, refiner.preprocess_image(to_device(stack, device), resized=True), strict=True):
            parts[i] = x[None]
    return torch.cat(parts)


def prompt_frame_masks(geometry: Any, masks: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """(B,1,S,S) soft coarse masks in [0, 1] at the encoder's side S, from (H, W) uint8 masks (0-255) of any sizes:
    the common resolution at which ``refine`` computes the prompts of a whole batch in one pass (each mask covers
    its whole image; a box edge lands within one encoder pixel of the native mask's). Resized on ``device``,
    bilinear, antialiased when shrinking (``SamGeometry``'s mask resize), one call per mask size."""
    from ultrarefiner.networks.sam_geometry import resize_mask

    side = (geometry.img_size, geometry.img_size)
    out: list[torch.Tensor] = [torch.empty(0)] * len(masks)
    for idx in index_groups(m.shape for m in masks).values():
        stack = torch.from_numpy(np.stack([np.ascontiguousarray(masks[i]) for i in idx]))[:, None]
        framed = resize_mask(to_device(stack, device).float().div_(255.0), side)
        for j, i in enumerate(idx):
            out[i] = framed[j]
    return torch.stack(out)


class BatchRefiner:
    def __init__(self, refiner: torch.nn.Module | Sequence[torch.nn.Module], device: torch.device, amp: bool = True,
                 tta: str = "none", optimize: str | None = "auto") -> None:
        """
        A ``SAMRefiner`` (eval mode, on ``device``), or an ensemble of them, applied to batches of images of any
        sizes: one encoder pass for the batch (every image preprocessed into the encoder frame), one prompt and
        mask-decoder pass (``SAMRefiner.forward_sizes``: prompts from the coarse masks resized to the encoder's side,
        ``prompt_frame_masks``), and the output resize per image size. Results do not depend on the batch size (up
        to float rounding), and equal the refiner's own forward on the resized coarse mask.

        An ensemble (e.g. the five folds' phase-2 refiners) returns the mean of its members' probabilities and
        predicted IoUs. Members whose image encoders hold the same weights (phase-2 refiners keep LiteMedSAM's
        frozen encoder) share one encoder pass, so each extra member costs one prompt encoder + mask decoder pass.

        Arguments:
          refiner (SAMRefiner or a sequence of them): in eval mode, on ``device``; the members of an ensemble must
            share the image preprocessing (model type, input size, normalisation).
          device: where it runs.
          amp (bool): bfloat16 autocast on CUDA (never on the CPU).
          tta (str): ``none`` or ``flip`` (mean probability of the image and its left-right flip, the flipped pass
            prompted by the flipped coarse mask; ``fast_inference``).
          optimize (str): the image encoder's speed option (``fast_inference.fast_encoder``).
        """
        from ultrarefiner.engines.inference.fast_inference import check_tta, fast_encoder
        from ultrarefiner.networks.embedding_cache import weights_fingerprint

        members = [refiner] if isinstance(refiner, torch.nn.Module) else list(refiner)
        if not members:
            raise ValueError("BatchRefiner needs at least one refiner")
        frames = {_geometry_signature(m) for m in members} if len(members) > 1 else set()
        if len(frames) > 1:
            raise UltraRefinerError(f"the refiners of an ensemble must share the image preprocessing (model type, "
                                    f"input size, normalisation); got {len(frames)} different ones: {sorted(frames)}")
        self.members, self.refiner, self.device = members, members[0], torch.device(device)
        self.amp = bool(amp and self.device.type == "cuda")
        self.tta = check_tta(tta) == "flip"
        # members grouped by encoder weights: one (optimised) encoder per group
        groups: dict[str, list[int]] = {}
        for i, m in enumerate(members):
            groups.setdefault(weights_fingerprint(m.sam.image_encoder) if len(members) > 1 else "", []).append(i)
        self.groups = [(fast_encoder(members[idx[0]].sam.image_encoder, self.device, optimize), idx)
                       for idx in groups.values()]

    def __call__(self, samples: Sequence[dict]) -> list[tuple[np.ndarray, float]]:
        """Refined bool masks (H, W) (probability > 0.5) and predicted IoUs of ``samples``."""
        probs, iou = self.probabilities(samples)
        masks = to_host([p > 0.5 for p in probs])  # the batch's masks in one copy
        return [(m, float(v)) for m, v in zip(masks, iou.tolist(), strict=True)]

    def probabilities(self, samples: Sequence[dict]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Refined probabilities (H, W) per sample ({"pixels", "coarse" uint8 (H, W)[, "frame", "frame_flipped"]})
        and their predicted IoUs (B,) on the CPU; with flip TTA the means over the two passes, with an ensemble the
        means over its members."""
        per_member = self.member_probabilities(samples)
        if len(per_member) == 1:
            return per_member[0]
        n = len(per_member)
        probs = [sum(m[0][j] for m in per_member) / n for j in range(len(samples))]
        return probs, sum(m[1] for m in per_member) / n

    @torch.no_grad()  # not inference_mode: jit_freeze traces its encoder on the first call
    def member_probabilities(self, samples: Sequence[dict]) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        """``probabilities`` of each member alone, in member order (one encoder pass per encoder group)."""
        from ultrarefiner.engines.inference.fast_inference import flip_tta_mean

        passes = [(s, f) for f in ((False, True) if self.tta else (False,)) for s in samples]
        sizes = [tuple(s["pixels"].shape) for s, _ in passes]
        coarse = prompt_frame_masks(self.refiner.geometry, [np.fliplr(s["coarse"]) if f else s["coarse"]
                                                            for s, f in passes], self.device)
        results: list[tuple[list[torch.Tensor], torch.Tensor]] = [([], torch.empty(0))] * len(self.members)
        b = len(samples)
        for encoder, members in self.groups:
            with autocast(self.device, self.amp):
                embeddings = encoder(encoder_batch(self.members[members[0]], passes, self.device))
            for k in members:
                with autocast(self.device, self.amp):  # one prompt and decoder pass for every size in the batch
                    out = self.members[k].forward_sizes(embeddings, coarse, sizes)
                chosen = out["selection_weights"].float().argmax(dim=1, keepdim=True)  # K = 1 by default
                iou = out["iou_predictions"].float().gather(1, chosen)[:, 0].cpu()  # one copy for the batch
                probs = [torch.sigmoid(m[0].float()) for m in out["masks"]]
                if self.tta:
                    results[k] = ([flip_tta_mean(probs[i], probs[i + b]) for i in range(b)],
                                  0.5 * (iou[:b] + iou[b:]))
                else:
                    results[k] = (probs, iou)
        return results


def _geometry_signature(refiner: torch.nn.Module) -> str:
    """What decides a refiner's encoder input, all held by its ``SamGeometry``: preprocessing mode, resize rule,
    input size, normalisation."""
    g = refiner.geometry
    return repr((g.mode, g.image_resize, g.img_size, g.pixel_mean.flatten().tolist(), g.pixel_std.flatten().tolist()))


def _metrics(coarse: np.ndarray, refined: np.ndarray, label: np.ndarray) -> dict[str, float]:
    from ultrarefiner.engines.evaluation.folder_evaluation import score_pair

    scores = {**score_pair(coarse, label, prefix="coarse_"), **score_pair(refined, label, prefix="refined_")}
    return {k: round(v, 6) for k, v in scores.items()}


# ------------------------------------------------------------------------------------------------ report
def _columns(rows: Sequence[dict]) -> list[str]:
    cols = ["stem", "image", "mask", "label", "height", "width", "pred_iou", "coarse_area", "refined_area",
            "label_area"]
    cols += [f"{k}_{m}" for m in METRIC_NAMES for k in ("coarse", "refined")]
    return [c for c in cols if any(c in r for r in rows)]


def _summary(rows: list[dict], skipped: list[dict], n_new: int) -> dict[str, Any]:
    labelled = [r for r in rows if "refined_dice" in r]
    cols = ["pred_iou", "coarse_area", "refined_area"]
    cols += [f"{k}_{m}" for m in METRIC_NAMES for k in ("coarse", "refined")] if labelled else []
    out: dict[str, Any] = {"n_images": len(rows), "n_refined_now": n_new, "n_resumed": len(rows) - n_new,
                           "n_skipped": len(skipped), "n_labelled": len(labelled), "metrics": summarise(rows, cols)}
    if labelled:
        out["n_blank_labels"] = sum(r.get("label_area") == 0 for r in labelled)
        out["refined_vs_coarse"] = compare_columns(labelled, "coarse", "refined", METRIC_NAMES)
    return out


def _fmt(x: Any, signed: bool = False, digits: int = 4) -> str:
    if not isinstance(x, (int, float)) or not math.isfinite(x):
        return "-"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def format_summary(report: dict[str, Any]) -> str:
    """Console table of ``report["summary"]``: predicted IoU, areas and, with labels, coarse vs refined metrics
    with the refined - coarse difference, its 95% bootstrap CI and improved/worsened/unchanged counts."""
    s = report["summary"]
    m = s["metrics"]
    lines = [f"refined {s['n_images']} image(s) ({s['n_refined_now']} now, {s['n_resumed']} from earlier runs); "
             f"skipped {s['n_skipped']}",
             f"{'predicted IoU':<16s}{_fmt(m['pred_iou']['mean']):>8s} ± {_fmt(m['pred_iou']['sd'])}",
             f"{'mean area (px)':<16s}coarse {_fmt(m['coarse_area']['mean'], digits=1)}, "
             f"refined {_fmt(m['refined_area']['mean'], digits=1)}"]
    comp = s.get("refined_vs_coarse")
    if comp:
        lines.append(f"with labels: {s['n_labelled']} image(s)")
        lines += blank_labels_note(s.get("n_blank_labels", 0), "report.csv",
                                   report.get("settings", {}).get("label_classes"))
        # columns wide enough for HD95 in pixels (hundreds, sd too) next to the [0, 1] metrics
        lines.append(f"{'metric':<10s}{'coarse':^20s} {'refined':^20s}  refined-coarse [95% CI]"
                     f"          improved/worsened/unchanged")
        for name, c in comp.items():
            a, b = m[f"coarse_{name}"], m[f"refined_{name}"]
            lines.append(f"{name:<10s}{_fmt(a['mean']):>9s} ± {_fmt(a['sd']):<8s} {_fmt(b['mean']):>9s} ± "
                         f"{_fmt(b['sd']):<8s}  {_fmt(c['mean_diff'], True)} [{_fmt(c['ci95'][0], True)}, "
                         f"{_fmt(c['ci95'][1], True)}]   {c['improved']}/{c['worsened']}/{c['unchanged']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ engine
def _device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UltraRefinerError(f"--device {device}: no CUDA device is available (use --device cpu)")
    return dev


def refine_folder(
    images: str | os.PathLike,
    masks: str | os.PathLike,
    output_dir: str | os.PathLike,
    labels: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    zero_shot: bool = False,
    batch_size: int | None = None,
    nifti: bool = False,
    device: str | torch.device | None = None,
    amp: bool = True,
    num_workers: int = 2,
    writers: int | None = None,
    tta: str = "none",
    optimize: str | None = "auto",
    box_source: str = "largest",
    mask_postfix: str = "",
    label_postfix: str = "",
    exclude: str | Sequence[str] | None = None,
    mask_classes: str | int | Sequence[int] | None = None,
    label_classes: str | int | Sequence[int] | None = None,
) -> dict[str, Any]:
    """Refine every image's coarse mask and write the outputs of the module docstring; returns the report.

    Arguments:
      images, masks: folders of images and coarse masks (``imaging.read_soft_mask``), matched by stem.
      output_dir: where the outputs go (created; a second run resumes).
      labels: optional folder of ground-truth masks (matched by stem): metrics and the paired comparison.
      checkpoint: phase-2 refiner checkpoint; None: the shipped refiner (``DEFAULT_REFINER``) unless ``zero_shot``.
        Several (a list, or paths separated by commas): an ensemble, the mean of their probabilities
        (``BatchRefiner``; members with the same frozen encoder share its pass).
      zero_shot: LiteMedSAM's packaged weights without a refiner checkpoint.
      batch_size: images per encoder, prompt and decoder pass (any sizes; outputs resized per image size); None: 8 on
        CUDA, 1 on the CPU (``fast_inference.default_batch_size``).
      nifti: also write ``masks/<stem>.nii.gz``.
      device: cpu, cuda, cuda:N; None/"auto": CUDA when available.
      amp: bfloat16 autocast (CUDA only).
      num_workers: data workers reading and checking the files.
      writers: threads writing the outputs and computing the metrics (``BackgroundWrites``); None: one per core,
        up to 8; 0: in the main thread.
      tta: ``none`` or ``flip`` (left-right flip test-time augmentation, ``BatchRefiner``).
      box_source: ``largest`` (default) or ``components``: one prompt set per connected component of the coarse
        mask, merged (``SAMRefiner``); for images with several lesions.
      optimize: the image encoder's speed option (``fast_inference.fast_encoder``: auto, none, channels_last,
        jit_freeze, compile).
      mask_postfix, label_postfix: coarse masks and labels are named ``<image stem><postfix>.*`` (``_seg`` for
        MONAI's ``SaveImage``).
      exclude: file-name patterns of the images folder's files to leave out (``imaging.exclude_patterns``).
      mask_classes, label_classes: the coarse masks, the labels are class maps (``imaging.lesion_classes``: e.g.
        ``"1,2"``), lesion where they hold one of these values; None: the mask rule. A folder refined from coarse
        masks read one way is not resumed with the other.

    Raises:
      UltraRefinerError / BadInputError: bad options or folders, or no image has a result at all.
    """
    from tqdm import tqdm

    from ultrarefiner.engines.inference.fast_inference import check_tta, default_batch_size, resolve_optimize

    tta = check_tta(tta)
    exclude = exclude_patterns(exclude)
    mask_classes = lesion_classes(mask_classes, "mask_classes")
    label_classes = lesion_classes(label_classes, "label_classes")
    ckpts = resolve_refiners(checkpoint, zero_shot)
    dev = _device(device)
    batch_size = default_batch_size(dev) if batch_size is None else batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch_size must be a positive integer, got {batch_size!r}")
    optimize = resolve_optimize(optimize, dev)
    if box_source not in ("largest", "components"):
        raise BadOptionError(f"--box_source must be 'largest' or 'components', got {box_source!r}")
    # TTA and the prompt rule change the results: a folder refined with one setting is not resumed with the other
    name = _refiner_name(ckpts) + (" with flip TTA" if tta == "flip" else "")
    name += " with one prompt set per lesion" if box_source == "components" else ""
    name += f" from coarse classes {','.join(map(str, mask_classes))}" if mask_classes else ""
    images, masks, out = Path(images), Path(masks), Path(output_dir)
    items, skipped = _match(images, masks, Path(labels) if labels is not None else None, mask_postfix, label_postfix,
                            exclude)
    out.mkdir(parents=True, exist_ok=True)
    progress = out / PROGRESS
    records = _read_progress(progress)
    others = sorted({r.get("refiner") for r in records.values()} - {name}, key=str)
    if others:
        raise UltraRefinerError(f"{out} holds results of another refiner ({others[0]}), not of {name}: use another "
                                f"--output_dir, or delete {progress} to start over")

    def done(item: dict) -> bool:
        rec = records.get(item["stem"])
        mask_png = out / "masks" / f"{item['stem']}.png"
        if rec is None or not mask_png.is_file() or ("label" in item and "refined_dice" not in rec):
            return False  # no result yet, or none with the metrics now asked for
        nii = out / "masks" / f"{item['stem']}.nii.gz"
        if nifti and not nii.is_file():  # asked for now, not then: convert the saved mask
            _write_nifti(nii, read_mask(mask_png))
        return True

    pending = [it for it in items if not done(it)]
    batches, unreadable = _size_batches(pending, batch_size)
    skipped += unreadable
    n_new = 0
    if batches:
        runner: BatchRefiner | None = None  # built on the first good sample: no cost when all are bad
        # the refiner (its geometry) does not exist yet: the main process resizes into the encoder frame (cv2 for
        # LiteMedSAM: well under a millisecond per image)
        loader = torch.utils.data.DataLoader(_SampleDataset(pending, mask_classes, label_classes),
                                             batch_sampler=batches, collate_fn=_as_list, num_workers=num_workers)
        bar = tqdm(total=sum(len(b) for b in batches), desc="refine", unit="image", disable=None)
        # metrics, PNGs and overlays of one batch are computed by threads while the refiner runs the next batch
        # (they dominate on a GPU); records are logged in the main thread once their files are on disk
        writes = BackgroundWrites(writers, round_size=batch_size)
        with progress.open("a", encoding="utf-8") as log:

            def log_records(finished: list[dict]) -> None:
                nonlocal n_new
                for record in finished:
                    log.write(json.dumps(record) + "\n")
                    records[record["stem"]] = record
                    n_new += 1
                log.flush()  # a crash loses at most the images being written

            try:
                for batch in loader:
                    good = [s for s in batch if "reason" not in s]
                    skipped += [s for s in batch if "reason" in s]
                    if good and runner is None:
                        # eval after .to(): TinyViT caches attention biases on eval, on the device they are on
                        refiners = [create_model("sam_refiner", c, device=dev, box_source=box_source).eval()
                                    for c in ckpts]
                        runner = BatchRefiner(refiners, dev, amp, tta, optimize)
                    for sample, refined, iou in _refine_batch(runner, good, skipped):
                        writes.submit(_save, sample, refined, iou, out, nifti, name)
                    # bounded: finished samples must not pile up in memory; a failed write (disk full...) stops the run
                    log_records(writes.wait())
                    bar.update(len(batch))
                log_records(writes.wait(0))
            finally:
                writes.close()
        bar.close()
    report = _write_report(out, records, skipped, n_new, dict(
        images=str(images), masks=str(masks), labels=None if labels is None else str(labels), refiner=name,
        threshold=THRESHOLD, batch_size=batch_size, device=str(dev), amp=bool(amp and dev.type == "cuda"),
        nifti=bool(nifti), tta=tta, optimize=optimize, box_source=box_source, mask_postfix=mask_postfix,
        label_postfix=label_postfix, exclude=list(exclude), mask_classes=list(mask_classes),
        label_classes=list(label_classes)))
    if skipped:
        logger.warning(f"{len(skipped)} sample(s) skipped, listed in {out / SKIPPED_CSV}")
    if not report["images"]:
        reasons = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:5])
        raise UltraRefinerError(f"no image could be refined ({len(skipped)} skipped: {reasons})")
    return report


def _refine_batch(runner: BatchRefiner | None, samples: list[dict], skipped: list[dict]):
    """Yield (sample, refined mask, predicted IoU); when a batch fails, its samples are retried one by one and the
    ones that still fail are skipped with the error (an odd image must not take its batch mates down)."""
    if not samples or runner is None:
        return
    try:
        results = runner(samples)
    except (RuntimeError, ValueError) as e:
        if len(samples) > 1:
            for s in samples:
                yield from _refine_batch(runner, [s], skipped)
            return
        skipped.append(dict(stem=samples[0]["stem"], file=samples[0]["image"],
                            reason=f"refiner failed ({type(e).__name__}: {e})"))
        return
    for sample, (refined, iou) in zip(samples, results, strict=True):
        yield sample, refined, iou


def _save(sample: dict, refined: np.ndarray, iou: float, out: Path, nifti: bool, name: str) -> dict:
    """Write the mask (and NIfTI) and the overlay of one sample; its progress record."""
    stem = sample["stem"]
    coarse = sample["coarse"] > 255 * THRESHOLD
    label = sample.get("truth")
    write_png(out / "masks" / f"{stem}.png", refined.astype(np.uint8) * 255)
    if nifti:
        _write_nifti(out / "masks" / f"{stem}.nii.gz", refined)
    picture = overlay_coarse_refined(sample["pixels"].astype(np.float32) / 255.0, coarse, refined, label)
    write_png(out / "overlays" / f"{stem}.png", picture, PICTURE_PNG_LEVEL)
    record = {"stem": stem, "image": sample["image"], "mask": sample["mask"]}
    if label is not None:
        record["label"] = sample["label"]
    h, w = refined.shape
    record.update(height=int(h), width=int(w), pred_iou=round(float(iou), 6), coarse_area=int(coarse.sum()),
                  refined_area=int(refined.sum()))
    if label is not None:
        record.update(label_area=int(label.sum()), **_metrics(coarse, refined, label))
    record["refiner"] = name
    return record


def _finite(obj: Any) -> Any:
    """NaN/inf -> None, so report.json is strict JSON (a CI of one image is NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _write_report(out: Path, records: dict[str, dict], skipped: list[dict], n_new: int,
                  settings: dict[str, Any]) -> dict[str, Any]:
    """report.csv, report.json and skipped.csv from the progress records whose mask is on disk."""
    rows = [{k: v for k, v in r.items() if k != "refiner"} for stem, r in sorted(records.items())
            if (out / "masks" / f"{stem}.png").is_file()]
    skipped = sorted(skipped, key=lambda s: (s["stem"], s["file"]))
    # report rows carry internal keys and skipped entries whole samples: only the listed columns are written
    write_csv(out / REPORT_CSV, rows, _columns(rows), extrasaction="ignore")
    write_csv(out / SKIPPED_CSV, skipped, ["stem", "file", "reason"], extrasaction="ignore")
    report = {"settings": settings, "summary": _summary(rows, skipped, n_new), "images": rows, "skipped": skipped}
    report = _finite(report)
    text = json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    atomic_write(out / REPORT_JSON, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return report
