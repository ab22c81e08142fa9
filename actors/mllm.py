"""MLLM pair scoring: P(yes) for "do these two images show the same object or place?".

One prompt layout for every backend (transformers here, vLLM in `vllm_scorer`):
    [system] [instruction] <query image> [between_images] <candidate image> <question>
so everything up to the candidate image is a prefix shared by the k candidates of a query.
The next-token logits give
    P(yes) = sum(exp(l_y) for y in yes variants) / sum(exp(l_t) for t in yes + no variants)
which for one token per word is softmax([l_yes, l_no])[0] = sigmoid(l_yes - l_no).

The transformers backend has two paths (`MLLMScorer.path` says which one runs):
- `prefix_reuse` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): each unique image of a call is processed
  and encoded once; the query prefix runs once and its KV cache is expanded over the
  candidate batch; the suffix gets its slice of the full sequence's 3-D M-RoPE positions;
  only the yes/no rows of the LM head are applied, at the last position (`actors/prefix_reuse.py`).
- `full_prompt` (every other family): one prompt per pair, batched with LEFT padding (so the
  last position of every row is its own last token), logits at the last position only.

Models load with AutoProcessor + AutoModelForImageTextToText by HF id or local path.
Compatibility shim: CPU-only torch comes without torchvision, and transformers then cannot
even construct processors that declare a video slot (Qwen2-VL, SmolVLM, LLaVA-OneVision).
`load_processor` retries with a same-named subclass that leaves the video slot out; image
inputs do not touch it. With torchvision installed the shim is never used.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
from dataclasses import dataclass
from typing import Hashable

import numpy as np
import torch
import transformers
from PIL import Image

from mllm_index.actors.decode import cap_pixels  # noqa: F401 (re-exported: the one pixel cap)

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Do these two images show the same object or place? Answer yes or no."


def without_video_processor(processor_class: type) -> type:
    """A subclass of `processor_class`, with the same name, whose sub-processors exclude video.

    Construct or load it with `video_processor=None` where the class requires that argument
    (see `video_kwargs`)."""
    attributes = [a for a in processor_class.get_attributes() if a != "video_processor"]
    shim = type(processor_class.__name__, (processor_class,), {"get_attributes": classmethod(lambda cls: attributes)})
    shim.__module__ = processor_class.__module__
    return shim


def video_kwargs(processor_class: type) -> dict:
    """`{"video_processor": None}` for processors whose __init__ names a video processor."""
    return {"video_processor": None} if "video_processor" in inspect.signature(processor_class.__init__).parameters else {}


def _processor_class(model: str) -> type:
    from transformers.utils import cached_file

    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = cached_file(model, name, _raise_exceptions_for_missing_entries=False)
        if path and json.load(open(path)).get("processor_class"):
            return getattr(transformers, json.load(open(path))["processor_class"])
    config = transformers.AutoConfig.from_pretrained(model)
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    return getattr(transformers, PROCESSOR_MAPPING_NAMES[config.model_type])


def load_processor(model: str):
    try:
        return transformers.AutoProcessor.from_pretrained(model)
    except Exception as exc:
        if importlib.util.find_spec("torchvision") is not None:
            raise
        log.info("processor of %s needs its video slot (%s); loading it without video (no torchvision)", model, exc)
        processor_class = _processor_class(model)
        return without_video_processor(processor_class).from_pretrained(model, **video_kwargs(processor_class))


def answer_token_ids(tokenizer, words: list[str]) -> list[int]:
    """Single-token spellings of each word ("yes", " yes", "Yes", " Yes", "YES", ...)."""
    ids = set()
    for word in words:
        for form in {word, word.lower(), word.capitalize(), word.upper()}:
            for variant in (form, " " + form):
                tokens = tokenizer.encode(variant, add_special_tokens=False)
                if len(tokens) == 1:
                    ids.add(tokens[0])
    if not ids:
        raise ValueError(f"none of {words} is a single token for this tokenizer; choose other answer words")
    return sorted(ids)


def prompt_messages(prompt: str, system_prompt: str | None = None, instruction: str | None = None,
                    between_images: str | None = None) -> list[dict]:
    """The one layout: system, instruction, query image, between text, candidate image, question.

    The query image comes before anything that depends on the candidate, so the tokens up to
    the candidate image are the same for all k candidates of a query (the shared prefix that
    prefix reuse and vLLM's prefix cache exploit). The symmetric option swaps the two images."""
    content = [{"type": "text", "text": instruction}] if instruction else []
    content.append({"type": "image"})
    if between_images:
        content.append({"type": "text", "text": between_images})
    content.append({"type": "image"})
    if prompt:
        content.append({"type": "text", "text": prompt})
    system = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt else []
    return system + [{"role": "user", "content": content}]


def render_prompt(processor, messages: list[dict]) -> str:
    """The processor's chat template rendered by the tokenizer: the same text, without the
    processor-level hooks that some families route through their video processor."""
    template = getattr(processor, "chat_template", None) or processor.tokenizer.chat_template
    return processor.tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)


