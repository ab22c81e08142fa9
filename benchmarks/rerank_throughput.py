"""MLLM re-ranking throughput: pairs/s by pairs per forward pass, one pair per forward as baseline.

    python benchmarks/rerank_throughput.py --pairs 96 --family qwen2_vl

The model is a tiny random one of the chosen family, built offline (pipelines/tiny_models),
scoring real photo pairs (bundled photos, capped at --max-pixels per image). Printed per
batch size: pairs/s end to end and for the forward pass alone, their speed-ups over batch
size 1, the largest score difference to batch size 1, and FLOPs per pair
(2 x parameters x tokens, a lower bound that ignores attention).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mllm_index.actors.mllm import MLLMScorer, cap_pixels
from mllm_index.pipelines.demo import bundled_photos
from mllm_index.pipelines.tiny_models import BUILDERS


def photo_pairs(n: int, max_pixels: int) -> list[tuple[Image.Image, Image.Image]]:
    """Photo pairs, each image capped once (as the rerank actor does after decoding)."""
    photos = [cap_pixels(Image.open(p).convert("RGB"), max_pixels) for p in bundled_photos()]
    return [(photos[i % len(photos)], photos[(i * 7 + 3) % len(photos)]) for i in range(n)]


def flops_per_pair(scorer: MLLMScorer, pair) -> float:
    images = [[cap_pixels(pair[0], scorer.max_pixels), cap_pixels(pair[1], scorer.max_pixels)]]
    inputs = scorer.processor(images=images, text=[scorer.text], return_tensors="pt")
    tokens = int(inputs["attention_mask"].sum())
    patches = int(inputs["pixel_values"].shape[0]) if "image_grid_thw" in inputs else tokens
    params = dict(scorer.model.named_parameters())
    vision = sum(p.numel() for n, p in params.items() if "visual" in n or "vision" in n)
    text = sum(p.numel() for p in params.values()) - vision
    return 2 * text * tokens + 2 * vision * patches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--family", default="qwen2_vl", choices=sorted(BUILDERS))
    ap.add_argument("--max-pixels", type=int, default=112 * 112)
    ap.add_argument("--batch-sizes", default="1,8,32")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = BUILDERS[args.family](Path(tmp) / args.family)
        scorer = MLLMScorer(model, max_pixels=args.max_pixels)
        pairs = photo_pairs(args.pairs, args.max_pixels)
        scorer.score(pairs[:4])  # warm-up
        forward = scorer.model.forward
        spent = {"forward": 0.0}

        def timed_forward(*a, **kw):
            t = time.perf_counter()
            out = forward(*a, **kw)
            spent["forward"] += time.perf_counter() - t
            return out

        scorer.model.forward = timed_forward
        rows, reference = [], None
        for b in (int(x) for x in args.batch_sizes.split(",")):
            scorer.batch_size = b
            spent["forward"] = 0.0
            t = time.perf_counter()
            scores = scorer.score(pairs)
            secs = time.perf_counter() - t
            reference = scores if reference is None else reference
            rows.append((b, len(pairs) / secs, len(pairs) / spent["forward"], float(np.abs(scores - reference).max())))
        flops = flops_per_pair(scorer, pairs[0])

    print(f"\n{args.family} (tiny, random weights), {args.pairs} photo pairs, <= {args.max_pixels} px per image, "
          f"{torch.get_num_threads()} CPU threads, float32")
    print(f"{'pairs/forward':>13s} {'pairs/s':>9s} {'x batch 1':>10s} {'forward-only pairs/s':>21s} {'x batch 1':>10s} "
          f"{'max |diff| vs b=1':>18s}")
    base, fbase = rows[0][1], rows[0][2]
    for b, rate, frate, diff in rows:
        print(f"{b:13d} {rate:9.1f} {rate / base:10.2f} {frate:21.1f} {frate / fbase:10.2f} {diff:18.2e}")
    print("pairs/s includes the processor (tokenise, resize, patchify: per image, so batching cannot amortise it)")
    print(f"FLOPs per pair (2 x params x tokens): {flops / 1e6:.1f} MFLOP")


if __name__ == "__main__":
    main()
