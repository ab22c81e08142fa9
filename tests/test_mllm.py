"""The MLLM scorer on tiny random models of every supported family, built offline."""

import numpy as np
import pytest
import torch
from PIL import Image
from mllm_index.pipelines.tiny_models import BUILDERS

from mllm_index.actors.mllm import MLLMScorer, answer_token_ids, cap_pixels, load_processor

FAMILIES = sorted(BUILDERS)


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


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_scores_equal_one_pair_at_a_time(vlm_dir, family):
    scorer = MLLMScorer(vlm_dir[family], max_pixels=112 * 112, batch_size=4)
    batch = scorer.score(pairs())
    single = np.array([scorer.score([p])[0] for p in pairs()])
    np.testing.assert_allclose(batch, single, atol=1e-5)
    assert ((batch > 0) & (batch < 1)).all()
    assert type(load_processor(vlm_dir[family])).__name__ == type(scorer.processor).__name__


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])  # their visual token count follows the image size
def test_prompts_of_different_lengths_share_a_batch(vlm_dir, family):
    scorer = MLLMScorer(vlm_dir[family], max_pixels=112 * 112)
    inputs = scorer.processor(images=[[q, c] for q, c in pairs()], text=[scorer.text] * 4, return_tensors="pt", padding=True)
    lengths = inputs["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # the batch really mixes lengths...
    assert (inputs["attention_mask"][:, -1] == 1).all()  # ...and every row ends on a real token (left padding)


def test_right_padding_would_read_pad_positions(vlm_dir):
    scorer = MLLMScorer(vlm_dir["qwen2_vl"], max_pixels=112 * 112)
    single = np.array([scorer.score([p])[0] for p in pairs()])
    scorer.processor.tokenizer.padding_side = "right"
    wrong = scorer.score(pairs())
    assert np.abs(wrong - single).max() > 1e-4  # why the scorer pads on the left


def test_score_is_p_yes_from_the_next_token_logits(vlm_dir):
    scorer = MLLMScorer(vlm_dir["qwen2_vl"], max_pixels=112 * 112)
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
