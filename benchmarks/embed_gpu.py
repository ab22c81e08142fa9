"""The embed actor at real backbone sizes on a GPU: images/s, and what folding the normalisation changes.

    python benchmarks/embed_gpu.py                    # DINOv2 small / base / large shapes, 224 px, bf16, GPU
    python benchmarks/embed_gpu.py --tiny             # the same code path on CPU, small shapes, float32

Random weights in the published DINOv2 shapes (a config, `save_pretrained`, loaded back through
`EmbedImages` like any checkpoint). Input: random uint8 letterboxed pixels in host memory, as the
decode stage hands them over, so each batch includes its host-to-device copy.

Per shape, in one run:
- `EmbedImages` with the normalisation folded into the patch embedding (the default) and without;
- images/s of each (the median of --repeats timed batches after a warm-up);
- the cosine similarity of each one's embeddings to a float32 run without autocast (the reference),
  so a fold that cost accuracy under bf16 would show here.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Dinov2Config, Dinov2Model

from mllm_index.actors import embed

SHAPES = {  # name: (hidden, layers, heads), from the published facebook/dinov2-* configs
    "dinov2_small": (384, 12, 6),
    "dinov2_base": (768, 12, 12),
    "dinov2_large": (1024, 24, 16),
}
TINY = {"tiny": (32, 1, 2)}


def save_backbone(folder: Path, hidden: int, layers: int, heads: int, image_size: int) -> str:
    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden,
                          image_size=image_size, patch_size=14)
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(folder)
    return str(folder)


def embedder(path: str, image_size: int, device: str, dtype: str, fold: bool) -> embed.EmbedImages:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    original = embed.fold_normalisation
    if not fold:
        embed.fold_normalisation = lambda *args: False
    try:
        return embed.EmbedImages(path, image_size, mean, std, dtype=dtype, device=device)
    finally:
        embed.fold_normalisation = original


def rate(model: embed.EmbedImages, pixels: np.ndarray, repeats: int) -> float:
    model.embed_pixels(pixels)  # warm-up (cuDNN / kernel choice)
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        model.embed_pixels(pixels)  # returns host numpy: the device work is done when it returns
        times.append(time.perf_counter() - t)
    return len(pixels) / float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small shapes on CPU (checks the script, not the GPU)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    device = "cpu" if args.tiny else "cuda"
    dtype = "float32" if args.tiny else "bfloat16"
    shapes = TINY if args.tiny else SHAPES
    pixels = np.random.default_rng(0).integers(0, 256, (args.batch, args.image_size, args.image_size, 3), dtype=np.uint8)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in shapes.items():
            path = save_backbone(Path(tmp) / name, *shape, args.image_size)
            reference = embedder(path, args.image_size, device, "float32", fold=False).embed_pixels(pixels[:32])
            for fold in (True, False):
                model = embedder(path, args.image_size, device, dtype, fold)
                cos = (model.embed_pixels(pixels[:32]) * reference).sum(1)
                rows.append((name, "folded" if model.folded else "normalise, then model", rate(model, pixels, args.repeats),
                             float(cos.min()), float(cos.mean())))
                del model
                if device == "cuda":
                    torch.cuda.empty_cache()
    print(f"\n{'backbone':14s} {'input':22s} {'images/s':>9s} {'cos min':>9s} {'cos mean':>9s}")
    for name, how, r, lo, mean in rows:
        print(f"{name:14s} {how:22s} {r:9.1f} {lo:9.5f} {mean:9.5f}")
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device: {gpu}; {dtype} (autocast on CUDA); batches of {args.batch} uint8 {args.image_size}px images from host "
          f"memory; cos: against float32 without autocast, unfolded")


if __name__ == "__main__":
    main()
