"""Offline quick start: a gallery made from the bundled photos, a tiny local backbone, one index run.

Nothing here needs the network: the photos ship with the package, and the backbone is
a small randomly initialised DINOv2 written with `save_pretrained` and then loaded back
through the same path as a hub id. Random weights still map near-duplicates close
together, which is what the demo's searches show; pass --model for a real backbone.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from pipelines.tiny_models import make_tiny_backbone

PHOTOS = Path(__file__).parent / "data" / "photos"


def bundled_photos() -> list[Path]:
    return sorted(PHOTOS.glob("*.jpg"))


def variants(img: Image.Image, rng: random.Random) -> dict[str, Image.Image]:
    """Views of one photo as a gallery would hold them: re-crops, flips, photometric changes."""
    w, h = img.size
    x, y = rng.randint(0, w // 5), rng.randint(0, h // 5)
    return {
        "orig": img,
        "crop": img.crop((x, y, x + int(w * 0.7), y + int(h * 0.7))),
        "mirror": ImageOps.mirror(img),
        "dark": ImageEnhance.Brightness(img).enhance(0.6),
        "small": img.resize((w // 4, h // 4)),
    }


def write_demo_gallery(folder: str | Path, photos: list[Path] | None = None, seed: int = 0) -> list[str]:
    """Write the gallery (and 3 broken files that must end up in the failures table)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = []
    for photo in photos or bundled_photos():
        img = Image.open(photo).convert("RGB")
        for kind, view in variants(img, rng).items():
            name = f"{photo.stem}/{kind}.jpg"
            (folder / photo.stem).mkdir(exist_ok=True)
            view.save(folder / name, quality=88)
            names.append(name)
    good = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(good, "JPEG")
    (folder / "broken").mkdir(exist_ok=True)
    (folder / "broken" / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (folder / "broken" / "error-page.jpg").write_text("<html><body>404 Not Found</body></html>")
    (folder / "broken" / "empty.png").write_bytes(b"")
    return names


def run_demo(workdir: str, model: str | None, config_path: str | None, overrides: list[str]) -> dict:
    from configs.schema import IndexJobConfig, load_config
    from pipelines.cli import init_ray
    from pipelines.index import run_index
    from storage.search import IndexSearcher

    work = Path(workdir).resolve()
    gallery = work / "gallery"
    if not gallery.exists():
        write_demo_gallery(gallery)
    model = model or make_tiny_backbone(work / "tiny-dinov2")
    cfg = load_config(IndexJobConfig, config_path, {"source.uri": str(gallery), "index.uri": str(work / "index"),
                                                    "model.name": model, "run.part_size": 32}, overrides)
    init_ray(cfg.run.ray_address)
    summary = run_index(cfg)

    searcher = IndexSearcher(str(work / "index"))
    from actors.embed import EmbedImages, load_preprocessing
    from actors.decode import decode_image, letterbox

    prep = load_preprocessing(model, cfg.model.image_size)
    embedder = EmbedImages(model, prep["image_size"], prep["image_mean"], prep["image_std"], cfg.model.pooling)
    queries = bundled_photos()[:3]
    pixels = np.stack([letterbox(decode_image(q.read_bytes(), prep["image_size"], 10**9, 10**9)[0], prep["image_size"], tuple(prep["fill"])) for q in queries])
    scores, ids = searcher.search(embedder.embed_pixels(pixels), k=5, rescore=50)
    catalog = {}
    for name in searcher.manifest["catalog"]["parts"]:
        table = searcher.location.read_parquet("versions", searcher.version, "catalog", name, columns=["image_id", "key"])
        catalog.update(zip(table.column("image_id").to_pylist(), table.column("key").to_pylist()))
    print("\nsearch with the bundled originals as queries (top 5):")
    for q, row_s, row_i in zip(queries, scores, ids):
        hits = ", ".join(f"{catalog.get(int(i), i)} ({s:.3f})" for s, i in zip(row_s, row_i) if i >= 0)
        print(f"  {q.name}: {hits}")
    print(f"\nindex: {work / 'index'}  failures: {work / 'index' / 'versions' / summary['version'] / 'failures'}\n")
    return summary
