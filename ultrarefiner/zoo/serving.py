"""Serving the bundles one 2D image at a time, for the MONAI Label app (``monailabel_app/``).

Nothing here imports MONAI Label, so it runs and is tested in the main environment; the app's tasks are thin
wrappers. Masks go in and out as (H, W) uint8 arrays at the image's native size, 1 = lesion.

* ``BundlePredictor``: an automatic bundle served by running its own ``configs/inference.json`` on the image (same
  preprocessing, inverse resizing and writer as the bundle CLI, so the app can never drift from the bundle).
* ``InteractivePredictor``: the SAM refiner driven by clicks, an ROI box and/or an existing label.
* ``write_training_datalist``: labelled studies -> a ``datalist.json`` the bundles' ``train.json`` reads, with
  folds drawn over near-duplicate groups as ``preprocess`` does.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ultrarefiner.data import imaging
from ultrarefiner.data.imaging import IMAGE_SUFFIXES, WIDE_MODES, open_image, read_image, read_label, to_gray_uint8
from ultrarefiner.errors import BadInputError
from ultrarefiner.utils.io import write_json, write_png
from ultrarefiner.utils.transfer import to_device

__all__ = [
    "BundlePredictor",
    "InteractivePredictor",
    "image_size",
    "load_image_uint8",
    "read_mask",
    "write_mask",
    "write_training_datalist",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------- files
def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of a 2D image file."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except OSError as e:
        raise BadInputError(path, f"not a readable 2D image ({e})") from e


def load_image_uint8(path: str | os.PathLike) -> np.ndarray:
    """(H, W) grayscale or (H, W, 3) RGB uint8 array of a 2D image file; 16-bit and float images rescaled by their
    maximum as ``refine`` reads them (``to_gray_uint8``; PIL's "L" conversion clips them to white)."""
    img = open_image(path)  # BadInputError naming the file
    return to_gray_uint8(img) if img.mode in ("L", "1", *WIDE_MODES) else np.asarray(img.convert("RGB"))


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask file -> (H, W) uint8 in {0, 1}, by the package's rule (``imaging.read_label``), which the train task
    also reads labels by: 0/1 label maps, 0/255 and soft 8-bit masks, 16-bit and float levels, a mask drawn in an
    RGBA image's alpha channel, and 2D NIfTI read x first (MONAI Label's default upload, as 3D Slicer and ITK write
    it). BadInputError names the file."""
    return read_label(path).astype(np.uint8)


def write_mask(mask: np.ndarray, path: str | os.PathLike) -> Path:
    """Atomically writes an (H, W) mask as an 8-bit PNG with values as given (1 = lesion)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a 2D mask (H, W) is expected, got shape {mask.shape}")
    return write_png(path, mask.astype(np.uint8))


