"""An instance-retrieval set made from the bundled photos, with the hard cases named.

Each photo gives one instance: a region cropped from it. The query is that region; the
gallery holds four positives, one per condition, and hard negatives (other regions of the
same photo: same colours and textures, another object):
    viewpoint_scale   the region with context, under a perspective warp and a scale change
    occluded          the region with a block covering about a third of it
    small_in_clutter  the region shrunk and pasted into a mosaic of other photos
    photometric       the region with context, much darker or brighter, recoloured, blurred
Written as plain files, a ground-truth table with those conditions, and three broken
files that must land in the failures table.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from mllm_index.storage.ground_truth import write_ground_truth

CONDITIONS = ("viewpoint_scale", "occluded", "small_in_clutter", "photometric")


def _box(w: int, h: int, rng: random.Random, frac: float) -> tuple[int, int, int, int]:
    bw, bh = int(w * frac), int(h * frac)
    x, y = rng.randint(0, w - bw), rng.randint(0, h - bh)
    return x, y, x + bw, y + bh


def _overlap(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return ix * iy / ((a[2] - a[0]) * (a[3] - a[1]))


def _grow(box, img: Image.Image, by: float) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    dx, dy = int((x1 - x0) * by), int((y1 - y0) * by)
    return max(0, x0 - dx), max(0, y0 - dy), min(img.width, x1 + dx), min(img.height, y1 + dy)


def _fit(img: Image.Image, long_side: int) -> Image.Image:
    scale = long_side / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC)


def _perspective(img: Image.Image, rng: random.Random, strength: float = 0.12) -> Image.Image:
    w, h = img.size
    corners = [(0, 0), (w, 0), (w, h), (0, h)]
    moved = [(x + rng.uniform(-strength, strength) * w, y + rng.uniform(-strength, strength) * h) for x, y in corners]
    # PIL wants the coefficients mapping output to input points: solve the 8-unknown linear system.
    rows, rhs = [], []
    for (x, y), (u, v) in zip(corners, moved):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    coeffs = np.linalg.solve(np.array(rows, float), np.array(rhs, float))
    return img.transform((w, h), Image.Transform.PERSPECTIVE, tuple(coeffs), Image.Resampling.BICUBIC, fillcolor=(90, 90, 90))


def _clutter(others: list[Image.Image], rng: random.Random, size=(640, 480)) -> Image.Image:
    canvas = Image.new("RGB", size)
    for y in range(0, size[1], 160):
        for x in range(0, size[0], 160):
            src = rng.choice(others)
            box = _box(src.width, src.height, rng, 0.3)
            canvas.paste(src.crop(box).resize((160, 160)), (x, y))
    return canvas


def instance_views(photo: Image.Image, others: list[Image.Image], rng: random.Random) -> tuple[Image.Image, dict, list]:
    """(query, {condition: positive}, [hard negatives]) for one photo."""
    box = _box(photo.width, photo.height, rng, 0.45)
    region = photo.crop(box)
    query = _fit(region, 400)
    view = _fit(_perspective(photo.crop(_grow(box, photo, 0.3)), rng), rng.randint(360, 560))
    occluded = photo.crop(_grow(box, photo, 0.2))
    rw, rh = region.size
    ow, oh = int(rw * 0.55), int(rh * 0.6)
    ox = box[0] - _grow(box, photo, 0.2)[0] + rng.randint(0, rw - ow)
    oy = box[1] - _grow(box, photo, 0.2)[1] + rng.randint(0, rh - oh)
    occluded.paste(Image.new("RGB", (ow, oh), (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))), (ox, oy))
    clutter = _clutter(others, rng)
    small = _fit(region, rng.randint(200, 260))
    clutter.paste(small, (rng.randint(0, clutter.width - small.width), rng.randint(0, clutter.height - small.height)))
    photometric = photo.crop(_grow(box, photo, 0.25))
    photometric = ImageEnhance.Brightness(photometric).enhance(rng.choice([0.45, 1.6]))
    photometric = ImageEnhance.Color(ImageEnhance.Contrast(photometric).enhance(0.7)).enhance(0.3)
    photometric = _fit(photometric.filter(ImageFilter.GaussianBlur(1.2)), 480)
    positives = {"viewpoint_scale": view, "occluded": _fit(occluded, 480), "small_in_clutter": clutter,
                 "photometric": photometric}
    negatives = []
    for _ in range(50):
        other = _box(photo.width, photo.height, rng, 0.4)
        if _overlap(other, box) < 0.05 and all(_overlap(other, n) < 0.3 for n in negatives):
            negatives.append(other)
        if len(negatives) == 2:
            break
    return query, positives, [_fit(photo.crop(n), 480) for n in negatives]


def write_demo_set(folder: str | Path, photos: list[Path], seed: int = 0) -> dict:
    """Write gallery/, queries/ and gt.parquet under `folder`; returns counts."""
    folder = Path(folder)
    rng = random.Random(seed)
    images = {p.stem: Image.open(p).convert("RGB") for p in photos}
    gt, n_gallery = [], 0
    for stem, photo in images.items():
        others = [img for s, img in images.items() if s != stem]
        query, positives, negatives = instance_views(photo, others, rng)
        _save(query, folder / "queries" / f"{stem}.jpg")
        for condition, img in positives.items():
            _save(img, folder / "gallery" / stem / f"{condition}.jpg")
        for i, img in enumerate(negatives):
            _save(img, folder / "gallery" / stem / f"negative{i}.jpg")
        n_gallery += len(positives) + len(negatives)
        gt.append({"query_id": f"{stem}.jpg", "positives": [f"{stem}/{c}.jpg" for c in positives], "junk": [],
                   "conditions": {f"{stem}/{c}.jpg": c for c in positives}})
    broken = folder / "gallery" / "broken"
    broken.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "JPEG")
    (broken / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (broken / "error-page.jpg").write_text("<html><body>404 Not Found</body></html>")
    (broken / "empty.png").write_bytes(b"")
    write_ground_truth(gt, str(folder / "gt.parquet"))
    return {"instances": len(gt), "gallery_images": n_gallery, "broken_files": 3}


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=90)
