"""Distributed listing and the bucket-by-bucket nightly diff (pipelines/listing.py, storage/key_index.py).

The reference for every check is the single-process listing (`list_entries` + `assign_ids`) and the
dict diff the update job used before: same ids, same duplicate_key rows, same added / changed /
deleted counts, the same live rows to tombstone.
"""

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from galleries import parquet_bytes, tar_bytes, write_files
from inputs import odd_files

from mllm_index.pipelines.listing import make_index_plan, make_update_plan
from mllm_index.pipelines.parts import list_entries
from mllm_index.storage.catalog import CATALOG_SCHEMA, FAILURE_SCHEMA
from mllm_index.storage.contracts import Counts, FileRef, Manifest, Plan, ShardRef, version_file
from mllm_index.storage.integrity import read_verified_parquet, write_parquet_ref
from mllm_index.storage.key_index import KEY_SCHEMA, bucket_of, key_bucket
from mllm_index.storage.sources import SourceSpec
from mllm_index.storage.tombstones import part_number
from mllm_index.storage.uris import Location

IMAGES = {name.split("/")[-1]: data for name, (data, _) in odd_files().items()}
G, W, P, R = IMAGES["gray.jpg"], IMAGES["photo.webp"], IMAGES["rgba.png"], IMAGES["cmyk.jpg"]


def gallery() -> dict[str, bytes]:
    """Loose files in nested folders, tars (one key in two of them), a Parquet table, a corrupt tar, other files."""
    return {
        "loose/a.jpg": G, "loose/deep/b.webp": W, "loose/deep/er/c.png": P, "loose/noext": R, "loose/deep/meta.json": b"{}",
        "readme.txt": b"hi",
        "shards/s0.tar": tar_bytes({"k1.jpg": G, "k1.json": b"{}", "same.jpg": G, "k2.png": P}),
        "shards/s1.tar": tar_bytes({"same.jpg": W, "k3.jpg": R, "k4.jpg": G}),
        "shards/s2.tar": tar_bytes({"k5.jpg": G, "k6.png": P}),
        "shards/bad.tar": b"not a tar at all" * 40,
        "tables/t.parquet": parquet_bytes({"r1": R, "r2": W, "r3": G}, row_group_size=2),
    }


def plan_rows(dest: Location, plan: Plan) -> pa.Table:
    return pa.concat_tables([dest.read_parquet("plan", f"part-{p:05d}.parquet") for p in plan.part_numbers])


def key_rows(index: Location, plan: Plan | Manifest) -> pa.Table:
    """The live key rows: every key file of every bucket, less the bucket's removed (image_id, part) pairs."""
    tables = []
    for ref in plan.keys:
        table = read_verified_parquet(index, ref)
        assert table.schema.equals(KEY_SCHEMA)
        assert table.column("key").to_pylist() == sorted(table.column("key").to_pylist())
        assert set(key_bucket(table.column("key"), plan.key_buckets)) == {bucket_of(ref)}
        tables.append(table)
    table = pa.concat_tables(tables) if tables else KEY_SCHEMA.empty_table()
    gone = {(i, p) for r in plan.key_removed for i, p in zip(*(read_verified_parquet(index, r).column(c).to_pylist()
                                                                for c in ("image_id", "part")))}
    live = [(i, p) not in gone for i, p in zip(table.column("image_id").to_pylist(), table.column("part").to_pylist())]
    assert len(live) - sum(live) == len(gone)  # each removed pair names exactly one key row
    return table.filter(pa.array(live, pa.bool_()))


def located(table: pa.Table) -> set[tuple]:
    return set(zip(*(table.column(c).to_pylist() for c in ("image_id", "key", "uri", "kind", "offset", "length", "etag"))))


