"""Differentiable SAM prompts (points, box, mask) from a soft coarse mask.

All coordinates here are in the coarse mask's own pixel frame, (x, y) = (column, row) pixel indices (pixel
centre at index + 0.5, SAM's convention: its prompt encoder adds the 0.5 itself). ``sam_geometry`` maps them to
the image and model frames.

Positive point ("deepest-point soft-argmax"):
  A probability-weighted centroid falls outside C/crescent-shaped masks and between two blobs. Instead:
  1. a soft depth map D = sum_k erode^k(p) (iterated 3x3 min-pooling, differentiable; for a hard mask it is the
     chessboard distance to the background) and its hard count Dh = sum_k [erode^k(p) > 0.5];
  2. the deepest pixel c* = argmax Dh (ties broken by D; no gradient). The (2 Dh* - 1)-square around c* is all
     foreground, so every pixel centre within Euclidean radius window * (Dh* - 1) of c* is foreground and the disk
     is convex;
  3. the point is the soft-argmax inside that disk: weights softmax(D / temperature + 2 log p) restricted to the
     disk. A convex combination of points of a convex foreground set stays inside it, so the point lands in the
     lesion for any shape (non-convex, several blobs: the deepest blob wins). Gradients reach p densely through
     the p^2 factor (2 log p) and structurally through D (boundary pixels move the depth).
  The work is done at most ``max_side`` pixels per side (area-downsampled) to keep the erosion loop cheap.

Negative point: picked from the background, never at a box corner (a corner can fall inside a round lesion):
  the same construction on 1 - p, at the background pixel nearest to the positive point among those at least
  ``negative_margin`` * min(h, w) deep into the background (e.g. the hole of a crescent, or just outside the
  lesion's nearest edge), then a soft-argmax in its inscribed disk.

Box:
  - ``moment``: from weighted first and second moments: centre mu, half width sqrt(3 var + 1/4) - 1/2, exact for a
    filled axis-aligned rectangle (a uniform distribution over n pixels has variance (n^2 - 1) / 12). Weights are
    a soft threshold sigmoid((p - 0.5) / 0.025) by default, or p^2: plain p lets diffuse background probability
    blow the box up to the whole image; p^2 only damps it (15% background over a 100x100 image still doubles a
    20-pixel box), the soft threshold removes it (1e-6 weight at p = 0.15) and keeps the gradient at the boundary;
  - ``tight``: min/max pixel indices of p > 0.5 (no gradient);
  - ``straight_through`` (default): forward value = tight box, backward = gradient of the moment box
    (``moment + (tight - moment).detach()``).
  Empty masks (no pixel > 0.5) get the whole-image box and invalid points (label -1, SAM's "not a point").

Mask prompt: ``probability_to_mask_logits`` maps probabilities to logits in SAM's low-res logit range; see there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .labelling import component_labels

__all__ = [
    "BOX_SOURCES",
    "PromptGenerator",
    "component_labels",
    "component_masks",
    "largest_component",
    "moment_box",
    "negative_point",
    "positive_point",
    "probability_to_mask_logits",
    "soft_depth",
    "straight_through_box",
    "tight_box",
]

_EPS = 1e-6
BOX_SOURCES = ("largest", "whole", "components")


def _to_work(prob: torch.Tensor, max_side: int) -> tuple[torch.Tensor, float, float]:
    """Area-downsamples (B,1,H,W) to at most max_side per side; returns it and the (sx, sy) scale back."""
    h, w = int(prob.shape[-2]), int(prob.shape[-1])  # python ints also under tracing (the .ts input size is fixed)
    s = max(h, w)
    if s <= max_side:
        return prob, 1.0, 1.0
    nh, nw = max(1, round(h * max_side / s)), max(1, round(w * max_side / s))
    return F.interpolate(prob, size=(nh, nw), mode="area"), w / nw, h / nh


def _from_work(xy: torch.Tensor, sx: float, sy: float) -> torch.Tensor:
    """Pixel-index coordinates (...,2) from the working frame back to the mask frame (pixel centres aligned)."""
    if sx == 1.0 and sy == 1.0:
        return xy
    scale = xy.new_tensor([sx, sy])
    return (xy + 0.5) * scale - 0.5


def soft_depth(prob: torch.Tensor, iterations: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable depth (distance into the foreground) of a soft mask by iterated 3x3 min-pooling.

    Arguments:
      prob (torch.Tensor): (B,1,H,W) in [0,1].
      iterations (int or None): maximal depth counted; default ceil(min(H,W)/2) (enough for any shape).

    Returns:
      torch.Tensor: soft depth D = sum_k erode^k(prob), (B,1,H,W), differentiable.
      torch.Tensor: hard depth Dh = sum_k [erode^k(prob) > 0.5] (chessboard distance for a binary mask), no grad.
    """
    if iterations is None:
        iterations = math.ceil(min(prob.shape[-2:]) / 2)
    e = prob
    depth = torch.zeros_like(prob)
    hard = torch.zeros_like(prob)
    alive = torch.ones((), dtype=torch.bool, device=prob.device)
    for _ in range(max(1, iterations)):
        on = e.detach() > 0.5
        # no data-dependent break (a host sync per step on a GPU, and untraceable): every step runs, masked once
        # nothing is left in the whole batch, which sums exactly what the break did
        alive = alive & on.any()
        depth = torch.where(alive, depth + e, depth)
        hard = torch.where(alive, hard + on.to(prob.dtype), hard)
        # max_pool pads with -inf, so the image border does not erode (a lesion at the border keeps its depth).
        e = -F.max_pool2d(-e, kernel_size=3, stride=1, padding=1)
    return depth, hard


