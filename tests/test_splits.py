"""Split invariants on synthetic group structures."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from ultrarefiner.data.duplicates import group_samples, near_duplicate_pairs
from ultrarefiner.data.splits import assign_folds, split_test


def _groups(n_groups=60, seed=0):
    rng = np.random.default_rng(seed)
    groups, classes = [], []
    for g in range(n_groups):
        size = int(rng.integers(1, 5))
        cls = "malignant" if g % 3 == 0 else "benign"
        groups += [f"g{g}"] * size
        classes += [cls] * size
    return groups, classes


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_no_group_crosses_test_or_folds(seed):
    groups, classes = _groups(seed=seed)
    test = split_test(groups, classes, 0.2, seed)
    side = {}
    for g, t in zip(groups, test, strict=True):
        assert side.setdefault(g, t) == t
    assert abs(sum(test) / len(groups) - 0.2) < 0.05
    train = [i for i, t in enumerate(test) if not t]
    folds = assign_folds([groups[i] for i in train], [classes[i] for i in train], 5, seed)
    fold_of = {}
    for i, k in zip(train, folds, strict=True):
        assert fold_of.setdefault(groups[i], k) == k
    sizes = Counter(folds)
    assert len(sizes) == 5 and max(sizes.values()) - min(sizes.values()) <= 4
    # class balance: each fold holds a share of malignant items close to the overall share
    mal = Counter(k for i, k in zip(train, folds, strict=True) if classes[i] == "malignant")
    assert max(mal.values()) - min(mal.values()) <= 4


def test_deterministic_and_order_free():
    groups, classes = _groups()
    perm = np.random.default_rng(5).permutation(len(groups))
    a = dict(zip(groups, assign_folds(groups, classes, 5, 42), strict=True))
    pg, pc = [groups[i] for i in perm], [classes[i] for i in perm]
    b = dict(zip(pg, assign_folds(pg, pc, 5, 42), strict=True))
    assert a == b
    ta = dict(zip(groups, split_test(groups, classes, 0.2, 7), strict=True))
    tb = dict(zip(pg, split_test(pg, pc, 0.2, 7), strict=True))
    assert ta == tb


def test_too_few_groups():
    with pytest.raises(ValueError, match="cannot fill 5 folds"):
        assign_folds(["a", "a", "b"], ["x"] * 3, 5, 0)


def test_union_find_and_pairs():
    bits = np.zeros((4, 256), bool)
    bits[1, :3] = True  # distance 3 from item 0
    bits[2, :200] = True
    bits[3, :205] = True  # distance 5 from item 2
    assert near_duplicate_pairs(bits, 10) == [(0, 1, 3), (2, 3, 5)]
    assert group_samples(5, [(0, 1), (3, 4), (1, 4)]) == [0, 0, 2, 0, 0]