def set_pixel_budget(image_processor, max_pixels: int, min_pixels: int | None = None) -> dict | None:
    """Make a pixel-budget image processor (the Qwen-VL families) resize into [min_pixels, max_pixels].

    Returns the size setting (vLLM gets the same one as `mm_processor_kwargs`), or None for
    processors that resize to a fixed size, where `cap_pixels` is the only budget."""
    size = getattr(image_processor, "size", None)
    if not type(image_processor).__name__.startswith("Qwen2VLImageProcessor") or size is None:
        return None
    low = min(int(min_pixels if min_pixels is not None else size["shortest_edge"]), int(max_pixels))
    new = {"shortest_edge": low, "longest_edge": int(max_pixels)}
    image_processor.size = new if isinstance(size, dict) else type(size)(**new)
    return new


def p_yes(yes_logits: torch.Tensor, no_logits: torch.Tensor) -> torch.Tensor:
    """P(yes) from the logits (or logprobs) of every yes and no variant, rows = pairs."""
    return torch.sigmoid(torch.logsumexp(yes_logits.float(), -1) - torch.logsumexp(no_logits.float(), -1))


@dataclass
class ScoreStats:
    """What the scoring cost, accumulated over calls; `summary()` is what a job summary reports."""

    backend: str
    path: str
    pairs: int = 0
    images: int = 0  # images processed and encoded: unique per call (prefix reuse), else two per pair
    visual_tokens: int = 0  # image tokens in the prompts: two image slots per pair, whatever was encoded
    prompt_tokens: int = 0  # full prompt length, summed over pairs
    computed_tokens: int = 0  # tokens that went through the language model (prefixes once per query)
    cached_tokens: int = 0  # prompt tokens served from a prefix cache (vLLM)
    forwards: int = 0

    def summary(self) -> dict:
        per = lambda a, b: round(a / b, 2) if b else None  # noqa: E731
        return {"backend": self.backend, "path": self.path, "pairs": self.pairs, "images": self.images,
                "visual_tokens_per_image": per(self.visual_tokens, 2 * self.pairs),
                "tokens_per_pair": per(self.prompt_tokens, self.pairs),
                "computed_tokens_per_pair": per(self.computed_tokens, self.pairs),
                "cached_tokens_per_pair": per(self.cached_tokens, self.pairs), "forwards": self.forwards}


Keys = list[tuple[Hashable, Hashable]]  # per pair: (query image key, candidate image key)


def image_keys(pairs: list[tuple[Image.Image, Image.Image]], keys: Keys | None = None) -> Keys:
    """Per pair, what identifies each image within one call: the caller's keys, else object identity.

    Identity is safe within a call (the pairs hold the images) and matches how the rerank actor
    works: it decodes each query and each candidate once and pairs the same objects k times."""
    if keys is None:
        return [(id(q), id(c)) for q, c in pairs]
    if len(keys) != len(pairs):
        raise ValueError(f"{len(keys)} key pairs for {len(pairs)} image pairs")
    return [tuple(k) for k in keys]


REUSE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


