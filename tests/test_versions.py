"""Version management: the index lock, the version table, rollback, readers during a publish."""

import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from mllm_index.configs.schema import IndexJobConfig, load_config
from mllm_index.pipelines.index import run_index
from mllm_index.storage.lock import LOCK, IndexLock, LockHeld
from mllm_index.storage.search import IndexSearcher
from mllm_index.storage.shard_store import publish_vectors
from mllm_index.storage.synthetic import clustered_vectors
from mllm_index.storage.uris import Location
from mllm_index.storage.versions import read_latest, rollback, version_table


def test_lock_refuses_a_second_writer_and_is_taken_over_after_expiry(tmp_path):
    index = Location(str(tmp_path / "idx"))
    first = IndexLock(index, "nightly update", ttl_seconds=60).acquire()
    with pytest.raises(LockHeld, match="locked by nightly update"):
        IndexLock(index, "second run").acquire()
    first.renew()
    first.release()
    assert not index.exists(LOCK)
    crashed = IndexLock(index, "crashed run", ttl_seconds=0.01).acquire()
    time.sleep(0.05)
    survivor = IndexLock(index, "next run").acquire()  # the crashed run's lock expired: taken over
    with pytest.raises(LockHeld, match="taken over"):
        crashed.renew()  # the presumed-dead run must stop before writing anything else
    survivor.release()


