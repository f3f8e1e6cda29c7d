"""Differentiable prompts from a soft coarse mask: points inside odd shapes, boxes, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ultrarefiner.networks.prompts import (
    PromptGenerator,
    component_labels,
    component_masks,
    largest_component,
    moment_box,
    negative_point,
    positive_point,
    probability_to_mask_logits,
    soft_depth,
    straight_through_box,
    tight_box,
)


def _grid(h, w):
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return xs, ys


def crescent(h=96, w=128):
    """A thin C: the weighted centroid lies in the hole."""
    xs, ys = _grid(h, w)
    r = ((xs - 64) ** 2 + (ys - 48) ** 2).sqrt()
    ring = (r > 28) & (r < 38)
    opening = (xs > 64) & ((ys - 48).abs() < 22)
    return (ring & ~opening).float()[None, None]


def two_blobs(h=80, w=100, big_second=True):
    m = torch.zeros(1, 1, h, w)
    m[..., 10:25, 8:23] = 1  # 15x15
    s = 22 if big_second else 15
    m[..., 45 : 45 + s, 60 : 60 + s] = 1
    return m


def soften(m, background=0.1, blur=2):
    """Blurred mask with diffuse background probability (like a network output)."""
    k = 2 * blur + 1
    p = F.avg_pool2d(m, k, stride=1, padding=blur, count_include_pad=False)
    return (background + (1 - 2 * background) * p).clamp(0, 1)


def _value_at(mask, xy):
    x, y = xy.round().long().tolist()
    return mask[0, 0, y, x].item()


def _centroid(p):
    xs, ys = _grid(*p.shape[-2:])
    w = p[0, 0] ** 2
    return torch.stack([(w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()])


@pytest.mark.parametrize("soft", [False, True])
def test_positive_point_inside_crescent_where_centroid_is_not(soft):
    hard = crescent()
    p = soften(hard) if soft else hard
    assert _value_at(hard, _centroid(p)) == 0  # the naive soft-argmax misses
    xy, ok = positive_point(p)
    assert ok.all()
    assert _value_at(hard, xy[0]) == 1


@pytest.mark.parametrize("big_second", [True, False])
def test_positive_point_inside_one_of_two_blobs(big_second):
    hard = two_blobs(big_second=big_second)
    assert _value_at(hard, _centroid(hard)) == 0
    for p in (hard, soften(hard)):
        xy, _ = positive_point(p)
        assert _value_at(hard, xy[0]) == 1
    if big_second:  # the deepest blob wins
        assert xy[0, 0] > 55 and xy[0, 1] > 40


def test_positive_point_downsampled_path_and_batch():
    big = F.interpolate(crescent(), size=(300, 400), mode="nearest")
    batch = torch.cat([big, F.interpolate(two_blobs(), size=(300, 400), mode="nearest")])
    xy, ok = positive_point(batch, max_side=64)
    assert ok.all()
    for i in range(2):
        assert _value_at(batch[i : i + 1], xy[i]) == 1


def test_positive_point_gradient_and_empty_mask():
    p = soften(crescent()).requires_grad_(True)
    xy, _ = positive_point(p)
    xy.sum().backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    empty = torch.zeros(2, 1, 32, 40)
    xy, ok = positive_point(empty)
    assert not ok.any()
    out = PromptGenerator(use_negative_point=True)(empty)
    assert (out["point_labels"] == -1).all()  # SAM's "not a point"
    assert torch.equal(out["boxes"], torch.tensor([[0.0, 0, 39, 31]] * 2))


def test_soft_depth_is_chessboard_distance_for_hard_masks():
    m = torch.zeros(1, 1, 20, 20)
    m[..., 2:13, 3:14] = 1  # 11x11 square: centre depth 6
    _, hard = soft_depth(m)
    assert hard.max() == 6 and hard[0, 0, 7, 8] == 6 and hard[0, 0, 2, 3] == 1


def test_negative_point_in_background_near_lesion_not_box_corner():
    m = torch.zeros(1, 1, 100, 100)
    xs, ys = _grid(100, 100)
    m[0, 0] = (((xs - 50) ** 2 + (ys - 50) ** 2) < 30**2).float()  # a disk fills its box corners' neighbourhoods
    p = soften(m).requires_grad_(True)
    pos, _ = positive_point(p)
    neg, ok = negative_point(p, pos)
    assert ok.all() and _value_at(m, neg[0]) == 0
    d_lesion = ((neg[0] - torch.tensor([50.0, 50.0])).norm() - 30).item()
    assert 2 <= d_lesion <= 15  # just outside, not far away in a corner of the image
    neg.sum().backward()
    assert p.grad.abs().sum() > 0
    # crescent: the background pixel nearest to the lesion's deepest point
    hard = crescent()
    pos, _ = positive_point(hard)
    neg, ok = negative_point(hard, pos)
    assert ok.all() and _value_at(hard, neg[0]) == 0
    full = torch.ones(1, 1, 30, 30)
    assert not negative_point(full)[1].any()


def test_moment_box_equals_tight_box_for_rectangle():
    m = torch.zeros(2, 1, 50, 60)
    m[0, :, 10:21, 5:31] = 1
    m[1, :, 0:50, 40:41] = 1  # one-pixel-wide column
    tight, ok = tight_box(m)
    assert ok.all()
    assert torch.equal(tight, torch.tensor([[5.0, 10, 30, 20], [40, 0, 40, 49]]))
    assert torch.allclose(moment_box(m), tight, atol=1e-4)


def test_moment_box_robust_to_diffuse_background():
    m = torch.zeros(1, 1, 100, 100)
    m[..., 40:60, 40:60] = 1
    p = 0.15 + 0.85 * m  # 15% probability everywhere else
    plain_weighting = p / p.sum()
    xs, _ = _grid(100, 100)
    mx = (plain_weighting[0, 0] * xs).sum()
    half_plain = (3 * (plain_weighting[0, 0] * (xs - mx) ** 2).sum() + 0.25).sqrt() - 0.5
    half_sq = ((lambda b: b[0, 2] - b[0, 0])(moment_box(p, weighting="square"))) / 2
    assert half_plain > 35  # p weighting: the box covers most of the image
    assert half_sq < half_plain - 4  # p^2 damps the background...
    box = moment_box(p)  # ...the soft threshold (default) removes it
    assert torch.allclose(box, torch.tensor([[40.0, 40, 59, 59]]), atol=0.5)
    p_low = 0.03 + 0.97 * m  # p^2 is near with low background (2.4 px too wide here)
    assert torch.allclose(moment_box(p_low, weighting="square"), box, atol=3.0)


def test_straight_through_box_forward_tight_backward_moment():
    p = soften(two_blobs(), background=0.05).requires_grad_(True)
    st = straight_through_box(p)
    assert torch.equal(st.detach(), tight_box(p)[0])
    g_st = torch.autograd.grad(st.sum(), p)[0]
    g_mo = torch.autograd.grad(moment_box(p).sum(), p)[0]
    assert torch.allclose(g_st, g_mo) and g_st.abs().sum() > 0
    assert tight_box(p)[0].requires_grad is False


def test_prompt_generator_switches_and_shapes():
    p = soften(crescent()).expand(3, -1, -1, -1).clone()
    out = PromptGenerator(use_negative_point=True)(p)
    assert out["point_coords"].shape == (3, 2, 2) and out["point_labels"].tolist() == [[1.0, 0.0]] * 3
    assert out["boxes"].shape == (3, 4)
    out = PromptGenerator(use_point_prompt=False, use_box_prompt=False)(p)
    assert out == {"point_coords": None, "point_labels": None, "boxes": None}
    out = PromptGenerator(use_point_prompt=False, use_negative_point=True, box_mode="moment")(p)
    assert out["point_labels"].tolist() == [[0.0]] * 3
    with pytest.raises(ValueError):
        PromptGenerator(box_mode="corners")


def test_mask_logits_scaling():
    p = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3)
    assert torch.allclose(probability_to_mask_logits(p), torch.tensor([-10.0, 0.0, 10.0]).view(1, 1, 1, 3))
    lg = probability_to_mask_logits(p, mode="logit", max_logit=8.0)
    assert torch.allclose(lg, torch.tensor([-8.0, 0.0, 8.0]).view(1, 1, 1, 3), atol=1e-3)


def test_positive_point_inside_random_non_convex_shapes():
    g = torch.Generator().manual_seed(0)
    xs, ys = _grid(64, 96)
    masks = []
    for _ in range(24):  # unions and differences of random ellipses: rings, bananas, several blobs
        m = torch.zeros(64, 96, dtype=torch.bool)
        for k in range(4):
            cx, cy, rx, ry = (torch.rand(4, generator=g) * torch.tensor([96, 64, 20, 14]) + torch.tensor([0, 0, 4, 4]))
            e = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1
            m = m & ~e if k == 3 else m | e
        if m.sum() < 10:
            continue
        masks.append(m.float()[None, None])
    batch = torch.cat(masks)
    for p in (batch, soften(batch)):
        xy, ok = positive_point(p)
        assert ok.all()
        for i in range(len(masks)):
            assert _value_at(batch[i : i + 1], xy[i]) == 1


def test_component_labels_and_largest_component():
    m = two_blobs()
    lab = component_labels(m > 0.5)
    assert lab[m == 0].eq(0).all() and len(torch.unique(lab[m > 0])) == 2
    right = (torch.arange(100) >= 50).float()  # the big second blob lies right of column 50, the small one left
    assert torch.equal(largest_component(m), m * right)
    assert torch.equal(largest_component(crescent()), crescent())  # 8-connected: one component
    assert torch.equal(largest_component(torch.zeros(2, 1, 30, 40)), torch.zeros(2, 1, 30, 40))
    # per sample in a batch, and on the downsampled working frame (400x320 -> 128x102): back at full resolution
    big = soften(F.interpolate(m, scale_factor=4, mode="nearest"), 0.05)
    flipped = big.flip(-1).flip(-2)
    comp = largest_component(torch.cat([big, flipped]), max_side=128)
    right = (torch.arange(400) >= 200).float()
    assert torch.equal(comp[0:1], (big > 0.5).float() * right)
    assert torch.equal(comp[1:2], (flipped > 0.5).float() * right.flip(0))


def test_box_of_the_largest_component_and_its_gradient():
    p = soften(two_blobs(), background=0.05).requires_grad_(True)
    largest = PromptGenerator(use_point_prompt=False)(p)["boxes"]  # box_source="largest" is the default
    whole = PromptGenerator(use_point_prompt=False, box_source="whole")(p)["boxes"]
    assert torch.allclose(largest, torch.tensor([[60.0, 45, 81, 66]]), atol=1.0)
    assert torch.equal(whole.detach(), tight_box(p)[0]) and whole[0, 0] < 12  # stretched over the small blob too
    (g,) = torch.autograd.grad(largest.sum(), p)
    assert g[..., 40:75, 55:90].abs().sum() > 0
    assert g[..., :35, :35].abs().sum() == 0  # nothing reaches the blob left out of the box
    empty = torch.zeros(1, 1, 32, 40)
    assert torch.equal(PromptGenerator(use_point_prompt=False)(empty)["boxes"], torch.tensor([[0.0, 0, 39, 31]]))
    with pytest.raises(ValueError, match="box_source"):
        PromptGenerator(box_source="biggest")


def test_component_masks_largest_first_with_a_size_floor():
    m = two_blobs()  # 15x15 blob and 22x22 blob
    m[..., 70:73, 2:5] = 1  # a 3x3 speck: 5 px above 0.5 once softened, 0.0006 of the image
    p = soften(m, background=0.05, blur=1)
    comps, valid = component_masks(p, max_components=4, min_fraction=0.001)
    assert comps.shape == (1, 4, 80, 100) and valid.tolist() == [[True, True, False, False]]
    fg = (p > 0.5).float()
    assert torch.equal(comps[0, 0], fg[0, 0] * (torch.arange(80)[:, None] >= 40) * (torch.arange(100) > 5))
    assert torch.equal(comps[0, 1], fg[0, 0] * (torch.arange(80)[:, None] < 40))  # then the 15x15 one
    assert comps[0, 2].sum() > 0 and comps[0, 3].sum() == 0  # the speck is found, but below the floor
    assert torch.equal(comps[:, :1], largest_component(p))  # slot 0 is what box_source="largest" uses
    # empty masks: no valid slot; more slots than pixels: padded
    empty_comps, empty_valid = component_masks(torch.zeros(2, 1, 8, 8), max_components=3)
    assert empty_comps.sum() == 0 and not empty_valid.any()
    tiny_comps, tiny_valid = component_masks(torch.ones(1, 1, 1, 2), max_components=3)
    assert tiny_comps.shape == (1, 3, 1, 2) and tiny_valid.tolist() == [[True, False, False]]
    with pytest.raises(ValueError, match="max_components"):
        component_masks(p, max_components=0)
