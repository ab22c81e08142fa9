"""Whole jobs through a faulty S3: the index job, the nightly update and the rerank job run once
straight against moto and once through `FaultProxy` at 10% faults (503 SlowDown, 500 InternalError,
connection resets, stalls past the read timeout). Every output must be the clean run's.

botocore's own retries are switched off (`retries.total_max_attempts: 1`) and the read timeout is
short, so faults reach s3fs and our retry layer; the summaries must show our retries.
"""

from __future__ import annotations

import http.client
import io
import math
import socket
import threading
import time
import uuid

import numpy as np
import pyarrow as pa
import pytest
from faultproxy import KINDS, FaultProxy
from galleries import parquet_bytes, tar_bytes, write_files
from inputs import bad_files
from PIL import Image, ImageOps

from mllm_index.actors.decode import decode_batch
from mllm_index.configs.schema import IndexJobConfig, RerankJobConfig, StorageConfig, load_config
from mllm_index.pipelines.demo import bundled_photos
from mllm_index.pipelines.index import run_index
from mllm_index.pipelines.rerank import run_rerank
from mllm_index.pipelines.update import run_update
from mllm_index.storage.faiss_store import index_from_bytes, stored_ids
from mllm_index.storage.uris import Location
from mllm_index.storage.versions import read_latest, read_manifest

pytestmark = pytest.mark.e2e
RATE, SEED = 0.10, 12
READ_TIMEOUT = 2.0
RETRY = {"attempts": 8, "base_delay": 0.05, "max_delay": 1.0}
INDEX_SETS = ["run.part_size=8", "decode.batch_size=8", "embed.batch_size=8"]
TOP_K, DEPTH, MAX_PIXELS = 6, 4, 112 * 112


def client_options(endpoint: str) -> dict:
    """s3fs options: no botocore retries, short timeouts (none of these keys is credential-like)."""
    return {"endpoint_url": endpoint, "config_kwargs": {"connect_timeout": READ_TIMEOUT, "read_timeout": READ_TIMEOUT,
                                                        "retries": {"total_max_attempts": 1, "mode": "standard"}}}


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def gallery_files() -> dict[str, bytes]:
    """26 loose photos and crops, a WebDataset shard of 4, a Parquet table of 3, two broken files."""
    files = {}
    for path in bundled_photos()[:13]:
        img = Image.open(path).convert("RGB")
        img.thumbnail((128, 128))
        files[f"loose/{path.stem}/a.jpg"] = jpeg(img)
        files[f"loose/{path.stem}/b.jpg"] = jpeg(img.crop((8, 8, img.width - 8, img.height - 8)))
    small = [Image.open(p).convert("RGB").resize((96, 64)) for p in bundled_photos()[13:18]]
    files["shards/00000.tar"] = tar_bytes({f"s{i}.jpg": jpeg(img) for i, img in enumerate(small[:4])} | {"s0.json": b"{}"})
    files["tables/t.parquet"] = parquet_bytes({f"t{i}": jpeg(ImageOps.mirror(img)) for i, img in enumerate(small[2:])})
    bad = bad_files()
    files["loose/bad/truncated.jpg"], files["loose/bad/notes.png"] = bad["bad/truncated.jpg"][0], bad["bad/notes.png"][0]
    return files


@pytest.fixture(scope="module")
def proxy(s3_endpoint):
    with FaultProxy(s3_endpoint, rate=RATE, seed=SEED, stall_seconds=READ_TIMEOUT + 1.5) as p:
        yield p


@pytest.fixture(scope="module")
def world(ray_session, s3_endpoint, proxy, tiny_dinov2):
    import s3fs

    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).mkdir(bucket)
    clean, faulty = client_options(s3_endpoint), client_options(proxy.url)
    source = Location(f"s3://{bucket}/gallery", clean)
    files = gallery_files()
    write_files(source, files)
    return dict(bucket=bucket, clean=clean, faulty=faulty, source=source, files=files, model=tiny_dinov2)


