"""vLLM backend for pair scoring (extra `[vllm]`): the same prompts and P(yes) as `MLLMScorer`.

The prompt is the text of `mllm.prompt_messages` rendered by the checkpoint's chat template,
with the two images as multimodal data (query first), so vLLM's automatic prefix cache
reuses the query's blocks for its k candidates and its encoder cache reuses image features.
One token is generated under `allowed_token_ids = yes + no variants`; with
`logprobs_mode="processed_logprobs"` the returned logprobs are over those tokens only, and
P(yes) follows the same rule as the transformers backend (`mllm.p_yes`).

Two ways to run it:
- `VLLMScorer`: an offline `vllm.LLM` inside the rerank actor, `score(pairs)` like MLLMScorer;
- `build_rerank_processor`: a `ray.data.llm` processor (vLLMEngineProcessorConfig from the
  reranker config) that maps rows of (query image, candidate image) to `rerank_score`.
vLLM is imported only when one of these is built.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from typing import Any

import numpy as np
import torch
from PIL import Image

from mllm_index.actors.mllm import (DEFAULT_PROMPT, Keys, ScoreStats, answer_token_ids, cap_pixels, image_keys, load_processor,
                                    p_yes, prompt_messages, render_prompt, set_pixel_budget)

log = logging.getLogger(__name__)
BACKENDS = ("auto", "transformers", "vllm")


def on_gpu(device: str) -> bool:
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def resolve_backend(r: dict) -> str:
    """`reranker.backend`: auto picks vLLM on a GPU where it is installed, transformers elsewhere."""
    backend = r.get("backend") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"reranker.backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    installed = importlib.util.find_spec("vllm") is not None
    if backend == "vllm" and not installed:
        raise ValueError("reranker.backend: vllm needs the [vllm] extra (pip install 'mllm-index[vllm]'); "
                         "or set reranker.backend: transformers")
    if backend == "auto":
        return "vllm" if installed and on_gpu(r.get("device", "auto")) else "transformers"
    return backend


def engine_kwargs(r: dict, n_answers: int = 20, pixel_size: dict | None = None) -> dict:
    """vLLM engine options from the reranker settings; `reranker.vllm_engine` overrides any of them.

    block_size must not exceed the shared prefix (query image plus template), or no block is
    ever complete and shared: 16 on GPU; vLLM's CPU attention takes multiples of 32 only."""
    gpu = on_gpu(r.get("device", "auto"))
    dtype = r.get("dtype", "auto")
    visual = math.ceil(1.1 * r["max_pixels"] / (28 * 28)) + 8  # 28 px per token: Qwen2/2.5-VL, the densest family
    kw: dict[str, Any] = {
        "enable_prefix_caching": True,
        "limit_mm_per_prompt": {"image": 2, "video": 0},
        "max_model_len": 256 * math.ceil((2 * visual + 256) / 256),
        "block_size": 16 if gpu else 32,
        "dtype": ("bfloat16" if gpu else "float32") if dtype == "auto" else dtype,
        "max_logprobs": max(20, n_answers),
        "logprobs_mode": "processed_logprobs",  # logprobs after allowed_token_ids: over the answer tokens only
        "enforce_eager": not gpu,  # on CPU, compiling costs more than a scoring job saves
        "seed": 0,
    }
    if pixel_size:
        kw["mm_processor_kwargs"] = {"size": dict(pixel_size)}
    kw.update(r.get("vllm_engine") or {})
    return kw


def sampling_params(answer_ids: list[int]) -> dict:
    return {"max_tokens": 1, "temperature": 0.0, "logprobs": len(answer_ids), "allowed_token_ids": list(answer_ids),
            "detokenize": False}


def p_yes_from_logprobs(logprobs: dict, yes_ids: list[int], no_ids: list[int]) -> float:
    """P(yes) from one position's {token id: logprob} (vLLM Logprob objects or ray.data.llm dicts)."""
    value = lambda t: logprobs[t] if isinstance(logprobs[t], float) else (  # noqa: E731
        logprobs[t]["logprob"] if isinstance(logprobs[t], dict) else logprobs[t].logprob)
    missing = [t for t in yes_ids + no_ids if t not in logprobs]
    if missing:
        raise RuntimeError(f"vLLM returned no logprob for answer tokens {missing}: the engine needs "
                           "logprobs_mode='processed_logprobs' and max_logprobs >= the number of answer tokens")
    lp = lambda ids: torch.tensor([[value(t) for t in ids]], dtype=torch.float64)  # noqa: E731
    return float(p_yes(lp(yes_ids), lp(no_ids))[0])


