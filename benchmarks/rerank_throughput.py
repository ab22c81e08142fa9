"""MLLM re-ranking throughput on CPU: today's scoring against caches, prefix reuse and vLLM.

    python benchmarks/rerank_throughput.py                       # transformers rows
    python benchmarks/rerank_throughput.py --vllm-python ../vllm-venv/bin/python   # + a vLLM-on-CPU row

A random Qwen2-VL of mid size (hidden 256, head_dim 64, 4 layers; pipelines/tiny_models MID),
photo views at <= 224 x 224 px (~64 visual tokens), --queries queries x --k candidates each,
no candidate shared between queries. Rows, all on the same pairs, end to end (processor included):
- one pair per forward: the scorer as it was, batch size 1 (full-vocabulary logits at every position);
- today's batching: the same, --batch pairs per forward;
- transformers, caches + prefix reuse: MLLMScorer (each image processed and encoded once, the
  query prefix once per query, yes/no rows of the LM head at the last position);
- vLLM on CPU (vLLM's CPU build, run in its own venv by --vllm-python; engine start not timed).
Per row: pairs/s, speed-up over one pair per forward, language-model tokens computed per pair,
FLOPs per pair (2 x parameters x tokens for the LM, 2 x vision parameters x patches per encoded
image, 2 x hidden x vocabulary per logit row; attention ignored, so a lower bound), and the
largest score difference to one pair per forward.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from benchmarks_common import random_crop
from mllm_index.actors.mllm import MLLMScorer, ScoreStats, cap_pixels, p_yes
from mllm_index.pipelines.demo import bundled_photos
from mllm_index.pipelines.tiny_models import MID_BUILDERS


def views(n: int, max_pixels: int, seed: int = 0) -> list[Image.Image]:
    """n distinct views (crop, mirror, brightness) of the bundled photos, capped once as the rerank actor does."""
    rng = random.Random(seed)
    photos = [Image.open(p).convert("RGB") for p in bundled_photos()]
    out = []
    for i in range(n):
        view = random_crop(photos[i % len(photos)], rng, 0.6)
        out.append(cap_pixels(ImageOps.mirror(view) if i % 2 else view, max_pixels))
    return out


def today(scorer: MLLMScorer, pairs, batch: int) -> np.ndarray:
    """The scorer before this change: processor per batch, two images per pair, logits at every position."""
    out = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        inputs = scorer.processor(images=[[cap_pixels(q, scorer.max_pixels), cap_pixels(c, scorer.max_pixels)] for q, c in chunk],
                                  text=[scorer.text] * len(chunk), return_tensors="pt", padding=True)
        with torch.inference_mode():
            logits = scorer.model(**inputs).logits[:, -1, :].float()
        out.append(p_yes(logits[:, scorer.yes_ids], logits[:, scorer.no_ids]).numpy())
    return np.concatenate(out)


def costs(scorer: MLLMScorer) -> dict:
    params = dict(scorer.model.named_parameters())
    vision = sum(p.numel() for n, p in params.items() if "visual" in n)
    embed = scorer.model.get_input_embeddings().weight
    head = scorer.model.get_output_embeddings().weight
    text = sum(p.numel() for n, p in params.items() if "visual" not in n) - embed.numel()
    text -= head.numel() if head is not embed else 0  # embeddings are looked up; the head counts per logit row
    return {"vision": vision, "text": text, "head_row": head.shape[1], "vocab": head.shape[0]}


def flops(c: dict, lm_tokens: float, patches_per_image: float, images: float, logit_rows: float, rows_per_logit: float) -> float:
    vision = 2 * c["vision"] * patches_per_image * images
    return 2 * c["text"] * lm_tokens + vision + 2 * c["head_row"] * rows_per_logit * logit_rows


def timed(fn, pairs):
    t = time.perf_counter()
    scores = fn(pairs)
    return scores, len(pairs) / (time.perf_counter() - t)


def vllm_row(python: str, model: str, folder: Path, pairs_index: list, max_pixels: int) -> dict | None:
    """Runs this script as a vLLM worker in the other venv, on the same saved images and pairs."""
    spec = folder / "pairs.json"
    spec.write_text(json.dumps({"model": model, "pairs": pairs_index, "max_pixels": max_pixels}))
    done = subprocess.run([python, __file__, "--vllm-worker", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"vLLM row not run: the worker exited with {done.returncode}:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads((folder / "vllm.json").read_text())


def vllm_worker(folder: Path) -> None:
    from mllm_index.actors.vllm_scorer import VLLMScorer

    spec = json.loads((folder / "pairs.json").read_text())
    images = {p.stem: Image.open(p).convert("RGB") for p in folder.glob("*.png")}
    pairs = [(images[q], images[c]) for q, c in spec["pairs"]]
    t = time.perf_counter()
    scorer = VLLMScorer(spec["model"], max_pixels=spec["max_pixels"], dtype="float32", device="cpu")
    start = time.perf_counter() - t
    scorer.score([(images["warm_q"], images["warm_c"])])  # first request: kernels, caches
    scorer.stats = ScoreStats(scorer.backend, scorer.path)
    scores, rate = timed(scorer.score, pairs)
    s = scorer.stats
    (folder / "vllm.json").write_text(json.dumps({
        "scores": scores.tolist(), "pairs_per_s": rate, "engine_start_s": start,
        "prompt_tokens": s.prompt_tokens / s.pairs, "computed_tokens": s.computed_tokens / s.pairs}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--k", type=int, default=50, help="candidates per query")
    ap.add_argument("--family", default="qwen2_vl", choices=sorted(MID_BUILDERS))
    ap.add_argument("--max-pixels", type=int, default=224 * 224)
    ap.add_argument("--batch", type=int, default=8, help="pairs per forward for today's batching and the new scorer")
    ap.add_argument("--vllm-python", help="python of a venv with vLLM (e.g. ../vllm-venv/bin/python) for the vLLM row")
    ap.add_argument("--vllm-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vllm_worker:
        return vllm_worker(Path(args.vllm_worker))

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = MID_BUILDERS[args.family](folder / args.family)
        pics = views(args.queries * (args.k + 1) + 2, args.max_pixels)
        queries, cands = pics[: args.queries], pics[args.queries : args.queries + args.queries * args.k]
        index = [(f"q{i}", f"c{i * args.k + j}") for i in range(args.queries) for j in range(args.k)]
        pairs = [(queries[i], cands[i * args.k + j]) for i in range(args.queries) for j in range(args.k)]
        scorer = MLLMScorer(model, max_pixels=args.max_pixels, batch_size=args.batch)
        full = MLLMScorer(model, max_pixels=args.max_pixels, batch_size=args.batch, prefix_reuse=False)
        c = costs(scorer)
        for fn in (lambda p: today(scorer, p, 1), lambda p: today(scorer, p, args.batch), full.score, scorer.score):
            fn([(pics[-2], pics[-1])] * 2)  # warm-up, on other images
        scorer.stats = ScoreStats(scorer.backend, scorer.path)
        scorer.score(pairs)  # untimed: exact prompt and visual token counts of these pairs
        prompt = scorer.stats.prompt_tokens / scorer.stats.pairs  # full prompt length (what a full forward computes)
        patches = 4 * scorer.stats.visual_tokens / (2 * scorer.stats.pairs)  # per image slot; 2 x 2 patches make a token
        scorer.stats = ScoreStats(scorer.backend, scorer.path)

        rows = []
        base, rate1 = timed(lambda p: today(scorer, p, 1), pairs)
        rows.append(("one pair per forward", rate1, prompt, flops(c, prompt, patches, 2, prompt, c["vocab"]), 0.0))
        scores, rate = timed(lambda p: today(scorer, p, args.batch), pairs)
        rows.append((f"today's batching ({args.batch}/forward)", rate, prompt, flops(c, prompt, patches, 2, prompt, c["vocab"]),
                     np.abs(scores - base).max()))
        scores, rate = timed(full.score, pairs)
        rows.append((f"transformers, last-position logits ({args.batch})", rate, prompt,
                     flops(c, prompt, patches, 2, 1, c["vocab"]), np.abs(scores - base).max()))
        scores, rate = timed(scorer.score, pairs)
        s = scorer.stats
        lm_tokens, images = s.computed_tokens / s.pairs, s.images / s.pairs
        answers = len(scorer.yes_ids) + len(scorer.no_ids)
        rows.append((f"transformers, caches + prefix reuse ({args.batch})", rate, lm_tokens,
                     flops(c, lm_tokens, patches, images, 1, answers), np.abs(scores - base).max()))
        vllm = None
        if args.vllm_python:
            for (kq, kc), (q, cand) in zip(index, pairs):
                q.save(folder / f"{kq}.png")
                cand.save(folder / f"{kc}.png")
            pics[-2].save(folder / "warm_q.png")
            pics[-1].save(folder / "warm_c.png")
            vllm = vllm_row(args.vllm_python, model, folder, index, args.max_pixels)
            if vllm:
                unique = (args.queries + len(pairs)) / len(pairs)  # its encoder cache: each image once, if it fits
                rows.append(("vLLM on CPU (prefix + encoder cache)", vllm["pairs_per_s"], vllm["computed_tokens"],
                             flops(c, vllm["computed_tokens"], patches, unique, 1, answers),
                             np.abs(np.array(vllm["scores"]) - base).max()))

    print(f"\n{args.family} (random, hidden 256, head_dim 64, 4 layers), {args.queries} queries x {args.k} candidates, "
          f"<= {args.max_pixels} px per image ({patches / 4:.1f} visual tokens, {prompt:.1f} prompt tokens per pair), "
          f"{torch.get_num_threads()} CPU threads, float32")
    print(f"{'':44s} {'pairs/s':>8s} {'x 1/forward':>11s} {'LM tokens/pair':>15s} {'MFLOP/pair':>11s} {'max |diff|':>11s}")
    for name, rate, tokens, fl, diff in rows:
        print(f"{name:44s} {rate:8.1f} {rate / rate1:11.2f} {tokens:15.1f} {fl / 1e6:11.1f} {diff:11.2e}")
    if vllm:
        print(f"vLLM engine start (not timed above): {vllm['engine_start_s']:.0f} s")
    elif args.vllm_python is None:
        print("vLLM row: not run (give --vllm-python)")


if __name__ == "__main__":
    main()
