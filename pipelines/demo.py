"""Offline quick start: a gallery made from the bundled photos, a tiny local backbone, one index run.

Nothing here needs the network: the photos ship with the package, and the backbone is
a small randomly initialised DINOv2 written with `save_pretrained` and then loaded back
through the same path as a hub id. Random weights still map near-duplicates close
together, which is what the demo's searches show; pass --model for a real backbone.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

PHOTOS = Path(__file__).parent / "data" / "photos"


def bundled_photos() -> list[Path]:
    return sorted(PHOTOS.glob("*.jpg"))


def make_tiny_backbone(path: str | Path, image_size: int = 112, hidden: int = 64, layers: int = 2) -> str:
    """A small random DINOv2 plus its preprocessor config, saved like a hub checkpoint."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    path = Path(path)
    if (path / "config.json").exists():
        return str(path)
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=2 * hidden,
                          image_size=image_size, patch_size=14)
    Dinov2Model(config).eval().save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BitImageProcessor", "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size}, "size": {"shortest_edge": image_size},
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    }, indent=2))
    return str(path)


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