def index_config(world, name: str, options: dict, model: str | None) -> IndexJobConfig:
    base = {"source.uri": world["source"].uri, "index.uri": f"s3://{world['bucket']}/{name}", "model.name": model,
            "storage.options": options, "storage.retry": RETRY}
    return load_config(IndexJobConfig, None, base, INDEX_SETS)


def injected_during(proxy: FaultProxy, run):
    """(run's result, faults injected meanwhile by kind, plus the requests seen and faults after forwarding)."""
    def snapshot() -> dict:
        return {**proxy.injected(), "requests": proxy.counts["requests"], "after_forward": proxy.counts["after_forward"]}

    before = snapshot()
    result = run()
    return result, {k: v - before[k] for k, v in snapshot().items()}


def rows(index: Location, refs, key) -> list[dict]:
    table = pa.concat_tables([index.read_parquet(ref.path) for ref in refs])
    return sorted(table.to_pylist(), key=key)


def version_contents(index_uri: str, options: dict) -> dict:
    """Everything a version is: manifest (file sizes and checksums included), rows of every table, shard ids."""
    index = Location(index_uri, options)
    manifest = read_manifest(index)
    shards = [stored_ids(index_from_bytes(index.read_bytes(s.file.path))).tolist() for s in manifest.shards]
    return {
        "manifest": manifest.model_dump(mode="json", exclude={"published_at"}),
        "catalog": rows(index, manifest.catalog, lambda r: r["image_id"]),
        "embeddings": rows(index, manifest.embeddings, lambda r: r["image_id"]),
        "failures": rows(index, manifest.failures, lambda r: (str(r["uri"]), str(r["key"]))),
        "shard_ids": shards,
    }


def assert_same_version(clean_uri: str, faulty_uri: str, options: dict) -> dict:
    clean, faulty = version_contents(clean_uri, options), version_contents(faulty_uri, options)
    keys = lambda c: {r["key"] for r in c["catalog"]}  # noqa: E731
    assert keys(faulty) == keys(clean), [(f["key"], f["stage"], f["error_type"], f["message"]) for f in faulty["failures"]]
    for part in ("catalog", "embeddings", "failures", "shard_ids", "manifest"):  # the most telling difference first
        assert faulty[part] == clean[part], part
    return clean


def comparable(summary) -> dict:
    """An index summary without what differs between two runs of the same job (times, URIs, retries)."""
    return summary.model_dump(exclude={"index_uri", "stage_seconds", "wall_seconds", "images_per_second",
                                       "startup_seconds", "storage_retries"})


@pytest.fixture(scope="module")
def indexed(world, proxy):
    clean = run_index(index_config(world, "index-clean", world["clean"], world["model"]))
    faulty, injected = injected_during(proxy, lambda: run_index(index_config(world, "index-faulty", world["faulty"], world["model"])))
    print(f"\nindex job through faults: injected {injected}, retries {faulty.storage_retries.model_dump()}")
    return clean, faulty, injected


def test_index_job_through_faults_matches_a_clean_run(world, indexed):
    clean, faulty, injected = indexed
    assert all(injected[k] > 0 for k in KINDS), injected
    contents = assert_same_version(f"s3://{world['bucket']}/index-clean", f"s3://{world['bucket']}/index-faulty",
                                   world["clean"])
    assert len(contents["catalog"]) == 33 and len(contents["failures"]) == 2
    assert comparable(faulty) == comparable(clean)
    assert faulty.storage_retries.driver + faulty.storage_retries.workers > 0  # our retry path, not only s3fs's


@pytest.fixture(scope="module")
def updated(world, proxy, indexed):
    """The same nightly change (2 deleted, 2 changed, 3 added) applied to both identical v1 indexes."""
    source, files = world["source"], world["files"]
    loose = sorted(k for k in files if k.startswith("loose/") and "/bad/" not in k)
    for key in loose[:2]:
        source.delete(key)
    for key in loose[2:4]:
        source.write_bytes(jpeg(ImageOps.flip(Image.open(io.BytesIO(files[key])))), key)
    for i, key in enumerate(loose[4:7]):
        source.write_bytes(jpeg(ImageOps.mirror(Image.open(io.BytesIO(files[key])))), f"new/{i}.jpg")
    clean = run_update(index_config(world, "index-clean", world["clean"], None))
    faulty, injected = injected_during(proxy, lambda: run_update(index_config(world, "index-faulty", world["faulty"], None)))
    print(f"\nupdate through faults: injected {injected}, retries {faulty.build.storage_retries.model_dump()}")
    return clean, faulty, injected


