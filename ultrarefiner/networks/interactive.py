"""Interactive refinement: user clicks, an ROI box and/or an existing label as prompts of a ``SAMRefiner``.

``SAMRefiner.forward`` derives its prompts from a coarse mask. An annotator gives them directly instead: foreground
and background clicks, a box, the current label (SAM's dense mask prompt), or any mix. Everything is in the
original image's pixel frame, (x, y) = (column, row) as in segment-anything; the refiner's ``geometry`` maps the
prompts into the encoder frame and ``decode`` runs SAM's prompt encoder and mask decoder, so the interactive path
shares preprocessing, prompt scaling and candidate selection with the trained refiner.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .prompts import largest_component, probability_to_mask_logits, tight_box
from .sam_refiner import SAMRefiner

__all__ = ["interactive_prompts", "refine_interactive"]

Point = Sequence[float]


def _check_points(points: Sequence[Point], original_size: tuple[int, int], what: str) -> list[list[float]]:
    h, w = original_size
    out = []
    for p in points:
        if len(p) < 2:
            raise ValueError(f"{what} click {list(p)} must be (x, y)")
        x, y = float(p[0]), float(p[1])
        if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
            raise ValueError(f"{what} click ({x:g}, {y:g}) lies outside the {w}x{h} (WxH) image")
        out.append([x, y])
    return out


def interactive_prompts(
    refiner: SAMRefiner,
    original_size: Sequence[int],
    foreground: Sequence[Point] = (),
    background: Sequence[Point] = (),
    box: Sequence[float] | None = None,
    label: np.ndarray | torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor | None]:
    """SAM prompts for one image from user input, in the format ``SAMRefiner.decode`` takes.

    Arguments:
      refiner (SAMRefiner): gives the mask-prompt frame and logit mapping (``geometry``, ``mask_prompt_mode``).
      original_size: (H, W) of the image.
      foreground, background: clicks as (x, y) pixel coordinates (column, row) of the original image.
      box: (x0, y0, x1, y1) ROI in original-image pixels, corners inclusive.
      label (array or None): (H, W) existing mask of the lesion (0/1, 0/255 or a probability in [0, 1]); becomes
        SAM's dense mask prompt and, without a ``box``, gives the box the refiner would derive from a coarse mask
        (its largest component's, when the refiner uses box prompts: MedSAM and LiteMedSAM were trained on boxes and
        ignore a lone mask prompt). An empty label is ignored (it would only tell SAM "nothing here").
      device: where the prompt tensors go (default: the refiner's).

    Returns:
      dict: "point_coords" (1,N,2), "point_labels" (1,N) (1 foreground, 0 background), "boxes" (1,4),
        "mask_input" (1,1,L,L) logits; entries None when not given.

    Raises:
      ValueError: no prompt at all, a click outside the image, an empty/reversed box, or a label of another size.
    """
    h, w = int(original_size[0]), int(original_size[1])
    device = torch.device(device) if device is not None else refiner.sam.pixel_mean.device
    fg = _check_points(foreground, (h, w), "foreground")
    bg = _check_points(background, (h, w), "background")
    prompts: dict[str, torch.Tensor | None] = {"point_coords": None, "point_labels": None, "boxes": None,
                                               "mask_input": None}
    if fg or bg:
        prompts["point_coords"] = torch.tensor([fg + bg], dtype=torch.float32, device=device)
        prompts["point_labels"] = torch.tensor([[1.0] * len(fg) + [0.0] * len(bg)], device=device)
    if box is not None and len(box) > 0:
        if len(box) != 4:
            raise ValueError(f"box must be (x0, y0, x1, y1), got {list(box)}")
        x0, y0, x1, y1 = (float(v) for v in box)
        x0, x1 = max(0.0, min(x0, x1)), min(w - 1.0, max(x0, x1))
        y0, y1 = max(0.0, min(y0, y1)), min(h - 1.0, max(y0, y1))
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"box {list(box)} covers no area of the {w}x{h} (WxH) image")
        prompts["boxes"] = torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32, device=device)
    if label is not None:
        mask = torch.as_tensor(np.asarray(label) if not torch.is_tensor(label) else label).to(device).float()
        mask = mask.squeeze()
        if tuple(mask.shape) != (h, w):
            raise ValueError(f"label has shape {tuple(mask.shape)}, the image is {(h, w)} (H, W)")
        if float(mask.max()) > 1.0:
            mask = mask / float(mask.max())  # 0/255 (or 0/label index) masks
        if float(mask.max()) > 0.0:
            low = refiner.geometry.mask_prompt_frame(mask[None, None], (h, w))
            prompts["mask_input"] = probability_to_mask_logits(low, refiner.mask_prompt_mode,
                                                               refiner.mask_prompt_max_logit)
            gen = refiner.prompt_generator
            if prompts["boxes"] is None and gen.use_box_prompt and float(mask.max()) > 0.5:
                src = mask[None, None]
                if gen.box_source != "whole":  # one prompt set here: "components" takes the largest too
                    src = src * largest_component(src, max_side=gen.max_side)
                prompts["boxes"] = tight_box(src)[0]
    if all(v is None for v in prompts.values()):
        raise ValueError("no prompt: give at least one foreground click, a box or a non-empty label")
    return prompts


@torch.no_grad()
def refine_interactive(
    refiner: SAMRefiner,
    image: torch.Tensor | None = None,
    image_embeddings: torch.Tensor | None = None,
    original_size: Sequence[int] | None = None,
    foreground: Sequence[Point] = (),
    background: Sequence[Point] = (),
    box: Sequence[float] | None = None,
    label: np.ndarray | torch.Tensor | None = None,
    prompts: dict[str, torch.Tensor | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Refined mask of one image from clicks, a box and/or a label (see ``interactive_prompts``).

    Arguments:
      refiner (SAMRefiner): in eval mode, the candidate with the highest predicted IoU is taken.
      image (torch.Tensor or None): (1,1|3,H,W) image on the 0-255 scale at native resolution.
      image_embeddings (torch.Tensor or None): (1,C,S/16,S/16) ``refiner.encode_image(image)`` from an earlier call
        on the same image (clicks on one image reuse it); then ``original_size`` is required.
      original_size: (H, W); defaults to the image's size.
      foreground, background, box, label: prompts, see ``interactive_prompts``.
      prompts: ``interactive_prompts``'s output for them, when the caller made it already (to refuse a bad prompt
        before encoding the image); the prompt arguments are then not read again.

    Returns:
      dict with "masks" (1,1,H,W) selected logits (lesion where > 0), "iou_predictions" (1,K),
        "image_embeddings" (for the next click) and "prompts".
    """
    if image_embeddings is None:
        if image is None:
            raise ValueError("give image or image_embeddings (+ original_size)")
        original_size = tuple(image.shape[-2:]) if original_size is None else original_size
        image_embeddings = refiner.encode_image(image)
    elif original_size is None:
        raise ValueError("original_size (H, W) is required with image_embeddings")
    size = (int(original_size[0]), int(original_size[1]))
    if prompts is None:
        prompts = interactive_prompts(refiner, size, foreground, background, box, label, image_embeddings.device)
    low_res, iou = refiner.decode(image_embeddings, prompts, size)
    weights = refiner.selection_weights(iou)
    low_res_sel = (weights[:, :, None, None] * low_res).sum(dim=1, keepdim=True)
    masks = refiner.geometry.postprocess_masks(low_res_sel, size)
    return {"masks": masks, "iou_predictions": iou, "image_embeddings": image_embeddings, "prompts": prompts}