def check_index_plan(index: Location, dest: Location, spec: SourceSpec, plan: Plan, part_size: int) -> None:
    table, failures, skipped = list_entries(spec)  # the single-process reference
    rows = plan_rows(dest, plan)
    assert located(rows) == located(table) and rows.num_rows == plan.entries == table.num_rows
    sizes = [dest.read_parquet("plan", f"part-{p:05d}.parquet").num_rows for p in plan.part_numbers]
    assert all(0 < s <= part_size for s in sizes)
    assert rows.column("part").to_pylist() == sorted(rows.column("part").to_pylist())
    listing = read_verified_parquet(index, plan.listing_failures)
    assert listing.schema.equals(FAILURE_SCHEMA)
    want = {(f["uri"], f["key"], f["error_type"], f["message"]) for f in failures}
    assert set(zip(*(listing.column(c).to_pylist() for c in ("uri", "key", "error_type", "message")))) == want
    assert plan.skipped == dict(skipped) and plan.list_failures == len(failures)
    assert plan.seen == plan.entries + plan.list_failures + sum(plan.skipped.values())
    keys = key_rows(index, plan)
    by_id = dict(zip(rows.column("image_id").to_pylist(), rows.column("part").to_pylist()))
    assert dict(zip(keys.column("image_id").to_pylist(), keys.column("part").to_pylist())) == by_id
    assert not dest.exists("listing")  # scratch gone once the plan is written


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_index_plan_lists_like_the_single_process_listing(ray_session, tmp_path, storage, request):
    if storage == "s3":
        bucket, options = request.getfixturevalue("s3_bucket")
        root, index = Location(f"s3://{bucket}/gallery", options), Location(f"s3://{bucket}/index", options)
    else:
        options, root, index = {}, Location(str(tmp_path / "gallery")), Location(str(tmp_path / "index"))
    write_files(root, gallery())
    spec = SourceSpec(root.uri, storage_options=options)
    dest = index.child("versions", "v000001")
    plan = make_index_plan(dest, spec, 3, version_file("v000001"), bucket_rows=4)
    assert plan.key_buckets == 4  # 15 entries listed (one key twice), 4 rows per bucket
    check_index_plan(index, dest, spec, plan, 3)
    assert plan.list_errors == {"ReadError": 1, "duplicate_key": 1}
    containers = read_verified_parquet(index, plan.containers).to_pylist()
    assert [(c["uri"].rsplit("/", 1)[-1], c["kind"], c["entries"]) for c in containers] == [
        ("s0.tar", "tar", 3), ("s1.tar", "tar", 3), ("s2.tar", "tar", 2), ("t.parquet", "parquet", 3)]
    assert plan.skipped == {"json": 1, "txt": 1, "tar:json": 1}
    # resumable: plan.json present, the plan is reused as written (the source is not listed again)
    root.delete()
    assert make_index_plan(dest, spec, 3, version_file("v000001"), bucket_rows=4) == plan


def test_index_plan_of_one_bucket_keeps_source_order(ray_session, tmp_path):
    root, index = Location(str(tmp_path / "g")), Location(str(tmp_path / "index"))
    write_files(root, gallery())
    dest = index.child("versions", "v000001")
    spec = SourceSpec(root.uri)
    plan = make_index_plan(dest, spec, 4, version_file("v000001"), bucket_rows=1000)
    assert plan.key_buckets == 1 and len(plan.keys) == 1
    check_index_plan(index, dest, spec, plan, 4)
    table, _, _ = list_entries(spec)  # one bucket: the parts are today's parts, row for row
    assert plan_rows(dest, plan).drop_columns(["part"]).equals(table)


