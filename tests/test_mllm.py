"""The transformers scorer on tiny random models of every supported family, built offline.

The reference everywhere is one full prompt per pair through a plain transformers forward
(`reference`): processor on (query, candidate, prompt), `model(**inputs).logits[:, -1]`.
Heads are planted (`plant`) so that scores spread out and a wrong position, a missing
DeepStack feature or a swapped image moves them by far more than the tolerance.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from mllm_index.actors.mllm import MLLMScorer, answer_token_ids, cap_pixels, load_processor, p_yes, prompt_messages
from mllm_index.pipelines.tiny_models import BUILDERS

FAMILIES = sorted(BUILDERS)
REUSE = ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"]


@pytest.fixture(scope="session")
def vlm_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(60, 60), (120, 80), (90, 200), (56, 56)]]


def pairs(seed: int = 0):
    a, b, c, d = images(seed)
    return [(a, b), (c, d), (b, c), (d, a)]


def rerank_block(seed: int = 1):
    """Three queries x their candidates, as the rerank actor builds them: one object per image,
    candidates shared between queries, a query that is also another query's candidate, both orders."""
    rng = np.random.default_rng(seed)
    pics = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            for h, w in [(64, 64), (100, 70), (50, 150), (90, 90), (120, 60), (40, 40), (80, 110)]]
    q1, q2, q3, *cands = pics
    return [(q1, c) for c in cands] + [(q2, c) for c in cands[1:]] + [(q3, q1), (q3, cands[0]), (cands[0], q3)]


def reference(scorer: MLLMScorer, pairs) -> np.ndarray:
    out = []
    for q, c in pairs:
        inputs = scorer.processor(images=[[cap_pixels(q, scorer.max_pixels), cap_pixels(c, scorer.max_pixels)]],
                                  text=[scorer.text], return_tensors="pt")
        if inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(scorer.model.dtype)
        with torch.no_grad():
            logits = scorer.model(**inputs).logits[:, -1].float()
        out.append(float(p_yes(logits[:, scorer.yes_ids], logits[:, scorer.no_ids])[0]))
    return np.array(out)


def plant(scorer: MLLMScorer, probe, spread: float = 1.0) -> None:
    """Yes rows = +v, no rows = -v, v scaled so that the logit gaps of the probe pairs centre on 0 and spread."""
    head = scorer.model.get_output_embeddings().weight
    hidden = []
    for q, c in probe:
        inputs = scorer.processor(images=[[cap_pixels(q, scorer.max_pixels), cap_pixels(c, scorer.max_pixels)]],
                                  text=[scorer.text], return_tensors="pt")
        with torch.no_grad():
            hidden.append(scorer.model(**inputs, output_hidden_states=True).hidden_states[-1][0, -1].float())
    hidden = torch.stack(hidden)
    mean = hidden.mean(0) / hidden.mean(0).norm()
    v = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(0))
    v = v - (v @ mean) * mean  # orthogonal to the mean state: gaps centred on 0
    v = spread * v / (hidden @ v).std()
    with torch.no_grad():
        head[scorer.yes_ids] = v.to(head.dtype)
        head[scorer.no_ids] = -v.to(head.dtype)


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_equal_one_full_prompt_per_pair(vlm_dir, family):
    scorer = MLLMScorer(vlm_dir[family], max_pixels=112 * 112, batch_size=3)
    assert scorer.path == ("prefix_reuse" if family in REUSE else "full_prompt")
    block = rerank_block()
    plant(scorer, block)
    expected = reference(scorer, block)
    got = scorer.score(block)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert expected.max() - expected.min() > 0.05  # the planted model tells the pairs apart
    assert ((got > 0) & (got < 1)).all()
    summary = scorer.stats.summary()
    assert summary["pairs"] == len(block) and summary["path"] == scorer.path and summary["visual_tokens_per_image"] > 0
    assert summary["tokens_per_pair"] > summary["visual_tokens_per_image"]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])  # Qwen2.5-VL shares Qwen2-VL's language model
def test_prefix_reuse_in_bfloat16(vlm_dir, family):
    scorer = MLLMScorer(vlm_dir[family], max_pixels=112 * 112, batch_size=4, dtype="bfloat16")
    block = rerank_block(2)
    plant(scorer, block, spread=0.3)  # bf16 rounding of the hidden state, amplified less than at spread 1
    expected = reference(scorer, block)
    np.testing.assert_allclose(scorer.score(block), expected, atol=1e-2)
    assert expected.max() - expected.min() > 0.05


