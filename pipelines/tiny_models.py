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


def _text(vocab: int, **extra) -> dict:
    return dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=0, eos_token_id=1, bos_token_id=1, **extra)


def build_qwen2_vl(path: Path, v25: bool = False) -> str:
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor, Qwen2_5_VLProcessor

    tok = tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")}
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2)
    processor_class = Qwen2_5_VLProcessor if v25 else Qwen2VLProcessor
    processor = without_video_processor(processor_class)(
        image_processor=image_processor, tokenizer=tok, **video_kwargs(processor_class),
        chat_template=TEMPLATE.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>"))
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if v25:
        from transformers import Qwen2_5_VLConfig as Config, Qwen2_5_VLForConditionalGeneration as Model

        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    else:
        from transformers import Qwen2VLConfig as Config, Qwen2VLForConditionalGeneration as Model

        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2)
    config = Config(text_config=_text(len(tok), rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
                    vision_config=vision, **common)
    return _save(path, processor, Model(config))


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
    "idefics3": _seeded(lambda p: build_idefics3(p)),
    "smolvlm": _seeded(lambda p: build_idefics3(p, smolvlm=True)),
    "llava_onevision": _seeded(build_llava_onevision),
}
