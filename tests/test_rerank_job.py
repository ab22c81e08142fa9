"""The rerank job end to end: moto S3 on 127.0.0.1, local Ray, a planted tiny Qwen2-VL."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from galleries import write_files
from PIL import Image

from mllm_index.actors.decode import open_image
from mllm_index.actors.mllm import MLLMScorer, cap_pixels
from mllm_index.configs.schema import ConfigError, IndexJobConfig, RerankJobConfig, load_config
from mllm_index.pipelines.demo import bundled_photos
from mllm_index.pipelines.evaluate import evaluate
from mllm_index.pipelines.index import run_index
from mllm_index.pipelines.report import candidate_rows, write_report
from mllm_index.pipelines.rerank import RESULT_SCHEMA, run_rerank
from mllm_index.pipelines.summaries import format_rerank
from mllm_index.pipelines.tiny_models import BUILDERS
from mllm_index.storage.catalog import image_id
from mllm_index.storage.ground_truth import write_ground_truth
from mllm_index.storage.uris import Location
from mllm_index.storage.versions import read_manifest

pytestmark = pytest.mark.e2e
TOP_K, DEPTH, MAX_PIXELS = 6, 4, 112 * 112


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup(ray_session, s3_endpoint, tiny_dinov2, tmp_path_factory):
    import s3fs

    options = {"endpoint_url": s3_endpoint}
    bucket = "rerank-e2e"
    s3fs.S3FileSystem(**options).mkdir(bucket)
    gallery = {}
    for path in bundled_photos()[:6]:
        img = Image.open(path).convert("RGB")
        img.thumbnail((256, 256))
        w, h = img.size
        gallery[f"{path.stem}/orig.jpg"] = jpeg(img)
        gallery[f"{path.stem}/crop.jpg"] = jpeg(img.crop((w // 8, h // 8, w - w // 8, h - h // 8)))
    source = Location(f"s3://{bucket}/gallery", options)
    write_files(source, gallery)
    index_uri = f"s3://{bucket}/index"
    run_index(load_config(IndexJobConfig, None, {"source.uri": source.uri, "index.uri": index_uri, "model.name": tiny_dinov2,
                                                 "storage.options": options, "run.part_size": 8}))
    # Queries: a Parquet table (key, image bytes, optional bbox), as Revisited Oxford / ILIAS queries come.
    keys, images, boxes = [], [], []
    for i, path in enumerate(bundled_photos()[:4]):
        img = Image.open(path).convert("RGB")
        img.thumbnail((200, 200))
        keys.append(f"q{i}")
        images.append(jpeg(img))
        boxes.append([10.0, 10.0, img.width - 20.0, img.height - 20.0] if i % 2 else None)
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": keys, "image": pa.array(images, pa.binary()),
                             "bbox": pa.array(boxes, pa.list_(pa.float32()))}), buf)
    Location(f"s3://{bucket}/queries", options).write_bytes(buf.getvalue(), "queries.parquet")
    missing = f"{bundled_photos()[0].stem}/crop.jpg"  # deleted after indexing: a candidate that cannot be read
    source.delete(missing)
    return dict(bucket=bucket, options=options, index_uri=index_uri, source=source.uri, gallery=gallery, missing=missing,
                queries=dict(zip(keys, zip(images, boxes))))


def rerank_config(setup, output: str, model: str | None, **sets) -> RerankJobConfig:
    base = {"queries.uri": f"s3://{setup['bucket']}/queries", "index_uri": setup["index_uri"], "output_uri": output,
            "reranker.model": model, "storage.options": setup["options"]}
    overrides = [f"search.top_k={TOP_K}", f"reranker.depth={DEPTH}", f"reranker.max_pixels={MAX_PIXELS}",
                 "run.part_size=2", "reranker.queries_per_batch=2"] + [f"{k}={v}" for k, v in sets.items()]
    return load_config(RerankJobConfig, None, base, overrides)


def read_results(out: Location) -> pa.Table:
    return pa.concat_tables([out.read_parquet("results", n) for n in out.list_names("results")])


def assert_scores_are_the_models(by_query: dict[str, list[dict]], setup, planted_vlm) -> None:
    """Ranks, kNN order past the depth, the unreadable candidate in place, and every score the model's P(yes)."""
    scorer = MLLMScorer(planted_vlm, max_pixels=MAX_PIXELS)
    missing_id = image_id(setup["source"], setup["missing"])
    changed = 0
    for key, group in by_query.items():
        group.sort(key=lambda r: r["rank"])
        assert [r["rank"] for r in group] == list(range(1, TOP_K + 1))
        assert len({r["image_id"] for r in group}) == TOP_K
        head, tail = group[:DEPTH], group[DEPTH:]
        assert [r["knn_rank"] for r in tail] == sorted(r["knn_rank"] for r in tail)  # beyond the depth: kNN order
        assert all(np.isnan(r["rerank_score"]) for r in tail)
        scored = [r for r in head if not np.isnan(r["rerank_score"])]
        assert [r["final_score"] for r in scored] == sorted((r["final_score"] for r in scored), reverse=True)
        for r in head:
            if r["image_id"] == missing_id:  # unreadable: no score, and it keeps its kNN position
                assert np.isnan(r["rerank_score"]) and r["rank"] == r["knn_rank"]
        changed += [r["knn_rank"] for r in head] != sorted(r["knn_rank"] for r in head)
        # The score is the model's P(yes) for (query crop, candidate), recomputed outside the job.
        data, box = setup["queries"][key]
        query = open_image(data, 10**9, 10**9, bbox=np.array(box, np.float32) if box else None)[0]
        pairs = [(query, open_image(setup["gallery"][r["key"]], 10**9, 10**9, draft_long_side=2 * int(MAX_PIXELS ** 0.5))[0])
                 for r in scored]
        np.testing.assert_allclose([r["rerank_score"] for r in scored], scorer.score(pairs), atol=1e-4)
    assert changed >= 1  # the planted model's answers really re-ordered some query's candidates