class Counting:
    """Stands in for the image processor and counts the images it is given."""

    def __init__(self, inner):
        self.inner, self.images = inner, 0

    def __call__(self, images=None, **kwargs):
        self.images += len(images)
        return self.inner(images=images, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("family", REUSE)
def test_each_image_is_encoded_once_and_each_prefix_runs_once(vlm_dir, family):
    scorer = MLLMScorer(vlm_dir[family], max_pixels=112 * 112, batch_size=4)
    block = rerank_block()
    encoded, features = [], scorer.model.model.get_image_features

    def counting_features(pixels, grid, **kw):
        encoded.append(len(grid))
        return features(pixels, grid, **kw)

    scorer.model.model.get_image_features = counting_features
    scorer.processor.image_processor = processed = Counting(scorer.processor.image_processor)
    scorer.score(block)
    unique = len({id(i) for pair in block for i in pair})
    assert sum(encoded) == processed.images == unique == scorer.stats.images == 7
    queries = {id(q): sum(1 for p in block if p[0] is q) for q, _ in block}
    assert scorer.stats.forwards == len(queries) + sum(-(-k // 4) for k in queries.values())
    # The prefix is paid once per query: fewer language-model tokens than one full prompt per pair.
    assert scorer.stats.computed_tokens < scorer.stats.prompt_tokens


def test_keys_name_images_and_rope_deltas_do_not_leak(vlm_dir):
    scorer = MLLMScorer(vlm_dir["qwen2_vl"], max_pixels=112 * 112, batch_size=2)
    block = rerank_block()
    plant(scorer, block)
    expected = reference(scorer, block)
    copies = [(q.copy(), c.copy()) for q, c in block]  # other objects, same images: only keys can tell
    index = {}
    keys = [(index.setdefault(q.tobytes(), len(index)), index.setdefault(c.tobytes(), len(index))) for q, c in copies]
    scorer.model.model.rope_deltas = torch.tensor([[1000]])  # what a generate() call would leave behind
    np.testing.assert_allclose(scorer.score(copies, keys=keys), expected, atol=1e-5)
    assert scorer.model.model.rope_deltas is None and scorer.stats.images == 7
    with pytest.raises(ValueError, match="key pairs"):
        scorer.score(copies, keys=keys[:-1])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_prompt_layout_with_system_and_instruction(vlm_dir, family):
    scorer = MLLMScorer(vlm_dir[family], max_pixels=112 * 112, system_prompt="Judge the pair.",
                        instruction="<Instruct>: find the same place.<Query>:", between_images="<Document>:", prompt="Same?")
    text = scorer.text
    order = [text.index(s) for s in ("Judge the pair.", "<Instruct>", "<|vision_start|>", "<Document>:", "Same?")]
    assert order == sorted(order) and text.count("<|image_pad|>") == 2
    assert text.index("<Document>:") < text.rindex("<|vision_start|>")  # between the two images
    block = rerank_block()
    plant(scorer, block)
    np.testing.assert_allclose(scorer.score(block), reference(scorer, block), atol=1e-5)
    assert [m["role"] for m in prompt_messages("q")] == ["user"]  # no system text: no system turn


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_pixel_budget_bounds_visual_tokens(vlm_dir, family):
    factor = 28 if family == "qwen2_vl" else 32  # pixels per visual token side: patch x merge
    big, tiny = Image.new("RGB", (900, 600), (200, 10, 10)), Image.new("RGB", (40, 40), (10, 200, 10))
    per_image = {}
    for max_pixels, min_pixels in [(64 * 64, 32 * 32), (224 * 224, 112 * 112)]:
        for name, image in [("big", big), ("tiny", tiny)]:
            scorer = MLLMScorer(vlm_dir[family], max_pixels=max_pixels, min_pixels=min_pixels)
            scorer.score([(image, image)])  # one image object: encoded once
            assert scorer.stats.images == 1 and scorer.processor.image_processor.size["longest_edge"] == max_pixels
            per_image[name, max_pixels] = tokens = scorer.stats.summary()["visual_tokens_per_image"]
            assert min_pixels / factor**2 <= tokens <= max_pixels / factor**2
    assert per_image["big", 224 * 224] > 4 * per_image["big", 64 * 64]
    assert per_image["tiny", 224 * 224] > per_image["tiny", 64 * 64]  # upscaled to the larger minimum


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_scores_equal_one_pair_at_a_time(vlm_dir, family):
    scorer = MLLMScorer(vlm_dir[family], max_pixels=112 * 112, batch_size=4)
    batch = scorer.score(pairs())
    single = np.array([scorer.score([p])[0] for p in pairs()])
    np.testing.assert_allclose(batch, single, atol=1e-5)
    assert type(load_processor(vlm_dir[family])).__name__ == type(scorer.processor).__name__


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])  # their visual token count follows the image size
def test_prompts_of_different_lengths_share_a_batch(vlm_dir, family):
    scorer = MLLMScorer(vlm_dir[family], max_pixels=112 * 112)
    inputs = scorer.processor(images=[[q, c] for q, c in pairs()], text=[scorer.text] * 4, return_tensors="pt", padding=True)
    lengths = inputs["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # the batch really mixes lengths...
    assert (inputs["attention_mask"][:, -1] == 1).all()  # ...and every row ends on a real token (left padding)


def test_right_padding_would_read_pad_positions(vlm_dir):
    scorer = MLLMScorer(vlm_dir["qwen2_vl"], max_pixels=112 * 112, prefix_reuse=False)
    assert scorer.path == "full_prompt"
    single = np.array([scorer.score([p])[0] for p in pairs()])
    scorer.processor.tokenizer.padding_side = "right"
    wrong = scorer.score(pairs())
    assert np.abs(wrong - single).max() > 1e-4  # why the full-prompt path pads on the left


@pytest.mark.parametrize("reuse", [True, False])
def test_score_is_p_yes_from_the_next_token_logits(vlm_dir, reuse):
    scorer = MLLMScorer(vlm_dir["qwen2_vl"], max_pixels=112 * 112, prefix_reuse=reuse)
    head = scorer.model.lm_head.weight
    with torch.no_grad():
        head[scorer.yes_ids] = 0
        head[scorer.no_ids] = 0
    np.testing.assert_allclose(scorer.score(pairs()), 0.5, atol=1e-6)  # only the yes/no logits enter the score

    capped = [[cap_pixels(q, scorer.max_pixels), cap_pixels(c, scorer.max_pixels)] for q, c in pairs()]
    inputs = scorer.processor(images=capped, text=[scorer.text] * 4, return_tensors="pt", padding=True)
    with torch.no_grad():  # the last hidden state does not depend on the LM head
        hidden = scorer.model(**inputs, output_hidden_states=True).hidden_states[-1][:, -1]
    direction = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(0))
    direction = direction / (2 * (hidden @ direction).std())  # logit differences of unit spread
    with torch.no_grad():
        head[scorer.yes_ids] = direction
        head[scorer.no_ids] = -direction
    # With every yes variant = v and every no variant = -v (as many of each), P(yes) = sigmoid(2 v.h).
    assert len(scorer.yes_ids) == len(scorer.no_ids)
    expected = torch.sigmoid(2 * hidden @ direction).numpy()
    got = scorer.score(pairs())
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got.max() - got.min() > 0.02  # the planted model answers differently for different pairs


def test_answer_variants_and_pixel_cap(vlm_dir):
    tok = load_processor(vlm_dir["qwen2_vl"]).tokenizer
    ids = answer_token_ids(tok, ["yes"])
    spelled = {tok.decode([i]) for i in ids}
    assert {"yes", "Yes"} <= {s.strip() for s in spelled} and len(ids) >= 2
    with pytest.raises(ValueError, match="single token"):
        answer_token_ids(tok, ["antidisestablishmentarianism"])
    big = Image.new("RGB", (1000, 500))
    assert cap_pixels(big, 100 * 100).size[0] * cap_pixels(big, 100 * 100).size[1] <= 100 * 100
    assert cap_pixels(big, 10**7) is big


def test_registry_builds_the_configured_scorer(vlm_dir):
    from mllm_index.actors.registry import reranker_kind
    from mllm_index.configs.schema import RerankerConfig

    cfg = RerankerConfig(model=vlm_dir["qwen3_vl"], max_pixels=112 * 112, min_pixels=56 * 56, backend="transformers",
                         system_prompt="Judge the pair.", instruction="<Query>:", between_images="<Document>:")
    scorer = reranker_kind(cfg.model).make({**cfg.model_dump(), "device": "cpu", "num_threads": 1})
    assert isinstance(scorer, MLLMScorer) and scorer.path == "prefix_reuse"
    assert scorer.text.index("Judge the pair.") < scorer.text.index("<Query>:") < scorer.text.index("<Document>:")
    assert scorer.processor.image_processor.size["shortest_edge"] == 56 * 56
    with pytest.raises(ValueError, match="'auto', 'transformers' or 'vllm'"):
        RerankerConfig(backend="tensorrt")


@pytest.mark.parametrize("installed", [True, False])
def test_backend_choice(monkeypatch, installed):
    import importlib.util

    from mllm_index.actors import vllm_scorer

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (object() if installed else None) if name == "vllm" else real(name, *a))
    assert vllm_scorer.resolve_backend({"backend": "auto", "device": "cpu"}) == "transformers"  # CPU: transformers
    assert vllm_scorer.resolve_backend({"backend": "auto", "device": "cuda"}) == ("vllm" if installed else "transformers")
    assert vllm_scorer.resolve_backend({"backend": "transformers", "device": "cuda"}) == "transformers"
    if installed:
        assert vllm_scorer.resolve_backend({"backend": "vllm", "device": "cpu"}) == "vllm"
    else:
        with pytest.raises(ValueError, match=r"reranker.backend: vllm needs the \[vllm\] extra"):
            vllm_scorer.resolve_backend({"backend": "vllm", "device": "cuda"})


