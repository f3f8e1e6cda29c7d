"""Near-duplicate detection with a perceptual hash, and grouping of samples that must stay together.

Hash: 256-bit difference hash. The grayscale image is resized to 17x16 with PIL's bilinear filter and each
bit says whether a pixel is brighter than its left neighbour. Two images are near-duplicates when their
hashes differ in at most ``DHASH_THRESHOLD = 10`` of 256 bits. This reproduces, pair for pair and distance
for distance, the reference list shipped with the BUSI copy (``near_duplicates_dhash.tsv``: 64 pairs, 43 of
them among lesion images, one pixel-identical pair filed as both benign and malignant). ``imagehash.dhash``
resizes with a Lanczos filter and finds a different set, hence these few lines. Tune with ``--dup_threshold``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

DHASH_SIZE = 16
DHASH_THRESHOLD = 10


def dhash_bits(image: np.ndarray) -> np.ndarray:
    """(H, W) uint8 image -> (DHASH_SIZE**2,) bool difference hash."""
    small = np.asarray(Image.fromarray(image).resize((DHASH_SIZE + 1, DHASH_SIZE), Image.BILINEAR), dtype=np.int16)
    return (small[:, 1:] > small[:, :-1]).reshape(-1)


def near_duplicate_pairs(
    hashes: np.ndarray, threshold: int = DHASH_THRESHOLD, chunk: int = 2048
) -> list[tuple[int, int, int]]:
    """Pairs ``(i, j, distance)`` with ``i < j`` and Hamming distance <= ``threshold``.

    Args:
        hashes: (N, B) bool hash bits.
    Uses ``|a| + |b| - 2 a.b`` on float32 in row chunks, so 10k images need no N x N x B array.
    """
    bits = hashes.astype(np.float32)
    ones = bits.sum(axis=1)
    pairs = []
    for start in range(0, len(bits), chunk):
        block = bits[start : start + chunk]
        dist = ones[start : start + chunk, None] + ones[None, :] - 2.0 * block @ bits.T
        ii, jj = np.nonzero(np.rint(dist) <= threshold)
        for i, j in zip(ii + start, jj, strict=True):
            if i < j:
                pairs.append((int(i), int(j), int(round(dist[i - start, j]))))
    return sorted(pairs)


def group_samples(n: int, links: list[tuple[int, int]]) -> list[int]:
    """Union-find over ``n`` items; returns for each item the smallest index of its connected component."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in links:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [find(i) for i in range(n)]
