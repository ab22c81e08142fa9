"""Search memory per process as the gallery grows: one process holding the version vs shard groups.

    python benchmarks/scale_search.py --sizes 400000,1600000

For each size N, a version of N clustered vectors (dim 384, storage.synthetic) is published
with `publish_vectors` (the job's storage path: parts -> trained index -> shards with their
sorted ids and float16 vectors -> manifest), and searched by fresh processes, one per row:

- baseline: `IndexSearcher` as it was before shard groups (read from git, commit BEFORE), holding
  every shard (and, to re-score, every float16 vector from the embeddings parts) in one process:
  what each `SearchIndex` actor held;
- shard groups: the rerank job's stages (`plan_search` under `--max-bytes-per-actor`), each
  stage in its own process, as a Ray actor would be; the rows are the stage with the highest
  peak, and the query rate is the queries over the sum of all stages' search seconds (a serial
  pipeline: Ray Data runs the stages concurrently);
- mmap: one process with every shard memory-mapped from the local disk (faiss IO_FLAG_MMAP_IFC)
  and the shortlist re-score: the alternative to groups.

Peak RSS is the process's VmHWM (file-backed pages it maps count, page cache read with pread
does not); "B/image" is (peak - the RSS of the same process before loading) / images the process
serves. Recall is against exact inner-product search over the same float16 vectors.
The query set is searched in blocks of `--batch` queries, as the job's search stages do.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

SIZES = "400000,1600000"
BEFORE = "3f5b69b"  # the last commit before shard groups: its IndexSearcher is the baseline


def status() -> dict[str, int]:
    """This process's memory counters (kB) from /proc/self/status."""
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


# -- child processes: one searcher or one stage each ---------------------------------------
def searcher_before_groups():
    """`IndexSearcher` as it was before shard groups (commit BEFORE), the baseline: its re-score
    builds one (queries, shortlist, dim) float32 array. None where git cannot show it."""
    import types

    src = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "show", f"{BEFORE}:storage/search.py"],
                         capture_output=True, text=True)
    if src.returncode:
        return None
    module = types.ModuleType("search_before_groups")
    exec(compile(src.stdout, "search_before_groups.py", "exec"), module.__dict__)
    return module.IndexSearcher


def child_searcher(spec: dict) -> dict:
    from mllm_index.storage.search import IndexSearcher

    before = searcher_before_groups()
    idle = status()["VmRSS"]
    t = time.perf_counter()
    if before is not None:
        searcher = before(spec["uri"], load_vectors=spec["rescore"] > 0)
    else:
        searcher = IndexSearcher(spec["uri"], load_vectors=spec["rescore"] > 0, vectors="memory")
    load = time.perf_counter() - t
    queries = np.load(spec["queries"], allow_pickle=False)
    return idle, load, _search_blocks(lambda q: searcher.search(q, k=spec["k"], nprobe=spec["nprobe"], rescore=spec["rescore"])[1],
                                      queries, spec)


def child_mmap(spec: dict) -> dict:
    import faiss

    from mllm_index.storage.faiss_store import merge_topk, set_nprobe
    from mllm_index.storage.search import exact_order
    from mllm_index.storage.shard_vectors import ShardRescorer, local_copy
    from mllm_index.storage.uris import Location
    from mllm_index.storage.versions import read_manifest

    idle = status()["VmRSS"]
    t = time.perf_counter()
    location = Location(spec["uri"])
    manifest = read_manifest(location)
    shards = [faiss.read_index(local_copy(location, s.file), faiss.IO_FLAG_MMAP_IFC) for s in manifest.shards]
    rescorer = ShardRescorer(location, list(manifest.shards)) if spec["rescore"] else None
    load = time.perf_counter() - t
    depth = max(spec["k"], spec["rescore"])

    def search(q):
        parts = []
        for shard in shards:
            set_nprobe(shard, spec["nprobe"])
            parts.append(shard.search(q, depth))
        _, ids = merge_topk([p[0] for p in parts], [p[1] for p in parts], depth, "ip")
        if rescorer is not None:
            _, ids = exact_order(rescorer.exact(q, ids, "ip"), ids, "ip")
        return ids[:, : spec["k"]]

    queries = np.load(spec["queries"], allow_pickle=False)
    return idle, load, _search_blocks(search, queries, spec)