def test_update_through_faults_matches_a_clean_run(world, updated):
    clean, faulty, injected = updated
    assert sum(injected[k] for k in KINDS) > 0
    assert clean.published and faulty.published and faulty.build.version == clean.build.version == "v000002"
    assert faulty.update == clean.update and clean.update.model_dump() == {"added": 3 + 2, "changed": 2, "deleted": 2,
                                                                           "unchanged": 29}  # + the 2 broken files, retried
    contents = assert_same_version(f"s3://{world['bucket']}/index-clean", f"s3://{world['bucket']}/index-faulty",
                                   world["clean"])
    # The update references the live catalog parts: their rows of deleted and changed images stay, tombstoned.
    tombstoned = sum(s["tombstoned"] for s in contents["manifest"]["shards"])
    assert contents["manifest"]["counts"]["indexed"] == 34 and len(contents["catalog"]) == 34 + tombstoned == 34 + 4
    assert comparable(faulty.build) == comparable(clean.build)
    assert faulty.build.storage_retries.driver + faulty.build.storage_retries.workers > 0


def rerank_config(world, output: str, options: dict, model: str, version: str) -> RerankJobConfig:
    base = {"queries.uri": f"s3://{world['bucket']}/queries", "index_uri": f"s3://{world['bucket']}/index-clean",
            "index_version": version, "output_uri": f"s3://{world['bucket']}/{output}", "reranker.model": model,
            "storage.options": options, "storage.retry": RETRY}
    sets = [f"search.top_k={TOP_K}", f"reranker.depth={DEPTH}", f"reranker.max_pixels={MAX_PIXELS}", "run.part_size=2",
            "reranker.queries_per_batch=2"]
    return load_config(RerankJobConfig, None, base, sets)


def run_rows(world, output: str, folder: str) -> list[dict]:
    """A run's rows without its run id, NaN as None (NaN != NaN), in a fixed order."""
    out = Location(f"s3://{world['bucket']}/{output}", world["clean"])
    table = out.read_parquet_folder(folder)
    rows = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items() if k != "run_id"}
            for r in table.to_pylist()]
    return sorted(rows, key=lambda r: tuple(str(r.get(c)) for c in ("query_id", "rank", "image_id", "stage")))


def test_rerank_job_through_faults_matches_a_clean_run(world, proxy, indexed, planted_vlm):
    queries = Location(f"s3://{world['bucket']}/queries", world["clean"])
    for i, path in enumerate(bundled_photos()[:4]):
        img = Image.open(path).convert("RGB")
        img.thumbnail((128, 128))
        queries.write_bytes(jpeg(img.crop((6, 6, img.width - 6, img.height - 6))), f"q{i}.jpg")
    version = read_latest(Location(f"s3://{world['bucket']}/index-clean", world["clean"]))
    clean = run_rerank(rerank_config(world, "runs/clean", world["clean"], planted_vlm, version))
    faulty, injected = injected_during(proxy, lambda: run_rerank(rerank_config(world, "runs/faulty", world["faulty"],
                                                                               planted_vlm, version)))
    print(f"\nrerank job through faults: injected {injected}, retries {faulty.storage_retries.model_dump()}")
    assert sum(injected[k] for k in KINDS) > 0
    results = run_rows(world, "runs/clean", "results")
    assert len(results) == 4 * TOP_K and clean.pairs_scored_this_run == 4 * DEPTH
    assert run_rows(world, "runs/faulty", "results") == results
    assert run_rows(world, "runs/faulty", "failures") == run_rows(world, "runs/clean", "failures")
    skip = {"output_uri", "stage_seconds", "wall_seconds", "pairs_per_second", "startup_seconds", "storage_retries"}
    assert faulty.model_dump(exclude=skip) == clean.model_dump(exclude=skip)
    assert faulty.storage_retries.driver + faulty.storage_retries.workers > 0


