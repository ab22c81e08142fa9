"""How the index and update jobs scale with the gallery: memory per process type, seconds per stage.

    python benchmarks/scale.py --sizes 100000 400000 1600000

For each N, in a fresh process with a fresh local Ray (so that peak RSS is that N's):
1. a gallery of N tiny PNGs in WebDataset tar shards (--shard-images per tar), made on the fly;
2. the index job with the cheapest embedder, `bench:pixel-stats` (no model: the benchmark
   measures the pipeline, not a backbone);
3. an update after nothing changed, a +1% update (two new tars), a -1% update (two tars
   deleted) and a fixed-delta update (+2,000 images in one tar, the same at every N). A tar is 0.5% of the gallery (--shard-images 0: N/200), so that a delta of whole
   containers is 1%: rewriting a tar changes its etag, which marks all its members changed.
Peak RSS is the high-water mark (VmHWM) of every process, read from /proc while the job runs,
grouped by what the process is (the driver, or the Ray task / actor in its process title). The high-water marks
are reset at the start of each step. Ray reuses a worker process for different tasks, so a worker's mark goes to
the task it runs when sampled and may come from an earlier task of the same step in that process (e.g. a shard
build, which holds one shard: up to `index.shard_size` vectors); the driver's figure has no such ambiguity.
Task functions whose names start with "_" (e.g. the listing's) are counted with Ray's own actors as "ray internals".
The table's goals are the issue's: driver peak < 1.5x from the smallest to the largest N,
update time at fixed delta < 1.5x from 400k to 1.6M, an unchanged update < 10% of the build.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

FIXED_DELTA = 2000
PX = 12  # tiny images: decode and embed cost little, so the pipeline's own costs show


def _png(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, 3)  # a colour per image, with noise: clustered, not uniform, vectors
    pixels = np.clip(base + rng.normal(0, 24, (PX, PX, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def write_tar(path: Path, ids: range | list[int]) -> None:
    """One WebDataset shard; written to a temporary name and renamed, so a listing never sees half a tar."""
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        for i in ids:
            data = _png(i)
            info = tarfile.TarInfo(f"img{i:09d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tmp.rename(path)


def make_gallery(folder: Path, n: int, per_tar: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"shard-{s:05d}.tar", range(s * per_tar, min(n, (s + 1) * per_tar))) for s in range(-(-n // per_tar))]
    with multiprocessing.Pool(os.cpu_count()) as pool:
        pool.starmap(write_tar, jobs)


class PeakRss:
    """Polls /proc for the high-water RSS of the driver and of every Ray worker, by process title."""

    def __init__(self, every: float = 0.25):
        self.every, self.peaks, self._stop = every, defaultdict(int), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        for pid in filter(str.isdigit, os.listdir("/proc")):  # start every high-water mark from the current RSS
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                pass  # not ours, or gone
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self._poll()

    def _run(self):
        while not self._stop.wait(self.every):
            self._poll()

    def _poll(self):
        me = os.getpid()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            hwm = re.search(r"VmHWM:\s+(\d+) kB", status)
            if not hwm:
                continue
            name = "driver" if int(pid) == me else _role(title)
            if name:
                self.peaks[name] = max(self.peaks[name], int(hwm.group(1)) * 1024)


RAY_INTERNALS = ("DashboardAgent", "RuntimeEnvAgent", "ActorLocationTracker", "AutoscalingCoordinator", "_")


def _role(title: str) -> str | None:
    """'ray::MapWorker(MapBatches(PixelStatsEmbedder)).submit' -> 'MapWorker(MapBatches(PixelStatsEmbedder))'."""
    if not title.startswith("ray::") or title == "ray::IDLE":
        return None
    name = re.sub(r"\.[A-Za-z_]+$", "", title[5:].split(" ")[0]).split(":")[-1]
    return "ray internals" if name.startswith(RAY_INTERNALS) else name[:60]


def one_size(n: int, work: Path, per_tar: int, part_size: int) -> dict:
    """Runs in its own process: the build and the three updates of one gallery size."""
    import ray

    from mllm_index.configs.schema import IndexJobConfig, load_config
    from mllm_index.pipelines.index import run_index
    from mllm_index.pipelines.update import run_update

    gallery, index = work / "gallery", work / "index"
    t = time.perf_counter()
    make_gallery(gallery, n, per_tar)
    made = time.perf_counter() - t
    cfg = load_config(IndexJobConfig, None, {"source.uri": str(gallery), "index.uri": str(index),
                                             "model.name": "bench:pixel-stats", "model.image_size": 12,
                                             "run.part_size": part_size, "source.format": "webdataset"})
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    row = {"images": n, "gallery_seconds": round(made, 1)}
    for step, change in (("build", None), ("unchanged", None), ("+1%", "add"), ("-1%", "remove"), ("+2000", "fixed")):
        if change == "fixed":  # the same delta at every N: 2,000 new images in one tar
            write_tar(gallery / "shard-99997.tar", range(2 * 10**8, 2 * 10**8 + FIXED_DELTA))
        elif change == "add":
            for t in range(2):
                write_tar(gallery / f"shard-{99998 + t}.tar", range(10**8 + t * per_tar, 10**8 + (t + 1) * per_tar))
        elif change == "remove":
            for t in range(2):
                (gallery / f"shard-{t:05d}.tar").unlink()
        with PeakRss() as rss:
            t = time.perf_counter()
            summary = run_index(cfg) if step == "build" else run_update(cfg)
            wall = time.perf_counter() - t
        row[step] = {"seconds": round(wall, 2), "stages": summary.stage_seconds if hasattr(summary, "stage_seconds") else {},
                     "peak_rss": dict(rss.peaks), "published": getattr(summary, "published", True),
                     "diff": _diff_record(index, summary)}
    # The rerank job is a Ray job of its own: a fresh session, so that its workers are not processes that ran
    # the index steps (a reused worker keeps its RSS, and the high-water reset starts from the current RSS).
    ray.shutdown()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    row["rerank"] = rerank_step(work, index, per_tar)
    ray.shutdown()
    return row


def _diff_record(index: Path, summary) -> dict:
    """How the update's key buckets were diffed (plan/listing.json): modes and key row groups read."""
    version = getattr(getattr(summary, "build", None), "version", None) or getattr(summary, "version", None)
    path = index / "versions" / str(version) / "plan" / "listing.json"
    if not version or not path.exists():
        return {}
    record = json.loads(path.read_text())
    return {"modes": record.get("bucket_modes", {}), "row_groups": record.get("key_row_groups_read", 0)}