def child_stage(spec: dict) -> dict:
    from mllm_index.actors.search import SearchShardGroup

    idle = status()["VmRSS"]
    t = time.perf_counter()
    actor = SearchShardGroup(spec["uri"], spec["version"], {}, **spec["stage"])
    load = time.perf_counter() - t
    rows = dict(np.load(spec["input"], allow_pickle=False))
    out, seconds = [], 0.0
    for a in range(0, len(rows["ok"]), spec["batch"]):
        batch = {k: v[a : a + spec["batch"]] for k, v in rows.items()}
        t = time.perf_counter()
        out.append(actor(batch))
        seconds += time.perf_counter() - t
    np.savez(spec["output"], **{k: np.concatenate([b[k] for b in out]) for k in out[0]})
    return idle, load, {"search_s": seconds}


def _search_blocks(search, queries: np.ndarray, spec: dict) -> dict:
    found, seconds = [], 0.0
    for a in range(0, len(queries), spec["batch"]):
        t = time.perf_counter()
        found.append(search(queries[a : a + spec["batch"]]))
        seconds += time.perf_counter() - t
    np.save(spec["output"], np.concatenate(found))
    return {"search_s": seconds}


def run_child(kind: str, spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(spec)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{kind} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the parent: build, search, tabulate ----------------------------------------------------
def gallery(n: int, dim: int, chunk: int = 100_000) -> np.ndarray:
    """float16 vectors drawn chunk by chunk from one distribution (the float32 whole would not fit)."""
    from mllm_index.storage.synthetic import clustered_vectors

    return np.concatenate([clustered_vectors(min(chunk, n - a), dim, intrinsic=16, clusters=200, seed=2 + a // chunk)
                           .astype(np.float16) for a in range(0, n, chunk)])


def exact_top(x: np.ndarray, queries: np.ndarray, k: int, chunk: int = 100_000) -> np.ndarray:
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for a in range(0, len(x), chunk):
        s = queries @ x[a : a + chunk].astype(np.float32).T
        top = np.argpartition(-s, min(k, s.shape[1] - 1), axis=1)[:, :k]
        best_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], 1)
        best_i = np.concatenate([best_i, top + a], 1)
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def row(name: str, n: int, res: list[dict], nq: int, found: np.ndarray, truth: np.ndarray) -> dict:
    peak = max(r["VmHWM"] for r in res) * 1024
    worst = max(res, key=lambda r: (r["VmHWM"] - r["idle"]) * 1024 / max(r["served"], 1))
    return {"name": name, "n": n, "procs": len(res), "peak_mb": peak / 2**20,
            "b_per_image": (worst["VmHWM"] - worst["idle"]) * 1024 / max(worst["served"], 1),
            "served": worst["served"], "anon_mb": max(r["RssAnon"] for r in res) / 1024,
            "load_s": sum(r["load_s"] for r in res), "qps": nq / sum(r["search_s"] for r in res),
            "r10": recall(found[:, :10], truth[:, :10]), "r100": recall(found, truth)}


