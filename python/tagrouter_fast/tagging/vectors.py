"""The one L2 normalisation every embedding goes through (encoder output, store tag
embeddings, DBSCAN inputs, tag centroids), so cosine similarities mean the same everywhere."""

from __future__ import annotations

import numpy as np

__all__ = ["l2_normalize"]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in float32; zero rows stay zero.

    Args:
        x: ``(n, d)`` array.

    Returns:
        ``(n, d)`` float32 array with unit rows.

    >>> l2_normalize(np.array([[3.0, 4.0]])).tolist()
    [[0.6000000238418579, 0.800000011920929]]
    """
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))
