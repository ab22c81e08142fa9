"""Search by shard groups, and the exact re-score that reads only the shortlist's vectors.

The reference is the single-process search (IndexSearcher holding every shard, its re-score
reading every vector from the embeddings parts): the group stages must give exactly its ids and
scores, for any grouping, and the shortlist re-score exactly its re-score. Versions whose shards
carry tombstones are searched the same way: tests/test_tombstones.py checks them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mllm_index.actors.search import SearchIndex, SearchShardGroup
from mllm_index.configs.schema import SearchConfig
from mllm_index.pipelines.search_stages import add_search_stages, plan_search
from mllm_index.storage import shard_vectors
from mllm_index.storage.catalog import embeddings_from_table
from mllm_index.storage.integrity import IntegrityError, digest, read_verified_parquet
from mllm_index.storage.search import IndexSearcher, ShardGroup, group_bytes, plan_groups
from mllm_index.storage.shard_store import publish_vectors
from mllm_index.storage.shard_vectors import load_ids
from mllm_index.storage.synthetic import clustered_vectors
from mllm_index.storage.uris import Location
from mllm_index.storage.versions import read_manifest

FORMAT_1 = Path(__file__).parent / "fixtures" / "format1"
DIM, N = 32, 6000


def gallery() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = clustered_vectors(N, DIM, intrinsic=6, clusters=30, seed=0)
    ids = np.random.default_rng(0).choice(2**40, N, replace=False).astype(np.int64)
    queries = clustered_vectors(40, DIM, intrinsic=6, clusters=30, seed=1)
    return x, ids, queries


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> tuple[Location, np.ndarray]:
    """6 shards of 1000 vectors (IVF64,PQ8x8), published the way the jobs publish."""
    x, ids, queries = gallery()
    root = Location(str(tmp_path_factory.mktemp("groups") / "idx"))
    publish_vectors(root, ids, x, "IVF64,PQ8x8", "ip", part_size=500, parts_per_shard=2)
    return root, queries


def run_stages(root: Location, search: SearchConfig, queries: np.ndarray, ok: np.ndarray, version: str | None = None) -> dict:
    """The plan's stages called in process, the rows re-cut into other blocks between stages (as Ray Data may)."""
    manifest = read_manifest(root, version)
    plan = plan_search(manifest, search)
    assert not plan.legacy
    batches = [{"embedding": queries, "ok": ok, "row": np.arange(len(queries))}]
    for j, stage in enumerate(plan.stages):
        actor = SearchShardGroup(root.uri, manifest.version, root.storage_options, stage.shards, stage.rescore_shards,
                                 plan.top_k, plan.depth, plan.nprobe, bool(plan.rescore), stage.final, plan.cache_dir)
        rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
        step = [7, 13, 40][j % 3]
        batches = [actor({k: v[a : a + step] for k, v in rows.items()}) for a in range(0, len(queries), step)]
    out = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert set(out) == {"ok", "row", "knn_ids", "knn_scores", "knn_shards"}  # running columns and the embedding are gone
    assert_shards_hold_live(root, manifest, out["knn_ids"], out["knn_shards"])
    return out


def assert_shards_hold_live(root: Location, manifest, ids: np.ndarray, shards: np.ndarray) -> None:
    """`knn_shards` names, for each returned id, a shard that stores it and has not tombstoned it
    (-1 exactly where no id was returned): the shard whose catalog file holds the id's live row."""
    from mllm_index.storage.tombstones import shard_tombstoned_ids

    assert shards.shape == ids.shape and shards.dtype == np.int64
    np.testing.assert_array_equal(shards == -1, ids == -1)
    for ref in manifest.shards:
        mine = shards == ref.shard
        stored = load_ids(root, ref.ids) if ref.ids is not None else None
        dead = shard_tombstoned_ids(root, ref) if ref.tombstones is not None else np.zeros(0, np.int64)
        if stored is not None:
            assert np.isin(ids[mine], stored).all(), ref.shard
        assert not np.isin(ids[mine], dead).any(), ref.shard
    assert np.isin(shards[shards >= 0], [s.shard for s in manifest.shards]).all()


def reference(root: Location, queries: np.ndarray, ok: np.ndarray, top_k: int, nprobe: int, rescore: int):
    scores, ids = IndexSearcher(root.uri).search(queries[ok], k=top_k, nprobe=nprobe, rescore=rescore)
    return np.where(ids >= 0, scores, np.nan), ids


