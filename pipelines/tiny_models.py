"""Tiny random models built offline: a DINOv2 backbone and multimodal LLMs of each supported family.

Used by the demo, the tests and the benchmarks, where no weights can be downloaded.

Each has a byte-level BPE tokenizer trained here with the `tokenizers` library (plus the
family's special tokens), a chat template written for the test, the family's real image
processor, and a model from its config class; all saved with `save_pretrained`, so the
scorer loads them through the same AutoProcessor / AutoModelForImageTextToText path as
a hub id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mllm_index.actors.mllm import DEFAULT_PROMPT, video_kwargs, without_video_processor


def make_tiny_backbone(path: str | Path, image_size: int = 112, hidden: int = 64, layers: int = 2) -> str:
    """A small random DINOv2 plus its preprocessor config, saved like a hub checkpoint."""
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


CORPUS = [DEFAULT_PROMPT, "Yes", "No", "yes", "no", " yes", " no", "user assistant system", "Are they the same?"] * 20
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}IMAGE"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def tokenizer(specials: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<eos>"] + specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@dataclass(frozen=True)
class Size:
    """Shapes of a random model: `TINY` for unit tests, `MID` where vLLM's CPU kernels need head_dim 64."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128
    vision: int = 32
    vision_depth: int = 2
    vision_heads: int = 2
    max_pixels: int = 112 * 112  # the processor's own budget (the scorer may override it)

    @property
    def half_head(self) -> int:
        return self.hidden // self.heads // 2


TINY = Size()
MID = Size(hidden=256, layers=4, heads=4, kv_heads=2, ffn=512, vision=128, vision_depth=2, vision_heads=2, max_pixels=224 * 224)


def _text(vocab: int, size: Size = TINY, **extra) -> dict:
    return dict(vocab_size=vocab, hidden_size=size.hidden, intermediate_size=size.ffn, num_hidden_layers=size.layers,
                num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, max_position_embeddings=4096,
                pad_token_id=0, eos_token_id=1, bos_token_id=1, **extra)


QWEN_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def _qwen_processor(processor_class, patch: int, size: Size):
    from transformers import Qwen2VLImageProcessorPil

    tok = tokenizer(list(QWEN_TOKENS))
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_TOKENS}
    factor = patch * 2
    image_processor = Qwen2VLImageProcessorPil(min_pixels=factor * factor, max_pixels=size.max_pixels, patch_size=patch,
                                               merge_size=2, temporal_patch_size=2)
    processor = without_video_processor(processor_class)(
        image_processor=image_processor, tokenizer=tok, **video_kwargs(processor_class),
        chat_template=TEMPLATE.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>"))
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return tok, processor, common


def _video_config(path: Path, video_class: str, patch: int, size: Size) -> None:
    """The video processor config that Qwen processors declare (vLLM loads the full processor).

    Written as JSON because constructing a video processor needs torchvision, which CPU-only
    torch installs lack; the scorer never sends video."""
    (path / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": video_class, "patch_size": patch, "temporal_patch_size": 2, "merge_size": 2,
        "size": {"shortest_edge": (2 * patch) ** 2, "longest_edge": size.max_pixels}}, indent=2))


QWEN_CLASSES = {  # family: (processor, config, model, video processor, patch size)
    "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLVideoProcessor", 14),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2VLVideoProcessor", 14),
    "qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLVideoProcessor", 16),
}


