"""Shared by the benchmark scripts: a gallery of real-size JPEGs made from the bundled photos."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

from mllm_index.pipelines.demo import bundled_photos


def random_crop(img: Image.Image, rng: random.Random, min_fraction: float) -> Image.Image:
    """A crop of between min_fraction and all of each side, at a random place: another view of the same scene."""
    w, h = img.size
    f = rng.uniform(min_fraction, 1.0)
    x, y = rng.randint(0, int(w * (1 - f))), rng.randint(0, int(h * (1 - f)))
    return img.crop((x, y, x + int(w * f), y + int(h * f)))


def make_gallery(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.jpg"):  # a larger earlier run's images would be listed too
        if not (stale.stem.isdigit() and int(stale.stem) < n):
            stale.unlink()
    rng = random.Random(seed)
    photos = [Image.open(p).convert("RGB") for p in bundled_photos()]
    paths = []
    for i in range(n):
        view = random_crop(photos[i % len(photos)], rng, 0.75)
        view = view.resize((size, int(size * view.height / view.width)), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            view = ImageOps.mirror(view)
        view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.7, 1.3))
        path = folder / f"{i:05d}.jpg"
        view.save(path, quality=90)
        paths.append(path)
    return paths