def bench_size(n: int, args, tmp: str) -> list[dict]:
    from mllm_index.pipelines.search_stages import plan_search
    from mllm_index.configs.schema import SearchConfig
    from mllm_index.storage.shard_store import publish_vectors
    from mllm_index.storage.synthetic import clustered_vectors
    from mllm_index.storage.uris import Location
    from mllm_index.storage.versions import read_manifest

    x = gallery(n, args.dim)
    ids = np.random.default_rng(n).choice(2**40, n, replace=False).astype(np.int64)
    queries = clustered_vectors(args.queries, args.dim, intrinsic=16, clusters=200, seed=1).astype(np.float32)
    truth = ids[exact_top(x, queries, 100)]
    root = Location(os.path.join(tmp, f"idx-{n}"))
    t = time.perf_counter()
    publish_vectors(root, ids, x, args.factory, "ip", part_size=args.shard_size // 4, parts_per_shard=4)
    build_s = time.perf_counter() - t
    del x
    manifest = read_manifest(root)
    qpath = os.path.join(tmp, "queries.npy")
    np.save(qpath, queries)
    print(f"N={n}: {args.factory}, {len(manifest.shards)} shards of {args.shard_size}, built in {build_s:.0f} s", flush=True)
    base = dict(uri=root.uri, k=100, nprobe=args.nprobe, queries=qpath, batch=args.batch, output=os.path.join(tmp, "found.npy"))
    rows = []
    for rescore in args.rescore:
        for name, kind in (("one process (IndexSearcher before groups)", "searcher"), ("one process, shards mmap", "mmap")):
            res = run_child(kind, {**base, "rescore": rescore})
            rows.append(row(f"{name}, rescore {rescore}", n, [{**res, "served": n}], len(queries),
                            np.load(base["output"]), truth))
            print(rows[-1], flush=True)
        plan = plan_search(manifest, SearchConfig(top_k=100, nprobe=args.nprobe, rescore=rescore,
                                                  max_bytes_per_actor=args.max_bytes_per_actor))
        current = os.path.join(tmp, "rows-0.npz")
        np.savez(current, embedding=queries, ok=np.ones(len(queries), bool))
        res = []
        for j, stage in enumerate(plan.stages):
            out = os.path.join(tmp, f"rows-{j + 1}.npz")
            spec = {"uri": root.uri, "version": manifest.version, "input": current, "output": out, "batch": args.batch,
                    "stage": {"shards": stage.shards, "rescore_shards": stage.rescore_shards, "top_k": 100,
                              "depth": plan.depth, "nprobe": plan.nprobe, "rescore": bool(rescore), "final": stage.final}}
            served = sum(manifest.shards[p].ntotal for p in set(stage.shards) | set(stage.rescore_shards))
            res.append({**run_child("stage", spec), "served": served})
            current = out
        found = np.load(current, allow_pickle=False)["knn_ids"]
        rows.append(row(f"shard groups ({len(plan.stages)} stages), rescore {rescore}", n, res, len(queries), found, truth))
        print(rows[-1], "stages:", [(r["served"], round(r["VmHWM"] / 1024), round(r["search_s"], 2)) for r in res], flush=True)
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, spec = sys.argv[2], json.loads(sys.argv[3])
        idle, load, out = {"searcher": child_searcher, "mmap": child_mmap, "stage": child_stage}[kind](spec)
        print(json.dumps({**status(), **out, "idle": idle, "load_s": load}))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=SIZES)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--factory", default="IVF1024,PQ48x8")
    ap.add_argument("--shard-size", type=int, default=200_000)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--rescore", default="0,200,1000")
    ap.add_argument("--max-bytes-per-actor", type=int, default=32 * 2**20)
    args = ap.parse_args()
    args.rescore = [int(r) for r in args.rescore.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            rows += bench_size(n, args, tmp)
    print(f"\ndim {args.dim}, {args.factory}, shards of {args.shard_size}, nprobe {args.nprobe}, {args.queries} queries "
          f"in blocks of {args.batch}, max_bytes_per_actor {args.max_bytes_per_actor / 2**20:.0f} MiB, {os.cpu_count()} CPUs")
    print(f"| {'N':>9} | {'search':<44} | procs | peak RSS MB | B/image served | anon MB at end | load s | queries/s | R@10 | R@100 |")
    print(f"| {'-' * 9}: | {'-' * 44} | ----: | ----------: | -------------: | -------------: | -----: | --------: | ---: | ----: |")
    for r in rows:
        print(f"| {r['n']:>9,} | {r['name']:<44} | {r['procs']:>5} | {r['peak_mb']:>11.0f} | {r['b_per_image']:>14.0f} | "
              f"{r['anon_mb']:>14.0f} | {r['load_s']:>6.1f} | {r['qps']:>9.0f} | {r['r10']:.3f} | {r['r100']:.3f} |")


if __name__ == "__main__":
    main()
