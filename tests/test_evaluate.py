"""Evaluation of a results table, ground-truth importers, and the CLI commands."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mllm_index.pipelines.evaluate import evaluate, format_report
from mllm_index.pipelines.metrics import average_precision
from mllm_index.storage.ground_truth import import_ilias, import_revisitop, read_ground_truth

ROOT = Path(__file__).parents[1]


def write_results(folder: Path, rankings: dict[str, list[tuple[str, int]]]) -> None:
    """query -> [(gallery key, knn_rank)] listed in final (re-ranked) order."""
    rows = [{"query_key": q, "key": key, "rank": i + 1, "knn_rank": knn}
            for q, items in rankings.items() for i, (key, knn) in enumerate(items)]
    (folder / "results").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "results" / "part-00000.parquet")


@pytest.fixture
def run(tmp_path):
    # q1: kNN order x, a, b; re-ranked a, b, x.   q2: kNN c, j, y; re-ranked y, j, c.
    write_results(tmp_path / "run", {"q1": [("a", 2), ("b", 3), ("x", 1)], "q2": [("y", 3), ("j", 2), ("c", 1)]})
    gt = [{"query_id": "q1", "positives": ["a", "b"], "junk": [], "conditions": {"a": "occluded", "b": "small"}},
          {"query_id": "q2", "positives": ["c"], "junk": ["j"], "conditions": {"c": "occluded"}},
          {"query_id": "q3", "positives": ["z"], "junk": []}]
    (tmp_path / "gt.jsonl").write_text("\n".join(json.dumps(r) for r in gt))
    return tmp_path / "run", tmp_path / "gt.jsonl"


def row(report, condition, ranking):
    return next(r for r in report["rows"] if r["condition"] == condition and r["ranking"] == ranking)


def test_knn_and_reranked_side_by_side(run):
    results, gt = run
    report = evaluate(str(results), str(gt), ks=(1, 2))
    knn_q1 = average_precision(["x", "a", "b"], {"a", "b"})
    knn_q2 = average_precision(["c", "j", "y"], {"c"}, {"j"})
    assert row(report, "all", "knn")["AP"] == pytest.approx((knn_q1 + knn_q2 + 0) / 3)  # q3 has no results: AP 0
    assert row(report, "all", "reranked")["AP"] == pytest.approx((1.0 + average_precision(["y", "c"], {"c"}) + 0) / 3)
    assert row(report, "all", "reranked")["R@1"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert report["queries_missing_from_results"] == ["q3"]
    # condition "occluded": q1 with a only (b ignored), q2 with c
    occluded = row(report, "occluded", "reranked")
    assert occluded["queries"] == 2
    assert occluded["AP"] == pytest.approx((1.0 + average_precision(["y", "c"], {"c"})) / 2)
    assert row(report, "small", "knn")["AP"] == pytest.approx(average_precision(["x", "b"], {"b"}))
    assert json.loads((results / "evaluation.json").read_text())["rows"] == report["rows"]
    assert "occluded" in format_report(report) and "reranked" in format_report(report)


def test_revisitop_import_protocols_and_query_table(tmp_path):
    gnd = {"imlist": ["g0", "g1", "g2", "g3"], "qimlist": ["q0"],
           "gnd": [{"easy": [0], "hard": [1], "junk": [2], "bbx": [10, 20, 110, 70]}]}
    pkl = tmp_path / "gnd_test.pkl"
    pkl.write_bytes(pickle.dumps(gnd))
    written = import_revisitop(str(pkl), str(tmp_path / "out"), images_uri="s3://b/jpg")
    easy = read_ground_truth(str(tmp_path / "out" / "gt_easy.parquet"))["q0.jpg"]
    medium = read_ground_truth(str(tmp_path / "out" / "gt_medium.parquet"))["q0.jpg"]
    hard = read_ground_truth(str(tmp_path / "out" / "gt_hard.parquet"))["q0.jpg"]
    assert (easy.positives, easy.junk) == ({"g0.jpg"}, {"g2.jpg", "g1.jpg"})
    assert (medium.positives, medium.junk) == ({"g0.jpg", "g1.jpg"}, {"g2.jpg"})
    assert medium.conditions == {"g0.jpg": ["easy"], "g1.jpg": ["hard"]}
    assert (hard.positives, hard.junk) == ({"g1.jpg"}, {"g2.jpg", "g0.jpg"})
    queries = pq.read_table(tmp_path / "out" / "queries.parquet").to_pylist()
    assert queries == [{"key": "q0.jpg", "uri": "s3://b/jpg/q0.jpg", "bbox": [10.0, 20.0, 100.0, 50.0]}]
    assert len(written) == 4
    with pytest.raises(ValueError, match="local file"):
        import_revisitop("s3://bucket/gnd.pkl", str(tmp_path / "x"))


def test_ilias_import_by_instance_prefix(tmp_path):
    ids = tmp_path / "ilias" / "image_ids"
    ids.mkdir(parents=True)
    (ids / "image_query_ids.txt").write_text("inst1/query/q_a.jpg,x\ninst2/query/q_b.jpg,y\n")
    (ids / "positive_ids.txt").write_text("\n".join(f"inst{1 + i % 2}/pos/p{i}.jpg,{0.1 * (i + 1)},{10 * i}" for i in range(6)))
    import_ilias(str(tmp_path / "ilias"), str(tmp_path / "out"))
    truth = read_ground_truth(str(tmp_path / "out" / "gt.parquet"))
    assert truth["inst1/query/q_a.jpg"].positives == {"inst1/pos/p0.jpg", "inst1/pos/p2.jpg", "inst1/pos/p4.jpg"}
    labels = truth["inst2/query/q_b.jpg"].conditions["inst2/pos/p5.jpg"]
    assert labels[0].startswith("scale:q4") and labels[1].startswith("clutter:q4")


def test_cli_evaluate_and_import(run, tmp_path):
    results, gt = run
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "mllm_index.pipelines.cli", "evaluate", str(results), str(gt), "--k", "1,10"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "reranked" in out.stdout and "occluded" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "mllm_index.pipelines.cli", "evaluate", str(results), str(gt),
                          "--storage-option", "secret=abc"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "credentials" in bad.stderr and "abc" not in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "mllm_index.pipelines.cli", "evaluate", str(tmp_path / "nothing"), str(gt)],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert missing.returncode == 1 and "no results" in missing.stderr