# -- the nightly diff ------------------------------------------------------------------------------------
def publish_like_a_run(index: Location, name: str, plan: Plan, failed: set[int], key_index: bool = True) -> Manifest:
    """The live version a run of `plan` publishes: catalog and failures parts (images in `failed` did not decode)."""
    catalog, failures = [], [plan.listing_failures]
    for p in plan.part_numbers:
        rows = index.child("versions", name).read_parquet("plan", f"part-{p:05d}.parquet")
        bad = pc.is_in(rows.column("image_id"), value_set=pa.array(sorted(failed), pa.int64()))
        ok = rows.filter(pc.invert(bad))
        ok = ok.drop_columns(["part"]).append_column("width", pa.array([8] * ok.num_rows, pa.int32()))
        ok = ok.append_column("height", pa.array([8] * ok.num_rows, pa.int32()))
        fail = [{"image_id": r["image_id"], "uri": r["uri"], "key": r["key"], "stage": "decode",
                 "error_type": "decode_error", "message": "x"} for r in rows.filter(bad).to_pylist()]
        catalog.append(write_parquet_ref(index, version_file(name, "catalog", f"part-{p:05d}.parquet"), ok.cast(CATALOG_SCHEMA)))
        failures.append(write_parquet_ref(index, version_file(name, "failures", f"part-{p:05d}.parquet"),
                                          pa.Table.from_pylist(fail, schema=FAILURE_SCHEMA)))
    indexed = sum(read_verified_parquet(index, r).num_rows for r in catalog)
    failed_parts = sorted(part_number(r) for r in failures[1:] if read_verified_parquet(index, r).num_rows)
    extra = dict(key_buckets=plan.key_buckets, keys=plan.keys, key_removed=plan.key_removed, containers=plan.containers,
                 loose_keys=plan.loose_keys, failed_parts=failed_parts) if key_index else {}
    return Manifest(version=name, dim=4, metric="ip", factory="Flat", counts=Counts(seen=plan.seen, indexed=indexed,
                    failed=plan.seen - indexed - sum(plan.skipped.values()), skipped=sum(plan.skipped.values())),
                    trained_on=indexed, trained=FileRef(path=version_file(name, "trained.faiss")),
                    shards=[ShardRef(file=FileRef(path=version_file(name, "shards", "shard-00000.faiss")), shard=0,
                                     parts=list(plan.part_numbers), ntotal=indexed)],
                    embeddings=[], catalog=catalog, failures=failures, **extra)


def reference_diff(entries: pa.Table, index: Location, live: Manifest):
    """The update job's diff before issue 9: the whole live catalog as a dict."""
    cat = pa.concat_tables([read_verified_parquet(index, r) for r in live.catalog])
    part_of = {}
    for ref in live.catalog:
        for i in read_verified_parquet(index, ref).column("image_id").to_pylist():
            part_of[i] = int(ref.name[5:10])
    before = {r["key"]: (r["etag"], r["length"], r["image_id"]) for r in cat.to_pylist()}
    now = {r["key"]: r for r in entries.to_pylist()}
    added = {k for k in now if k not in before}
    changed = {k for k in now if k in before and before[k][:2] != (now[k]["etag"], now[k]["length"])}
    deleted = {k for k in before if k not in now}
    removed = {(before[k][2], part_of[before[k][2]]) for k in deleted | changed}
    return added, changed, deleted, len(now) - len(added) - len(changed), removed


def reference_from_keys(entries: pa.Table, index: Location, live: Manifest):
    """`reference_diff` against the live key rows (a chain of updates: the catalog is spread over versions);
    rows that failed to decode last time are not live."""
    keys = key_rows(index, live)
    failed = {(i, part_number(r)) for r in live.failures[1:] for i in read_verified_parquet(index, r).column("image_id").to_pylist()}
    rows = [r for r in keys.to_pylist() if (r["image_id"], r["part"]) not in failed]
    before = {r["key"]: (r["etag"], r["length"], r["image_id"], r["part"]) for r in rows}
    now = {r["key"]: r for r in entries.to_pylist()}
    added = {k for k in now if k not in before}
    changed = {k for k in now if k in before and before[k][:2] != (now[k]["etag"], now[k]["length"])}
    deleted = {k for k in before if k not in now}
    removed = {before[k][2:] for k in deleted | changed}
    return added, changed, deleted, len(now) - len(added) - len(changed), removed