class PromptSpec:
    """Prompt text, answer tokens and pixel budget of a checkpoint: what both vLLM paths share."""

    def __init__(self, model: str, prompt: str = DEFAULT_PROMPT, yes_words=("yes",), no_words=("no",),
                 max_pixels: int = 448 * 448, min_pixels: int | None = None, system_prompt: str | None = None,
                 instruction: str | None = None, between_images: str | None = None):
        processor = load_processor(model)
        tok = processor.tokenizer
        self.yes_ids, self.no_ids = answer_token_ids(tok, list(yes_words)), answer_token_ids(tok, list(no_words))
        if set(self.yes_ids) & set(self.no_ids):
            raise ValueError("the yes and no words share a token")
        self.text = render_prompt(processor, prompt_messages(prompt, system_prompt, instruction, between_images))
        self.max_pixels = max_pixels
        self.pixel_size = set_pixel_budget(processor.image_processor, max_pixels, min_pixels)
        token = getattr(processor, "image_token", None)
        self.image_token = tok.convert_tokens_to_ids(token) if token else None
        self.params = sampling_params(self.yes_ids + self.no_ids)

    def request(self, query, candidate, uuids: tuple[str, str] | None = None) -> dict:
        req = {"prompt": self.text, "multi_modal_data": {"image": [query, candidate]}}
        if uuids:
            req["multi_modal_uuids"] = {"image": list(uuids)}
        return req


class VLLMScorer:
    """P(yes) per (query, candidate) pair from an offline vLLM engine; the interface of MLLMScorer."""

    backend, path = "vllm", "vllm_prefix_cache"

    def __init__(self, model: str, prompt: str = DEFAULT_PROMPT, yes_words=("yes",), no_words=("no",),
                 max_pixels: int = 448 * 448, batch_size: int = 8, dtype: str = "auto", device: str = "auto",
                 num_threads: int | None = None, *, min_pixels: int | None = None, system_prompt: str | None = None,
                 instruction: str | None = None, between_images: str | None = None, engine: dict | None = None,
                 content_keys: bool = False):
        from vllm import LLM, SamplingParams

        self.spec = PromptSpec(model, prompt, yes_words, no_words, max_pixels, min_pixels, system_prompt, instruction,
                               between_images)
        self.max_pixels, self.batch_size = max_pixels, batch_size
        settings = {"max_pixels": max_pixels, "dtype": dtype, "device": device, "vllm_engine": engine or {}}
        self.engine_kwargs = engine_kwargs(settings, len(self.spec.params["allowed_token_ids"]), self.spec.pixel_size)
        self.llm = LLM(model=model, **self.engine_kwargs)
        self.params = SamplingParams(**self.spec.params)
        self.content_keys = content_keys  # caller keys name image content across calls: vLLM may skip hashing pixels
        self.stats = ScoreStats(self.backend, self.path)

    def score(self, pairs: list[tuple[Image.Image, Image.Image]], keys: Keys | None = None) -> np.ndarray:
        """P(yes) per pair, in order; the whole list goes to the engine, which batches and caches itself."""
        if not pairs:
            return np.zeros(0, np.float32)
        ids = image_keys(pairs, keys)
        capped: dict = {}
        for (q, c), (kq, kc) in zip(pairs, ids):  # each unique image resized once
            capped.setdefault(kq, q)
            capped.setdefault(kc, c)
        capped = {k: cap_pixels(v, self.max_pixels) for k, v in capped.items()}
        uuid = (lambda kq, kc: (str(kq), str(kc))) if self.content_keys and keys is not None else (lambda kq, kc: None)
        requests = [self.spec.request(capped[kq], capped[kc], uuid(kq, kc)) for kq, kc in ids]
        outputs = self.llm.generate(requests, self.params, use_tqdm=False)
        scores = np.array([p_yes_from_logprobs(o.outputs[0].logprobs[0], self.spec.yes_ids, self.spec.no_ids)
                           for o in outputs], np.float32)
        s = self.stats  # images: image slots in prompts (vLLM's encoder cache dedups them itself)
        s.pairs, s.forwards, s.images = s.pairs + len(pairs), s.forwards + 1, s.images + 2 * len(pairs)
        for o in outputs:
            n, cached = len(o.prompt_token_ids), int(o.num_cached_tokens or 0)
            s.prompt_tokens, s.cached_tokens = s.prompt_tokens + n, s.cached_tokens + cached
            s.computed_tokens += n - cached
            if self.spec.image_token is not None:
                s.visual_tokens += list(o.prompt_token_ids).count(self.spec.image_token)
        return scores


