"""Re-ranking at real model sizes on a GPU: pairs/s and the fraction of the FLOP bound, per backend.

    python benchmarks/rerank_gpu.py                         # Qwen2.5-VL-3B and Qwen3-VL-2B shapes, bf16, GPU
    python benchmarks/rerank_gpu.py --models qwen3_vl_2b --tokens 256
    python benchmarks/rerank_gpu.py --tiny                  # the same code paths on CPU: small shapes, float32

Random weights in the real shapes (pipelines/tiny_models.build_qwen with config overrides; the
tokenizer is the small offline one, so prompts are a few text tokens plus the images). Images are
random pixels of exactly sqrt(tokens) x (patch x merge) px a side, so each carries the stated
number of visual tokens (64, 256, 1024). Each query has --k candidates, none shared.

Rows per (model, visual tokens): transformers with one full prompt per pair (batched), transformers
with caches + prefix reuse, and vLLM (prefix + encoder cache), where vLLM is installed.
FLOP bound: the pairs/s the device would reach at its peak rate (--peak-tflops, else the bf16 dense
peak of known GPUs, else a measured matmul rate) on the work that must be done: each image encoded
once, each query prefix once, each candidate suffix once, attention included; the fraction is
pairs/s over that bound, the same yardstick for every row.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from mllm_index.actors.mllm import MLLMScorer, ScoreStats
from mllm_index.pipelines.tiny_models import Size, build_qwen

SHAPES = {  # name: (family, text config, vision config), from the published configs
    "qwen2_5_vl_3b": ("qwen2_5_vl",
                      dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                           num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                           rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
                      dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31])),
    "qwen3_vl_2b": ("qwen3_vl",
                    dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                          "mrope_interleaved": True}),
                    dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                         num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17])),
}
TINY = Size(hidden=256, layers=2, heads=4, kv_heads=2, ffn=512, vision=128, vision_depth=2, vision_heads=2)  # head_dim 64
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0}


def peak_flops(device: str, given: float | None) -> tuple[float, str]:
    if given:
        return given * 1e12, "given"
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name} bf16 dense peak"
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(5):  # best of 5: other processes on the machine only ever slow it down
        t = time.perf_counter()
        for _ in range(4):
            a @ a
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * 4 / (time.perf_counter() - t))
    return best, f"measured {n}x{n} {dtype} matmul, best of 5"


def template_tokens(path: str) -> tuple[int, int, int]:
    """Text tokens before, between and after the two images in the rendered prompt."""
    from mllm_index.actors.mllm import DEFAULT_PROMPT, load_processor, prompt_messages, render_prompt
    from mllm_index.actors.prefix_reuse import token_runs

    processor = load_processor(path)
    image = Image.new("RGB", (64, 64))
    text = render_prompt(processor, prompt_messages(DEFAULT_PROMPT))
    ids = processor(images=[[image, image]], text=[text], return_tensors="pt")["input_ids"][0].tolist()
    (s1, e1), (s2, e2) = token_runs(ids, processor.tokenizer.convert_tokens_to_ids(processor.image_token))
    return s1, s2 - e1, len(ids) - e2


def needed_flops(config, tokens: int, text_tokens: tuple[int, int, int], k: int) -> float:
    """FLOPs per pair of the minimum work: images once, query prefix once per k pairs, LM head rows ignored."""
    t, v = config.text_config, config.vision_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    q_width, kv_width = t.num_attention_heads * head_dim, t.num_key_value_heads * head_dim
    per_token = t.num_hidden_layers * 2 * (t.hidden_size * (2 * q_width + 2 * kv_width) + 3 * t.hidden_size * t.intermediate_size)
    attention = lambda lo, hi: t.num_hidden_layers * 4 * q_width * (hi * (hi + 1) - lo * (lo + 1)) / 2  # noqa: E731
    a, b, c = text_tokens
    prefix, total = a + tokens + b, a + b + c + 2 * tokens
    lm = (per_token * prefix + attention(0, prefix)) / k + per_token * (total - prefix) + attention(prefix, total)
    patches = 4 * tokens
    width = getattr(v, "hidden_size", None) if hasattr(v, "out_hidden_size") else v.embed_dim
    ffn = getattr(v, "intermediate_size", None) or width * getattr(v, "mlp_ratio", 4)
    vision = v.depth * (2 * patches * (4 * width * width + 2 * width * ffn) + 4 * width * patches**2)
    return lm + vision * (1 + k) / k  # one query image per k pairs plus one candidate image per pair


def random_images(n: int, side: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def run(scorer, queries, cands, k, warm) -> float:
    pairs = [(q, c) for i, q in enumerate(queries) for c in cands[i * k : (i + 1) * k]]
    scorer.score([(warm[0], warm[1]), (warm[0], warm[2])])  # warm-up, on other images
    scorer.stats = ScoreStats(scorer.backend, scorer.path)  # count the timed pairs only
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    scorer.score(pairs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(pairs) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small shapes, float32, on CPU: checks the script, not the GPU")
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--tokens", default=None, help="visual tokens per image (default 64,256,1024; --tiny: 16,64)")
    ap.add_argument("--queries", type=int, default=None)
    ap.add_argument("--k", type=int, default=None, help="candidates per query (default 50; --tiny: 8)")
    ap.add_argument("--batch", type=int, default=None, help="pairs per transformers forward (default k)")
    ap.add_argument("--backends", default="transformers,vllm")
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args()
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("no GPU here: use --tiny to run the same code paths on CPU")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    levels = [int(x) for x in (args.tokens or ("16,64" if args.tiny else "64,256,1024")).split(",")]
    queries_n, k = args.queries or (2 if args.tiny else 4), args.k or (8 if args.tiny else 50)
    batch = args.batch or k
    peak, peak_source = peak_flops(device, args.peak_tflops)
    backends = args.backends.split(",")
    if "vllm" in backends and importlib.util.find_spec("vllm") is None:
        print("vllm: not installed in this environment (extra [vllm]); its rows are not run")
        backends.remove("vllm")

    print(f"{'model':14s} {'vis tok':>7s} {'backend':32s} {'pairs/s':>9s} {'bound':>9s} {'of bound':>8s} {'LM tok/pair':>11s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            family, text, vision = SHAPES[name]
            side_unit = 32 if family == "qwen3_vl" else 28
            top = max(levels)
            if args.tiny:
                text, vision = {}, {}
            torch.manual_seed(0)
            path = build_qwen(Path(tmp) / name, family, TINY, text=text, vision=vision, dtype=dtype, device=device)
            config = transformers.AutoConfig.from_pretrained(path)
            text_tokens = template_tokens(path)
            max_pixels = (int(top**0.5) * side_unit) ** 2
            scorers = []
            if "transformers" in backends:
                scorers += [("transformers, full prompt per pair", dict(prefix_reuse=False)),
                            ("transformers, caches + prefix reuse", {})]
            for label, extra in scorers + ([("vllm, prefix + encoder cache", None)] if "vllm" in backends else []):
                if extra is None:
                    from mllm_index.actors.vllm_scorer import VLLMScorer

                    scorer = VLLMScorer(path, max_pixels=max_pixels, dtype="float32" if args.tiny else "bfloat16", device=device,
                                        engine={"gpu_memory_utilization": 0.85} if device == "cuda" else None)
                else:
                    scorer = MLLMScorer(path, max_pixels=max_pixels, batch_size=batch, device=device,
                                        dtype="float32" if args.tiny else "bfloat16", **extra)
                for tokens in levels:
                    side = int(tokens**0.5) * side_unit
                    images = random_images(queries_n * (k + 1) + 3, side, seed=tokens)
                    rate = run(scorer, images[:queries_n], images[queries_n:-3], k, images[-3:])
                    s = scorer.stats.summary()
                    bound = peak / needed_flops(config, tokens, text_tokens, k)
                    print(f"{name:14s} {tokens:7d} {label:32s} {rate:9.1f} {bound:9.1f} {rate / bound:8.1%} "
                          f"{s['computed_tokens_per_pair'] or 0:11.1f}", flush=True)
                del scorer
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device: {where}, peak {peak / 1e9:.0f} GFLOP/s ({peak_source}); "
          f"{queries_n} queries x {k} candidates per level, {'float32' if args.tiny else 'bf16'}")


if __name__ == "__main__":
    main()