def rerank_step(work: Path, index: Path, per_tar: int, queries: int = 200) -> dict:
    """The rerank job on the updated version: 200 queries (gallery images), top 20, re-scored by
    RANSAC-verified SIFT (the cheapest re-ranker: this measures the job's memory, not a model)."""
    from mllm_index.configs.schema import RerankJobConfig, load_config
    from mllm_index.pipelines.rerank import run_rerank

    folder = work / "queries"
    folder.mkdir()
    for i in range(queries):
        (folder / f"q{i:05d}.png").write_bytes(_png(10 * per_tar + i))  # tars 0 and 1 were deleted by the -1% step
    cfg = load_config(RerankJobConfig, None, {
        "queries.uri": str(folder), "index_uri": str(index), "output_uri": str(work / "rerank"),
        "reranker.model": "classic:sift-ransac", "search.top_k": 20, "reranker.depth": 20})
    with PeakRss() as rss:
        t = time.perf_counter()
        summary = run_rerank(cfg)
        wall = time.perf_counter() - t
    return {"seconds": round(wall, 2), "stages": summary.stage_seconds, "peak_rss": dict(rss.peaks),
            "published": True}


STEPS = ("build", "unchanged", "+1%", "-1%", "+2000", "rerank")


def mb(x: int | None) -> str:
    return "-" if not x else f"{x / 2**20:.0f}"


