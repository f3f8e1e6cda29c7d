"""SAM input/output geometry: image preprocessing, prompt coordinates, mask-prompt frame and postprocessing.

Three modes, to match the checkpoint's training preprocessing (mixing them silently degrades results):

``sam`` (Meta's SAM, ``SamPredictor``):
  image longest side resized to ``img_size`` (``ResizeLongestSide``; the "exact" resize is the predictor's own PIL
  resize on uint8), normalised once with ``pixel_mean``/``pixel_std`` on the 0-255 scale, zero-padded bottom/right
  to img_size x img_size (after normalising, as ``Sam.preprocess``); coordinates scaled by (new_w / W, new_h / H)
  with new size int(size * s + 0.5) (written here: ``apply_coords_torch`` breaks on tensors requiring grad); the mask
  prompt lives in the padded low-res frame; outputs are upsampled to img_size, cropped and resized back
  (``Sam.postprocess_masks``).

``medsam`` (MedSAM's ``MedSAM_Inference.py``):
  image squashed to img_size x img_size (aspect ratio not kept; "exact" = skimage ``transform.resize(order=3,
  preserve_range=True, anti_aliasing=True)`` then ``astype(uint8)``), min-max scaled to [0,1] over the whole image,
  no mean/std, no padding; coordinates/boxes scaled by img_size / [W, H, W, H]; the mask prompt is the coarse mask
  resized to the low-res square; outputs resized straight from low-res to (H, W) (as ``medsam_inference``).

``litemedsam`` (LiteMedSAM's published ``CVPR24_LiteMedSAM_infer.py``; 256 input, TinyViT encoder):
  image longest side resized to img_size (new size int(size * s + 0.5); "exact" = ``cv2.resize(INTER_AREA)`` on
  uint8), min-max scaled to [0,1] over the resized image, no mean/std, then zero-padded bottom/right to
  img_size x img_size; coordinates scaled as in ``sam``. The low-res frame is the padded input itself (L = img_size =
  4 x the 64x64 embedding): the mask prompt is the mask resized to the content size and zero-padded, and outputs are
  cropped to the content and resized to (H, W) (``MedSAMLite.postprocess_masks``).

Whichever the mode, the encoder sees the image at its native resolution (pass the original image, not a 224 crop
upsampled). Images are (B,C,H,W) with values on the 0-255 scale (uint8 or float), C = 1 or 3.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from ultrarefiner.utils.grouping import index_groups, take_rows
from ultrarefiner.utils.transfer import to_device

__all__ = ["SamGeometry", "litemedsam_resize_uint8", "medsam_resize_uint8", "per_sample", "resize_mask"]

_MODES = ("sam", "medsam", "litemedsam")
_PADDED = ("sam", "litemedsam")  # longest side resized, content padded bottom/right
_RESIZES = ("exact", "torch")


def _spline_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_out, 4) source indices and weights of a cubic B-spline zoom n_in -> n_out as ``scipy.ndimage.zoom`` computes
    them with ``order=3, mode='mirror', grid_mode=True``: pixel-centre coordinates, whole-sample mirror at the edges
    (for coordinates and taps alike), scipy's own weight formulas."""
    cc = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    if n_in == 1:
        cc[:] = 0.0
    else:
        cc = np.abs(cc)
        over = cc > n_in - 1
        cc[over] = 2 * (n_in - 1) - cc[over]
    fl = np.floor(cc)
    y = cc - fl
    z = 1.0 - y
    w1 = (y * y * (y - 2.0) * 3.0 + 4.0) / 6.0
    w2 = (z * z * (z - 2.0) * 3.0 + 4.0) / 6.0
    w0 = z * z * z / 6.0
    weights = np.stack([w0, w1, w2, 1.0 - w0 - w1 - w2], axis=1)
    idx = fl.astype(np.int64)[:, None] - 1 + np.arange(4)
    if n_in == 1:
        return np.zeros_like(idx), weights
    period = 2 * n_in - 2
    idx = np.abs(idx) % period
    return np.where(idx >= n_in, period - idx, idx), weights