def rewrite_in_place(path: str, data: bytes) -> None:
    """New bytes, same size and mtime: the listing sees the same etag (local etag = size + mtime)."""
    st = os.stat(path)
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def check_update(index: Location, dest: Location, live: Manifest, plan: Plan, reference) -> pa.Table:
    added, changed, deleted, unchanged, removed = reference
    assert (plan.update.added, plan.update.changed, plan.update.deleted, plan.update.unchanged) == (
        len(added), len(changed), len(deleted), unchanged)
    assert plan.first_part == live.next_part and plan.key_buckets == (live.key_buckets or plan.key_buckets)
    rows = plan_rows(dest, plan) if plan.parts else pa.table({"key": pa.array([], pa.string())})
    assert sorted(rows.column("key").to_pylist()) == sorted(added | changed) and rows.num_rows == plan.entries
    got = pa.concat_tables([read_verified_parquet(index, r) for r in plan.removed]) if plan.removed else None
    assert (set(zip(got.column("image_id").to_pylist(), got.column("part").to_pylist())) if got else set()) == removed
    assert plan.seen == plan.update.added + plan.update.changed + plan.update.unchanged + plan.list_failures + sum(
        plan.skipped.values())
    return key_rows(index, plan)


def test_update_plan_opens_only_changed_containers_and_diffs_bucket_by_bucket(ray_session, tmp_path):
    root, index = Location(str(tmp_path / "g")), Location(str(tmp_path / "index"))
    files = gallery()
    files["shards/s3.tar"] = tar_bytes({"k7.jpg": G, "k8.jpg": W})
    write_files(root, files)
    spec = SourceSpec(root.uri)
    v1 = index.child("versions", "v000001")
    plan1 = make_index_plan(v1, spec, 3, version_file("v000001"), bucket_rows=4)
    first, _, _ = list_entries(spec)
    failed = {r["image_id"] for r in first.to_pylist() if r["key"] in ("k7", "loose/a.jpg")}  # did not decode last time
    live = publish_like_a_run(index, "v000001", plan1, failed)

    # the night: s0 changes (new bytes), s2 vanishes, a new tar, one loose file changes, one goes, one comes
    write_files(root, {"shards/s0.tar": tar_bytes({"k1.jpg": G, "same.jpg": P}), "shards/s9.tar": tar_bytes({"n1.jpg": G}),
                       "loose/deep/b.webp": W + b"\0", "loose/new.jpg": P})
    root.delete("shards/s2.tar")
    root.delete("loose/deep/er/c.png")
    entries, _, _ = list_entries(spec)
    reference = reference_diff(entries, index, live)
    # s1 and t.parquet are unchanged: overwrite s1 with unreadable bytes of the same size and mtime; opening it
    # would make its three keys deleted. s3 is unchanged but k7 failed last time: it is opened again.
    s1 = root.path("shards/s1.tar")
    rewrite_in_place(s1, b"\xff" * os.path.getsize(s1))

    v2 = index.child("versions", "v000002")
    plan = make_update_plan(v2, spec, 3, version_file("v000002"), index, live, bucket_rows=4)
    keys = check_update(index, v2, live, plan, reference)
    scanned = {u.rsplit("/", 1)[-1] for u in v2.read_json("plan", "listing.json")["scanned"]}
    assert scanned == {"s0.tar", "s9.tar", "s3.tar", "bad.tar"}
    assert {"k7", "loose/a.jpg"} <= reference[0]  # failed last time: back as added, as before
    # the new key index: every listed key once; unchanged rows keep their live part, new rows are in new parts
    assert sorted(keys.column("key").to_pylist()) == sorted(entries.column("key").to_pylist())
    live_part = {r["key"]: r["part"] for r in key_rows(index, plan1).to_pylist()}
    for r in keys.to_pylist():
        if r["key"] in reference[0] | reference[1]:
            assert r["part"] >= live.next_part
        else:
            assert r["part"] == live_part[r["key"]]
    names = {r["uri"].rsplit("/", 1)[-1] for r in read_verified_parquet(index, plan.containers).to_pylist()}
    assert names == {"s0.tar", "s1.tar", "s3.tar", "s9.tar", "t.parquet"}
    # resumable: the saved plan is reused
    assert make_update_plan(v2, spec, 3, version_file("v000002"), index, live, bucket_rows=4) == plan


