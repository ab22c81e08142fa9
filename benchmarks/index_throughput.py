"""Index job throughput vs a naive single-process loop and the decode floor, in one run.

    python benchmarks/index_throughput.py --images 400

Gallery: real photos (bundled) turned into N real-size JPEGs (1024 px long side).
- naive: one process; PIL open + convert + resize (no draft mode), batches of 32 through
  the same model, FAISS train + add with the same factory. What a user scripts first.
- decode floor: our decode (JPEG draft + resize + letterbox) only, a process per core.
- index job: `run_index` on local Ray with all cores (listing, decode tasks, embed actor,
  parts written, train, shards, publish), on N/4 and on N images: the whole-job rates,
  and the marginal rate between the two runs, which separates the fixed start-up cost
  (Ray Data, actor start, model load) from the streaming throughput. An unreported job of
  --warmup images runs first, so that neither measured job pays the Ray session's own start.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

from mllm_index.actors.decode import decode_image, letterbox
from mllm_index.actors.embed import EmbedImages, load_preprocessing
from benchmarks_common import make_gallery  # sibling module
from mllm_index.pipelines.tiny_models import make_tiny_backbone


def naive_loop(paths: list[Path], model: str, prep: dict, factory: str) -> float:
    import faiss
    import torch
    from transformers import AutoModel

    t = time.perf_counter()
    net = AutoModel.from_pretrained(model).eval()
    s = prep.image_size
    mean = torch.tensor(prep.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.image_std).view(1, 3, 1, 1)
    vectors = []
    for start in range(0, len(paths), 32):
        batch = []
        for p in paths[start : start + 32]:
            img = Image.open(p).convert("RGB")
            scale = s / max(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC)
            canvas = Image.new("RGB", (s, s), tuple(prep.fill))
            canvas.paste(img, ((s - img.width) // 2, (s - img.height) // 2))
            batch.append(np.asarray(canvas))
        x = (torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255 - mean) / std
        with torch.inference_mode():
            v = net(pixel_values=x).pooler_output
        vectors.append(torch.nn.functional.normalize(v, dim=-1).numpy())
    x = np.concatenate(vectors)
    index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add_with_ids(x, np.arange(len(x), dtype=np.int64))
    return time.perf_counter() - t


def _decode_ours(args) -> int:
    path, s, fill = args
    pixels, _, _ = decode_image(Path(path).read_bytes(), s, 89_478_485, 1 << 26)
    return int(letterbox(pixels, s, fill)[0, 0, 0])


def _decode_plain(args) -> int:
    path, s, _ = args
    img = Image.open(path).convert("RGB")
    scale = s / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC).width


def decode_floor(paths: list[Path], prep: dict, workers: int, fn) -> float:
    t = time.perf_counter()
    with Pool(workers) as pool:
        pool.map(fn, [(str(p), prep.image_size, tuple(prep.fill)) for p in paths], chunksize=8)
    return time.perf_counter() - t


def index_job(gallery: Path, index: Path, model: str, part_size: int | None) -> dict:
    from mllm_index.configs.schema import IndexJobConfig, load_config
    from mllm_index.pipelines.index import run_index

    overrides = {"source.uri": str(gallery), "index.uri": str(index), "model.name": model}
    if part_size:
        overrides["run.part_size"] = part_size
    cfg = load_config(IndexJobConfig, None, overrides)
    t = time.perf_counter()
    summary = run_index(cfg).to_json()
    summary["measured_wall"] = time.perf_counter() - t
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=1024, help="long side of the gallery JPEGs")
    ap.add_argument("--image-size", type=int, default=224, help="backbone input size")
    ap.add_argument("--part-size", type=int, default=None, help="run.part_size (default: the job's, 4096)")
    ap.add_argument("--hidden", type=int, default=32, help="tiny embedder width")
    ap.add_argument("--layers", type=int, default=1, help="tiny embedder depth")
    ap.add_argument("--warmup", type=int, default=64, help="images of an unreported first job (0: none)")
    ap.add_argument("--workdir", default="benchmarks/out/throughput")
    args = ap.parse_args()

    import ray

    from mllm_index.storage.faiss_store import default_factory

    work = Path(args.workdir)
    for name in ("index", "index-quarter"):
        shutil.rmtree(work / name, ignore_errors=True)
    paths = make_gallery(work / "gallery", args.images, args.size)
    model = make_tiny_backbone(work / f"tiny-dinov2-{args.image_size}-{args.hidden}x{args.layers}", image_size=args.image_size,
                               hidden=args.hidden, layers=args.layers)
    prep = load_preprocessing(model)
    dim = EmbedImages(model, prep.image_size, prep.image_mean, prep.image_std, device="cpu").dim
    cores = os.cpu_count() or 1
    factory = default_factory(len(paths), dim)

    naive = naive_loop(paths, model, prep, factory)
    plain_floor = decode_floor(paths, prep, cores, _decode_plain)
    floor = decode_floor(paths, prep, cores, _decode_ours)
    small, warm = work / "gallery-quarter", work / "gallery-warmup"  # a quarter of the images; a few, to warm up
    for folder, count in ((small, len(paths) // 4), (warm, args.warmup)):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for p in paths[:count]:
            shutil.copy(p, folder / p.name)
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    if args.warmup:  # the session's first job also starts Ray Data and the worker pool: not per-job costs
        shutil.rmtree(work / "index-warmup", ignore_errors=True)
        index_job(warm, work / "index-warmup", model, args.part_size)
    job_small = index_job(small, work / "index-quarter", model, args.part_size)
    job = index_job(work / "gallery", work / "index", model, args.part_size)
    ray.shutdown()

    n, n_small = len(paths), len(paths) // 4
    for got, want in ((job_small, n_small), (job, n)):
        if got["counts"]["seen"] != want:
            raise SystemExit(f"the job saw {got['counts']['seen']} images, the gallery has {want}: stale files?")
    marginal = (n - n_small) / (job["measured_wall"] - job_small["measured_wall"])
    fixed = job["measured_wall"] - n / marginal
    rows = [
        ("naive single-process loop", n / naive),
        (f"decode floor, plain PIL ({cores} procs)", n / plain_floor),
        (f"decode floor, our decode ({cores} procs)", n / floor),
        (f"index job, whole job, {n_small} images", n_small / job_small["measured_wall"]),
        (f"index job, whole job, {n} images", n / job["measured_wall"]),
        (f"index job, marginal ({n_small} -> {n})", marginal),
    ]
    print(f"\n{n} JPEGs, long side {args.size}px -> {prep.image_size}px; tiny DINOv2 {args.hidden}x{args.layers} "
          f"(dim {dim}); {factory}; {cores} cores")
    print(f"{'method':42s} {'images/s':>9s} {'x naive':>8s} {'x floor':>8s}")
    for name, rate in rows:
        print(f"{name:42s} {rate:9.1f} {rate * naive / n:8.2f} {rate * floor / n:8.2f}")
    print("x floor = against our decode (JPEG draft mode), the stricter of the two floors")
    print(f"index job fixed cost (Ray Data start, actor start, model load, publish): about {fixed:.1f}s")
    print(f"job stages ({n} images): {job['stage_seconds']}, first part after {job.get('startup_seconds')}s")


if __name__ == "__main__":
    main()