def medsam_resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """MedSAM's image resize: skimage ``resize(img, (size, size), order=3, preserve_range=True,
    anti_aliasing=True).astype(np.uint8)``, re-stated separably.

    skimage >= 0.19 runs: Gaussian pre-filter with sigma max(0, (factor - 1) / 2) in 'mirror' mode,
    ``ndimage.zoom(order=3, mode='mirror', grid_mode=True)``, clip to the input range. The zoom's cubic B-spline is
    separable, so here it is the same spline prefilter (scipy's) followed by two 4-tap passes (rows, then columns)
    instead of scipy's 16-tap (64 with a channel axis) loop per output pixel: the same arithmetic up to floating-point
    summation order, about 15x faster (16 ms vs 250 ms for a BUSI image to 1024 on one core). Truncation to uint8
    then differs by one grey level where a value lies within ~1e-12 of an integer: 0.03% of the pixels of 33 BUSI
    images, never more than 1 (``tests/test_sam_refiner.py`` checks against skimage).

    Arguments:
      image (np.ndarray): (H, W, C) uint8.
      size (int): output side.

    Returns:
      np.ndarray: (size, size, C) uint8.
    """
    from scipy import ndimage

    img = image.astype(np.float64)
    h, w = img.shape[:2]
    sigma = np.maximum(0.0, (np.array([h / size, w / size]) - 1.0) / 2.0)
    if np.any(sigma > 0):
        img = ndimage.gaussian_filter(img, [*sigma, *([0.0] * (img.ndim - 2))], cval=0.0, mode="mirror")
    if (h, w) != (size, size):  # scipy's zoom returns the input unchanged when every factor is 1
        for axis in (0, 1):  # a zoom factor of 1 on the channel axis: its prefilter and taps cancel exactly
            img = ndimage.spline_filter1d(img, 3, axis=axis, output=np.float64, mode="mirror")
        iy, wy = _spline_taps(h, size)
        ix, wx = _spline_taps(w, size)
        rows = np.einsum("ok,ok...->o...", wy, img[iy])  # (size, W, C)
        img = np.einsum("ok,pok...->po...", wx, rows[:, ix])  # (size, size, C)
    return np.clip(img, image.min(), image.max()).astype(np.uint8)


def litemedsam_resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """LiteMedSAM's image resize (``resize_longest_side``): longest side to ``size``, new side int(side * s + 0.5),
    ``cv2.resize(INTER_AREA)``.

    Arguments:
      image (np.ndarray): (H, W, C) uint8.
      size (int): target of the longest side.

    Returns:
      np.ndarray: (new_h, new_w, C) uint8.
    """
    import cv2

    h, w = image.shape[:2]
    new_h, new_w = ResizeLongestSide.get_preprocess_shape(h, w, size)
    out = cv2.resize(np.ascontiguousarray(image), (new_w, new_h), interpolation=cv2.INTER_AREA)
    return out.reshape(new_h, new_w, *image.shape[2:])  # cv2 drops a trailing channel axis of 1