def test_update_of_an_unchanged_gallery_references_every_key_bucket(ray_session, tmp_path):
    root, index = Location(str(tmp_path / "g")), Location(str(tmp_path / "index"))
    write_files(root, {k: v for k, v in gallery().items() if k.startswith(("shards/s", "tables/"))})
    spec = SourceSpec(root.uri)
    v1 = index.child("versions", "v000001")
    plan1 = make_index_plan(v1, spec, 3, version_file("v000001"), bucket_rows=3)
    live = publish_like_a_run(index, "v000001", plan1, set())
    v2 = index.child("versions", "v000002")
    plan = make_update_plan(v2, spec, 3, version_file("v000002"), index, live, bucket_rows=3)
    assert plan.update.model_dump() == {"added": 0, "changed": 0, "deleted": 0, "unchanged": plan1.entries}
    assert plan.parts == 0 and plan.removed == [] and plan.keys == plan1.keys  # referenced, not rewritten
    assert v2.read_json("plan", "listing.json")["scanned"] == []
    assert plan.seen == plan1.seen - plan1.list_failures + plan.list_failures
    assert not v2.exists("keys")


def test_update_of_a_format_2_version_builds_the_key_index_from_its_catalog(ray_session, tmp_path):
    root, index = Location(str(tmp_path / "g")), Location(str(tmp_path / "index"))
    write_files(root, gallery())
    spec = SourceSpec(root.uri)
    v1 = index.child("versions", "v000001")
    plan1 = make_index_plan(v1, spec, 3, version_file("v000001"), bucket_rows=1000)
    first, _, _ = list_entries(spec)
    failed = {r["image_id"] for r in first.to_pylist() if r["key"] == "k3"}
    live = publish_like_a_run(index, "v000001", plan1, failed, key_index=False)
    assert live.key_buckets == 0 and live.containers is None
    write_files(root, {"shards/s2.tar": tar_bytes({"k5.jpg": G}), "loose/z.png": P})
    entries, _, _ = list_entries(spec)
    reference = reference_diff(entries, index, live)
    v2 = index.child("versions", "v000002")
    plan = make_update_plan(v2, spec, 2, version_file("v000002"), index, live, bucket_rows=5)
    assert plan.key_buckets == int(np.ceil(live.counts.seen / 5))
    keys = check_update(index, v2, live, plan, reference)
    assert sorted(keys.column("key").to_pylist()) == sorted(entries.column("key").to_pylist())
    assert all(r.path.startswith("versions/v000002/keys/") for r in plan.keys)  # nothing to reference: all written
    assert len(v2.read_json("plan", "listing.json")["scanned"]) == 5  # no container table: every container opened


