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
import pyarrow as pa
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
from mllm_index.storage.integrity import IntegrityError, read_verified
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


def settled(count, quiet_s: float = 3.0, limit_s: float = 60.0) -> int:
    """count() once it has not changed for quiet_s: a killed driver's tasks may finish a part or two before Ray ends them."""
    value, since, deadline = count(), time.time(), time.time() + limit_s
    while time.time() - since < quiet_s and time.time() < deadline:
        time.sleep(0.5)
        now = count()
        if now != value:
            value, since = now, time.time()
    return value


def test_killed_driver_resumes_without_loss_or_duplicates(ray_session, s3_bucket, tiny_dinov2, monkeypatch):
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
    deadline = time.time() + 480  # generous: the CI machine may be shared
    while len(index.list_names("versions", "v000001", "stats")) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    output = proc.communicate()[0]
    # Writer tasks write the markers, so a part or two may finish between the third marker and the kill.
    finished = settled(lambda: len(index.list_names("versions", "v000001", "stats")))
    assert 3 <= finished < len(photos) // 4, output[-3000:]  # interrupted mid-job
    assert not index.exists("LATEST") and not index.exists("versions", "v000001", "manifest.json")
    assert index.read_json("LOCK.json")["pid"] == proc.pid  # the killed driver's lock is still there...

    sets.append(f"storage.options={{endpoint_url: '{options['endpoint_url']}'}}")
    cfg = load_config(IndexJobConfig, None, {"source.uri": source.uri, "index.uri": index_uri, "model.name": tiny_dinov2}, sets)
    received = []  # every batch the resumed run's driver pulls from Ray Data
    iter_batches = ray_session.data.Dataset.iter_batches

    def spy(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            received.append({k: v.nbytes for k, v in batch.items()})
            yield batch

    monkeypatch.setattr(ray_session.data.Dataset, "iter_batches", spy)
    resumed = run_index(cfg)  # ...and is taken over at once: its process is gone
    monkeypatch.undo()
    assert resumed.resumed and resumed.version == "v000001"
    assert resumed.images_processed_this_run == len(photos) - finished * 4  # finished parts were not redone
    from mllm_index.pipelines.part_chunks import STATS_COLUMNS
    stats_rows = [b for b in received if "stats" in b]
    assert stats_rows and all(set(b) == set(STATS_COLUMNS) for b in stats_rows)  # the driver got stats rows...
    assert not any({"embedding", "pixels", "key", "uri"} & set(b) for b in received)  # ...and no image's data
    assert resumed.counts.failed == 0  # the killed run's workers reached S3 too (AWS_ENDPOINT_URL forwarded)
    manifest = IndexSearcher(index_uri, storage_options=options, load_vectors=False).manifest
    ids = all_ids(index, manifest)
    assert len(ids) == len(set(ids)) == len(photos)
    problems = []
    for ref in manifest.files():  # every part is whole: sizes and checksums as their writers recorded them
        try:
            read_verified(index, ref)
        except IntegrityError as exc:
            problems.append(str(exc))
    assert not problems, problems[:3]
    catalog_ids = [i for ref in manifest.catalog for i in index.read_parquet(ref.path).column("image_id").to_pylist()]
    assert sorted(catalog_ids) == sorted(ids.tolist())  # nothing duplicated across the killed run's parts and the redo
    assert not index.exists("versions", "v000001", "chunks")  # scratch of unfinished parts cleared, then removed

    clean = run_index(load_config(IndexJobConfig, None, {"source.uri": source.uri, "index.uri": f"s3://{bucket}/clean",
                                                          "model.name": tiny_dinov2}, sets))
    clean_manifest = IndexSearcher(f"s3://{bucket}/clean", storage_options=options, load_vectors=False).manifest
    assert clean.counts == resumed.counts
    np.testing.assert_array_equal(np.sort(all_ids(Location(f"s3://{bucket}/clean", options), clean_manifest)), np.sort(ids))


# -- the writer stage (pipelines/part_chunks.py): workers write parts, the driver gets stats rows --------------
def embedded_rows(ids: np.ndarray, part: int, dim: int = 8, bad: set[int] = frozenset()) -> dict[str, np.ndarray]:
    """Rows as the embed actors hand them on: catalog columns, decode outcome, float16 embedding."""
    n = len(ids)
    ok = np.array([int(i) not in bad for i in ids])
    obj = lambda values: np.array(values, dtype=object)  # noqa: E731
    emb = np.random.default_rng(int(ids.sum()) % 2**32).standard_normal((n, dim)).astype(np.float16)
    emb[~ok] = 0
    return {"image_id": ids.astype(np.int64), "key": obj([f"k{i}" for i in ids]), "uri": obj([f"file:///g/{i}.jpg" for i in ids]),
            "kind": obj(["file"] * n), "offset": np.zeros(n, np.int64), "length": np.full(n, 100, np.int64),
            "etag": obj([f"e{i}" for i in ids]), "part": np.full(n, part, np.int32), "width": np.full(n, 64, np.int32),
            "height": np.full(n, 48, np.int32), "ok": ok, "stage": obj(["" if o else "decode" for o in ok]),
            "error_type": obj(["" if o else "truncated" for o in ok]), "message": obj(["" if o else "cut short" for o in ok]),
            "retries": np.ones(n, np.int32), "embedding": emb}


def planned(index: Location, version: str, sizes: dict[int, int]) -> dict[int, np.ndarray]:
    """Plan parts of the given sizes (the writer reads a part's size from its plan file)."""
    from mllm_index.storage.catalog import ENTRY_SCHEMA
    from mllm_index.storage.shard_store import part_file

    ids = {}
    for part, n in sizes.items():
        ids[part] = np.arange(1000 * part + 1, 1000 * part + 1 + n, dtype=np.int64)
        rows = embedded_rows(ids[part], part)
        table = pa.table({f.name: pa.array(rows[f.name], f.type) for f in ENTRY_SCHEMA})
        index.child("versions", version).write_parquet(table.append_column("part", pa.array(rows["part"])), "plan", part_file(part))
    return ids


def test_writer_tasks_publish_whole_verified_parts_once(tmp_path):
    from mllm_index.pipelines.part_chunks import CHUNKS, STATS_COLUMNS, chunk_name, write_chunks
    from mllm_index.storage.catalog import embeddings_from_table
    from mllm_index.storage.contracts import PartStats, read_contract
    from mllm_index.storage.integrity import read_verified_parquet

    index, name = Location(str(tmp_path / "idx")), "v000001"
    version = index.child("versions", name)
    index.write_json({"token": "ours"}, "LOCK.json")
    ids = planned(index, name, {3: 10, 4: 6})
    write = lambda batch, token="ours": write_chunks(batch, index=index, version_name=name, token=token)  # noqa: E731
    first = write(embedded_rows(ids[3][:4], 3, bad={ids[3][1]}))
    assert set(first) == set(STATS_COLUMNS) and not first["finished"].any()  # no embedding leaves the task
    assert version.list_names(CHUNKS, "part-00003.d") == [f"{chunk_name(ids[3][:4])}"] and chunk_name(ids[3][:4]).endswith("-4.parquet")
    again = write(embedded_rows(ids[3][:4], 3, bad={ids[3][1]}))  # a retried task rewrites the same chunk
    assert not again["finished"].any() and len(version.list_names(CHUNKS, "part-00003.d")) == 1
    # A stale task of an interrupted run wrote another split of the same rows: counted, but merged once per id.
    write(embedded_rows(ids[3][2:6], 3, bad={ids[3][1]}))
    assert not version.exists("stats", "part-00003.json")

    # The last two batches of part 3 finish it from two tasks at once: one set of files, a marker that verifies.
    import threading
    out = []
    batches = [embedded_rows(ids[3][6:8], 3), embedded_rows(ids[3][8:], 3)]
    threads = [threading.Thread(target=lambda b=b: out.append(write(b))) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(int(o["finished"].sum()) for o in out) >= 1
    stats = read_contract(version, PartStats, "stats", "part-00003.json")
    assert (stats.rows, stats.indexed, stats.failed, stats.errors, stats.dim, stats.retries) == (10, 9, 1, {"truncated": 1}, 8, 10)
    emb_ids, vecs = embeddings_from_table(read_verified_parquet(index, stats.files["embeddings"]))
    assert emb_ids.tolist() == sorted(set(ids[3].tolist()) - {int(ids[3][1])}) and vecs.dtype == np.float16
    catalog = read_verified_parquet(index, stats.files["catalog"])
    failures = read_verified_parquet(index, stats.files["failures"])
    assert catalog.column("image_id").to_pylist() == emb_ids.tolist() and failures.column("image_id").to_pylist() == [ids[3][1]]
    assert not version.exists(CHUNKS, "part-00003.d")  # chunks go once the marker is written
    for o in out:  # the stats row of a finishing task carries the marker's content
        for text in o["stats"][o["finished"]]:
            assert PartStats.model_validate_json(text) == stats

    # A task retried after the part finished leaves the part as its marker describes it.
    late = write(embedded_rows(ids[3], 3))
    assert late["finished"].all() and read_contract(version, PartStats, "stats", "part-00003.json") == stats
    read_verified_parquet(index, stats.files["embeddings"])

    # A run whose lock was taken over writes chunks (scratch) but neither part files nor a marker.
    lost = write(embedded_rows(ids[4], 4), token="presumed-dead")
    assert lost["lock_lost"].all() and not lost["finished"].any()
    assert not version.exists("stats", "part-00004.json") and not version.exists("embeddings", "part-00004.parquet")


def test_writer_stage_sends_the_driver_stats_rows_only(ray_session, tmp_path):
    """The writer stage on Ray Data: one small row per (batch, part) reaches the driver, never an embedding."""
    from mllm_index.pipelines.part_chunks import STATS_COLUMNS, add_writer_stage, finished_stats
    from mllm_index.storage.contracts import PartStats
    from mllm_index.storage.lock import LockHeld

    index, name = Location(str(tmp_path / "idx")), "v000001"
    ids = planned(index, name, {0: 7, 1: 7, 2: 3, 5: 4})

    def embedded(parts: list[int]):
        """Blocks of 3 images of one part, as the embed actors hand them on (built here, in the test's driver)."""
        from ray.data.extensions import ArrowTensorArray

        blocks = []
        for p in parts:
            for i in range(0, len(ids[p]), 3):
                rows = embedded_rows(ids[p][i : i + 3], p)
                blocks.append(pa.table({k: ArrowTensorArray.from_numpy(v) if k == "embedding" else pa.array(v)
                                        for k, v in rows.items()}))
        return ray_session.data.from_arrow(blocks)

    seen = list(add_writer_stage(embedded([0, 1, 2]), index, name, None, 0.5).iter_batches(batch_size=None,
                                                                                          batch_format="numpy"))
    assert seen and all(set(b) == set(STATS_COLUMNS) for b in seen)
    assert sum(int(b["rows"].sum()) for b in seen) == 17
    stats = {s.part: s for b in seen for s in map(PartStats.model_validate_json, b["stats"][b["finished"]])}
    assert {p: s.rows for p, s in stats.items()} == {0: 7, 1: 7, 2: 3}

    again = list(finished_stats(add_writer_stage(embedded([2]), index, name, None, 0.5), renew=lambda: None))
    assert [s.part for s in again] == [2] and again[0] == stats[2]  # a finished part is reported, not rewritten

    index.write_json({"token": "the run that took over"}, "LOCK.json")

    def renew():
        raise LockHeld("taken over")

    with pytest.raises(LockHeld):
        list(finished_stats(add_writer_stage(embedded([5]), index, name, "ours", 0.5), renew=renew))
    assert not index.child("versions", name).exists("stats", "part-00005.json")