def _request(url: str, method: str, path: str, body: bytes | None = None, timeout: float = 5.0):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_the_fault_proxy_injects_each_kind_and_stops_cleanly(s3_endpoint):
    import s3fs

    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("http://10.1.2.3:9000", rate=0.1)
    bucket = f"proxy-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).mkdir(bucket)
    for kind, status, code in (("slowdown", 503, b"<Code>SlowDown</Code>"), ("internal_error", 500, b"<Code>InternalError</Code>")):
        with FaultProxy(s3_endpoint, rate=1.0, kinds=(kind,)) as p:
            got, body = _request(p.url, "GET", f"/{bucket}/missing")
            assert got == status and code in body and p.injected() == {kind: 1} and p.counts["forwarded"] == 0
    with FaultProxy(s3_endpoint, rate=1.0, kinds=("reset",), after_forward=1.0) as p:
        with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected)):
            _request(p.url, "PUT", f"/{bucket}/written", b"payload")
        assert p.counts["forwarded"] == p.counts["after_forward"] == 1  # applied, then the answer was lost
    assert s3fs.S3FileSystem(endpoint_url=s3_endpoint).cat_file(f"{bucket}/written") == b"payload"
    with FaultProxy(s3_endpoint, rate=0.0) as p:  # a signed client through the proxy: forwarded unchanged
        assert s3fs.S3FileSystem(endpoint_url=p.url, skip_instance_cache=True).cat_file(f"{bucket}/written") == b"payload"
        assert p.counts["forwarded"] == p.counts["requests"] > 0 and sum(p.injected().values()) == 0

    p = FaultProxy(s3_endpoint, rate=1.0, kinds=("stall",), stall_seconds=60.0, after_forward=0.0).start()
    with pytest.raises(socket.timeout):
        _request(p.url, "GET", f"/{bucket}/written", timeout=0.5)  # silence past the client's read timeout
    stalled = threading.Thread(target=lambda: pytest.raises(OSError, _request, p.url, "GET", f"/{bucket}/written", None, 30))
    stalled.start()
    time.sleep(0.3)
    t = time.time()
    p.stop()  # ends the stalls, closes the connections, joins the threads: well before the 60 s stall
    stalled.join(10)
    assert time.time() - t < 5 and not stalled.is_alive() and p.injected()["stall"] == 2
    assert p.alive_threads() == []


def test_the_configured_policy_reaches_the_workers(ray_session, s3_endpoint, world):
    """A decode task, in a Ray worker, retries a read exactly as storage.retry says (3 attempts, not the default 5)."""
    entry = {"image_id": np.array([1]), "key": np.array(["k"], object), "part": np.array([0]),
             "uri": np.array([f"s3://{world['bucket']}/gallery/loose/bad/notes.png"], object),
             "kind": np.array(["file"], object), "offset": np.array([0]), "length": np.array([40])}
    with FaultProxy(s3_endpoint, rate=1.0, kinds=("internal_error",)) as p:
        storage = StorageConfig(options=client_options(p.url), retry={"attempts": 3, "base_delay": 0.0, "max_delay": 0.0})
        task = ray_session.remote(lambda batch, options: decode_batch(batch, image_size=32, fill=(0, 0, 0), max_pixels=10**6,
                                                                     max_bytes=10**6, storage_options=options))
        out = ray_session.get(task.remote(entry, storage.options_with_retry()))
        assert p.injected() == {"internal_error": 3}  # one request per attempt: botocore and s3fs do not retry a 500
    assert out["stage"].tolist() == ["read"] and out["error_type"].tolist() == ["RetriesExhausted"]
    assert "failed after 3 attempts" in out["message"][0] and out["retries"].tolist() == [2]