# ----------------------------------------------------------------------------------------------------- automatic
class BundlePredictor:
    def __init__(
        self,
        bundle_dir: str | os.PathLike,
        checkpoint: str | os.PathLike | None = None,
        overrides: Mapping[str, Any] | None = None,
        outputs: Mapping[str, str] | None = None,
        config: str = "inference.json",
    ) -> None:
        """
        Runs a bundle's inference config on single images.

        Each call stages the image alone in a temporary ``input_dir``, runs the config's ``initialize``/``run``/
        ``finalize`` with ``input_dir``, ``output_dir`` and ``ckpt_path`` overridden, and reads the masks back. The
        network is built once and reused; its weights are reloaded from ``checkpoint`` on every call (the bundle's
        ``CheckpointLoader``), so weights replaced by a training run are served at once.

        Arguments:
          bundle_dir: the bundle folder (``configs/<config>``, ``configs/metadata.json``).
          checkpoint: weights file (default ``<bundle_dir>/models/model.pt``).
          overrides: extra config overrides, e.g. ``{"img_size": 32, "vit_depth": 1}`` for tiny test weights.
          outputs: result name -> path of the PNG written per image under ``output_dir``, ``{stem}`` standing for
            the image name (``{stem}_seg.png`` for the transunet bundle).
          config: the inference config file name.
        """
        self.bundle_dir = Path(bundle_dir).resolve()
        self.config_file = self.bundle_dir / "configs" / config
        if not self.config_file.is_file():
            raise BadInputError(self.config_file, "inference config not found")
        self.checkpoint = Path(checkpoint).resolve() if checkpoint else self.bundle_dir / "models" / "model.pt"
        self.overrides = dict(overrides or {})
        self.outputs = dict(outputs or {"pred": "{stem}_seg.png"})
        self._network: torch.nn.Module | None = None
        self._lock = threading.Lock()  # one shared network: requests run one at a time

    def is_ready(self) -> bool:
        return self.checkpoint.is_file()

    def predict(self, image: str | os.PathLike) -> dict[str, np.ndarray]:
        """Masks of one 2D image: result name -> (H, W) uint8 in {0, 1} at the image's size.

        Raises:
          BadInputError: unreadable image, missing weights, or a config that writes no/other-sized masks.
        """
        image = Path(image)
        size = image_size(image)
        if not self.checkpoint.is_file():
            raise BadInputError(self.checkpoint, f"weights of bundle {self.bundle_dir.name} not found")
        with self._lock, tempfile.TemporaryDirectory(prefix="ultrarefiner_serve_") as tmp:
            input_dir, output_dir = Path(tmp) / "input", Path(tmp) / "output"
            input_dir.mkdir()
            if image.suffix.lower() in IMAGE_SUFFIXES:  # what the inference configs read
                (input_dir / image.name).symlink_to(image.resolve())
            else:
                Image.open(image).save(input_dir / f"{image.stem}.png")
            self._run(input_dir, output_dir)
            result = {}
            for name, pattern in self.outputs.items():
                rel = pattern.format(stem=image.stem)
                path = output_dir / rel
                if not path.is_file():
                    found = sorted(p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*") if p.is_file())
                    raise BadInputError(self.config_file, f"wrote no {rel} for output {name!r}; found {found}")
                mask = imaging.read_mask(path).astype(np.uint8)  # a prediction: read_label's checks are for labels
                if mask.shape != size:
                    raise BadInputError(self.config_file, f"{rel} is {mask.shape}, the image {size} (H, W)")
                result[name] = mask
        return result

    def _run(self, input_dir: Path, output_dir: Path) -> None:
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(self.config_file))
        if "ckpt_path" not in parser:
            raise BadInputError(self.config_file, "defines no 'ckpt_path', so the served weights cannot be set")
        parser.update({"bundle_root": str(self.bundle_dir), **self.overrides, "input_dir": str(input_dir),
                       "output_dir": str(output_dir), "ckpt_path": str(self.checkpoint)})
        if self._network is not None:
            parser["network_def"] = self._network  # skip rebuilding (seconds for ViT-B); weights still reloaded
        for section in ("initialize", "run", "finalize"):
            if section in parser:
                parser.get_parsed_content(section)
        if self._network is None and "network_def" in parser:
            self._network = parser.get_parsed_content("network_def")