class MLLMScorer:
    """Scores (query, candidate) image pairs with a multimodal LLM through transformers; no training involved."""

    backend = "transformers"

    def __init__(self, model: str, prompt: str = DEFAULT_PROMPT, yes_words=("yes",), no_words=("no",),
                 max_pixels: int = 448 * 448, batch_size: int = 8, dtype: str = "auto", device: str = "auto",
                 num_threads: int | None = None, *, min_pixels: int | None = None, system_prompt: str | None = None,
                 instruction: str | None = None, between_images: str | None = None, prefix_reuse: bool = True):
        if num_threads:
            torch.set_num_threads(max(1, int(num_threads)))
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
        if torch_dtype is None:  # auto: bf16 on GPU, float32 on CPU
            torch_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.processor = load_processor(model)
        self.processor.tokenizer.padding_side = "left"
        if self.processor.tokenizer.pad_token is None:
            self.processor.tokenizer.pad_token = self.processor.tokenizer.eos_token
        # safetensors only: a .bin checkpoint is a pickle, and no pickle is loaded from storage.
        self.model = transformers.AutoModelForImageTextToText.from_pretrained(
            model, dtype=torch_dtype, use_safetensors=True).to(self.device).eval()
        self.yes_ids = torch.tensor(answer_token_ids(self.processor.tokenizer, list(yes_words)), device=self.device)
        self.no_ids = torch.tensor(answer_token_ids(self.processor.tokenizer, list(no_words)), device=self.device)
        if set(self.yes_ids.tolist()) & set(self.no_ids.tolist()):
            raise ValueError("the yes and no words share a token")
        self.text = render_prompt(self.processor, prompt_messages(prompt, system_prompt, instruction, between_images))
        self.max_pixels, self.batch_size = max_pixels, batch_size
        self.pixel_size = set_pixel_budget(self.processor.image_processor, max_pixels, min_pixels)
        self.reuse = None
        if prefix_reuse and self.model.config.model_type in REUSE_FAMILIES:
            from mllm_index.actors.prefix_reuse import PrefixReuse

            self.reuse = PrefixReuse(self.model, self.processor, self.text)
        self.path = "prefix_reuse" if self.reuse else "full_prompt"
        self.stats = ScoreStats(self.backend, self.path)

    def answer_logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Yes and no logits from last-position hidden states: only those rows of the LM head.

        The head is read at each call (not copied once), so it is always the model's own."""
        head = self.model.get_output_embeddings()
        ids = torch.cat([self.yes_ids, self.no_ids])
        logits = hidden.to(head.weight.dtype) @ head.weight[ids].T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[ids]
        return logits[:, : len(self.yes_ids)], logits[:, len(self.yes_ids):]

    @torch.inference_mode()
    def _forward(self, pairs: list[tuple[Image.Image, Image.Image]]) -> np.ndarray:
        images = [[cap_pixels(q, self.max_pixels), cap_pixels(c, self.max_pixels)] for q, c in pairs]
        inputs = self.processor(images=images, text=[self.text] * len(pairs), return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        logits = self.model(**inputs, logits_to_keep=1).logits[:, -1, :].float()
        s = self.stats
        s.forwards, s.images, s.pairs = s.forwards + 1, s.images + 2 * len(pairs), s.pairs + len(pairs)
        lengths = int(inputs["attention_mask"].sum())
        s.prompt_tokens, s.computed_tokens = s.prompt_tokens + lengths, s.computed_tokens + lengths
        image_token = getattr(self.model.config, "image_token_id", None) or getattr(self.model.config, "image_token_index", None)
        if image_token is not None:
            s.visual_tokens += int((inputs["input_ids"] == image_token).sum())
        return p_yes(logits[:, self.yes_ids], logits[:, self.no_ids]).cpu().numpy()

    def score(self, pairs: list[tuple[Image.Image, Image.Image]], keys: Keys | None = None) -> np.ndarray:
        """P(yes) per pair, in order.

        `keys` (optional) name the query and candidate image of each pair within this call; by
        default the image objects themselves are the keys (identity). Equal keys must mean the
        same image: each is processed and encoded once per call (prefix-reuse path)."""
        if not pairs:
            return np.zeros(0, np.float32)
        if self.reuse is not None:
            return self.reuse.score(pairs, image_keys(pairs, keys), self)
        out = [self._forward(pairs[i : i + self.batch_size]) for i in range(0, len(pairs), self.batch_size)]
        return np.concatenate(out)


def scorer_kwargs(r: dict) -> dict:
    """Constructor arguments of either backend's scorer from the reranker settings (the config section)."""
    return dict(model=r["model"], prompt=r["prompt"], yes_words=r["yes_words"], no_words=r["no_words"],
                max_pixels=r["max_pixels"], batch_size=r["batch_size"], dtype=r["dtype"], device=r["device"],
                num_threads=r.get("num_threads"), min_pixels=r.get("min_pixels"), system_prompt=r.get("system_prompt"),
                instruction=r.get("instruction"), between_images=r.get("between_images"))