def scored_pairs(out: Location, setup) -> list[tuple[Image.Image, Image.Image]]:
    """The (query crop, candidate) images of every scored result row, decoded as the job decodes them."""
    pairs = []
    for r in read_results(out).to_pylist():
        if not np.isnan(r["rerank_score"]):
            data, box = setup["queries"][r["query_key"]]
            query = open_image(data, 10**9, 10**9, bbox=np.array(box, np.float32) if box else None)[0]
            candidate = open_image(setup["gallery"][r["key"]], 10**9, 10**9, draft_long_side=2 * int(MAX_PIXELS ** 0.5))[0]
            pairs.append((cap_pixels(query, MAX_PIXELS), cap_pixels(candidate, MAX_PIXELS)))
    return pairs


def processor_tokens(model: str, pairs) -> tuple[float, float]:
    """(visual tokens per image, tokens per pair) as the checkpoint's own processor gives them for these
    images under the configured max_pixels: one full prompt per pair, independent of the job's counters."""
    scorer = MLLMScorer(model, max_pixels=MAX_PIXELS)
    image_token = scorer.model.config.image_token_id
    visual = prompt = 0
    for q, c in pairs:
        ids = scorer.processor(images=[[q, c]], text=[scorer.text], return_tensors="pt")["input_ids"][0]
        visual, prompt = visual + int((ids == image_token).sum()), prompt + len(ids)
    return round(visual / (2 * len(pairs)), 2), round(prompt / len(pairs), 2)