@pytest.mark.parametrize("rescore", [0, 60])
@pytest.mark.parametrize("grouping", [{"shards_per_actor": 1}, {"shards_per_actor": 2}, {"shards_per_actor": 4},
                                      {"max_bytes_per_actor": None}, "bytes"])
def test_shard_groups_return_exactly_the_single_process_search(index, grouping, rescore):
    root, queries = index
    manifest = read_manifest(root)
    shared = manifest.trained.bytes
    if grouping == "bytes":  # a memory budget of 2.5 shards, counted as the actors count it
        budget = int(2.5 * group_bytes(manifest.shards[:1], index=True, ids=True, shared=shared))
        grouping = {"max_bytes_per_actor": budget}
    search = SearchConfig(top_k=25, nprobe=8, rescore=rescore, **grouping)
    plan = plan_search(manifest, search)
    if search.max_bytes_per_actor:
        for stage in plan.stages:
            held = (group_bytes([manifest.shards[p] for p in stage.shards], index=True, shared=shared)
                    + group_bytes([manifest.shards[p] for p in stage.rescore_shards], index=False, ids=True))
            assert held <= search.max_bytes_per_actor or len(set(stage.shards) | set(stage.rescore_shards)) == 1
    searched = [p for s in plan.stages for p in s.shards]
    assert sorted(searched) == list(range(6))  # every shard searched once
    if rescore:
        assert sorted(p for s in plan.stages for p in s.rescore_shards) == list(range(6))  # and re-scored once
    ok = np.ones(len(queries), bool)
    ok[[3, 17]] = False  # queries that failed to decode pass through with ids -1
    out = run_stages(root, search, queries, ok)
    assert (out["knn_ids"][~ok] == -1).all() and np.isnan(out["knn_scores"][~ok]).all()
    want_scores, want_ids = reference(root, queries, ok, 25, 8, rescore)
    np.testing.assert_array_equal(out["knn_ids"][ok], want_ids)
    np.testing.assert_allclose(out["knn_scores"][ok], want_scores, rtol=0, atol=1e-6)


def test_groups_bounded_by_bytes_and_count():
    from mllm_index.storage.contracts import FileRef, ShardRef

    shards = [ShardRef(file=FileRef(path=f"s{i}", bytes=b), shard=i, parts=[i], ntotal=10) for i, b in
              enumerate([40, 40, 40, 200, 10, 10])]
    assert plan_groups(shards, 100, None) == [[0, 1], [2], [3], [4, 5]]  # the 200-byte shard alone
    assert plan_groups(shards, 100, 1) == [[0], [1], [2], [3], [4], [5]]
    assert plan_groups(shards, None, 4) == [[0, 1, 2, 3], [4, 5]]
    assert plan_groups(shards, 200, None, index=False, ids=True) == [[0, 1], [2, 3], [4, 5]]  # 80 B of ids each
    assert plan_groups([], 100, None) == []
    # each file carries a 30-byte copy of the trained index, held once per group
    assert plan_groups(shards, 100, None, shared=30) == [[0, 1, 2], [3], [4, 5]]
    assert group_bytes([shards[0], shards[1], shards[2]], shared=30) == 30 + 3 * 10


@pytest.mark.parametrize("count", [1, 50, 3000])  # one run, a few, and enough runs to read on several threads
def test_vector_file_reads_exactly_the_rows_asked_for(tmp_path, count):
    vectors = np.random.default_rng(count).standard_normal((5000, 24)).astype(np.float16)
    np.save(tmp_path / "v.npy", vectors)
    rows = np.unique(np.r_[np.random.default_rng(1).choice(5000, count, replace=False), [10, 11, 12]])  # a run of 3
    f = shard_vectors.VectorFile(str(tmp_path / "v.npy"))
    np.testing.assert_array_equal(f.read(rows), vectors[rows])
    assert f.read(np.zeros(0, np.int64)).shape == (0, 24)
    f.close()
    np.save(tmp_path / "w.npy", vectors.astype(np.float32))
    with pytest.raises(IntegrityError, match="float16"):
        shard_vectors.VectorFile(str(tmp_path / "w.npy"))