def test_vllm_engine_options_and_logprob_rule():
    from mllm_index.actors.vllm_scorer import engine_kwargs, p_yes_from_logprobs, processor_config, sampling_params

    cpu = engine_kwargs({"max_pixels": 448 * 448, "dtype": "auto", "device": "cpu"}, 12, {"shortest_edge": 3136, "longest_edge": 448 * 448})
    gpu = engine_kwargs({"max_pixels": 448 * 448, "dtype": "auto", "device": "cuda", "vllm_engine": {"max_model_len": 4096}})
    assert cpu["block_size"] == 32 and gpu["block_size"] == 16  # <= the shared prefix (an image is >= 64 tokens here)
    assert cpu["enable_prefix_caching"] and cpu["limit_mm_per_prompt"] == {"image": 2, "video": 0}
    assert cpu["dtype"] == "float32" and gpu["dtype"] == "bfloat16" and gpu["max_model_len"] == 4096
    assert cpu["max_model_len"] >= 2 * 448 * 448 // 28**2 and cpu["logprobs_mode"] == "processed_logprobs"
    assert cpu["mm_processor_kwargs"] == {"size": {"shortest_edge": 3136, "longest_edge": 448 * 448}}
    assert sampling_params([5, 7, 9]) == {"max_tokens": 1, "temperature": 0.0, "logprobs": 3, "allowed_token_ids": [5, 7, 9],
                                          "detokenize": False}
    yes, no = [5, 7], [9]
    logprobs = {5: -1.0, 7: {"logprob": -2.0}, 9: type("Logprob", (), {"logprob": -0.5})()}
    expected = (np.exp(-1.0) + np.exp(-2.0)) / (np.exp(-1.0) + np.exp(-2.0) + np.exp(-0.5))
    assert abs(p_yes_from_logprobs(logprobs, yes, no) - expected) < 1e-6
    with pytest.raises(RuntimeError, match="processed_logprobs"):
        p_yes_from_logprobs({5: -1.0, 9: -0.5}, yes, no)
    stage = processor_config({"model": "m", "max_pixels": 448 * 448, "batch_size": 64, "device": "cuda", "concurrency": 2,
                              "accelerator_type": "H100", "dtype": "auto"})
    assert (stage.concurrency, stage.accelerator_type, stage.batch_size) == (2, "H100", 64)
    assert stage.engine_kwargs["enable_prefix_caching"] and stage.placement_group_config is None
    on_cpu = processor_config({"model": "m", "max_pixels": 448 * 448, "batch_size": 8, "device": "cpu", "accelerator_type": "H100"})
    assert on_cpu.accelerator_type is None and on_cpu.placement_group_config["bundles"][0]["CPU"] == 1