def test_rerank_end_to_end(setup, planted_vlm):
    out_uri = f"s3://{setup['bucket']}/runs/planted"
    summary = run_rerank(rerank_config(setup, out_uri, planted_vlm))
    # The summary names the path that ran (prefix reuse: a Qwen2-VL) and its token counts.
    out, pairs = Location(out_uri, setup["options"]), summary.pairs_scored_this_run
    scoring = summary.scoring
    assert scoring.backend == "transformers" and scoring.paths == {"transformers/prefix_reuse": pairs}
    per_image, per_pair = processor_tokens(planted_vlm, scored_pairs(out, setup))
    assert (scoring.visual_tokens_per_image, scoring.tokens_per_pair) == (per_image, per_pair)
    assert 0 < per_image <= MAX_PIXELS / 28**2  # the pixel budget: one token per 28 x 28 pixels (2 x 2 merged patches)
    assert scoring.computed_tokens_per_pair < scoring.tokens_per_pair  # each query's prefix ran once for its candidates
    assert scoring.images_encoded < 2 * pairs and scoring.cached_tokens_per_pair == 0
    assert "transformers/prefix_reuse" in format_rerank(summary) and "visual tokens/image" in format_rerank(summary)
    assert summary.queries.model_dump() == {"seen": 4, "ok": 4, "failed": 0, "skipped": 0} and summary.parts == 2
    results = read_results(out)
    assert results.schema == RESULT_SCHEMA
    rows = results.to_pylist()
    by_query = {}
    for r in rows:
        by_query.setdefault(r["query_key"], []).append(r)
    assert sorted(by_query) == ["q0", "q1", "q2", "q3"]

    assert_scores_are_the_models(by_query, setup, planted_vlm)
    missing_id = image_id(setup["source"], setup["missing"])
    # Built with catalog files by shard: no per-run copy of the catalog, and each result names its shard.
    index = Location(setup["index_uri"], setup["options"])
    assert all(s.catalog is not None for s in read_manifest(index, summary.index_version).shards)
    assert not out.exists("catalog_by_id") and all(r["shard"] >= 0 for r in rows)

    failures = pa.concat_tables([out.read_parquet("failures", n) for n in out.list_names("failures")]).to_pylist()
    hits = [f for f in failures if f["image_id"] == missing_id]
    assert hits and all(f["stage"] == "candidate" and f["key"] == setup["missing"] for f in hits)
    assert summary.candidate_failures == len(hits)

    # Evaluate against ground truth on S3: each query's positives are the two views of its photo.
    gt_rows = [{"query_id": f"q{i}", "positives": [f"{p.stem}/orig.jpg", f"{p.stem}/crop.jpg"], "junk": [],
                "conditions": {f"{p.stem}/crop.jpg": "cropped"}} for i, p in enumerate(bundled_photos()[:4])]
    write_ground_truth(gt_rows, f"s3://{setup['bucket']}/gt.parquet", setup["options"])
    report = evaluate(out_uri, f"s3://{setup['bucket']}/gt.parquet", ks=(1, 5), storage_options=setup["options"])
    assert {(r["condition"], r["ranking"]) for r in report["rows"]} == {
        (c, k) for c in ("all", "cropped") for k in ("knn", "reranked")}
    knn_all = next(r for r in report["rows"] if r["condition"] == "all" and r["ranking"] == "knn")
    assert knn_all["queries"] == 4 and 0.5 < knn_all["AP"] <= 1.0  # the backbone finds the near-duplicates
    assert out.exists("evaluation.json")
    # The report finds the shown candidates' rows in the shards' catalogs (no catalog_by_id to fall back on).
    shown = {r["image_id"]: r["shard"] for r in rows}
    found = candidate_rows(out, index, summary.index_version, shown)
    assert [f and f["key"] for f in found] == [next(r["key"] for r in rows if r["image_id"] == i) for i in sorted(shown)]
    assert write_report(out_uri, storage_options=setup["options"]).endswith("report.html")
    assert "data:image/jpeg;base64," in out.read_text("report.html") and not out.exists("catalog_by_id")

    # Interrupted run: part 1 lost its output and marker; the re-run redoes only that part.
    before = read_results(out).sort_by([("query_id", "ascending"), ("rank", "ascending")])
    out.delete("stats", "part-00001.json")
    out.delete("results", "part-00001.parquet")
    again = run_rerank(rerank_config(setup, out_uri, planted_vlm))
    assert again.parts_this_run == 1 and again.run_id == summary.run_id
    assert again.pairs_scored_this_run == 0  # its queries were in written chunks: merged again, not re-scored
    # Lost with its chunks too: its queries are scored again, and only they.
    out.delete("stats", "part-00001.json")
    out.delete("results", "part-00001.parquet")
    out.delete("chunks", "part-00001.d")
    third = run_rerank(rerank_config(setup, out_uri, planted_vlm))
    assert third.parts_this_run == 1 and 0 < third.pairs_scored_this_run <= 2 * DEPTH
    for run in (again, third):
        assert run.queries.ok == 4 and run.results == 4 * TOP_K
    after = read_results(out).sort_by([("query_id", "ascending"), ("rank", "ascending")])
    assert after.num_rows == before.num_rows == 4 * TOP_K
    assert after.column("image_id").to_pylist() == before.column("image_id").to_pylist()
    np.testing.assert_allclose(after.column("rerank_score").to_numpy(zero_copy_only=False),
                               before.column("rerank_score").to_numpy(zero_copy_only=False), atol=1e-5)

    with pytest.raises(ConfigError, match="other settings"):
        run_rerank(rerank_config(setup, out_uri, planted_vlm, **{"reranker.depth": 2}))


