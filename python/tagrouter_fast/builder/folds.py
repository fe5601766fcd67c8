"""Stratified k-fold splits: the inner cross-validation of the builder's tuning and the
evaluation's outer folds use the same splitter."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["stratified_folds"]


def stratified_folds(strata: Sequence[str], k: int, seed: int) -> list[np.ndarray]:
    """Split row indices into ``k`` test folds, each stratum spread evenly.

    Every stratum is shuffled with ``seed`` and dealt round-robin, starting where the previous
    stratum stopped, so fold sizes differ by at most one and every stratum's share per fold
    differs by at most one query.

    >>> [len(f) for f in stratified_folds(["a", "a", "b", "b"], 2, 0)]
    [2, 2]
    """
    if k < 2:
        raise ValueError("need at least 2 folds")
    n = len(strata)
    if n < k:
        raise ValueError(f"{n} queries cannot make {k} folds")
    rng = np.random.default_rng(seed)
    labels = np.asarray(strata, dtype=object)
    folds: list[list[int]] = [[] for _ in range(k)]
    start = 0
    for s in sorted(set(strata)):
        idx = np.flatnonzero(labels == s)
        rng.shuffle(idx)
        for r, i in enumerate(idx):
            folds[(start + r) % k].append(int(i))
        start = (start + len(idx)) % k
    return [np.sort(np.asarray(f, dtype=np.int64)) for f in folds]
