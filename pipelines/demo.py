"""`mllm-index demo`: the whole pipeline, offline, on a set made from the bundled photos.

index (classic:sift-vlad) -> rerank (classic:sift-ransac) -> evaluate -> HTML report, on a
local Ray and a local folder. Nothing needs the network: the photos ship with the package
and the default backends are local features. --model / --reranker-model switch in real
transformers models (a GPU and the weights, or hub access, are then up to the user).
"""

from __future__ import annotations

import time
from pathlib import Path

PHOTOS = Path(__file__).parent / "data" / "photos"


def bundled_photos() -> list[Path]:
    return sorted(PHOTOS.glob("*.jpg"))


def run_demo(workdir: str, model: str | None = None, reranker_model: str | None = None, top_k: int = 20) -> dict:
    from mllm_index.actors.classic import SIFT_RANSAC, SIFT_VLAD
    from mllm_index.actors.registry import reranker_kind
    from mllm_index.configs.schema import IndexJobConfig, RerankJobConfig, load_config
    from mllm_index.pipelines.cluster import init_ray
    from mllm_index.pipelines.demo_set import write_demo_set
    from mllm_index.pipelines.evaluate import evaluate, format_report
    from mllm_index.pipelines.index import run_index
    from mllm_index.pipelines.rerank import run_rerank
    from mllm_index.pipelines.summaries import format_index, format_rerank
    from mllm_index.pipelines.report import write_report

    t0 = time.time()
    work = Path(workdir).resolve()
    data = work / "data"
    if not (data / "gt.parquet").exists():
        print(f"building the demo set in {data} ...")
        print(f"  {write_demo_set(data, bundled_photos())}")
    init_ray(None)
    index_cfg = load_config(IndexJobConfig, None, {"source.uri": str(data / "gallery"), "index.uri": str(work / "index"),
                                                   "model.name": model or SIFT_VLAD, "run.part_size": 32})
    indexed = run_index(index_cfg)
    print(format_index(indexed))
    reranker = reranker_model or SIFT_RANSAC
    output = work / "runs" / f"{indexed.version}-{reranker.replace('/', '_').replace(':', '-')}"
    rerank_cfg = load_config(RerankJobConfig, None, {
        "queries.uri": str(data / "queries"), "index_uri": str(work / "index"), "index_version": indexed.version,
        "output_uri": str(output), "reranker.model": reranker, "search.top_k": top_k, "reranker.depth": top_k,
        "reranker.max_pixels": reranker_kind(reranker).default_max_pixels, "run.part_size": 8})
    reranked = run_rerank(rerank_cfg)
    print(format_rerank(reranked))
    report = evaluate(str(output), str(data / "gt.parquet"), ks=(1, 5, 10))
    html = write_report(str(output), str(data / "gt.parquet"))
    wall = time.time() - t0
    print("\n" + format_report(report, ("AP", "mAP@10", "R@1", "R@5", "P@5")))
    print(f"\nreport: {html}\nwall time: {wall:.0f}s")
    return {"index": indexed.to_json(), "rerank": reranked.to_json(), "evaluation": report, "report": html,
            "wall_seconds": round(wall, 1)}