def _grid(h: int, w: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ys = torch.arange(h, device=like.device, dtype=like.dtype).view(1, h, 1).expand(1, h, w)
    xs = torch.arange(w, device=like.device, dtype=like.dtype).view(1, 1, w).expand(1, h, w)
    return xs.reshape(1, -1), ys.reshape(1, -1)


def _disk_soft_argmax(score: torch.Tensor, prob: torch.Tensor, center: torch.Tensor, radius: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Soft-argmax of score / temperature + 2 log prob over the disk |x - center| <= radius.

    score, prob: (B,1,H,W); center: (B,2) pixel indices (x,y); radius: (B,). Returns (B,2).
    """
    b, _, h, w = prob.shape
    xs, ys = _grid(h, w, prob)
    d2 = (xs - center[:, :1]) ** 2 + (ys - center[:, 1:]) ** 2
    inside = d2 <= (radius.view(-1, 1).clamp_min(0.0) ** 2 + 1e-3)  # always holds the centre pixel
    logits = score.reshape(b, -1) / temperature + 2.0 * torch.log(prob.reshape(b, -1).clamp_min(_EPS))
    logits = logits.masked_fill(~inside, float("-inf"))
    weights = torch.softmax(logits, dim=1)
    return torch.stack([(weights * xs).sum(1), (weights * ys).sum(1)], dim=1)


def _argmax_xy(key: torch.Tensor) -> torch.Tensor:
    """(B,1,H,W) -> (B,2) integer (x,y) of the maximum, as float."""
    w = key.shape[-1]
    idx = key.flatten(1).argmax(dim=1)
    return torch.stack([idx % w, idx // w], dim=1).to(key.dtype)


def positive_point(prob: torch.Tensor, temperature: float = 1.0, window: float = 0.5, max_side: int = 128,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Deepest-point soft-argmax (see module docstring): a point inside the lesion, differentiable in ``prob``.

    Arguments:
      prob (torch.Tensor): (B,1,H,W) soft mask in [0,1].
      temperature (float): softmax temperature on the depth (in working-frame pixels).
      window (float): disk radius as a fraction of the inscribed half-width (< 1 keeps the disk inside).
      max_side (int): working resolution cap.

    Returns:
      torch.Tensor: (B,2) point (x, y) in the mask's pixel frame.
      torch.Tensor: (B,) bool, False where the mask is empty (no pixel > 0.5); such points sit at the centre.
    """
    p, sx, sy = _to_work(prob, max_side)
    depth, hard = soft_depth(p)
    b, _, h, w = p.shape
    key = hard + depth.detach() / (depth.detach().amax(dim=(1, 2, 3), keepdim=True) + 1.0)  # D breaks ties
    center = _argmax_xy(key)
    hard_at = hard.flatten(1).gather(1, (center[:, 1] * w + center[:, 0]).long().view(-1, 1)).squeeze(1)
    valid = hard_at > 0
    radius = window * (hard_at - 1.0)
    xy = _disk_soft_argmax(depth, p, center, radius, temperature)
    xy = _from_work(xy, sx, sy)
    hh, ww = prob.shape[-2:]
    fallback = xy.new_tensor([(ww - 1) / 2.0, (hh - 1) / 2.0]).expand_as(xy)
    return torch.where(valid.view(-1, 1), xy, fallback), valid


def negative_point(prob: torch.Tensor, positive: torch.Tensor | None = None, margin: float = 0.05,
                   temperature: float = 1.0, window: float = 0.5, max_side: int = 128,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A background point near the lesion (not a box corner), differentiable in ``prob``.

    Arguments:
      prob (torch.Tensor): (B,1,H,W) soft mask in [0,1].
      positive (torch.Tensor or None): (B,2) positive point in the mask frame; the background pixel nearest to it
        (among those at least ``margin`` deep into the background) is chosen. None: the deepest background pixel.
      margin (float): minimal depth into the background, as a fraction of min(H, W) of the working frame.
      temperature, window, max_side: as in ``positive_point``.

    Returns:
      torch.Tensor: (B,2) point (x, y) in the mask's pixel frame.
      torch.Tensor: (B,) bool, False where there is no background (then label it -1).
    """
    p, sx, sy = _to_work(prob, max_side)
    bg = 1.0 - p
    depth, hard = soft_depth(bg)
    b, _, h, w = p.shape
    xs, ys = _grid(h, w, p)
    need = max(1.0, margin * min(h, w))
    flat_hard = hard.flatten(1)
    tie = depth.detach().flatten(1) / (depth.detach().flatten(1).amax(dim=1, keepdim=True) + 1.0)
    key = flat_hard + tie  # default: deepest background pixel
    if positive is not None:
        pos_w = positive.detach().clone()
        pos_w = (pos_w + 0.5) / pos_w.new_tensor([sx, sy]) - 0.5  # mask frame -> working frame
        d2 = (xs - pos_w[:, :1]) ** 2 + (ys - pos_w[:, 1:]) ** 2
        near = -d2 + tie  # nearest candidate, deeper on ties
        ok = flat_hard >= need
        key = torch.where(ok.any(dim=1, keepdim=True), near.masked_fill(~ok, float("-inf")), key)
    idx = key.argmax(dim=1)
    center = torch.stack([idx % w, idx // w], dim=1).to(p.dtype)
    hard_at = flat_hard.gather(1, idx.view(-1, 1)).squeeze(1)
    valid = hard_at > 0
    radius = window * (hard_at - 1.0)
    xy = _disk_soft_argmax(depth, bg, center, radius, temperature)
    xy = _from_work(xy, sx, sy)
    return torch.where(valid.view(-1, 1), xy, torch.zeros_like(xy)), valid


def _box_weights(prob: torch.Tensor, weighting: str) -> torch.Tensor:
    if weighting == "square":
        return prob**2
    if weighting == "soft_threshold":
        return torch.sigmoid((prob - 0.5) / 0.025)
    raise ValueError(f"box weighting must be 'square' or 'soft_threshold', got {weighting!r}")


def moment_box(prob: torch.Tensor, weighting: str = "soft_threshold") -> torch.Tensor:
    """Box from weighted first/second moments, differentiable (see module docstring).

    Arguments:
      prob (torch.Tensor): (B,1,H,W) soft mask in [0,1].
      weighting (str): ``soft_threshold`` (sigmoid((p - 0.5) / 0.025), default) or ``square`` (p^2).

    Returns:
      torch.Tensor: (B,4) box (x0, y0, x1, y1) in pixel indices of the mask frame, clamped to the image.
    """
    b, _, h, w = prob.shape
    wts = _box_weights(prob, weighting).reshape(b, -1)
    xs, ys = _grid(h, w, prob)
    mass = wts.sum(1).clamp_min(_EPS)
    mx, my = (wts * xs).sum(1) / mass, (wts * ys).sum(1) / mass
    vx = (wts * (xs - mx.view(-1, 1)) ** 2).sum(1) / mass
    vy = (wts * (ys - my.view(-1, 1)) ** 2).sum(1) / mass
    hx = torch.sqrt(3.0 * vx + 0.25) - 0.5
    hy = torch.sqrt(3.0 * vy + 0.25) - 0.5
    box = torch.stack([mx - hx, my - hy, mx + hx, my + hy], dim=1)
    lo = box.new_zeros(4)
    hi = box.new_tensor([w - 1, h - 1, w - 1, h - 1])
    return torch.maximum(torch.minimum(box, hi), lo)


def tight_box(prob: torch.Tensor, threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight box of ``prob > threshold`` (no gradient).

    Returns:
      torch.Tensor: (B,4) (x0, y0, x1, y1) min/max pixel indices; the whole image where the mask is empty.
      torch.Tensor: (B,) bool, False for empty masks.
    """
    b, _, h, w = prob.shape
    on = prob.detach()[:, 0] > threshold
    rows, cols = on.any(dim=2), on.any(dim=1)  # (B,H), (B,W)
    valid = rows.any(dim=1)
    ar_h = torch.arange(h, device=prob.device)
    ar_w = torch.arange(w, device=prob.device)
    y0 = torch.where(rows, ar_h, h).amin(1)
    y1 = torch.where(rows, ar_h, -1).amax(1)
    x0 = torch.where(cols, ar_w, w).amin(1)
    x1 = torch.where(cols, ar_w, -1).amax(1)
    box = torch.stack([x0, y0, x1, y1], dim=1).to(prob.dtype)
    full = box.new_tensor([0, 0, w - 1, h - 1]).expand_as(box)
    return torch.where(valid.view(-1, 1), box, full), valid


def largest_component(prob: torch.Tensor, threshold: float = 0.5, max_side: int = 128) -> torch.Tensor:
    """The largest 8-connected component of ``prob > threshold`` as a (B,1,H,W) 0/1 float mask (no gradient).

    Labelled in the area-downsampled working frame (at most ``max_side`` per side; areas counted there), then
    mapped back to the full frame and intersected with ``prob > threshold``. An empty mask gives an empty mask.
    It is slot 0 of ``component_masks``.
    """
    return component_masks(prob, 1, 0.0, threshold, max_side)[0]


def component_masks(prob: torch.Tensor, max_components: int = 4, min_fraction: float = 0.001,
                    threshold: float = 0.5, max_side: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``max_components`` largest 8-connected components of ``prob > threshold``, largest first (no gradient).

    Labelled in the area-downsampled working frame like ``largest_component``, with a fixed number of slots so that
    no host sync decides the shapes: slots beyond the mask's components, or whose area is below ``min_fraction`` of
    the image, are marked invalid. Slot 0 (the largest component, as ``largest_component`` gives it) is valid
    whenever the mask has foreground.

    Arguments:
      prob (torch.Tensor): (B,1,H,W) soft mask in [0,1].

    Returns:
      torch.Tensor: (B,K,H,W) 0/1 masks (each intersected with ``prob > threshold``), K = ``max_components``.
      torch.Tensor: (B,K) bool, slot holds a component above the size floor.
    """
    if max_components < 1:
        raise ValueError(f"max_components must be >= 1, got {max_components}")
    with torch.no_grad():
        work, _, _ = _to_work(prob.float(), max_side)
        lab = component_labels(work > threshold)
        b, hw = lab.shape[0], lab[0].numel()
        flat = lab.view(b, -1).long()
        area = torch.zeros(b, hw + 1, device=prob.device).scatter_add_(1, flat, torch.ones_like(lab.view(b, -1)))
        area[:, 0] = 0
        k = min(max_components, hw)
        # (B,K), largest first; a stable sort keeps equal areas in label order (argmax's choice for slot 0); id 0
        # (the background, area 0) only fills slots beyond the mask's components
        top_area, top_id = (t[:, :k] for t in area.sort(dim=1, descending=True, stable=True))
        valid = top_area >= max(min_fraction * hw, 1.0)
        valid[:, 0] = top_area[:, 0] > 0
        comp = (lab == top_id.view(b, k, 1, 1).float()) & (lab > 0)  # (B,K,h,w)
        comp = F.max_pool2d(comp.float(), 3, stride=1, padding=1)  # one working pixel of slack before mapping back
        if comp.shape[-2:] != prob.shape[-2:]:
            comp = F.interpolate(comp, size=prob.shape[-2:], mode="nearest")
        if k < max_components:  # a mask of fewer pixels than slots
            comp = F.pad(comp, (0, 0, 0, 0, 0, max_components - k))
            valid = F.pad(valid, (0, max_components - k), value=False)
        return (comp > 0).to(prob.dtype) * (prob > threshold).to(prob.dtype), valid


def straight_through_box(prob: torch.Tensor, threshold: float = 0.5, weighting: str = "soft_threshold") -> torch.Tensor:
    """Forward: the tight box of ``prob > threshold``; backward: the moment box's gradient. (B,4)."""
    moment = moment_box(prob, weighting)
    tight, _ = tight_box(prob, threshold)
    return moment + (tight - moment).detach()


def probability_to_mask_logits(prob: torch.Tensor, mode: str = "linear", max_logit: float = 10.0) -> torch.Tensor:
    """Maps a probability mask to SAM mask-prompt logits in [-max_logit, max_logit].

    SAM's mask prompt is meant to be its own previous low-res logits (threshold 0, confident pixels around
    +-10 and beyond), not probabilities: a [0,1] mask would look like "everything uncertain, slightly positive".

    Arguments:
      prob (torch.Tensor): (B,1,h,w) in [0,1] (already resized into the low-res frame).
      mode (str): ``linear`` (default): (2p - 1) * max_logit, bounded gradient 2 * max_logit;
        ``logit``: logit(clamp(p, e, 1 - e)) with e = sigmoid(-max_logit), the exact inverse of SAM's sigmoid
        but with gradients up to ~exp(max_logit) near 0 and 1.
      max_logit (float): magnitude given to a certain pixel (p = 0 or 1); p = 0.5 maps to 0 either way.

    Returns:
      torch.Tensor: (B,1,h,w) logits.
    """
    if mode == "linear":
        return (2.0 * prob - 1.0) * max_logit
    if mode == "logit":
        e = 1.0 / (1.0 + math.exp(max_logit))
        return torch.logit(prob.clamp(e, 1.0 - e))
    raise ValueError(f"mask prompt mode must be 'linear' or 'logit', got {mode!r}")


class PromptGenerator(nn.Module):
    def __init__(
        self,
        use_point_prompt: bool = True,
        use_negative_point: bool = False,
        use_box_prompt: bool = True,
        box_mode: str = "straight_through",
        box_weighting: str = "soft_threshold",
        point_temperature: float = 1.0,
        point_window: float = 0.5,
        negative_margin: float = 0.05,
        max_side: int = 128,
        box_source: str = "largest",
    ) -> None:
        """
        Sparse SAM prompts (points and box) from a soft coarse mask, in the mask's pixel frame.

        Arguments:
          use_point_prompt (bool): positive point from ``positive_point``.
          use_negative_point (bool): also a background point from ``negative_point``.
          use_box_prompt (bool): a box.
          box_mode (str): ``straight_through`` (tight forward, moment backward), ``moment`` or ``tight``
            (no gradient).
          box_weighting (str): ``soft_threshold`` (default) or ``square`` (p^2) weights of the moment box.
          point_temperature, point_window, negative_margin, max_side: see ``positive_point``/``negative_point``.
          box_source (str): ``largest`` (default): the box of the coarse mask's largest connected component, or
            ``whole``: the box of the whole mask (a stray false-positive blob then stretches the box over both,
            which measured worse on BUSI; see bundles/sam_refiner/docs/README.md), or ``components``: one prompt
            set per component, which ``SAMRefiner`` builds from ``component_masks``; a single prompt set here (the
            interactive path) then takes the largest component's box.
        """
        super().__init__()
        if box_source not in BOX_SOURCES:
            raise ValueError(f"box_source must be one of {', '.join(map(repr, BOX_SOURCES))}, got {box_source!r}")
        self.box_source = box_source
        if box_mode not in ("straight_through", "moment", "tight"):
            raise ValueError(f"box_mode must be 'straight_through', 'moment' or 'tight', got {box_mode!r}")
        self.use_point_prompt = use_point_prompt
        self.use_negative_point = use_negative_point
        self.use_box_prompt = use_box_prompt
        self.box_mode = box_mode
        self.box_weighting = box_weighting
        self.point_temperature = point_temperature
        self.point_window = point_window
        self.negative_margin = negative_margin
        self.max_side = max_side

    def forward(self, prob: torch.Tensor, box_source: str | None = None) -> dict[str, torch.Tensor | None]:
        """
        Arguments:
          prob (torch.Tensor): (B,1,H,W) soft coarse mask in [0,1].
          box_source (str or None): overrides ``self.box_source`` (``whole`` for a mask already cut to one
            component, which saves the component labelling).

        Returns:
          dict with
            "point_coords": (B,N,2) float (x,y) pixel indices, N = 1 or 2 (positive first), or None;
            "point_labels": (B,N) float, 1 positive, 0 negative, -1 "not a point" (empty mask), or None;
            "boxes": (B,4) float (x0,y0,x1,y1), or None.
        """
        if prob.dim() != 4 or prob.shape[1] != 1:
            raise ValueError(f"coarse mask must be (B,1,H,W), got {tuple(prob.shape)}")
        coords, labels = [], []
        pos = None
        if self.use_point_prompt or self.use_negative_point:
            pos, pos_ok = positive_point(prob, self.point_temperature, self.point_window, self.max_side)
        if self.use_point_prompt:
            coords.append(pos)
            labels.append(torch.where(pos_ok, 1.0, -1.0).to(prob.dtype))
        if self.use_negative_point:
            neg, neg_ok = negative_point(prob, pos, self.negative_margin, self.point_temperature, self.point_window,
                                         self.max_side)
            coords.append(neg)
            # no lesion (empty mask): a lone negative point would contradict the whole-image box, drop it too
            labels.append(torch.where(neg_ok & pos_ok, 0.0, -1.0).to(prob.dtype))
        out: dict[str, torch.Tensor | None] = {"point_coords": None, "point_labels": None, "boxes": None}
        if coords:
            out["point_coords"] = torch.stack(coords, dim=1)
            out["point_labels"] = torch.stack(labels, dim=1)
        if self.use_box_prompt:
            box_prob = prob
            if (box_source or self.box_source) != "whole":
                box_prob = prob * largest_component(prob, max_side=self.max_side)  # gradient through prob inside it
            if self.box_mode == "straight_through":
                out["boxes"] = straight_through_box(box_prob, weighting=self.box_weighting)
            elif self.box_mode == "moment":
                out["boxes"] = moment_box(box_prob, self.box_weighting)
            else:
                out["boxes"] = tight_box(box_prob)[0]
        return out
