"""Synthetic embeddings for tests and benchmarks: clustered, on a curved low-dimensional manifold.

Uniform random vectors make ANN recall look unlike real embeddings (no neighbourhood
structure); these have clusters and a low intrinsic dimension, as image embeddings do.
"""

from __future__ import annotations

import numpy as np


def clustered_vectors(n: int, dim: int = 64, intrinsic: int = 8, clusters: int = 40, seed: int = 0,
                      dataset_seed: int = 0) -> np.ndarray:
    """L2-normalised float32 vectors (n, dim).

    `dataset_seed` fixes the distribution (cluster centres, projection); `seed` draws
    samples from it, so a query set (another seed) comes from the gallery's distribution.
    """
    structure = np.random.default_rng(dataset_seed)
    centers = structure.normal(size=(clusters, intrinsic))
    projection = structure.normal(size=(intrinsic, dim))
    rng = np.random.default_rng(1_000_003 + seed)
    z = centers[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, intrinsic))
    x = np.tanh(z @ projection) + 0.02 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
