"""Group-aware, class-balanced, deterministic test split and K-fold assignment.

Groups (patients, near-duplicate clusters) are never divided. Randomness comes only from
``numpy.random.default_rng(seed)`` applied to group ids sorted as strings, so the same seed gives the same
split whatever order the files were listed in (no ``hash()``, no global RNG).
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np


def _ordered_groups(groups: list[str], seed: int) -> list[str]:
    unique = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(unique))
    return [unique[i] for i in order]


def _majority_class(groups: list[str], classes: list[str]) -> dict[str, str]:
    votes: dict[str, Counter] = defaultdict(Counter)
    for g, c in zip(groups, classes, strict=True):
        votes[g][c] += 1
    # ties broken by class name so the result does not depend on input order
    return {g: min(v.items(), key=lambda kv: (-kv[1], kv[0]))[0] for g, v in votes.items()}


def split_test(groups: list[str], classes: list[str], test_ratio: float, seed: int) -> list[bool]:
    """Mark items for the test split: about ``test_ratio`` of each class, drawn over whole groups."""
    size = Counter(groups)
    major = _majority_class(groups, classes)
    target = {c: test_ratio * n for c, n in Counter(major[g] for g in groups).items()}
    taken: Counter = Counter()
    test_groups = set()
    for g in _ordered_groups(groups, seed):
        c = major[g]
        # take the group if that brings the class count closer to its target
        if abs(taken[c] + size[g] - target[c]) < abs(taken[c] - target[c]):
            taken[c] += size[g]
            test_groups.add(g)
    return [g in test_groups for g in groups]


def assign_folds(groups: list[str], classes: list[str], n_splits: int, seed: int) -> list[int]:
    """Fold index per item; each group goes whole to the fold with the fewest items of its class so far."""
    if n_splits < 2:
        raise ValueError(f"n_splits must be >= 2, got {n_splits}")
    size = Counter(groups)
    if len(size) < n_splits:
        raise ValueError(f"{len(size)} groups cannot fill {n_splits} folds")
    major = _majority_class(groups, classes)
    order = _ordered_groups(groups, seed)
    rank = {g: i for i, g in enumerate(order)}
    total = np.zeros(n_splits, dtype=np.int64)
    counts: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(n_splits, dtype=np.int64))
    fold_of: dict[str, int] = {}
    # largest groups first (seeded order breaks ties) keeps folds even
    for g in sorted(order, key=lambda g: (-size[g], rank[g])):
        c = counts[major[g]]
        k = int(np.lexsort((total, c))[0])  # fewest of this class, then fewest overall
        fold_of[g] = k
        c[k] += size[g]
        total[k] += size[g]
    return [fold_of[g] for g in groups]