# ----------------------------------------------------------------------------------------------------- interactive
class InteractivePredictor:
    def __init__(
        self,
        bundle_dir: str | os.PathLike | None = None,
        checkpoint: str | os.PathLike | None = None,
        overrides: Mapping[str, Any] | None = None,
        model_type: str | None = None,
        preprocessing: str | None = None,
        device: str | torch.device | None = None,
        cache_size: int = 4,
        optimize: str | None = "auto",
    ) -> None:
        """
        The SAM refiner answering clicks, an ROI box and/or a label (``networks.interactive``).

        The refiner is ``ultrarefiner.create_model("sam_refiner", checkpoint)``: a phase-2 refiner file (``best.pt``
        or a bundle's ``models/model.pt``, such as the shipped one) rebuilds the refiner it records; a plain
        SAM/MedSAM/LiteMedSAM weights file is the zero-shot refiner over those weights (``model_type``).

        Arguments:
          bundle_dir: the ``sam_refiner`` bundle folder (optional: where the default checkpoint is).
          checkpoint: weights (default ``<bundle_dir>/models/model.pt``).
          overrides: ``SAMRefiner`` arguments over the file's (e.g. ``{"box_source": "components"}``), or
            ``build_tiny_sam`` arguments for ``model_type="tiny"`` (tests).
          model_type: the SAM of a plain weights file: ``lite_medsam`` (default), ``vit_b``, ``vit_l``, ``vit_h``
            or ``tiny``; None: what a refiner file records.
          preprocessing: None (what the file records, else the model's own: ``litemedsam`` for LiteMedSAM,
            ``medsam`` for vit_b), ``medsam`` or ``sam`` (Meta's weights).
          device: default CUDA when available.
          cache_size: image embeddings kept (successive clicks on one image skip the image encoder).
          optimize: the image encoder's speed option (``fast_inference.fast_encoder``; ``auto``: on a CPU without
            native bfloat16 TorchScript-frozen, LiteMedSAM's stem on row slabs, the same embeddings up to float32
            rounding; "none": the encoder as it is). ``warm_up`` freezes it before the first request.
        """
        self.bundle_dir = Path(bundle_dir).resolve() if bundle_dir else None
        default = self.bundle_dir / "models" / "model.pt" if self.bundle_dir else None
        self.checkpoint = Path(checkpoint).resolve() if checkpoint else default
        if self.checkpoint is None:
            raise ValueError("give the refiner's checkpoint or its bundle folder")
        self.overrides = dict(overrides or {})
        self.model_type = model_type
        self.preprocessing = preprocessing
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cache_size = cache_size
        self.optimize = optimize
        self._refiner = None
        self._encode: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._loaded_mtime: int | None = None
        self._embeddings: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.encoder_calls = 0  # image encodings run (cache misses), reported by predict()
        self._lock = threading.Lock()

    def is_ready(self) -> bool:
        return self.checkpoint.is_file()

    def _build(self) -> torch.nn.Module:
        from ultrarefiner.hub import create_model

        if not self.checkpoint.is_file():
            raise BadInputError(self.checkpoint, "SAM refiner weights not found")
        overrides = {"sam_kwargs": self.overrides} if self.model_type == "tiny" else dict(self.overrides)
        overrides.update({k: v for k, v in (("model_type", self.model_type), ("preprocessing", self.preprocessing))
                          if v is not None})
        return create_model("sam_refiner", self.checkpoint, device=self.device, **overrides)

    def refiner(self):
        """The refiner, rebuilt when the checkpoint file changed since it was loaded."""
        mtime = self.checkpoint.stat().st_mtime_ns if self.checkpoint.is_file() else None
        if self._refiner is None or mtime != self._loaded_mtime:
            from ultrarefiner.engines.inference.fast_inference import fast_encoder

            self._refiner = self._build()
            # a frozen copy of these weights: rebuilt with the refiner, as the cached embeddings are dropped
            self._encode = fast_encoder(self._refiner.sam.image_encoder, self.device, self.optimize)
            self._loaded_mtime = mtime
            self._embeddings.clear()
        return self._refiner

    def _embed(self, refiner: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
        """(1, 1|3, H, W) 0-255 image on the device -> its embeddings through the fast encoder of ``refiner``, the
        one ``refiner()`` just returned (not looked up again: one stat of the checkpoint per request, and the
        embeddings always from the weights that decode them)."""
        return self._encode(refiner.preprocess_image(image.float()))

    def warm_up(self) -> None:
        """Builds the refiner and encodes and refines a synthetic image once, so that the first request pays only
        its own encoding (the frozen encoder is traced on its first input shape, the one every image has)."""
        from ultrarefiner.networks.interactive import refine_interactive

        with self._lock, torch.inference_mode():
            refiner = self.refiner()
            image = torch.linspace(0.0, 255.0, 128 * 128, device=self.device).view(1, 1, 128, 128)
            embeddings = self._embed(refiner, image)
            refine_interactive(refiner, image_embeddings=embeddings, original_size=(128, 128),
                               box=[16.0, 16.0, 96.0, 96.0])

    def predict(
        self,
        image: str | os.PathLike,
        foreground: Sequence[Sequence[float]] = (),
        background: Sequence[Sequence[float]] = (),
        box: Sequence[float] | None = None,
        label: np.ndarray | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Refined mask of one image.

        Arguments:
          image: 2D image file (grayscale or RGB, native size).
          foreground, background: clicks (x, y) = (column, row) in image pixels.
          box: (x0, y0, x1, y1) ROI in image pixels.
          label: (H, W) existing mask (mask prompt).

        Returns:
          (H, W) uint8 mask in {0, 1}; info with the predicted IoU, the prompts used and whether the image
          embedding came from the cache (``embedding_cached``).

        Raises:
          ValueError: no prompt (before the image is encoded), a click outside the image, a label of another size.
          BadInputError: an unreadable image.
        """
        from ultrarefiner.networks.interactive import interactive_prompts, refine_interactive

        # refuse before the image is read and encoded (seconds on a CPU); an all-zero label is no prompt either
        has_label = label is not None and bool(np.asarray(label).any())
        if not (len(foreground) or len(background) or (box is not None and len(box)) or has_label):
            raise ValueError("no prompt: give at least one foreground click, a box or a non-empty label")
        path = Path(image)
        pixels = load_image_uint8(path)
        size = pixels.shape[:2]
        with self._lock, torch.inference_mode():
            refiner = self.refiner()
            # made once, before encoding: a bad prompt fails without the seconds of encoding on a CPU
            prompts = interactive_prompts(refiner, size, foreground, background, box, label, self.device)
            stat = path.stat()
            key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
            embeddings = self._embeddings.get(key)
            cached = embeddings is not None
            if embeddings is None:
                self.encoder_calls += 1
                x = to_device(torch.from_numpy(np.array(pixels)), self.device)
                x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
                embeddings = self._embed(refiner, x)
                self._embeddings[key] = embeddings
                while len(self._embeddings) > self.cache_size:
                    self._embeddings.popitem(last=False)
            self._embeddings.move_to_end(key)
            out = refine_interactive(refiner, image_embeddings=embeddings, original_size=size, prompts=prompts)
        mask = (out["masks"][0, 0] > 0).to(torch.uint8).cpu().numpy()
        info = {
            "iou_prediction": float(out["iou_predictions"].max()),
            "foreground": [list(map(float, p)) for p in foreground],
            "background": [list(map(float, p)) for p in background],
            "box": [float(v) for v in box] if box is not None and len(box) else None,
            "label_prompt": out["prompts"]["mask_input"] is not None,
            "embedding_cached": cached,
        }
        return mask, info


# ----------------------------------------------------------------------------------------------------- training
def write_training_datalist(
    items: Sequence[Mapping[str, str]],
    data_root: str | os.PathLike,
    name: str = "MONAILABEL",
    n_splits: int = 5,
    seed: int = 42,
) -> Path:
    """Writes ``<data_root>/<name>/datalist.json`` (the ``preprocess`` layout) from labelled images.

    Near-duplicate images (difference hash, as ``preprocess``) form one group and share a fold, so a validation
    fold never holds a copy of a training image. Paths are stored absolute; nothing is copied.

    Arguments:
      items: ``{"image": path, "label": path}`` per labelled image (2D PNG/JPEG).
      data_root, name: where the datalist goes; the bundle's ``data_root``/``dataset_name``.
      n_splits: folds (lowered to the number of groups when fewer).
      seed: fold assignment seed.

    Returns:
      the datalist path.

    Raises:
      ValueError: fewer than two labelled images (nothing to validate on).
    """
    from ultrarefiner.data.duplicates import dhash_bits, group_samples, near_duplicate_pairs
    from ultrarefiner.data.splits import assign_folds

    items = sorted(({"image": str(Path(d["image"]).resolve()), "label": str(Path(d["label"]).resolve())}
                    for d in items), key=lambda d: d["image"])
    if len(items) < 2:
        raise ValueError(f"training needs at least 2 labelled images, the datastore has {len(items)}")
    gray = [read_image(d["image"]) for d in items]  # refine's rule: 16-bit rescaled, not clipped to white
    hashes = np.stack([dhash_bits(g) for g in gray])
    roots = group_samples(len(items), [(i, j) for i, j, _ in near_duplicate_pairs(hashes)])
    groups = [f"{name}/g{r:04d}" for r in roots]
    k = max(2, min(n_splits, len(set(groups))))
    if len(set(groups)) < 2:
        raise ValueError("all labelled images are near-duplicates of one another: no independent validation fold")
    folds = assign_folds(groups, ["lesion"] * len(items), k, seed)
    training = [{**d, "fold": f, "group": g, "dataset": name, "class": "lesion",
                 "height": int(a.shape[0]), "width": int(a.shape[1])}
                for d, f, g, a in zip(items, folds, groups, gray, strict=True)]
    out = Path(data_root) / name / "datalist.json"
    write_json(out, {"name": name, "datasets": [name], "n_splits": k, "seed": seed, "training": training,
                     "testing": []})
    return out
