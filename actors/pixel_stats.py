"""`bench:pixel-stats`: an embedder with no model, for scale benchmarks and smoke runs.

Measuring how the jobs scale with the gallery needs millions of images through the whole
pipeline on a laptop-class machine; a neural backbone would make the benchmark measure the
model instead. This embedder is cheap and deterministic, and still gives clustered vectors
(similar images get similar statistics): per-cell colour means and brightness spread on a
4x4 grid, centred and L2-normalised (64 dimensions).
"""

from __future__ import annotations

import numpy as np

from mllm_index.actors.embed import PixelEmbedder
from mllm_index.storage.contracts import ModelSpec, Preprocessing

PIXEL_STATS = "bench:pixel-stats"
GRID = 4


def pixel_stats_preprocessing(name: str, image_size: int | None = None) -> Preprocessing:
    return Preprocessing(image_size=int(image_size or 16), image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                         fill=(0, 0, 0))


class PixelStatsEmbedder(PixelEmbedder):
    dim = GRID * GRID * 4

    def __init__(self, image_size: int):
        if image_size % GRID:
            raise ValueError(f"model.image_size must be a multiple of {GRID} for {PIXEL_STATS}, got {image_size}")
        self.cell = image_size // GRID

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        b, c = len(pixels), self.cell
        cells = pixels.astype(np.float32).reshape(b, GRID, c, GRID, c, 3) / 255.0
        means = cells.mean(axis=(2, 4)).reshape(b, -1)
        spread = cells.mean(axis=5).std(axis=(2, 4)).reshape(b, -1)
        vec = np.concatenate([means - 0.5, 2 * spread], axis=1)
        return vec / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-6)


def pixel_stats_kwargs(spec: ModelSpec, prep: Preprocessing, ctx) -> dict:
    return {"image_size": prep.image_size}
