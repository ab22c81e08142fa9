"""MLLM pair scoring: P(yes) for "do these two images show the same object or place?".

One prompt holds the query image, the candidate image and a yes/no question; one
forward pass gives the next-token logits; the score is
    P(yes) = sum(exp(l_y) for y in yes variants) / sum(exp(l_t) for t in yes + no variants)
which for one token per word is softmax([l_yes, l_no])[0] = sigmoid(l_yes - l_no).
Pairs are batched with LEFT padding, so the last position of every row is its own last
prompt token (with right padding the score would be read at pad positions).

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
import math

import numpy as np
import torch
import transformers
from PIL import Image

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


def cap_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    """Downscale so that width x height <= max_pixels (bounds the visual tokens per image)."""
    w, h = image.size
    if w * h <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (w * h))
    return image.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.BICUBIC)


class MLLMScorer:
    """Scores (query, candidate) image pairs with a multimodal LLM; no training involved."""

    def __init__(self, model: str, prompt: str = DEFAULT_PROMPT, yes_words=("yes",), no_words=("no",),
                 max_pixels: int = 448 * 448, batch_size: int = 8, dtype: str = "auto", device: str = "auto",
                 num_threads: int | None = None):
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
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": prompt}]}]
        # The processor's template rendered by the tokenizer: the same text, without the
        # processor-level hooks that some families route through their video processor.
        template = getattr(self.processor, "chat_template", None) or self.processor.tokenizer.chat_template
        self.text = self.processor.tokenizer.apply_chat_template(messages, chat_template=template,
                                                                 add_generation_prompt=True, tokenize=False)
        self.max_pixels, self.batch_size = max_pixels, batch_size

    @torch.inference_mode()
    def _forward(self, pairs: list[tuple[Image.Image, Image.Image]]) -> np.ndarray:
        images = [[cap_pixels(q, self.max_pixels), cap_pixels(c, self.max_pixels)] for q, c in pairs]
        inputs = self.processor(images=images, text=[self.text] * len(pairs), return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        logits = self.model(**inputs).logits[:, -1, :].float()
        yes = torch.logsumexp(logits[:, self.yes_ids], dim=-1)
        no = torch.logsumexp(logits[:, self.no_ids], dim=-1)
        return torch.sigmoid(yes - no).cpu().numpy()

    def score(self, pairs: list[tuple[Image.Image, Image.Image]]) -> np.ndarray:
        """P(yes) per pair, in order (batches of `batch_size` pairs per forward pass)."""
        out = [self._forward(pairs[i : i + self.batch_size]) for i in range(0, len(pairs), self.batch_size)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)