# -- ray.data.llm ------------------------------------------------------------------------------
def processor_config(r: dict, pixel_size: dict | None = None, n_answers: int = 20, env: dict | None = None):
    """A `ray.data.llm.vLLMEngineProcessorConfig` from the reranker settings (the config section).

    Prompts arrive rendered and images as multimodal data, so the chat-template, tokenize and
    detokenize stages are off. `concurrency` engine replicas; `accelerator_type` (e.g. "H100")
    pins them to that GPU type; on CPU one engine takes one CPU bundle. `env`: environment variables of
    the engine replicas (the prefix-cache tally's name, actors/vllm_prefix_stats.py)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    gpu = on_gpu(r.get("device", "auto"))
    return vLLMEngineProcessorConfig(
        model_source=r["model"], engine_kwargs=engine_kwargs(r, n_answers, pixel_size), batch_size=r["batch_size"],
        concurrency=r.get("concurrency") or 1, accelerator_type=r.get("accelerator_type") if gpu else None,
        placement_group_config=None if gpu else {"bundles": [{"CPU": 1}]},
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False, log_engine_metrics=False,
        runtime_env={"env_vars": dict(env)} if env else None)


def build_rerank_processor(r: dict, env: dict | None = None):
    """A Ray Data stage: rows with `query_image` and `candidate_image` (HxWx3 uint8 arrays, already
    capped to max_pixels) in, the same rows with `rerank_score`, `prompt_tokens` and `visual_tokens`
    out, images and engine columns dropped.

    Rows may carry `query_uuid` / `candidate_uuid` (strings naming image content across the run,
    e.g. "q:<query_id>", "g:<image_id>"): vLLM then skips hashing those pixels."""
    from ray.data.llm import build_processor

    spec = PromptSpec(r["model"], r["prompt"], r["yes_words"], r["no_words"], r["max_pixels"], r.get("min_pixels"),
                      r.get("system_prompt"), r.get("instruction"), r.get("between_images"))
    text, params, yes, no = spec.text, spec.params, spec.yes_ids, spec.no_ids

    def preprocess(row: dict) -> dict:  # ray.data.llm keeps the input columns next to what this adds
        out = {"prompt": text, "multimodal_data": {"image": [row["query_image"], row["candidate_image"]]},
               "sampling_params": dict(params)}
        if "query_uuid" in row:
            out["multimodal_uuids"] = {"image": [str(row["query_uuid"]), str(row["candidate_uuid"])]}
        return out

    engine_columns = {"query_image", "candidate_image", "query_uuid", "candidate_uuid", "prompt", "multimodal_data",
                      "multimodal_uuids", "sampling_params", "generated_tokens", "generated_text", "logprobs", "metrics",
                      "prompt_token_ids", "prompt_logprobs", "embeddings", "num_generated_tokens", "num_input_tokens",
                      "time_taken_llm", "batch_uuid", "request_id", "params", "__inference_error__"}
    image_token = spec.image_token

    def postprocess(row: dict) -> dict:
        """P(yes), and the prompt's length and image tokens (ray.data.llm rows carry no prefix-cache counts)."""
        keep = {k: v for k, v in row.items() if k not in engine_columns}
        ids = row.get("prompt_token_ids")
        ids = [] if ids is None else list(ids)
        visual = sum(1 for t in ids if t == image_token) if image_token is not None else 0
        return {**keep, "rerank_score": p_yes_from_logprobs(row["logprobs"][0], yes, no), "prompt_tokens": len(ids),
                "visual_tokens": visual}

    light = {"num_cpus": 0.25}  # per-row dict work: a whole CPU per task would starve the stages around it
    return build_processor(processor_config(r, spec.pixel_size, len(yes) + len(no), env), preprocess=preprocess,
                           postprocess=postprocess, preprocess_map_kwargs=light, postprocess_map_kwargs=light)
