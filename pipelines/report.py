"""One self-contained HTML report of a rerank run: metrics, and for a sample of queries
the query with its top-k before (kNN) and after re-ranking, as thumbnails with scores and
correct / junk / wrong marks when ground truth is given. Images are inlined as data URIs,
so the file can be mailed or opened from object storage as it is.
"""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict

import numpy as np
from PIL import Image

from mllm_index.actors.decode import DecodeFailure, open_image
from mllm_index.storage.ground_truth import read_ground_truth
from mllm_index.storage.catalog_index import FOLDER, INDEX, CatalogBuckets
from mllm_index.storage.search import Catalog
from mllm_index.storage.shard_catalog import ShardCatalogs, has_shard_catalogs
from mllm_index.storage.sources import fetch_bytes
from mllm_index.storage.uris import Location, redact
from mllm_index.storage.versions import read_manifest

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin-bottom:24px}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}
.q{margin:18px 0;padding-top:8px;border-top:1px solid #ddd}.row{display:flex;gap:6px;align-items:flex-start;margin:4px 0}
.lab{width:90px;font-size:12px;color:#555;padding-top:40px}figure{margin:0;width:116px;font-size:11px;text-align:center}
figcaption{overflow-wrap:anywhere;line-height:1.25}
img{width:110px;height:110px;object-fit:contain;background:#eee;border:3px solid #bbb}
.correct img{border-color:#2a9d3a}.wrong img{border-color:#d33}.junk img{border-color:#999;opacity:.6}.query img{border-color:#246}
"""
CHECK = """<script>window.addEventListener('load',()=>{const i=[...document.images];
document.body.dataset.images=i.length;document.body.dataset.broken=i.filter(x=>!x.complete||x.naturalWidth===0).length;});</script>"""


def thumbnail(data, size: int = 220) -> str:
    """Data URI of a JPEG thumbnail; an unreadable image becomes a visible placeholder tile."""
    try:
        if isinstance(data, BaseException):
            raise DecodeFailure("read", str(data))
        image = open_image(data, 10**9, 1 << 30, draft_long_side=size)[0]
        image.thumbnail((size, size))
    except DecodeFailure:
        image = Image.new("RGB", (size, size), (200, 60, 60))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _metrics_table(report: dict) -> str:
    cols = [c for c in ("AP", "mAP@10", "R@1", "R@5", "R@10", "P@5", "P@10") if report["rows"] and c in report["rows"][0]]
    head = "<tr><th class=l>condition</th><th class=l>ranking</th><th>queries</th>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"
    body = "".join(f"<tr><td class=l>{html.escape(r['condition'])}</td><td class=l>{r['ranking']}</td><td>{r['queries']}</td>"
                   + "".join(f"<td>{100 * r[c]:.1f}</td>" for c in cols) + "</tr>" for r in report["rows"])
    return f"<table>{head}{body}</table>"


def _figure(uri: str, caption: str, mark: str) -> str:
    return f'<figure class="{mark}"><img src="{uri}" alt=""><figcaption>{html.escape(caption)}</figcaption></figure>'


def candidate_rows(out: Location, index: Location, version: str, wanted: dict[int, int]) -> list[dict | None]:
    """Catalog rows of the shown candidates (image_id -> the shard the run found it in, -1: unknown).

    A run whose results name every shown candidate's shard reads them from the shards' catalog
    files (a row group each); an older run from its catalog by id (a bucket each); a run from
    before both from the version's whole catalog."""
    ids = np.array(sorted(wanted), np.int64)
    shards = np.array([wanted[i] for i in ids.tolist()], np.int64)
    manifest = read_manifest(index, version)
    if len(ids) and (shards >= 0).all() and has_shard_catalogs(manifest.shards):
        return ShardCatalogs(index, manifest.shards).lookup(ids, shards)
    if out.exists(FOLDER, INDEX):  # the run's catalog by id: only the shown candidates' buckets are read
        return CatalogBuckets(out).lookup(ids)
    return Catalog(index, manifest).lookup(ids)  # the version's catalog, read whole


def write_report(results_uri: str, ground_truth_uri: str | None = None, queries: int = 12, top: int = 8,
                 storage_options: dict | None = None) -> str:
    """Write report.html next to the results; returns its URI."""
    out = Location(results_uri, storage_options)
    run = out.read_json("run.json")
    index = Location(run["settings"]["index_uri"], storage_options)
    results = out.read_parquet_folder("results")
    by_query = defaultdict(list)
    for row in results.to_pylist():
        by_query[row["query_key"]].append(row)
    plan = out.read_parquet_folder("plan")
    query_rows = {r["key"]: r for r in plan.to_pylist()}
    truth = read_ground_truth(ground_truth_uri, storage_options) if ground_truth_uri else {}
    sample = sorted(by_query)[:queries]

    wanted = {r["image_id"]: r.get("shard", -1) for q in sample for r in by_query[q] if r["rank"] <= top or r["knn_rank"] <= top}
    entries = [e for e in candidate_rows(out, index, run["index_version"], wanted) if e is not None]
    thumbs = {int(e["image_id"]): thumbnail(d) for e, d in zip(entries, fetch_bytes(entries, storage_options or {}))}
    query_entries = [query_rows[q] for q in sample]
    query_thumbs = dict(zip(sample, (thumbnail(d) for d in fetch_bytes(query_entries, storage_options or {}))))

    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>mllm-index report</title><style>{STYLE}</style></head><body>",
             f"<h1>Rerank run {html.escape(run['run_id'])}</h1>",
             f"<p>index {html.escape(redact(index.uri))} version {run['index_version']}; reranker "
             f"{html.escape(str(run['settings']['reranker']['model'] or 'knn'))}; {len(by_query)} queries.</p>"]
    if out.exists("evaluation.json"):
        parts.append("<h2>Metrics (%)</h2>" + _metrics_table(out.read_json("evaluation.json")))
    parts.append(f"<h2>Top {top} results for {len(sample)} of {len(by_query)} queries: kNN order, then re-ranked</h2>"
                 "<p>Borders: green correct, red wrong, grey junk (with ground truth). Captions: rank, key, score.</p>")
    for q in sample:
        t = truth.get(q)
        mark = (lambda key: "correct" if key in t.positives else "junk" if key in t.junk else "wrong") if t else (lambda key: "")
        rows = by_query[q]
        parts.append(f'<div class=q><div class=row><div class=lab>query</div>{_figure(query_thumbs[q], q, "query")}</div>')
        for label, col, score in (("kNN", "knn_rank", "knn_score"), ("re-ranked", "rank", "final_score")):
            ranked = sorted((r for r in rows if r[col] <= top), key=lambda r: r[col])
            figs = "".join(_figure(thumbs.get(r["image_id"], thumbnail(b"")), f"{r[col]}. {r['key']} {r[score]:.3f}", mark(r["key"]))
                           for r in ranked)
            parts.append(f"<div class=row><div class=lab>{label}</div>{figs}</div>")
        parts.append("</div>")
    parts.append(CHECK + "</body></html>")
    out.write_text("\n".join(parts), "report.html")
    return out.full_uri(out.path("report.html"))