def build_qwen(path: Path, family: str, size: Size = TINY, text: dict | None = None, vision: dict | None = None,
               dtype: torch.dtype | None = None, device: str | None = None) -> str:
    """A random Qwen2-VL, Qwen2.5-VL or Qwen3-VL (also the shape of Qwen3-VL-Reranker) checkpoint.

    `text` / `vision` override config entries (the GPU benchmark builds real-size shapes this way);
    `device` is where the weights are initialised (a GPU makes billions of parameters quick)."""
    import transformers

    processor_name, config_name, model_name, video_name, patch = QWEN_CLASSES[family]
    processor_class = getattr(transformers, processor_name)
    tok, processor, common = _qwen_processor(processor_class, patch, size)
    half = size.half_head
    v = size.vision
    if family == "qwen3_vl":  # interleaved M-RoPE and DeepStack features
        third = 5 * half // 16
        text_config = _text(len(tok), size, head_dim=size.hidden // size.heads, rope_parameters={
            "rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [half - 2 * third, third, third],
            "mrope_interleaved": True})
        vision_config = dict(depth=size.vision_depth, hidden_size=v, intermediate_size=2 * v, num_heads=size.vision_heads,
                             out_hidden_size=size.hidden, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                             num_position_embeddings=64, deepstack_visual_indexes=[0])
    else:
        third = 3 * half // 8
        text_config = _text(len(tok), size, rope_scaling={"type": "mrope", "mrope_section": [half - 2 * third, third, third]})
        if family == "qwen2_5_vl":
            vision_config = dict(depth=size.vision_depth, hidden_size=v, intermediate_size=2 * v, num_heads=size.vision_heads,
                                 out_hidden_size=size.hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                                 window_size=56, fullatt_block_indexes=[size.vision_depth - 1])
        else:
            vision_config = dict(depth=size.vision_depth, embed_dim=v, hidden_size=size.hidden, num_heads=size.vision_heads,
                                 mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    config = getattr(transformers, config_name)(text_config={**text_config, **(text or {})},
                                                vision_config={**vision_config, **(vision or {})}, **common)
    with torch.device(device or "cpu"):
        model = getattr(transformers, model_name)(config)
    out = _save(path, processor, model.to(dtype) if dtype else model)
    _video_config(path, video_name, patch, size)
    return out


def build_qwen2_vl(path: Path, v25: bool = False, size: Size = TINY) -> str:
    return build_qwen(path, "qwen2_5_vl" if v25 else "qwen2_vl", size)


def build_qwen3_vl(path: Path, size: Size = TINY) -> str:
    return build_qwen(path, "qwen3_vl", size)


def build_idefics3(path: Path, smolvlm: bool = False) -> str:
    if smolvlm:
        from transformers import SmolVLMConfig as Config, SmolVLMForConditionalGeneration as Model
        from transformers import SmolVLMImageProcessorPil as ImageProcessor, SmolVLMProcessor as Processor
    else:
        from transformers import Idefics3Config as Config, Idefics3ForConditionalGeneration as Model
        from transformers import Idefics3ImageProcessorPil as ImageProcessor, Idefics3Processor as Processor
    tok = tokenizer(["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"])
    image_processor = ImageProcessor(do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
    processor = without_video_processor(Processor)(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                                                   **video_kwargs(Processor),
                                                   chat_template=TEMPLATE.replace("IMAGE", "<image>"))
    config = Config(text_config=_text(len(tok)), vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, image_size=32, patch_size=8), scale_factor=2,
                    image_token_id=tok.convert_tokens_to_ids("<image>"))
    return _save(path, processor, Model(config))


def build_llava_onevision(path: Path) -> str:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessorPil
    from transformers import LlavaOnevisionProcessor

    tok = tokenizer(["<image>", "<video>"])
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
                                                      image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]])
    processor = without_video_processor(LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tok, **video_kwargs(LlavaOnevisionProcessor), num_image_tokens=16, vision_feature_select_strategy="full",
        chat_template=TEMPLATE.replace("IMAGE", "<image>"))
    config = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **_text(len(tok))),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]])
    return _save(path, processor, LlavaOnevisionForConditionalGeneration(config))


def _save(path: Path, processor, model) -> str:
    model = model.eval()
    path.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(path)
    model.save_pretrained(path)
    return str(path)


def _seeded(build):
    """The same random weights on every build (seeded before the model is constructed)."""
    def wrapper(path: Path) -> str:
        torch.manual_seed(0)
        return build(path)
    return wrapper


BUILDERS = {
    "qwen2_vl": _seeded(lambda p: build_qwen2_vl(p)),
    "qwen2_5_vl": _seeded(lambda p: build_qwen2_vl(p, v25=True)),
    "qwen3_vl": _seeded(lambda p: build_qwen3_vl(p)),
    "idefics3": _seeded(lambda p: build_idefics3(p)),
    "smolvlm": _seeded(lambda p: build_idefics3(p, smolvlm=True)),
    "llava_onevision": _seeded(build_llava_onevision),
}

# Head dim 64 (vLLM's CPU attention kernels), 224-px images at <= 64 visual tokens: the vLLM test and the benchmark.
MID_BUILDERS = {
    "qwen2_vl": _seeded(lambda p: build_qwen2_vl(p, size=MID)),
    "qwen2_5_vl": _seeded(lambda p: build_qwen2_vl(p, v25=True, size=MID)),
    "qwen3_vl": _seeded(lambda p: build_qwen3_vl(p, size=MID)),
}