def test_nightly_diff_of_containers_reads_only_what_changed(ray_session, tmp_path):
    """A gallery of containers: each bucket's diff reads the row groups a change touches and writes a delta key file
    and a removed file; the live files are referenced. Counts, planned rows, tombstones and the live key rows equal
    the single-process diff and listing, night after night, and a compaction writes each bucket back as one base."""
    from mllm_index.storage import key_runs

    root, index = Location(str(tmp_path / "g")), Location(str(tmp_path / "index"))
    files = {k: v for k, v in gallery().items() if k.startswith(("shards/s", "tables/"))}
    files["shards/s3.tar"] = tar_bytes({f"x{i:02d}.jpg": G for i in range(12)})  # 12 keys after all others
    write_files(root, files)
    spec = SourceSpec(root.uri)
    layout = key_runs.KeyLayout(row_group=2, compact_fraction=10.0)  # no compaction until the last night
    plan = make_index_plan(index.child("versions", "v000001"), spec, 3, version_file("v000001"), bucket_rows=6,
                           layout=layout)
    first, _, _ = list_entries(spec)
    live = publish_like_a_run(index, "v000001", plan, {r["image_id"] for r in first.to_pylist() if r["key"] == "r2"})
    assert live.loose_keys == 0 and live.failed_parts
    s1 = root.path("shards/s1.tar")
    s1_bytes = open(s1, "rb").read()
    nights = [  # (files written, files deleted)
        ({"shards/s0.tar": tar_bytes({"k1.jpg": G, "same.jpg": P, "k9.jpg": W}),  # same changed, k2 gone, k9 new
          "shards/s9.tar": tar_bytes({"n1.jpg": G, "k4.jpg": W})}, ["shards/s2.tar"]),  # k4: already in s1
        ({"shards/s3.tar": tar_bytes({**{f"x{i:02d}.jpg": G for i in range(12) if i != 5}, "x05.jpg": W})}, []),
        ({"shards/s10.tar": tar_bytes({"z1.jpg": P, "x03.jpg": P})}, []),  # x03: in s3, whose range is not read
        ({}, ["shards/s9.tar"]),
    ]
    for night, (written, deleted) in enumerate(nights, start=2):
        write_files(root, written)
        for name in deleted:
            root.delete(name)
        entries, _, _ = list_entries(spec)
        reference = reference_from_keys(entries, index, live)
        rewrite_in_place(s1, b"\xff" * len(s1_bytes))  # unchanged: opening it would delete its keys
        if night == 5:
            layout = key_runs.KeyLayout(row_group=2, compact_fraction=0.0)
        name = f"v{night:06d}"
        dest = index.child("versions", name)
        plan = make_update_plan(dest, spec, 3, version_file(name), index, live, bucket_rows=6, layout=layout)
        rewrite_in_place(s1, s1_bytes)
        record = dest.read_json("plan", "listing.json")
        keys = check_update(index, dest, live, plan, reference)
        assert sorted(keys.column("key").to_pylist()) == sorted(entries.column("key").to_pylist())
        assert located(keys.select(["image_id", "key", "uri", "etag", "length"]).append_column(
            "kind", pa.array([""] * keys.num_rows)).append_column("offset", pa.array([0] * keys.num_rows))) == located(
            entries.select(["image_id", "key", "uri", "etag", "length"]).append_column(
                "kind", pa.array([""] * entries.num_rows)).append_column("offset", pa.array([0] * entries.num_rows)))
        assert "s1.tar" not in {u.rsplit("/", 1)[-1] for u in record["scanned"]}
        per_bucket = {}
        for ref in plan.keys:
            per_bucket.setdefault(bucket_of(ref), []).append(ref)
        if night < 5:
            assert set(record["bucket_modes"]) == {"delta"}
            assert set(live.keys) <= set(plan.keys) and set(live.key_removed) <= set(plan.key_removed)  # referenced
            assert all(r.path.startswith(f"versions/{name}/") for r in set(plan.keys) - set(live.keys))
            assert 0 < record["key_row_groups_read"] < sum(
                pq_row_groups(index, r) for r in live.keys)  # pruned: not every row group was read
        else:  # compaction: one base per bucket, nothing removed
            assert set(record["bucket_modes"]) == {"full"} and plan.key_removed == []
            assert all(len(refs) == 1 for refs in per_bucket.values())
        live = publish_like_a_run(index, name, plan, set())
    # the gallery outgrew its buckets (more than 2 x run.key_bucket_rows each): the live key rows are re-bucketed
    dest = index.child("versions", "v000006")
    plan = make_update_plan(dest, spec, 3, version_file("v000006"), index, live, bucket_rows=2, layout=layout)
    assert plan.key_buckets == -(-live.counts.seen // 2) > live.key_buckets
    before = key_rows(index, live)
    assert plan.update.model_dump() == {"added": 0, "changed": 0, "deleted": 0, "unchanged": before.num_rows}
    assert plan.parts == 0 and plan.key_removed == [] and not set(plan.keys) & set(live.keys)
    as_set = lambda t: set(zip(*(t.column(c).to_pylist() for c in KEY_SCHEMA.names)))  # noqa: E731
    assert as_set(key_rows(index, plan)) == as_set(before)


def pq_row_groups(index: Location, ref: FileRef) -> int:
    import io

    import pyarrow.parquet as pq

    return pq.ParquetFile(io.BytesIO(index.read_bytes(ref.path))).metadata.num_row_groups
