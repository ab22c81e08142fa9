"""Shared by the benchmark scripts: a gallery of real-size JPEGs made from the bundled photos."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

from mllm_index.pipelines.demo import bundled_photos


def make_gallery(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    photos = [Image.open(p).convert("RGB") for p in bundled_photos()]
    paths = []
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        f = rng.uniform(0.75, 1.0)
        x, y = rng.randint(0, int(w * (1 - f))), rng.randint(0, int(h * (1 - f)))
        view = img.crop((x, y, x + int(w * f), y + int(h * f)))
        view = view.resize((size, int(size * view.height / view.width)), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            view = ImageOps.mirror(view)
        view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.7, 1.3))
        path = folder / f"{i:05d}.jpg"
        view.save(path, quality=90)
        paths.append(path)
    return paths