def test_shards_carry_their_sorted_ids_and_vectors(index):
    root, _ = index
    manifest = read_manifest(root)
    by_id = {}
    for ref in manifest.embeddings:
        ids, vecs = embeddings_from_table(read_verified_parquet(root, ref))
        by_id.update(zip(ids.tolist(), vecs))
    for shard in manifest.shards:
        assert shard.ids.sha256 and shard.vectors.sha256 and shard.files() == [shard.file, shard.ids, shard.vectors]
        ids = load_ids(root, shard.ids)
        vectors = np.load(root.path(shard.vectors.path), allow_pickle=False)
        assert len(ids) == shard.ntotal and vectors.dtype == np.float16
        np.testing.assert_array_equal(vectors, np.stack([by_id[i] for i in ids.tolist()]))


@pytest.mark.parametrize("k, rescore", [(10, 10), (10, 200), (100, 300)])
def test_shortlist_rescore_equals_the_in_memory_rescore(index, k, rescore, monkeypatch):
    root, queries = index
    memory = IndexSearcher(root.uri)
    shards = IndexSearcher(root.uri, vectors="shards")
    assert shards.vectors is None and shards.rescorer.nbytes == 8 * N  # the ids, not the vectors
    read = []
    original = shard_vectors.VectorFile.read
    monkeypatch.setattr(shard_vectors.VectorFile, "read", lambda self, rows: read.append(len(rows)) or original(self, rows))
    want_scores, want_ids = memory.search(queries, k=k, nprobe=8, rescore=rescore)
    got_scores, got_ids = shards.search(queries, k=k, nprobe=8, rescore=rescore)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_scores, want_scores, rtol=0, atol=1e-6)
    assert 0 < sum(read) <= len(queries) * rescore  # only the shortlist's rows were read


def test_shortlist_rescore_from_s3_copies_verified_vectors_once(index, s3_bucket, tmp_path, monkeypatch):
    bucket, options = s3_bucket
    local, queries = index
    root = Location(f"s3://{bucket}/idx", options)
    for path in Path(local.root).rglob("*"):  # the module's index, uploaded as it is
        if path.is_file():
            root.write_bytes(path.read_bytes(), str(path.relative_to(local.root)))
    manifest = read_manifest(root)
    cache = tmp_path / "cache"
    searcher = IndexSearcher(root.uri, storage_options=options, vectors="shards", cache_dir=str(cache))
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{s.vectors.sha256}.npy" for s in manifest.shards)
    want = IndexSearcher(root.uri, storage_options=options).search(queries, k=10, nprobe=8, rescore=50)
    got = searcher.search(queries, k=10, nprobe=8, rescore=50)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-6)

    # the group stages read their shards and vectors through the same verified cache
    ok = np.ones(len(queries), bool)
    out = run_stages(root, SearchConfig(top_k=10, nprobe=8, rescore=50, shards_per_actor=4, cache_dir=str(cache)), queries, ok)
    np.testing.assert_array_equal(out["knn_ids"], want[1])
    assert len(list(cache.iterdir())) == 2 * len(manifest.shards)  # vectors + FAISS files, nothing else

    monkeypatch.setattr(root.fs.__class__, "open", lambda *a, **kw: pytest.fail("copied again"))
    IndexSearcher(root.uri, storage_options=options, vectors="shards", cache_dir=str(cache))  # verified copies reused
    run_stages(root, SearchConfig(top_k=10, nprobe=8, rescore=50, cache_dir=str(cache)), queries, ok)
    monkeypatch.undo()

    # a vectors object replaced under the same name: refused, and nothing unverified stays in a cache
    shard = manifest.shards[1].vectors
    data = bytearray(root.read_bytes(shard.path))
    data[-10] ^= 0xFF
    root.write_bytes(bytes(data), shard.path)
    with pytest.raises(IntegrityError, match="sha256 mismatch") as err:
        IndexSearcher(root.uri, storage_options=options, vectors="shards", cache_dir=str(tmp_path / "fresh"))
    assert shard.path in str(err.value)
    kept = [p.name for p in (tmp_path / "fresh").iterdir()]
    assert kept == [f"{manifest.shards[0].vectors.sha256}.npy"]  # the intact shard's; no partial or damaged copy


