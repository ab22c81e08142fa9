"""Nightly update vs full rebuild, in one run: an update that adds 5% to a gallery.

    python benchmarks/update_vs_rebuild.py --images 1000

Gallery: N real-size JPEGs made from the bundled photos; tiny DINOv2 (the same as
index_throughput.py). Measured: the first full build (v1), then N * --added new images
are written, then `run_update` (v2) and a full `run_index` of the new gallery into a
second index. Both end with the same content; the table compares their wall times.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from benchmarks_common import make_gallery  # sibling module
from mllm_index.configs.schema import IndexJobConfig, load_config
from mllm_index.pipelines.index import run_index
from mllm_index.pipelines.tiny_models import make_tiny_backbone
from mllm_index.pipelines.update import run_update


def config(gallery: Path, index: Path, model: str | None, part_size: int) -> IndexJobConfig:
    return load_config(IndexJobConfig, None, {"source.uri": str(gallery), "index.uri": str(index), "model.name": model,
                                              "run.part_size": part_size})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--added", type=float, default=0.05)
    ap.add_argument("--part-size", type=int, default=128)
    ap.add_argument("--workdir", default="benchmarks/out/update")
    args = ap.parse_args()

    import ray

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    gallery = work / "gallery"
    make_gallery(gallery, args.images, 1024, seed=0)
    model = make_tiny_backbone(work / "tiny-dinov2", image_size=224, hidden=32, layers=1)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)

    t = time.perf_counter()
    run_index(config(gallery, work / "index", model, args.part_size))
    first = time.perf_counter() - t
    added = int(args.images * args.added)
    make_gallery(gallery / "added", added, 1024, seed=1)

    t = time.perf_counter()
    update = run_update(config(gallery, work / "index", None, args.part_size))
    update_s = time.perf_counter() - t
    t = time.perf_counter()
    rebuild = run_index(config(gallery, work / "rebuild", model, args.part_size))
    rebuild_s = time.perf_counter() - t
    ray.shutdown()

    assert update.build.counts.indexed == rebuild.counts.indexed
    print(f"\n{args.images} JPEGs (1024 px) + {added} added ({args.added:.0%}); tiny DINOv2 224 px; {os.cpu_count()} cores")
    print(f"{'run':34s} {'images embedded':>15s} {'seconds':>8s} {'vs rebuild':>10s}")
    print(f"{'first full build (v1)':34s} {args.images:15d} {first:8.1f} {first / rebuild_s:10.2f}")
    print(f"{'update (v2): +{:d}'.format(added):34s} {update.build.images_processed_this_run:15d} {update_s:8.1f} {update_s / rebuild_s:10.2f}")
    print(f"{'full rebuild of the new gallery':34s} {rebuild.images_processed_this_run:15d} {rebuild_s:8.1f} {1.0:10.2f}")
    print(f"update stages: {update.stage_seconds}")


if __name__ == "__main__":
    main()