def print_table(rows: list[dict]) -> None:
    roles = sorted({r for row in rows for step in STEPS for r in row[step]["peak_rss"] if r != "driver"})
    print("\n| images | step | seconds | stages (s) | driver peak MB | worst worker peak MB |")
    print("| ---: | --- | ---: | --- | ---: | ---: |")
    for row in rows:
        for step in STEPS:
            s = row[step]
            stages = ", ".join(f"{k} {v:.1f}" for k, v in s["stages"].items())
            if s.get("diff") and step != "build":
                modes = "+".join(f"{m} x{n}" for m, n in s["diff"]["modes"].items())
                stages += f"; buckets {modes}, {s['diff']['row_groups']} key row groups read"
            workers = max((v for k, v in s["peak_rss"].items() if k != "driver"), default=0)
            print(f"| {row['images']:,} | {step} | {s['seconds']:.1f} | {stages} | {mb(s['peak_rss'].get('driver'))} | "
                  f"{mb(workers)} |")
    # Per process type: the highest peak over the build and the updates, and in the rerank job (a worker process
    # is named by the Ray task or actor it ran when sampled).
    print("\n| process (Ray task / actor) | " + " | ".join(f"{row['images']:,}: index+update MB | rerank MB" for row in rows)
          + " |")
    print("| --- | " + " | ".join("---: | ---:" for _ in rows) + " |")
    for role in ["driver", *roles]:
        cells = []
        for row in rows:
            build = max((row[step]["peak_rss"].get(role, 0) for step in STEPS[:-1]), default=0)
            cells += [mb(build), mb(row["rerank"]["peak_rss"].get(role))]
        print(f"| {role} | " + " | ".join(cells) + " |")
    first, last = rows[0], rows[-1]
    drv = last["build"]["peak_rss"]["driver"] / first["build"]["peak_rss"]["driver"]
    print(f"\ndriver peak, {last['images']:,} vs {first['images']:,} images: {drv:.2f}x (goal < 1.5x)")
    for role in ["driver", *roles]:
        a, b = first["rerank"]["peak_rss"].get(role), last["rerank"]["peak_rss"].get(role)
        if a and b:
            print(f"rerank job, {role} peak, {last['images']:,} vs {first['images']:,}: {b / a:.2f}x (goal < 1.5x)")
    mid = next((r for r in rows if r["images"] >= 400_000), None)
    if mid is not None and mid is not last:
        for step in ("+2000", "+1%", "-1%"):
            print(f"{step} update seconds, {last['images']:,} vs {mid['images']:,}: "
                  f"{last[step]['seconds'] / mid[step]['seconds']:.2f}x"
                  + (" (goal < 1.5x at a fixed delta)" if step == "+2000" else " (the delta is 1% of N: it grows with N)"))
    print(f"unchanged update / build at {last['images']:,}: {last['unchanged']['seconds'] / last['build']['seconds']:.3f} "
          f"(goal < 0.10)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000, 1_600_000])
    ap.add_argument("--shard-images", type=int, default=0, help="images per tar shard (0: N/200)")
    ap.add_argument("--part-size", type=int, default=20_000)
    ap.add_argument("--workdir", default="benchmarks/out/scale")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size in this process
    args = ap.parse_args()
    if args.one:
        work = Path(args.workdir) / str(args.one)
        subprocess.run(["rm", "-rf", str(work)], check=True)
        per_tar = args.shard_images or max(1, args.one // 200)
        print(json.dumps(one_size(args.one, work, per_tar, args.part_size)))
        return
    rows = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--shard-images", str(args.shard_images),
                              "--part-size", str(args.part_size), "--workdir", args.workdir],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{n:,} images: the run failed\n{out.stderr[-4000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{n:,} images done: build {rows[-1]['build']['seconds']} s", flush=True)
        subprocess.run(["rm", "-rf", str(Path(args.workdir) / str(n))], check=True)
        (Path(args.workdir) / "rows.json").write_text(json.dumps(rows))  # raw numbers, kept with the table
    print_table(rows)


if __name__ == "__main__":
    main()
