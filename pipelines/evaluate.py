"""Evaluate a rerank run against ground truth: the kNN ranking and the re-ranked one, side by side.

Both rankings come from the same results rows (`knn_rank` and `rank`), so the comparison
isolates the re-ranker. A ground-truth query with no results counts with AP 0 and is
reported as missing. Per-condition rows evaluate each query against the positives with
that label only; its other positives are ignored (junk), not counted as wrong.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from mllm_index.pipelines.metrics import average_precision, average_precision_at_k, precision_at_k, recall_at_k
from mllm_index.storage.ground_truth import QueryTruth, read_ground_truth
from mllm_index.storage.uris import Location, redact

RANKINGS = {"knn": "knn_rank", "reranked": "rank"}


def load_rankings(results_uri: str, storage_options: dict | None = None) -> dict[str, dict[str, list[str]]]:
    """query_key -> {"knn": gallery keys by kNN rank, "reranked": by final rank}."""
    out = Location(results_uri, storage_options)
    folder = out if not out.exists("results") else out.child("results")
    table = folder.read_parquet_folder(columns=["query_key", "key", "rank", "knn_rank"])
    if table is None:
        raise FileNotFoundError(f"no results parts under {redact(out.uri)}")
    by_query = defaultdict(list)
    for row in table.to_pylist():
        by_query[row["query_key"]].append(row)
    return {q: {name: [r["key"] for r in sorted(rows, key=lambda r: r[col])] for name, col in RANKINGS.items()}
            for q, rows in by_query.items()}


def query_metrics(ranking: list[str], truth: QueryTruth, ks: tuple[int, ...]) -> dict[str, float]:
    m = {"AP": average_precision(ranking, truth.positives, truth.junk)}
    for k in ks:
        m[f"mAP@{k}"] = average_precision_at_k(ranking, truth.positives, k, truth.junk)
        m[f"R@{k}"] = recall_at_k(ranking, truth.positives, k, truth.junk)
        m[f"P@{k}"] = precision_at_k(ranking, truth.positives, k, truth.junk)
    return m


def condition_truths(truth: QueryTruth) -> dict[str, QueryTruth]:
    """One reduced ground truth per condition label among this query's positives."""
    labels = defaultdict(set)
    for key in truth.positives:
        for label in truth.conditions.get(key, []):
            labels[label].add(key)
    return {label: QueryTruth(keys, truth.junk | (truth.positives - keys)) for label, keys in labels.items()}


def _mean(values: list[dict]) -> dict[str, float]:
    keys = values[0].keys() if values else []
    return {k: float(np.mean([v[k] for v in values if not math.isnan(v[k])])) for k in keys}


def evaluate(results_uri: str, ground_truth_uri: str, ks: tuple[int, ...] = (1, 5, 10, 100),
             storage_options: dict | None = None) -> dict:
    rankings = load_rankings(results_uri, storage_options)
    truth = read_ground_truth(ground_truth_uri, storage_options)
    missing = sorted(q for q in truth if q not in rankings)
    rows = []
    groups: dict[str, list[tuple[str, QueryTruth]]] = {"all": [(q, t) for q, t in truth.items() if t.positives]}
    for q, t in truth.items():
        for label, reduced in condition_truths(t).items():
            groups.setdefault(label, []).append((q, reduced))
    for group, items in groups.items():
        for name in RANKINGS:
            per_query = [query_metrics(rankings.get(q, {}).get(name, []), t, ks) for q, t in items]
            rows.append({"condition": group, "ranking": name, "queries": len(items), **_mean(per_query)})
    report = {"results_uri": redact(results_uri), "ground_truth_uri": redact(ground_truth_uri), "ks": list(ks),
              "queries_in_ground_truth": len(truth), "queries_missing_from_results": missing, "rows": rows}
    Location(results_uri, storage_options).write_json(report, "evaluation.json")
    return report


def format_report(report: dict, columns: tuple[str, ...] = ("AP", "mAP@10", "R@1", "R@10", "P@10")) -> str:
    columns = [c for c in columns if c in report["rows"][0]] if report["rows"] else []
    header = f"{'condition':28s} {'ranking':9s} {'queries':>7s} " + " ".join(f"{c:>7s}" for c in columns)
    lines = [header, "-" * len(header)]
    for row in report["rows"]:
        lines.append(f"{row['condition'][:28]:28s} {row['ranking']:9s} {row['queries']:7d} "
                     + " ".join(f"{100 * row[c]:7.2f}" for c in columns))
    if report["queries_missing_from_results"]:
        lines.append(f"{len(report['queries_missing_from_results'])} ground-truth queries have no results (counted with AP 0)")
    return "\n".join(lines)
