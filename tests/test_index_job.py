"""The index job end to end: moto S3 on 127.0.0.1, local Ray, tiny saved models."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from galleries import parquet_bytes, tar_bytes, write_files
from inputs import bad_files, odd_files
from PIL import Image

from mllm_index.actors.decode import decode_image, letterbox
from mllm_index.actors.embed import EmbedImages, load_preprocessing
from mllm_index.configs.schema import IndexJobConfig, load_config
from mllm_index.pipelines.demo import bundled_photos
from mllm_index.pipelines.index import run_index
from mllm_index.storage.contracts import MANIFEST_FORMAT
from mllm_index.storage.catalog import image_id
from mllm_index.storage.faiss_store import index_from_bytes, stored_ids
from mllm_index.storage.search import IndexSearcher
from mllm_index.storage.uris import Location

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[1]


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def photo_views(n_photos: int, size: int = 256) -> dict[str, bytes]:
    """Real photos and a re-crop of each, as a gallery holds them."""
    out = {}
    for path in bundled_photos()[:n_photos]:
        img = Image.open(path).convert("RGB")
        img.thumbnail((size, size))
        w, h = img.size
        out[f"{path.stem}/orig.jpg"] = jpeg(img)
        out[f"{path.stem}/crop.jpg"] = jpeg(img.crop((w // 10, h // 10, w - w // 10, h - h // 10)))
    return out


def job_config(source: str, index: str, model: str, options: dict, **overrides) -> IndexJobConfig:
    sets = [f"{k}={v}" for k, v in overrides.items()]
    return load_config(IndexJobConfig, None, {"source.uri": source, "index.uri": index, "model.name": model,
                                              "storage.options": options}, sets).require()


def all_ids(index: Location, manifest) -> np.ndarray:
    shards = [index_from_bytes(index.read_bytes(s.file.path)) for s in manifest.shards]
    return np.concatenate([stored_ids(shard) for shard in shards])


def test_mixed_gallery_on_s3_with_bad_and_odd_inputs(ray_session, s3_bucket, tiny_dinov2):
    bucket, options = s3_bucket
    source = Location(f"s3://{bucket}/gallery", options)
    photos = photo_views(6)
    odd = {k: v[0] for k, v in odd_files().items()}
    bad = {k: v[0] for k, v in bad_files().items()}
    write_files(source, {**{f"loose/{k}": v for k, v in photos.items()}, **{f"loose/{k}": v for k, v in odd.items()},
                         **{f"loose/{k}": v for k, v in bad.items()}, "loose/caption.json": b"{}"})
    shard_members = {f"s{i:03d}.jpg": jpeg(Image.open(bundled_photos()[6 + i]).convert("RGB").resize((200, 130))) for i in range(4)}
    source.write_bytes(tar_bytes({**shard_members, "s000.json": b"{}"}), "shards", "00000.tar")
    source.write_bytes(b"this is not a tar file at all" * 40, "shards", "00001.tar")
    table_rows = {f"t{i}": jpeg(Image.open(bundled_photos()[10 + i]).convert("RGB").resize((180, 120))) for i in range(3)}
    source.write_bytes(parquet_bytes(table_rows), "tables", "part-0.parquet")

    cfg = job_config(source.uri, f"s3://{bucket}/index", tiny_dinov2, options, **{"run.part_size": 8})
    summary = run_index(cfg)
    c = summary.counts
    n_images = len(photos) + len(odd) + len(bad) + len(shard_members) + len(table_rows)
    assert c.seen == c.indexed + c.failed + c.skipped
    assert c.indexed == len(photos) + len(odd) + len(shard_members) + len(table_rows)
    assert c.failed == len(bad) + 1  # + the corrupt tar, as one listing failure
    assert c.skipped == 2 and c.seen == n_images + 1 + 2  # caption.json, s000.json; + the corrupt tar

    index = Location(f"s3://{bucket}/index", options)
    version = summary.version
    searcher = IndexSearcher(index.uri, storage_options=options)
    manifest = searcher.manifest
    assert index.read_text("LATEST").strip() == version == manifest.version and manifest.format == MANIFEST_FORMAT
    assert manifest.model.name == tiny_dinov2 and manifest.preprocessing.image_size == 56
    assert index.exists("versions", version, "stats.json")

    catalog = {}
    for ref in manifest.catalog:
        for row in index.read_parquet(ref.path).to_pylist():
            catalog[row["key"]] = row
    for key, (_, (w, h)) in odd_files().items():
        assert (catalog[f"loose/{key}"]["width"], catalog[f"loose/{key}"]["height"]) == (w, h), key
    assert {"s000", "s003", "t0", "t2"} <= set(catalog)
    failures = {}
    for ref in manifest.failures:
        for row in index.read_parquet(ref.path).to_pylist():
            failures[row["key"] or row["uri"]] = row
    for key, (_, error_type) in bad_files().items():
        assert failures[f"loose/{key}"]["error_type"] == error_type, key
    corrupt = [f for k, f in failures.items() if k.endswith("00001.tar")]
    assert len(corrupt) == 1 and corrupt[0]["stage"] == "list"

    ids = all_ids(index, manifest)
    assert len(ids) == len(set(ids)) == c.indexed == searcher.ntotal
    assert set(ids) == {r["image_id"] for r in catalog.values()}
    assert catalog["loose/odd/gray.jpg"]["image_id"] == image_id(source.uri, "loose/odd/gray.jpg")

    # Each original photo, embedded as a query, finds itself first and its re-crop near the top.
    prep = load_preprocessing(tiny_dinov2)
    embedder = EmbedImages(tiny_dinov2, prep.image_size, prep.image_mean, prep.image_std, device="cpu")
    keys = [k for k in photos if k.endswith("orig.jpg")]
    px = np.stack([letterbox(decode_image(photos[k], 56, 10**9, 10**9)[0], 56, tuple(prep.fill)) for k in keys])
    _, found = searcher.search(embedder.embed_pixels(px), k=3, rescore=50)
    id_of = {row["image_id"]: key for key, row in catalog.items()}
    assert [id_of[i] for i in found[:, 0]] == [f"loose/{k}" for k in keys]


def test_killed_driver_resumes_without_loss_or_duplicates(ray_session, s3_bucket, tiny_dinov2):
    bucket, options = s3_bucket
    source = Location(f"s3://{bucket}/gallery", options)
    photos = photo_views(18, size=160)
    write_files(source, photos)
    index_uri = f"s3://{bucket}/index"
    sets = ["run.part_size=4", "decode.batch_size=4", "embed.batch_size=4"]
    # The killed run finds the endpoint through AWS_ENDPOINT_URL alone, the resumed one through storage.options.
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, MLLM_INDEX_PAUSE_AFTER_PARTS="3",
               PYTHONPATH=str(ROOT), AWS_ENDPOINT_URL=options["endpoint_url"])
    cmd = [sys.executable, "-m", "mllm_index.pipelines.cli", "index", source.uri, index_uri, "--model", tiny_dinov2]
    proc = subprocess.Popen(cmd + [a for s in sets for a in ("--set", s)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    index = Location(index_uri, options)
    deadline = time.time() + 240
    while len(index.list_names("versions", "v000001", "stats")) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    output = proc.communicate()[0]
    assert len(index.list_names("versions", "v000001", "stats")) == 3, output[-3000:]
    assert not index.exists("LATEST") and not index.exists("versions", "v000001", "manifest.json")
    assert index.read_json("LOCK.json")["pid"] == proc.pid  # the killed driver's lock is still there...

    sets.append(f"storage.options={{endpoint_url: '{options['endpoint_url']}'}}")
    cfg = load_config(IndexJobConfig, None, {"source.uri": source.uri, "index.uri": index_uri, "model.name": tiny_dinov2}, sets)
    resumed = run_index(cfg)  # ...and is taken over at once: its process is gone
    assert resumed.resumed and resumed.version == "v000001"
    assert resumed.images_processed_this_run == len(photos) - 3 * 4  # finished parts were not redone
    assert resumed.counts.failed == 0  # the killed run's workers reached S3 too (AWS_ENDPOINT_URL forwarded)
    manifest = IndexSearcher(index_uri, storage_options=options, load_vectors=False).manifest
    ids = all_ids(index, manifest)
    assert len(ids) == len(set(ids)) == len(photos)

    clean = run_index(load_config(IndexJobConfig, None, {"source.uri": source.uri, "index.uri": f"s3://{bucket}/clean",
                                                          "model.name": tiny_dinov2}, sets))
    clean_manifest = IndexSearcher(f"s3://{bucket}/clean", storage_options=options, load_vectors=False).manifest
    assert clean.counts == resumed.counts
    np.testing.assert_array_equal(np.sort(all_ids(Location(f"s3://{bucket}/clean", options), clean_manifest)), np.sort(ids))