def test_summary_names_the_full_prompt_path(setup, tmp_path):
    """A family without prefix reuse (Idefics3) runs full prompts, and the summary says so."""
    model = BUILDERS["idefics3"](tmp_path / "idefics3")
    out_uri = f"s3://{setup['bucket']}/runs/idefics3"
    summary = run_rerank(rerank_config(setup, out_uri, model))
    pairs, scoring = summary.pairs_scored_this_run, summary.scoring
    assert pairs > 0 and scoring.paths == {"transformers/full_prompt": pairs}
    per_image, per_pair = processor_tokens(model, scored_pairs(Location(out_uri, setup["options"]), setup))
    assert (scoring.visual_tokens_per_image, scoring.tokens_per_pair) == (per_image, per_pair) and per_image > 0
    assert scoring.computed_tokens_per_pair == scoring.tokens_per_pair and scoring.images_encoded == 2 * pairs
    assert "transformers/full_prompt" in format_rerank(summary)


def test_knn_only_run_and_model_mismatch(setup, tiny_clip):
    out_uri = f"s3://{setup['bucket']}/runs/knn"
    summary = run_rerank(rerank_config(setup, out_uri, None))
    assert summary.reranker == "knn" and summary.pairs_scored_this_run == 0 and summary.scoring is None
    rows = read_results(Location(out_uri, setup["options"])).to_pylist()
    assert all(r["rank"] == r["knn_rank"] and np.isnan(r["rerank_score"]) for r in rows)
    # A version whose shards have no catalog files (built before them) keeps the per-run catalog by id.
    index = Location(setup["index_uri"], setup["options"])
    live = read_manifest(index)
    old = live.model_copy(update={"version": "v000002", "shards": [s.model_copy(update={"catalog": None})
                                                                   for s in live.shards]})
    index.write_json(old.model_dump(mode="json"), "versions", "v000002", "manifest.json")  # published, not LATEST
    old_uri = f"s3://{setup['bucket']}/runs/knn-old-version"
    run_rerank(rerank_config(setup, old_uri, None, index_version="v000002"))
    old_out = Location(old_uri, setup["options"])
    assert old_out.exists("catalog_by_id", "index.json")
    row_of = lambda r: (r["query_key"], r["rank"], r["image_id"], r["key"], r["uri"])  # noqa: E731
    assert sorted(map(row_of, read_results(old_out).to_pylist())) == sorted(map(row_of, rows))
    write_report(old_uri, storage_options=setup["options"])
    with pytest.raises(ConfigError, match="was built with"):
        run_rerank(rerank_config(setup, f"s3://{setup['bucket']}/runs/other", None, query_model=tiny_clip))


def test_rerank_on_a_multi_node_cluster(setup, planted_vlm, ray_cluster):
    """A 0-CPU head (it only coordinates, as in cluster.yaml) and two worker nodes: the same answers."""
    import ray

    out_uri = f"s3://{setup['bucket']}/runs/cluster"
    summary = run_rerank(rerank_config(setup, out_uri, planted_vlm))
    assert summary.queries.ok == 4 and summary.parts == 2 and summary.pairs_scored_this_run > 0
    by_query = {}
    for r in read_results(Location(out_uri, setup["options"])).to_pylist():
        by_query.setdefault(r["query_key"], []).append(r)
    assert sorted(by_query) == ["q0", "q1", "q2", "q3"]
    assert_scores_are_the_models(by_query, setup, planted_vlm)
    head = next(n for n in ray.nodes() if n["Resources"].get("CPU", 0) == 0)
    assert head["Alive"] and len([n for n in ray.nodes() if n["Alive"]]) == 3
