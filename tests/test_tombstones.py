"""Every reader of a version honours its shards' tombstones.

A version is built the way the jobs build one (`publish_vectors`, plus synthetic catalog parts),
then an update is simulated the way the update job writes it: the live shards referenced with
tombstones for deleted and changed ids, and a delta shard on the same trained index holding the
changed ids' new vectors and a few added ids. The reference is exact search over the live set:
the ids a reader may return, each with its live vector.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mllm_index.actors.search import SearchShardGroup
from mllm_index.configs.schema import SearchConfig
from mllm_index.pipelines import catalog_buckets
from mllm_index.storage import shard_catalog, tombstones
from mllm_index.storage.catalog import CATALOG_SCHEMA, embeddings_table
from mllm_index.storage.catalog_index import write_bucket
from mllm_index.storage.contracts import Counts, FileRef, ShardRef, version_file
from mllm_index.storage.faiss_store import add_vectors, index_to_bytes
from mllm_index.storage.integrity import IntegrityError, digest, load_faiss_verified, write_parquet_ref
from mllm_index.storage.search import Catalog, IndexSearcher, ShardGroup
from mllm_index.storage.shard_catalog import ShardCatalogs, write_shard_catalog
from mllm_index.storage.shard_store import part_file, publish_vectors, shard_file
from mllm_index.storage.shard_vectors import ShardRescorer, load_ids, pair_scores, write_shard_vectors
from mllm_index.storage.synthetic import clustered_vectors
from mllm_index.storage.tombstones import (TOMBSTONE_SCHEMA, PartFilter, id_selector, live_mask, read_tombstones,
                                           search_params, write_tombstones)
from mllm_index.storage.uris import Location
from mllm_index.storage.verify import verify_version
from mllm_index.storage.versions import publish, read_manifest
from test_search_groups import run_stages

DIM, N, PART = 32, 4000, 500  # 8 parts, 2 per shard: 4 shards
ROW_GROUP = 64  # rows per row group of the shards' catalog files: 16 per base shard


def catalog_part(ids: np.ndarray, part: int, source: str) -> pa.Table:
    n = len(ids)
    return pa.table({"image_id": pa.array(ids, pa.int64()), "key": [f"img-{i}.jpg" for i in ids.tolist()],
                     "uri": [f"{source}/shard-{part}.tar"] * n, "kind": ["tar"] * n,
                     "offset": pa.array(np.arange(n) * 1000, pa.int64()), "length": pa.array(np.full(n, 999), pa.int64()),
                     "etag": [source] * n, "width": pa.array(np.full(n, 64), pa.int32()),
                     "height": pa.array(np.full(n, 48), pa.int32())}, schema=CATALOG_SCHEMA)


class Gallery:
    """A published base version and its 'update': what each id's live vector and catalog row is."""

    def __init__(self, root: Location, factory: str):
        x = clustered_vectors(N, DIM, intrinsic=6, clusters=30, seed=0)
        ids = np.random.default_rng(0).choice(2**40, N, replace=False).astype(np.int64)
        self.queries = clustered_vectors(30, DIM, intrinsic=6, clusters=30, seed=1)
        self.root = root
        base = read_manifest(root, publish_vectors(root, ids, x, factory, "ip", part_size=PART, parts_per_shard=2))
        refs = [write_parquet_ref(root, version_file(base.version, "catalog", part_file(p)),
                                  catalog_part(ids[p * PART : (p + 1) * PART], p, "s3://old"))
                for p in range(N // PART)]
        # each shard's catalog rows beside it, as build_shard writes them (publish_vectors has no catalog)
        shards = [s.model_copy(update={"catalog": write_shard_catalog(root, base.version, s.shard, [refs[p] for p in s.parts],
                                                                      load_ids(root, s.ids), ROW_GROUP)})
                  for s in base.shards]
        self.base = publish(root, base.model_copy(update={"catalog": refs, "shards": shards}))
        part_of = dict(zip(ids.tolist(), (np.arange(N) // PART).tolist()))

        # the base's exact top results: deleting and changing some of them is what a reader could get wrong
        top = ids[np.argsort(-(self.queries @ x.T), axis=1)[:, :5]]
        hits = np.unique(top)
        rng = np.random.default_rng(2)
        picked = rng.permutation(hits)
        self.deleted = np.unique(np.r_[picked[:25], rng.choice(ids, 100, replace=False)])
        rest = np.setdiff1d(ids, self.deleted)
        demoted = np.setdiff1d(picked[25:50], self.deleted)  # changed to a vector far from their query
        promoted = rng.choice(np.setdiff1d(rest, hits), 40, replace=False)  # changed to a vector near a query
        self.changed = np.sort(np.r_[demoted, promoted])
        new_vectors = {int(i): v for i, v in zip(demoted, clustered_vectors(len(demoted), DIM, intrinsic=6, clusters=30,
                                                                           seed=5, dataset_seed=3))}
        near = self.queries[np.arange(len(promoted)) % len(self.queries)] + 0.15 * rng.normal(size=(len(promoted), DIM))
        new_vectors.update(zip(promoted.tolist(), near / np.linalg.norm(near, axis=1, keepdims=True)))
        self.added = np.random.default_rng(3).choice(2**40, 60, replace=False).astype(np.int64) + 2**41
        added_x = clustered_vectors(len(self.added), DIM, intrinsic=6, clusters=30, seed=7)
        new_vectors.update(zip(self.added.tolist(), added_x))
        delta_ids = np.array(sorted(new_vectors), np.int64)
        # float16, as the embeddings parts hold them and build_shard adds them
        delta_x = np.stack([new_vectors[i] for i in delta_ids.tolist()]).astype(np.float16).astype(np.float32)

        # the live set: what exact search may return, with the float16 vectors the re-score reads
        old = {int(i): v for i, v in zip(ids, x) if int(i) not in set(self.deleted.tolist()) | set(self.changed.tolist())}
        old.update(new_vectors)
        self.live_ids = np.array(sorted(old), np.int64)
        self.live_x = np.stack([old[i] for i in self.live_ids.tolist()]).astype(np.float16).astype(np.float32)
        self.tombstoned = np.union1d(self.deleted, self.changed)
        self.version = self._update(base, delta_ids, delta_x, part_of)

    def _update(self, base, delta_ids, delta_x, part_of) -> str:
        """The update's version: live shards by reference with tombstones, one delta shard, new parts."""
        root, name = self.root, "v000002"
        new_part, delta_no = self.base.next_part, len(self.base.shards)
        version = root.child("versions", name)
        emb = write_parquet_ref(root, version_file(name, "embeddings", part_file(new_part)), embeddings_table(delta_ids, delta_x))
        cat = write_parquet_ref(root, version_file(name, "catalog", part_file(new_part)),
                                catalog_part(delta_ids, new_part, "s3://new"))
        filled = add_vectors(load_faiss_verified(root, self.base.trained), delta_ids, delta_x, use_gpu=False)
        data = index_to_bytes(filled)
        version.write_bytes(data, "shards", shard_file(delta_no))
        ids_ref, vec_ref = write_shard_vectors(version, name, delta_no, delta_ids, delta_x)
        delta = ShardRef(file=digest(version_file(name, "shards", shard_file(delta_no)), data), shard=delta_no,
                         parts=[new_part], ntotal=len(delta_ids), ids=ids_ref, vectors=vec_ref, delta=True,
                         catalog=write_shard_catalog(root, name, delta_no, [cat], delta_ids, ROW_GROUP))
        shards = []
        for shard in self.base.shards:
            dead = [i for i in self.tombstoned.tolist() if part_of[i] in shard.parts]
            if not dead:
                shards.append(shard)
                continue
            table = pa.table({"image_id": pa.array(dead[::-1], pa.int64()),  # unsorted: the writer sorts
                              "part": pa.array([part_of[i] for i in dead[::-1]], pa.int32())})
            ref = write_tombstones(root, version_file(name, "tombstones", shard_file(shard.shard, "parquet")), table)
            shards.append(shard.model_copy(update={"tombstones": ref, "tombstoned": len(dead)}))
        live = len(self.live_ids)
        manifest = self.base.model_copy(update={
            "version": name, "parent": self.base.version, "shards": [*shards, delta],
            "embeddings": [*self.base.embeddings, emb], "catalog": [*self.base.catalog, cat],
            "counts": Counts(seen=live, indexed=live)})
        publish(root, manifest)
        return name

    def exact(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the live set (the float16 vectors the shards were built from): (scores, ids)."""
        scores = self.queries @ self.live_x.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), self.live_ids[order]


@pytest.fixture(scope="module")
def pq(tmp_path_factory) -> Gallery:
    return Gallery(Location(str(tmp_path_factory.mktemp("tomb") / "pq")), "IVF64,PQ8x8")


@pytest.fixture(scope="module")
def flat(tmp_path_factory) -> Gallery:
    return Gallery(Location(str(tmp_path_factory.mktemp("tomb") / "flat")), "IVF16,Flat")


def assert_same_ids_and_scores(got, want, atol=1e-6):
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=atol)


def assert_same_ranking(got, want, atol):
    """Equal scores to `atol`, and equal ids except where two candidates' scores tie to within
    `atol` (FAISS and numpy sum in other orders, so such ties may come out swapped)."""
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=atol)
    for g_ids, w_ids, w_scores in zip(got[1], want[1], want[0]):
        for pos in np.flatnonzero(g_ids != w_ids):
            tied = np.abs(w_scores - w_scores[pos]) <= atol
            assert g_ids[pos] in set(w_ids[tied].tolist()) or abs(w_scores[pos] - w_scores[-1]) <= atol, (pos, g_ids, w_ids)


# -- storage.tombstones ---------------------------------------------------------------------------

def test_tombstone_files_are_sorted_verified_and_matched_by_part(tmp_path):
    root = Location(str(tmp_path))
    ref = write_tombstones(root, "versions/v000003/tombstones/shard-00001.parquet",
                           pa.table({"image_id": [9, 3, 5, 3], "part": [4, 2, 3, 2]}))
    shard = ShardRef(file=FileRef(path="versions/v000001/shards/shard-00001.faiss"), shard=1, parts=[2, 3, 4],
                     ntotal=10, tombstones=ref, tombstoned=3)
    table = read_tombstones(root, shard)
    assert table.schema == TOMBSTONE_SCHEMA and table.to_pydict() == {"image_id": [3, 5, 9], "part": [2, 3, 4]}
    assert read_tombstones(root, shard.model_copy(update={"tombstones": None})).num_rows == 0
    # a changed id is dead only in the part it was tombstoned in
    np.testing.assert_array_equal(live_mask(np.array([3, 5, 9, 7]), 2, table), [False, True, True, True])
    np.testing.assert_array_equal(live_mask(np.array([3, 5, 9, 7]), 3, table), [True, False, True, True])
    np.testing.assert_array_equal(live_mask(np.array([3, 5]), 0, table), [True, True])

    Path(root.path(ref.path)).write_bytes(Path(root.path(ref.path)).read_bytes()[:-3])
    with pytest.raises(IntegrityError, match="tombstones/shard-00001.parquet"):
        read_tombstones(root, shard)
    root.write_parquet(pa.table({"image_id": pa.array([5, 3], pa.int64()), "part": pa.array([1, 1], pa.int32())}), "t.parquet")
    unsorted = digest("t.parquet", root.read_bytes("t.parquet"))
    with pytest.raises(IntegrityError, match="not sorted"):
        read_tombstones(root, shard.model_copy(update={"tombstones": unsorted}))


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,PQ8x8", "IVF16,PQ8x4", "IVF16,SQ8"])
def test_id_selector_filters_inside_faiss_for_the_project_factories(factory):
    import faiss

    x = clustered_vectors(3000, DIM, intrinsic=6, clusters=30, seed=0)
    q = clustered_vectors(20, DIM, intrinsic=6, clusters=30, seed=1)
    ids = np.arange(3000, dtype=np.int64) * 7 + 1
    index = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add_with_ids(x, ids)
    index.nprobe = 6
    _, top = index.search(q, 5)
    dead = np.unique(np.r_[top.ravel(), ids[::5]])  # the best answers among them
    scores, found = index.search(q, 40, params=search_params(id_selector(dead), 6))
    # = the unfiltered ranking with the dead ids taken out
    all_scores, all_ids = index.search(q, 40 + len(dead))
    for r in range(len(q)):
        keep = ~np.isin(all_ids[r], dead) & (all_ids[r] >= 0)
        np.testing.assert_array_equal(found[r], all_ids[r][keep][:40])
        np.testing.assert_array_equal(scores[r], all_scores[r][keep][:40])


# -- search ---------------------------------------------------------------------------------------

def test_flat_search_is_exact_search_over_the_live_set(flat):
    searcher = IndexSearcher(flat.root.uri, flat.version)
    manifest = searcher.manifest
    assert searcher.live == manifest.live == len(flat.live_ids) < manifest.ntotal == searcher.ntotal
    got = searcher.search(flat.queries, k=30, nprobe=16)
    assert not np.isin(got[1], flat.deleted).any()
    assert_same_ranking(got, flat.exact(30), atol=1e-5)
    assert_same_ranking(searcher.search(flat.queries, k=30, nprobe=16, rescore=60), flat.exact(30), 1e-5)
    # the groups, with and without a re-score, equal it
    for rescore in (0, 60):
        out = run_stages(flat.root, SearchConfig(top_k=30, nprobe=16, rescore=rescore, shards_per_actor=2),
                         flat.queries, np.ones(len(flat.queries), bool), flat.version)
        assert_same_ranking((out["knn_scores"], out["knn_ids"]), flat.exact(30), atol=1e-5)


@pytest.mark.parametrize("rescore", [0, 80])
@pytest.mark.parametrize("grouping", [{"shards_per_actor": 1}, {"shards_per_actor": 2}, {"shards_per_actor": 3},
                                      {"max_bytes_per_actor": None}])
def test_shard_groups_equal_the_single_process_search_with_tombstones(pq, grouping, rescore):
    search = SearchConfig(top_k=20, nprobe=8, rescore=rescore, **grouping)
    ok = np.ones(len(pq.queries), bool)
    ok[4] = False
    out = run_stages(pq.root, search, pq.queries, ok, pq.version)
    scores, ids = IndexSearcher(pq.root.uri, pq.version).search(pq.queries[ok], k=20, nprobe=8, rescore=rescore)
    np.testing.assert_array_equal(out["knn_ids"][ok], ids)
    np.testing.assert_allclose(out["knn_scores"][ok], scores, rtol=0, atol=1e-6)
    assert not np.isin(out["knn_ids"], pq.deleted).any()  # a deleted id never comes back
    assert np.isin(out["knn_ids"], pq.changed).any() and np.isin(out["knn_ids"], pq.added).any()  # their new vectors do


def test_pq_search_with_rescore_finds_the_exact_top_over_the_live_set(pq):
    searcher = IndexSearcher(pq.root.uri, pq.version, vectors="shards")
    got = searcher.search(pq.queries, k=10, nprobe=64, rescore=400)
    assert_same_ranking(got, pq.exact(10), 1e-5)
    # the base version, searched the same way, still returns its own (now deleted) best answers
    old = IndexSearcher(pq.root.uri, pq.base.version).search(pq.queries, k=10, nprobe=64, rescore=400)
    assert np.isin(old[1], pq.deleted).any()


def test_tombstoned_ids_never_fill_a_shard_top_k(pq):
    """Filtered inside FAISS, not after: a shard still returns `depth` live ids."""
    manifest = read_manifest(pq.root, pq.version)
    group = ShardGroup(pq.root, manifest, list(range(len(manifest.shards))))
    assert group.live == manifest.live and group.ntotal == manifest.ntotal
    scores, ids = group.search(pq.queries, 200, 64)
    for shard, i in zip(manifest.shards, ids):
        assert (i >= 0).all() and not np.isin(i, pq.deleted).any()
        if shard.tombstoned:
            held = tombstones.tombstoned_ids(read_tombstones(pq.root, shard))
            assert not np.isin(i, held).any()


def test_rescore_reads_the_live_vector_of_a_changed_id(pq):
    """A changed id is stored in its old shard (tombstoned) and the delta shard: only the delta's vector scores it."""
    manifest = read_manifest(pq.root, pq.version)
    candidates = np.tile(pq.changed, (len(pq.queries), 1))
    live = dict(zip(pq.live_ids.tolist(), pq.live_x.astype(np.float16)))
    want = np.stack([pair_scores(np.repeat(q[None], len(pq.changed), 0), np.stack([live[i] for i in pq.changed.tolist()]),
                                 "ip") for q in pq.queries])
    for order in (list(range(len(manifest.shards))), list(range(len(manifest.shards)))[::-1]):
        rescorer = ShardRescorer(pq.root, [manifest.shards[p] for p in order])
        np.testing.assert_array_equal(rescorer.exact(pq.queries, candidates, "ip"), want)
    # each old shard alone knows nothing of them (NaN), the delta alone scores them all
    old = ShardRescorer(pq.root, manifest.shards[:-1]).exact(pq.queries, candidates, "ip")
    assert np.isnan(old).all()
    # a deleted id is scored by no shard
    assert np.isnan(ShardRescorer(pq.root, manifest.shards).exact(pq.queries, np.tile(pq.deleted, (2, 1)), "ip")).all()
    # the stages' running exact scores: the old shards' stage after the delta's cannot overwrite them
    batch = {"embedding": pq.queries, "ok": np.ones(len(pq.queries), bool), "_pq_ids": candidates,
             "_pq_scores": np.zeros(candidates.shape, np.float32)}
    for stage in ([len(manifest.shards) - 1], list(range(len(manifest.shards) - 1))):
        actor = SearchShardGroup(pq.root.uri, pq.version, {}, [], stage, top_k=5, depth=len(pq.changed), nprobe=8,
                                 rescore=True, final=False)
        batch = actor(batch)
    np.testing.assert_array_equal(batch["_exact"], want)


def test_in_memory_rescore_keeps_only_live_vectors(pq):
    memory = IndexSearcher(pq.root.uri, pq.version)
    np.testing.assert_array_equal(memory.ids, pq.live_ids)
    np.testing.assert_array_equal(memory.vectors, pq.live_x.astype(np.float16))
    shards = IndexSearcher(pq.root.uri, pq.version, vectors="shards")
    for k, rescore in ((10, 10), (10, 200)):
        assert_same_ids_and_scores(shards.search(pq.queries, k=k, nprobe=8, rescore=rescore),
                                   memory.search(pq.queries, k=k, nprobe=8, rescore=rescore))


def test_a_changed_id_without_its_tombstone_is_refused_by_the_in_memory_rescore(pq, tmp_path):
    shutil.copytree(pq.root.root, tmp_path / "idx")
    root = Location(str(tmp_path / "idx"))
    manifest = read_manifest(root, pq.version)
    untombstoned = [s.model_copy(update={"tombstones": None, "tombstoned": 0}) for s in manifest.shards]
    publish(root, manifest.model_copy(update={"version": "v000003", "shards": untombstoned}))
    with pytest.raises(IntegrityError, match="live vectors in the embeddings parts"):
        IndexSearcher(root.uri, "v000003")


# -- catalog --------------------------------------------------------------------------------------

def expected_rows(g: Gallery, ids: np.ndarray) -> list[str | None]:
    live = set(g.live_ids.tolist())
    return [None if i not in live else ("s3://new" if i in set(np.r_[g.changed, g.added].tolist()) else "s3://old")
            for i in ids.tolist()]


def test_catalog_lookup_returns_the_live_row(pq):
    manifest = read_manifest(pq.root, pq.version)
    probe = np.r_[pq.changed, pq.deleted, pq.added, pq.live_ids[:50]]
    rows = Catalog(pq.root, manifest).lookup(probe)
    assert [r and r["uri"].split("/shard-")[0] for r in rows] == expected_rows(pq, probe)
    assert sum(r is not None for r in Catalog(pq.root, manifest).lookup(pq.live_ids)) == manifest.live


def test_catalog_bucket_task_reads_only_its_part_shard_tombstones(pq, monkeypatch):
    manifest = read_manifest(pq.root, pq.version)
    shards = tombstones.shard_of_part(manifest)
    read = []
    original = catalog_buckets.read_tombstone_file
    monkeypatch.setattr(catalog_buckets, "read_tombstone_file", lambda index, ref: read.append(ref.path) or original(index, ref))
    for ref in manifest.catalog:
        item = catalog_buckets._item(ref, shards)
        read.clear()
        table = catalog_buckets._read_parts({k: np.array([v]) for k, v in item.items()}, index=pq.root, buckets=3)
        shard = shards[tombstones.part_number(ref)]
        assert read == ([shard.tombstones.path] if shard.tombstones else [])  # that shard's, nothing else
        ids = table.column("image_id").to_numpy()
        assert np.isin(ids, pq.live_ids).all()  # only live rows
        assert [u.split("/shard-")[0] for u in table.column("uri").to_pylist()] == expected_rows(pq, ids)


def live_shard(g: Gallery, manifest) -> dict[int, int]:
    """id -> the shard where it is live (stored and not tombstoned), from the shards' ids files."""
    out = {}
    for s in manifest.shards:
        ids = load_ids(g.root, s.ids)
        dead = tombstones.shard_tombstoned_ids(g.root, s) if s.tombstones else np.zeros(0, np.int64)
        out.update(dict.fromkeys(ids[~np.isin(ids, dead)].tolist(), s.shard))
    return out


def test_catalog_buckets_on_ray_hold_one_live_row_per_id(pq, tmp_path, ray_session):
    manifest = read_manifest(pq.root, pq.version)
    dest = Location(str(tmp_path / "run"))
    buckets = catalog_buckets.ensure_catalog_buckets(pq.root, manifest, dest, rows_per_bucket=500)
    assert dest.read_json("catalog_by_id", "index.json")["rows"] == manifest.live
    probe = np.r_[pq.changed, pq.deleted, pq.added, pq.live_ids[::40]]
    assert [r and r["uri"].split("/shard-")[0] for r in buckets.lookup(probe)] == expected_rows(pq, probe)

    # The shards' catalog files give the same row as the per-run buckets for every live id, looked up
    # in the shard where it is live (a changed id's old shard still holds its old row, tombstoned).
    catalogs = ShardCatalogs(pq.root, manifest.shards)
    where = live_shard(pq, manifest)
    assert sorted(where) == pq.live_ids.tolist()
    shards = np.array([where[i] for i in pq.live_ids.tolist()], np.int64)
    want = buckets.lookup(pq.live_ids)
    assert all(w is not None for w in want) and catalogs.lookup(pq.live_ids, shards) == want
    # ... and for the ids and shards the search reports
    out = run_stages(pq.root, SearchConfig(top_k=20, nprobe=8, rescore=40, shards_per_actor=2), pq.queries,
                     np.ones(len(pq.queries), bool), pq.version)
    got = catalogs.lookup(out["knn_ids"].ravel(), out["knn_shards"].ravel())
    assert got == buckets.lookup(out["knn_ids"].ravel()) and all(r is not None for r in got)
    changed = np.isin(out["knn_ids"].ravel(), pq.changed)
    assert changed.any() and all(r["uri"].startswith("s3://new") for r, c in zip(got, changed) if c)


def test_shard_catalogs_read_one_row_group_per_wanted_id(pq, monkeypatch):
    import pyarrow.parquet as pq_files

    manifest = read_manifest(pq.root, pq.version)
    by_number = {s.shard: s for s in manifest.shards}
    ok = np.ones(4, bool)
    out = run_stages(pq.root, SearchConfig(top_k=5, nprobe=8, shards_per_actor=3), pq.queries[:4], ok, pq.version)
    ids, shards = out["knn_ids"].ravel(), out["knn_shards"].ravel()
    # the row groups holding them, from each file's own statistics
    wanted, sizes, groups_in = set(), {}, {}
    for s in np.unique(shards):
        ref = by_number[int(s)].catalog
        meta = pq_files.ParquetFile(pq.root.path(ref.path)).metadata
        sizes[ref.path], groups_in[int(s)] = ref.bytes, meta.num_row_groups
        stats = [meta.row_group(g).column(0).statistics for g in range(meta.num_row_groups)]
        for i in ids[shards == s].tolist():
            wanted.add((int(s), next(g for g, st in enumerate(stats) if st.min <= i <= st.max)))
    assert len(wanted) < sum(groups_in.values()) / 2  # the test is selective: most row groups are not wanted

    reads = []
    original = shard_catalog._read_range
    monkeypatch.setattr(shard_catalog, "_read_range", lambda index, ref, a, b: reads.append((ref.path, a, b))
                        or original(index, ref, a, b))
    shard_catalog._FOOTERS.clear()
    catalogs = ShardCatalogs(pq.root, manifest.shards)
    rows = catalogs.lookup(ids, shards)
    assert [r["image_id"] for r in rows] == ids.tolist()
    assert catalogs.row_groups_read == len(wanted) and catalogs.footers_read == len(sizes)
    group_reads = [(p, a, b) for p, a, b in reads if b != sizes[p]]  # a footer read ends at the file's end
    assert 0 < len(group_reads) <= len(wanted)  # one read per run of adjacent wanted row groups
    assert sum(b - a for _, a, b in group_reads) < sum(sizes.values()) / 2
    # a second lookup in this process reads no footer again (bounded LRU), only the row groups
    reads.clear()
    again = ShardCatalogs(pq.root, manifest.shards)
    assert again.lookup(ids, shards) == rows and again.footers_read == 0 and len(reads) == len(group_reads)
    # unknown ids, -1 and a shard without a catalog file give None; a footer that disagrees with the shard is refused
    assert again.lookup(np.array([5, -1, ids[0]]), np.array([shards[0], 0, 99])) == [None, None, None]
    wrong = by_number[int(shards[0])].model_copy(update={"ntotal": by_number[int(shards[0])].ntotal + 1})
    with pytest.raises(IntegrityError, match="the shard holds"):
        ShardCatalogs(pq.root, [wrong]).lookup(ids[:1], shards[:1])


def test_a_bucket_with_two_rows_for_an_id_is_refused(tmp_path):
    table = catalog_part(np.array([5, 7, 5], np.int64), 0, "s3://x")
    with pytest.raises(ValueError, match="image_id 5 has more than one live row"):
        write_bucket(Location(str(tmp_path)), 0, table)


def test_part_filter_holds_one_shard_tombstones_at_a_time(pq, monkeypatch):
    manifest = read_manifest(pq.root, pq.version)
    loads = []
    original = tombstones.read_tombstones
    monkeypatch.setattr(tombstones, "read_tombstones", lambda index, shard: loads.append(shard.shard) or original(index, shard))
    live = PartFilter(pq.root, manifest)
    kept = 0
    for ref in manifest.catalog:
        ids = catalog_buckets.read_verified_parquet(pq.root, ref, columns=["image_id"]).column("image_id").to_numpy()
        kept += int(live.mask(ref, ids).sum())
    assert kept == manifest.live
    assert loads == sorted(set(loads)) == [s.shard for s in manifest.shards if s.tombstones]  # each once, in order


# -- verify ---------------------------------------------------------------------------------------

def test_verify_checks_tombstones(pq, tmp_path):
    shutil.copytree(pq.root.root, tmp_path / "idx")
    root = Location(str(tmp_path / "idx"))
    check = verify_version(root, pq.version)
    assert check.ok, check.problems
    manifest = read_manifest(root, pq.version)
    assert check.files == len(manifest.files())
    hit = next(p for p, s in enumerate(manifest.shards) if s.tombstones)
    shard = manifest.shards[hit]

    def variant(name: str, **shard_update) -> list[str]:
        shards = list(manifest.shards)
        shards[hit] = shard.model_copy(update=shard_update)
        publish(root, manifest.model_copy(update={"version": name, "shards": shards}))
        return verify_version(root, name).problems

    problems = variant("v000003", tombstoned=shard.tombstoned + 1)
    assert any("the manifest records" in p and shard.tombstones.path in p for p in problems), problems
    stray = write_tombstones(root, "versions/v000003/t1.parquet", pa.table({"image_id": [1, 2], "part": [0, 0]}))
    problems = variant("v000004", tombstones=stray, tombstoned=2)
    assert any("not in the shard" in p for p in problems) or any("which shard" in p for p in problems), problems
    inside = tombstones.read_tombstones(root, shard).slice(0, 3)
    other = write_tombstones(root, "versions/v000003/t2.parquet", inside.set_column(1, "part", pa.array([99] * 3, pa.int32())))
    problems = variant("v000005", tombstones=other, tombstoned=3)
    assert any("part(s) [99]" in p for p in problems), problems
    # counts: indexed must be the live vectors
    publish(root, manifest.model_copy(update={"version": "v000006", "counts": Counts(seen=manifest.ntotal,
                                                                                     indexed=manifest.ntotal)}))
    problems = verify_version(root, "v000006").problems
    assert problems and all("tombstoned" in p for p in problems), problems
    # a damaged tombstone file is named
    path = Path(root.path(shard.tombstones.path))
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = verify_version(root, pq.version).problems
    assert len(problems) == 1 and shard.tombstones.path in problems[0] and "sha256" in problems[0]
    with pytest.raises(IntegrityError, match="sha256"):
        IndexSearcher(root.uri, pq.version, load_vectors=False)