def test_damaged_shard_files_are_refused(index, tmp_path):
    shutil.copytree(index[0].root, tmp_path / "idx")
    root = Location(str(tmp_path / "idx"))
    manifest = read_manifest(root)

    def damage(ref):
        path = Path(root.path(ref.path))
        data = bytearray(path.read_bytes())
        data[200] ^= 0x01
        path.write_bytes(bytes(data))

    damage(manifest.shards[2].vectors)
    with pytest.raises(IntegrityError, match="sha256 mismatch") as err:
        IndexSearcher(root.uri, vectors="shards")
    assert manifest.shards[2].vectors.path in str(err.value)
    damage(manifest.shards[4].file)
    with pytest.raises(IntegrityError, match="sha256 mismatch") as err:
        ShardGroup(root, manifest, [3, 4])
    assert manifest.shards[4].file.path in str(err.value)
    assert ShardGroup(root, manifest, [0, 1, 3]).ntotal == 3000  # the intact ones load

    # a shard trained apart (another coarse quantizer) cannot be merged with the version's: refused by name
    import faiss

    other = faiss.index_factory(DIM, "IVF64,PQ8x8", faiss.METRIC_INNER_PRODUCT)
    other.train(clustered_vectors(3000, DIM, intrinsic=6, clusters=30, seed=9, dataset_seed=9))
    data = faiss.serialize_index(other).tobytes()
    root.write_bytes(data, "versions", "foreign.faiss")
    foreign = manifest.shards[5].model_copy(update={"file": digest("versions/foreign.faiss", data)})
    mixed = manifest.model_copy(update={"shards": [*manifest.shards[:5], foreign]})
    with pytest.raises(IntegrityError, match="coarse quantizer differs") as err:
        ShardGroup(root, mixed, [0, 5])
    assert "versions/foreign.faiss" in str(err.value)


def test_format_1_index_still_searches(tmp_path):
    shutil.copytree(FORMAT_1 / "index", tmp_path / "index")
    root = Location(str(tmp_path / "index"))
    manifest = read_manifest(root)
    assert all(s.ids is None and s.vectors is None for s in manifest.shards)
    expected = json.loads((FORMAT_1 / "expected.json").read_text())
    queries = np.array(expected["queries"], np.float32)
    ok = np.ones(len(queries), bool)

    # without a re-score: shard groups, as for any version
    out = run_stages(root, SearchConfig(top_k=5, nprobe=4, rescore=0, shards_per_actor=1), queries, ok)
    np.testing.assert_array_equal(out["knn_ids"], expected["rescore_0"]["ids"])
    np.testing.assert_allclose(out["knn_scores"], expected["rescore_0"]["scores"], atol=1e-6)

    # with a re-score: the old way, one stage holding every shard and vector
    plan = plan_search(manifest, SearchConfig(top_k=5, nprobe=4, rescore=10, shards_per_actor=1))
    assert plan.legacy and plan.resources["concurrency"] == 1
    actor = SearchIndex(root.uri, manifest.version, {}, top_k=5, nprobe=4, rescore=10)
    out = actor({"embedding": queries, "ok": ok})
    np.testing.assert_array_equal(out["knn_ids"], expected["rescore_10"]["ids"])
    np.testing.assert_allclose(out["knn_scores"], expected["rescore_10"]["scores"], atol=1e-6)
    with pytest.raises(ValueError, match="no ids/vectors files"):
        IndexSearcher(root.uri, vectors="shards")


def test_search_stages_on_ray_data(index, ray_session):
    import ray

    root, queries = index
    manifest = read_manifest(root)
    search = SearchConfig(top_k=20, nprobe=8, rescore=40, shards_per_actor=2, num_cpus=0.1, batch_size=16)
    plan = plan_search(manifest, search)
    assert len(plan.stages) == 5 and plan.resources["concurrency"] == 5  # 3 PQ groups (the last re-scores) + 2
    ok = np.ones(len(queries), bool)
    ok[5] = False
    ds = ray.data.from_items([{"row": i, "embedding": q, "ok": bool(o)} for i, (q, o) in enumerate(zip(queries, ok))])
    ds = add_search_stages(ds, plan, root.uri, manifest.version, {}, batch_size=search.batch_size)
    rows = sorted(ds.take_all(), key=lambda r: r["row"])
    got_ids, got_scores = np.stack([r["knn_ids"] for r in rows]), np.stack([r["knn_scores"] for r in rows])
    want_scores, want_ids = reference(root, queries, ok, 20, 8, 40)
    np.testing.assert_array_equal(got_ids[ok], want_ids)
    np.testing.assert_allclose(got_scores[ok], want_scores, rtol=0, atol=1e-6)
    assert (got_ids[~ok] == -1).all()
    assert_shards_hold_live(root, manifest, got_ids, np.stack([r["knn_shards"] for r in rows]))