class SamGeometry:
    def __init__(
        self,
        mode: str = "medsam",
        img_size: int = 1024,
        pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
        pixel_std: Sequence[float] = (58.395, 57.12, 57.375),
        image_resize: str = "exact",
        low_res_size: int | None = None,
    ) -> None:
        """
        Arguments:
          mode (str): ``sam``, ``medsam`` or ``litemedsam`` (see module docstring); must match the checkpoint.
          img_size (int): the image encoder's input side (1024 for SAM/MedSAM, 256 for LiteMedSAM).
          pixel_mean, pixel_std: SAM's normalisation on the 0-255 scale (``sam`` mode only).
          image_resize (str): ``exact`` (the reference resize on uint8 on the CPU: PIL for ``sam``, skimage/scipy
            for ``medsam``, cv2 INTER_AREA for ``litemedsam``; needed to reproduce the checkpoint's preprocessing
            bit for bit, e.g. when building an embedding cache) or ``torch`` (``F.interpolate`` on the tensor's
            device: bilinear antialiased for
            ``sam`` like ``apply_image_torch``, bicubic antialiased for ``medsam``, area/bilinear for
            ``litemedsam``; fast, close but not identical).
          low_res_size (int or None): side L of the mask prompt / low-res logits (4 x the embedding side): None
            takes img_size // 4 (ViT encoders, 16x patches) or img_size for ``litemedsam`` (TinyViT, 4x).
        """
        if mode not in _MODES:
            raise ValueError(f"preprocessing must be one of {_MODES}, got {mode!r}")
        if image_resize not in _RESIZES:
            raise ValueError(f"image_resize must be one of {_RESIZES}, got {image_resize!r}")
        self.mode = mode
        self.img_size = img_size
        self.pixel_mean = torch.tensor(pixel_mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.pixel_std = torch.tensor(pixel_std, dtype=torch.float32).view(1, -1, 1, 1)
        self.image_resize = image_resize
        if low_res_size is None:
            low_res_size = img_size if mode == "litemedsam" else img_size // 4
        if img_size % low_res_size:
            raise ValueError(f"low_res_size {low_res_size} must divide img_size {img_size}")
        self.low_res_size = int(low_res_size)  # mask prompt / low-res output side (256 for SAM and LiteMedSAM)
        self.low_res_factor = img_size // self.low_res_size  # encoder pixels per low-res pixel (4 SAM, 1 LiteMedSAM)

    @property
    def pads(self) -> bool:
        """Longest side resized and content padded bottom/right (``sam``, ``litemedsam``), not squashed."""
        return self.mode in _PADDED

    # ----------------------------------------------------------------------------------------- frames
    def input_size(self, original_size: Sequence[int]) -> tuple[int, int]:
        """(h, w) of the image content inside the img_size x img_size encoder input."""
        h, w = int(original_size[0]), int(original_size[1])
        if self.pads:
            return ResizeLongestSide.get_preprocess_shape(h, w, self.img_size)
        return self.img_size, self.img_size

    def _scale(self, original_size: Sequence[int]) -> tuple[float, float]:
        new_h, new_w = self.input_size(original_size)
        return new_w / float(original_size[1]), new_h / float(original_size[0])

    def _scales(self, original_size: Sequence[int] | Sequence[Sequence[int]], like: torch.Tensor) -> torch.Tensor:
        """(x, y) scales into the encoder frame: (2,) for one size, (B,1,2) for one size per sample."""
        if per_sample(original_size):
            return like.new_tensor([self._scale(s) for s in original_size]).unsqueeze(1)
        return like.new_tensor(self._scale(original_size))

    def transform_coords(self, coords: torch.Tensor, original_size: Sequence[int] | Sequence[Sequence[int]]
                         ) -> torch.Tensor:
        """(B,N,2) (x,y) pixel coordinates of the original image -> encoder input frame (differentiable).
        ``original_size``: (H, W), or one (H, W) per sample."""
        return coords * self._scales(original_size, coords)

    def transform_boxes(self, boxes: torch.Tensor, original_size: Sequence[int] | Sequence[Sequence[int]]
                        ) -> torch.Tensor:
        """(B,4) (x0,y0,x1,y1) of the original image -> encoder input frame (differentiable).
        ``original_size``: (H, W), or one (H, W) per sample."""
        return (boxes.unflatten(-1, (2, 2)) * self._scales(original_size, boxes)).flatten(-2)

    # ----------------------------------------------------------------------------------------- image
    def resize_uint8(self, image: np.ndarray) -> np.ndarray:
        """The exact reference resize of one (H,W,3) uint8 image into the encoder frame (for data workers or an
        embedding cache): (new_h,new_w,3) in ``sam`` mode (PIL, as ``SamPredictor.set_image``) and ``litemedsam``
        mode (cv2 INTER_AREA, as LiteMedSAM), (S,S,3) in ``medsam`` mode (skimage/scipy, as MedSAM). Feed the result
        to ``preprocess_image(..., resized=True)``."""
        if self.mode == "sam":
            return ResizeLongestSide(self.img_size).apply_image(image)
        if self.mode == "litemedsam":
            return litemedsam_resize_uint8(image, self.img_size)
        return medsam_resize_uint8(image, self.img_size)

    def preprocess_image(self, image: torch.Tensor, resized: bool = False) -> torch.Tensor:
        """
        Arguments:
          image (torch.Tensor): (B,C,H,W), C in {1,3}, values on the 0-255 scale (uint8 or float).
          resized (bool): the image is already in the encoder frame (``resize_uint8`` output: long side img_size
            for ``sam``/``litemedsam``, img_size x img_size for ``medsam``); only normalisation and padding remain.

        Returns:
          torch.Tensor: (B,3,img_size,img_size) float32 encoder input, on the image's device.
        """
        if image.dim() != 4 or image.shape[1] not in (1, 3):
            raise ValueError(f"image must be (B,1|3,H,W), got {tuple(image.shape)}")
        if image.is_floating_point() and 0.0 < float(image.max()) <= 1.0:
            raise ValueError("image values look like [0,1]; SAM/MedSAM preprocessing expects the 0-255 scale")
        if image.shape[1] == 1:
            image = image.expand(-1, 3, -1, -1)
        if resized:
            h, w = image.shape[-2:]
            ok = max(h, w) == self.img_size if self.pads else h == w == self.img_size
            if not ok:
                raise ValueError(f"a resized image must match the {self.mode} encoder frame, got {(h, w)}")
        if self.mode == "sam":
            x = image.float() if resized else self._resize_sam(image)
            x = (x - to_device(self.pixel_mean, x.device)) / to_device(self.pixel_std, x.device)  # 0-255 scale
            h, w = x.shape[-2:]
            return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))
        if self.mode == "litemedsam":
            x = image.float() if resized else self._resize_litemedsam(image)
            h, w = x.shape[-2:]
            return F.pad(_min_max(x), (0, self.img_size - w, 0, self.img_size - h))  # normalise, then pad
        x = image.float() if resized else self._resize_medsam(image)
        return _min_max(x)

    @staticmethod
    def _to_uint8_numpy(image: torch.Tensor) -> np.ndarray:
        """(B,3,H,W) -> (B,H,W,3) uint8 (float images are rounded and clipped)."""
        if image.dtype != torch.uint8:
            image = image.detach().float().round().clamp(0, 255).to(torch.uint8)
        return image.permute(0, 2, 3, 1).contiguous().cpu().numpy()

    def _resize_sam(self, image: torch.Tensor) -> torch.Tensor:
        new_h, new_w = self.input_size(image.shape[-2:])
        if self.image_resize == "exact":
            resize = ResizeLongestSide(self.img_size)
            arr = np.stack([resize.apply_image(a) for a in self._to_uint8_numpy(image)])
            return to_device(torch.from_numpy(arr), image.device).permute(0, 3, 1, 2).float()
        return F.interpolate(image.float(), (new_h, new_w), mode="bilinear", align_corners=False, antialias=True)

    def _resize_litemedsam(self, image: torch.Tensor) -> torch.Tensor:
        new_h, new_w = self.input_size(image.shape[-2:])
        if self.image_resize == "exact":
            arr = np.stack([litemedsam_resize_uint8(a, self.img_size) for a in self._to_uint8_numpy(image)])
            return to_device(torch.from_numpy(arr), image.device).permute(0, 3, 1, 2).float()
        shrink = new_h < image.shape[-2]
        x = F.interpolate(image.float(), (new_h, new_w), mode="area" if shrink else "bilinear",
                          align_corners=None if shrink else False)
        return x.round().clamp(0, 255)  # cv2 rounds to uint8

    def _resize_medsam(self, image: torch.Tensor) -> torch.Tensor:
        if self.image_resize == "exact":
            arr = np.stack([medsam_resize_uint8(a, self.img_size) for a in self._to_uint8_numpy(image)])
            return to_device(torch.from_numpy(arr), image.device).permute(0, 3, 1, 2).float()
        x = F.interpolate(image.float(), (self.img_size, self.img_size), mode="bicubic", align_corners=False,
                          antialias=True)
        return x.clamp(0, 255).floor()  # the recipe casts to uint8 (truncation) before min-max

    # ----------------------------------------------------------------------------------------- masks
    def mask_prompt_frame(self, prob: torch.Tensor, original_size: Sequence[int] | Sequence[Sequence[int]]
                          ) -> torch.Tensor:
        """Places a soft mask of the original image into SAM's low-res mask-prompt frame (differentiable).

        Arguments:
          prob (torch.Tensor): (B,1,h,w) in [0,1], covering the whole original image (any resolution).
          original_size: (H, W) of the original image, or one (H, W) per sample.

        Returns:
          torch.Tensor: (B,1,L,L) probabilities (``low_res_size``). ``sam``/``litemedsam``: the mask resized to the
            image's content size in the encoder frame, padded with 0 (background) bottom/right, average-pooled to L
            (4x for SAM, none for LiteMedSAM), so it lines up with the padded image; ``medsam``: resized straight to
            L x L.
        """
        if per_sample(original_size):  # the padded content differs per size; a squashed frame does not
            if len(original_size) != prob.shape[0]:
                raise ValueError(f"{len(original_size)} sizes for a batch of {prob.shape[0]}")
            if not self.pads:
                return resize_mask(prob, (self.low_res_size, self.low_res_size))
            groups = index_groups((int(s[0]), int(s[1])) for s in original_size)
            if len(groups) == 1:
                return self.mask_prompt_frame(prob, next(iter(groups)))
            order = [i for idx in groups.values() for i in idx]
            framed = torch.cat([self.mask_prompt_frame(take_rows(prob, idx), s) for s, idx in groups.items()])
            return framed[to_device(torch.tensor(order).argsort(), prob.device)]  # back to the batch's order
        if self.pads:
            new_h, new_w = self.input_size(original_size)
            x = resize_mask(prob, (new_h, new_w))
            x = F.pad(x, (0, self.img_size - new_w, 0, self.img_size - new_h), value=0.0)
            f = self.low_res_factor
            return F.avg_pool2d(x, kernel_size=f, stride=f) if f > 1 else x
        return resize_mask(prob, (self.low_res_size, self.low_res_size))

    def postprocess_masks(self, low_res: torch.Tensor, original_size: Sequence[int]) -> torch.Tensor:
        """(B,C,L,L) low-res logits -> (B,C,H,W) logits at the original size (``Sam.postprocess_masks`` in
        ``sam`` mode; crop to the content, then one bilinear resize in ``litemedsam`` mode, as
        ``MedSAMLite.postprocess_masks``; one bilinear resize in ``medsam`` mode, as ``medsam_inference``)."""
        size = (int(original_size[0]), int(original_size[1]))
        if self.pads:
            x = low_res
            if self.low_res_factor > 1:
                x = F.interpolate(low_res, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
            new_h, new_w = self.input_size(original_size)
            x = x[..., :new_h, :new_w]
            return F.interpolate(x, size, mode="bilinear", align_corners=False)
        return F.interpolate(low_res, size, mode="bilinear", align_corners=False)


def per_sample(original_size: Sequence[int] | Sequence[Sequence[int]]) -> bool:
    """Whether ``original_size`` holds one (H, W) per sample (a sequence of pairs) rather than one (H, W)."""
    return len(original_size) > 0 and not isinstance(original_size[0], (int, np.integer)) and \
        not (isinstance(original_size[0], torch.Tensor) and original_size[0].dim() == 0)


def _min_max(x: torch.Tensor) -> torch.Tensor:
    """Per-image min-max scaling to [0, 1] (MedSAM and LiteMedSAM normalise this way, without mean/std)."""
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-8)


def resize_mask(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B,C,h,w) soft masks -> (B,C,H,W): bilinear, antialiased when shrinking (a thin lesion must not vanish
    between samples); the mask prompt's resize."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=shrink)
