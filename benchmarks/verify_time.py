"""How long `mllm-index verify` takes, against the floor of just reading the same bytes.

Publishes a version of N clustered vectors with `publish_vectors` (the job's parts -> trained
index -> shards -> manifest path, no images), then, in the same run:
- baseline: read every referenced file once (no checksum, no parsing), 8 threads;
- verify: read, sha256, parse (FAISS load, Parquet decode) and reconcile the counts, 8 threads.
`--index URI` verifies an existing index too (e.g. the demo's `mllm-index-demo/index`).

    python benchmarks/verify_time.py --vectors 1000000 --dim 384
"""

from __future__ import annotations

import argparse
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mllm_index.storage.shard_store import publish_vectors
from mllm_index.storage.synthetic import clustered_vectors
from mllm_index.storage.uris import Location
from mllm_index.storage.verify import verify_version
from mllm_index.storage.versions import read_latest, read_manifest


def read_all(index: Location, version: str) -> tuple[int, float]:
    refs = read_manifest(index, version).files()
    t = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        total = sum(pool.map(lambda r: len(index.read_bytes(r.path)), refs))
    return total, time.perf_counter() - t


def measure(name: str, index: Location) -> list[tuple]:
    version = read_latest(index)
    total, read_s = read_all(index, version)
    check = verify_version(index, version)
    assert check.ok, check.problems
    mib = total / 2**20
    return [(name, "read every file (baseline)", check.files, mib, read_s),
            (name, "verify (sha256 + parse + counts)", check.files, mib, check.seconds)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--factory", default="IVF1024,PQ48x8")
    ap.add_argument("--workdir", default="benchmarks/out/verify")
    ap.add_argument("--index", help="also verify this existing index (its live version)")
    args = ap.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    if args.index:
        rows += measure(args.index, Location(args.index))
    x = clustered_vectors(args.vectors, args.dim, seed=0)
    t = time.perf_counter()
    publish_vectors(Location(str(work / "idx")), np.arange(args.vectors, dtype=np.int64), x, args.factory,
                    part_size=65536, parts_per_shard=4)
    built = time.perf_counter() - t
    del x
    rows += measure(f"{args.vectors:,} x {args.dim} ({args.factory})", Location(str(work / "idx")))

    print(f"\n(publishing the {args.vectors:,}-vector version took {built:.1f}s)")
    print("| index | pass | files | MiB | seconds | MiB/s |\n| --- | --- | ---: | ---: | ---: | ---: |")
    for name, what, files, mib, seconds in rows:
        print(f"| {name} | {what} | {files} | {mib:.1f} | {seconds:.2f} | {mib / seconds:.0f} |")


if __name__ == "__main__":
    main()
