"""Index size and recall: IVF-PQ bytes per vector vs flat float32, recall vs exact search.

    python benchmarks/index_recall.py --n 100000 --dim 384

Vectors are clustered with a low intrinsic dimension (storage.synthetic), the regime in
which PQ alone loses neighbours. The index is built through the job's own storage path
(parts -> trained index -> shards -> manifest) with the factory the job would choose,
and searched through IndexSearcher: PQ only, and with the exact float16 re-score (every vector
in RAM, or only the shortlist's rows read from the shards' vector files: the same answers).
The baseline, exact search on a flat index, is measured in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import faiss
import numpy as np

from mllm_index.storage.faiss_store import default_factory
from mllm_index.storage.search import IndexSearcher
from mllm_index.storage.shard_store import publish_vectors
from mllm_index.storage.synthetic import clustered_vectors
from mllm_index.storage.uris import Location


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--factory", default="auto")
    args = ap.parse_args()

    x = clustered_vectors(args.n, args.dim, intrinsic=16, clusters=200, seed=0)
    q = clustered_vectors(args.queries, args.dim, intrinsic=16, clusters=200, seed=1)
    ids = np.random.default_rng(0).choice(2**40, args.n, replace=False).astype(np.int64)
    factory = default_factory(args.n, args.dim) if args.factory == "auto" else args.factory

    flat = faiss.IndexFlatIP(args.dim)
    flat.add(x.astype(np.float16).astype(np.float32))
    t = time.perf_counter()
    _, exact_rows = flat.search(q, 100)
    flat_ms = (time.perf_counter() - t) * 1000 / len(q)
    truth10, truth100 = ids[exact_rows[:, :10]], ids[exact_rows]

    with tempfile.TemporaryDirectory() as tmp:
        root = Location(tmp)
        part_size = -(-args.n // (4 * args.shards))
        t = time.perf_counter()
        publish_vectors(root, ids, x, factory, "ip", part_size=part_size, parts_per_shard=4)
        build_s = time.perf_counter() - t
        searcher = IndexSearcher(root.uri)
        index_bytes = sum(s.file.bytes for s in searcher.manifest.shards)
        print(f"\n{args.n} vectors, dim {args.dim}, {factory}, {len(searcher.shards)} shards, built in {build_s:.1f}s")
        print(f"{'storage':38s} {'bytes/vector':>12s} {'vs flat f32':>11s}")
        print(f"{'flat float32 (baseline)':38s} {4 * args.dim:12d} {1.0:11.3f}")
        print(f"{'IVF-PQ shards (codes + ids + lists)':38s} {index_bytes / args.n:12.1f} {index_bytes / args.n / (4 * args.dim):11.3f}")
        print(f"{'float16 vectors for the re-score':38s} {2 * args.dim:12d} {0.5:11.3f}")
        print(f"\n{'search':34s} {'R@10':>6s} {'R@100':>6s} {'ms/query':>9s}")
        print(f"{'exact flat (baseline)':34s} {1.0:6.3f} {1.0:6.3f} {flat_ms:9.3f}")
        # the shortlist re-score: only the shortlist's rows, read from the shards' vector files
        shortlist = IndexSearcher(root.uri, vectors="shards")
        for nprobe in (1, 4, 16, 64):
            for rescore, s, how in ((0, searcher, ""), (1000, searcher, ", all in RAM"), (1000, shortlist, ", rows read")):
                t = time.perf_counter()
                _, found = s.search(q, k=100, nprobe=nprobe, rescore=rescore)
                ms = (time.perf_counter() - t) * 1000 / len(q)
                name = f"nprobe {nprobe}" + (f", rescore {rescore}{how}" if rescore else ", PQ only")
                print(f"{name:34s} {recall(found[:, :10], truth10):6.3f} {recall(found, truth100):6.3f} {ms:9.3f}")


if __name__ == "__main__":
    main()