def test_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    import subprocess
    import sys

    index = Location(str(tmp_path / "idx"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    IndexLock(index, "killed driver", ttl_seconds=3600).acquire()
    lock = index.read_json(LOCK)
    index.write_json(dict(lock, pid=int(dead.stdout)), LOCK)  # as if that (now finished) process held it
    IndexLock(index, "re-run").acquire().release()


def test_index_job_refuses_while_another_run_holds_the_lock(tmp_path):
    index = Location(str(tmp_path / "idx"))
    with IndexLock(index, "nightly update", ttl_seconds=60):
        cfg = load_config(IndexJobConfig, None, {"source.uri": str(tmp_path / "g"), "index.uri": index.uri, "model.name": "m"})
        with pytest.raises(LockHeld, match="another run is writing this index"):
            run_index(cfg)
    assert not index.exists("versions")  # refused before writing anything


def publish(index: Location, n: int, seed: int) -> str:
    x = clustered_vectors(n, 32, seed=seed)
    return publish_vectors(index, np.arange(n, dtype=np.int64) + 10_000 * seed, x, "IVF4,Flat", part_size=500)


def test_version_table_and_rollback(tmp_path):
    index = Location(str(tmp_path / "idx"))
    v1, v2 = publish(index, 300, 1), publish(index, 500, 2)
    rows = version_table(index)
    assert [(r["version"], r["live"], r["indexed"]) for r in rows] == [(v1, False, 300), (v2, True, 500)]
    rollback(index, v1)
    assert read_latest(index) == v1 and IndexSearcher(index.uri).ntotal == 300
    with pytest.raises(ValueError, match="published: v000001, v000002"):
        rollback(index, "v000007")


def test_readers_see_a_whole_version_while_new_ones_publish(tmp_path):
    index = Location(str(tmp_path / "idx"))
    publish(index, 300, 1)
    seen, errors, stop = [], [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                searcher = IndexSearcher(index.uri)
                seen.append((searcher.version, searcher.ntotal, searcher.manifest.counts.indexed, len(searcher.ids)))
            except Exception as exc:  # a half-published version would show up here
                errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    for seed, n in ((2, 400), (3, 500), (4, 600)):
        publish(index, n, seed)
    stop.set()
    thread.join()
    assert not errors and len({s[0] for s in seen}) >= 2
    assert all(ntotal == indexed == vectors for _, ntotal, indexed, vectors in seen)  # never a mix of versions


def test_garbage_collection_keeps_live_newest_and_leased_versions(tmp_path):
    from mllm_index.storage.lock import ReadLease, leased_versions
    from mllm_index.storage.versions import begin_version, collect_garbage

    index = Location(str(tmp_path / "idx"))
    names = [publish(index, 200, seed) for seed in range(1, 6)]  # v1..v5, v5 live
    abandoned, _ = begin_version(index, "crashed", {})  # v6: unpublished, newer than every published one
    rollback(index, names[1])  # v2 live again
    with ReadLease(index, names[0], "a rerank run"):  # a reader is using v1
        assert leased_versions(index) == {names[0]}
        result = collect_garbage(index, keep=2, protected=leased_versions(index))
    assert result["deleted"] == [names[2]]  # v3: neither live, newest two, nor leased
    assert [r["version"] for r in version_table(index)] == [names[0], names[1], names[3], names[4], abandoned]
    assert leased_versions(index) == set()  # the lease is released with the reader
    expired = ReadLease(index, names[0], "crashed reader", ttl_seconds=-1)
    expired.renew()  # left behind by a crashed reader: already expired, so it protects nothing
    newest = publish(index, 200, 7)  # v7 is published and live now; the v6 folder is abandoned
    result = collect_garbage(index, keep=1, protected=leased_versions(index))
    assert result["deleted"] == [names[0], names[1], names[3], names[4], abandoned]
    assert result["kept"] == [newest] and read_latest(index) == newest
    with pytest.raises(ValueError, match="keep"):
        collect_garbage(index, keep=0)


def test_retention_setting_runs_after_each_publish(ray_session, tiny_dinov2, tmp_path):
    from pathlib import Path

    from mllm_index.pipelines.demo import bundled_photos

    gallery = Path(tmp_path / "g")
    gallery.mkdir()
    for path in bundled_photos()[:4]:
        (gallery / path.name).write_bytes(path.read_bytes())
    sets = ["index.keep_versions=2", "run.part_size=4"]
    for run in range(3):
        cfg = load_config(IndexJobConfig, None, {"source.uri": str(gallery), "index.uri": str(tmp_path / "idx"),
                                                 "model.name": tiny_dinov2}, sets + [f"run.seed={run}"])
        summary = run_index(cfg)
    assert summary.garbage_collected == ["v000001"]
    assert [r["version"] for r in version_table(Location(str(tmp_path / "idx")))] == ["v000002", "v000003"]


def test_garbage_collection_never_deletes_a_file_that_a_kept_live_or_leased_version_references(tmp_path):
    """Versions share files (an update references the live version's shards and parts): deleting a
    version deletes only the files of its folder that no remaining version references."""
    from mllm_index.storage.contracts import version_file
    from mllm_index.storage.lock import ReadLease, leased_versions
    from mllm_index.storage.tombstones import write_tombstones
    from mllm_index.storage.versions import begin_version, collect_garbage, publish as publish_manifest, read_manifest

    index = Location(str(tmp_path / "idx"))
    v1 = publish(index, 400, 1)
    base = read_manifest(index, v1)
    # v2 references every file of v1 and adds tombstones of its own for shard 0 (as an update does).
    v2, _ = begin_version(index, "update", {})
    dead = np.array([10_000, 10_001], np.int64)
    tomb = write_tombstones(index, version_file(v2, "tombstones", "shard-00000.parquet"),
                            pa.table({"image_id": dead, "part": np.zeros(2, np.int32)}))
    shards = [base.shards[0].model_copy(update={"tombstones": tomb, "tombstoned": 2})]
    publish_manifest(index, base.model_copy(update={"version": v2, "parent": v1, "shards": shards,
                                                    "counts": base.counts.model_copy(update={"indexed": 398, "seen": 398})}))
    v3 = publish(index, 300, 3)  # live, shares nothing
    shared = {ref.path for ref in read_manifest(index, v2).files()}
    assert any(p.startswith(f"versions/{v1}/") for p in shared)

    with ReadLease(index, v2, "a rerank run"):
        result = collect_garbage(index, keep=1, protected=leased_versions(index))
        assert result == {"deleted": [v1], "retired": [v1], "kept": [v2, v3]}
        for version in (v2, v3):  # every file of the leased and the live version is still there
            assert all(index.exists(ref.path) for ref in read_manifest(index, version).files())
        rows = {r["version"]: r for r in version_table(index)}
        assert rows[v1]["retired"] and not rows[v1]["published"]
        left = {index.relative(p) for p in index.find("versions", v1)}
        assert left == {p for p in shared if p.startswith(f"versions/{v1}/")} | {f"versions/{v1}/retired.json"}
        with pytest.raises(ValueError, match="not a published version"):
            rollback(index, v1)
        rollback(index, v2)  # the leased version still works as a whole
        searcher = IndexSearcher(index.uri)
        assert searcher.version == v2 and searcher.ntotal == 400
        scores, ids = searcher.search(clustered_vectors(400, 32, seed=1)[:5].astype(np.float32), k=3)
        assert not np.isin(ids, dead).any()
        rollback(index, v3)
    from mllm_index.pipelines.cli import format_versions

    assert f"{v1}   retired" in format_versions(version_table(index))
    result = collect_garbage(index, keep=1, protected=leased_versions(index))  # the lease is gone
    assert result == {"deleted": [v1, v2], "retired": [], "kept": [v3]}
    assert not index.exists("versions", v1) and not index.exists("versions", v2)
    assert all(index.exists(ref.path) for ref in read_manifest(index, v3).files())
