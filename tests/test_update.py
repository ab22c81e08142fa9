"""Nightly cycle: build v1, add ~10%, delete ~5%, change ~5%, update; the live index must answer like a
full rebuild over the new gallery would, while the update references what it did not change (shards,
parts, trained index) and never opens an unchanged tar. Then compaction and retraining, which must
also equal a rebuild, and garbage collection over versions that share files."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from mllm_index.configs.schema import ConfigError, IndexJobConfig, UpdateOptions, load_config
from mllm_index.pipelines.demo import bundled_photos
from mllm_index.pipelines.index import run_index
from mllm_index.pipelines.update import run_update
from mllm_index.storage.contracts import UpdateCounts
from mllm_index.storage.faiss_store import index_from_bytes, stored_ids
from mllm_index.storage.search import IndexSearcher
from mllm_index.storage.tombstones import live_mask, read_tombstones, shard_of_part, shard_tombstoned_ids
from mllm_index.storage.uris import Location
from mllm_index.storage.verify import verify_version
from mllm_index.storage.versions import list_versions, read_latest, read_manifest
from tests.galleries import tar_bytes

pytestmark = pytest.mark.e2e
FORMAT_1 = Path(__file__).parent / "fixtures" / "format1"


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def views(n: int) -> dict[str, bytes]:
    out = {}
    for path in bundled_photos()[:n]:
        img = Image.open(path).convert("RGB")
        img.thumbnail((160, 160))
        out[f"{path.stem}/a.jpg"] = jpeg(img)
        out[f"{path.stem}/b.jpg"] = jpeg(img.crop((8, 8, img.width - 8, img.height - 8)))
    return out


def config(source: Path, index: Path, model: str | None, *sets: str) -> IndexJobConfig:
    return load_config(IndexJobConfig, None, {"source.uri": str(source), "index.uri": str(index), "model.name": model,
                                              "run.part_size": 8, "decode.batch_size": 8, "embed.batch_size": 8,
                                              "index.shard_size": 16}, list(sets))


def snapshot(index_uri: str) -> tuple[set, dict, IndexSearcher]:
    """(live ids, key -> id of the live catalog rows, searcher), tombstones applied as readers apply them."""
    searcher = IndexSearcher(index_uri)
    loc, m = searcher.location, searcher.manifest
    ids = []
    for s in m.shards:
        stored = stored_ids(index_from_bytes(loc.read_bytes(s.file.path)))
        ids.append(stored[~np.isin(stored, shard_tombstoned_ids(loc, s))])
    ids = np.concatenate(ids)
    assert len(ids) == len(set(ids.tolist())) == m.counts.indexed  # no id twice
    catalog, shard_of = {}, shard_of_part(m)
    for ref in m.catalog:
        part = int(ref.name[5:10])
        table = loc.read_parquet(ref.path)
        table = table.filter(live_mask(table.column("image_id").to_numpy(), part, read_tombstones(loc, shard_of[part])))
        for row in table.select(["key", "image_id"]).to_pylist():
            assert row["key"] not in catalog
            catalog[row["key"]] = row["image_id"]
    return set(ids.tolist()), catalog, searcher


def same_as_rebuild(index: Path, rebuild: Path) -> None:
    ids, catalog, searcher = snapshot(str(index))
    rebuilt_ids, rebuilt_catalog, rebuilt = snapshot(str(rebuild))
    assert ids == rebuilt_ids and catalog == rebuilt_catalog
    # The same queries find the same images (the changed ones included: their new vectors, not the old).
    queries = rebuilt.vectors[np.argsort(rebuilt.ids)].astype(np.float32)
    _, live_top = searcher.search(queries, k=1, rescore=20)
    _, rebuilt_top = rebuilt.search(queries, k=1, rescore=20)
    assert (live_top[:, 0] == rebuilt_top[:, 0]).mean() == 1.0


def files_under(index: Path, version: str) -> set[str]:
    folder = index / "versions" / version
    return {str(p.relative_to(index)) for p in folder.rglob("*") if p.is_file()}


def write_gallery(gallery: Path) -> dict[str, bytes]:
    """Two tar shards of 8 images each (never changed) and 20 loose images."""
    files = views(18)  # 36 images
    keys = sorted(files)
    for t in range(2):
        (gallery / "tars").mkdir(parents=True, exist_ok=True)
        (gallery / "tars" / f"t{t}.tar").write_bytes(tar_bytes({k: files[k] for k in keys[8 * t : 8 * t + 8]}))
    loose = {f"loose/{k}": files[k] for k in keys[16:]}
    for key, data in loose.items():
        (gallery / key).parent.mkdir(parents=True, exist_ok=True)
        (gallery / key).write_bytes(data)
    return loose


def test_nightly_update_matches_a_full_rebuild_and_references_what_it_did_not_change(ray_session, tiny_dinov2, tmp_path):
    gallery, index = tmp_path / "gallery", tmp_path / "index"
    loose = write_gallery(gallery)
    sets = ("index.compact_fraction=0.5",)  # this night: tombstones, no compaction (that comes below)
    run_index(config(gallery, index, tiny_dinov2, *sets))
    v1 = read_manifest(Location(str(index)), "v000001")
    assert len(v1.shards) >= 2 and v1.key_buckets >= 1 and v1.containers is not None

    # Delete, change and add loose images of one shard only, so that the other shards are untouched.
    shard_of = shard_of_part(v1)
    keys_by_shard: dict[int, list[str]] = {}
    for ref in v1.catalog:
        for key in Location(str(index)).read_parquet(ref.path).column("key").to_pylist():
            if key.startswith("loose/"):
                keys_by_shard.setdefault(shard_of[int(ref.name[5:10])].shard, []).append(key)
    target = max(keys_by_shard, key=lambda s: len(keys_by_shard[s]))
    hit = sorted(keys_by_shard[target])[:4]
    for key in hit[:2]:  # delete ~5%
        (gallery / key).unlink()
    for key in hit[2:4]:  # change ~5%: another picture under the same name
        (gallery / key).write_bytes(jpeg(ImageOps.mirror(Image.open(io.BytesIO(loose[key])))))
    for i, key in enumerate(sorted(loose)[:4]):  # add ~10%
        (gallery / "new" / f"{i}.jpg").parent.mkdir(exist_ok=True)
        (gallery / "new" / f"{i}.jpg").write_bytes(jpeg(ImageOps.flip(Image.open(io.BytesIO(loose[key])))))
    # The unchanged tars get other bytes under the same size and mtime (their etag): an update that
    # opened one would fail to list it. Their real bytes come back before the rebuild reads them.
    tars = {p: (p.read_bytes(), p.stat()) for p in sorted((gallery / "tars").iterdir())}
    for path, (data, st) in tars.items():
        path.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), np.uint8).tobytes())
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    summary = run_update(config(gallery, index, None, *sets))
    assert summary.published and summary.build.version == "v000002" and not summary.build.retrained
    assert summary.update == UpdateCounts(added=4, changed=2, deleted=2, unchanged=32)
    assert summary.build.images_processed_this_run == 6  # only added + changed were decoded and embedded
    assert summary.build.counts.indexed == 38 and summary.build.counts.failed == 0
    listing = json.loads((index / "versions" / "v000002" / "plan" / "listing.json").read_text())
    assert listing["scanned"] == []  # no container was opened
    for path, (data, st) in tars.items():
        path.write_bytes(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    # Referenced, not rewritten: the live shards keep their files (in v000001's folder); the untouched
    # ones are the very same references; the touched shard only gained tombstones; the new images
    # are in delta shards on v000001's trained index; v000002's folder holds only what it made.
    root = Location(str(index))
    v2 = read_manifest(root, "v000002")
    by_number = {s.shard: s for s in v2.shards}
    for old in v1.shards:
        new = by_number[old.shard]
        if old.shard == target:
            assert new.file == old.file and new.parts == old.parts and new.tombstoned == 4
            assert new.tombstones.path == "versions/v000002/tombstones/shard-%05d.parquet" % old.shard
        else:
            assert new == old
    deltas = [s for s in v2.shards if s.delta]
    assert deltas and all(s.file.path.startswith("versions/v000002/shards/") for s in deltas)
    assert sorted(p for s in deltas for p in s.parts) == list(range(v1.next_part, v2.next_part))
    assert v2.trained == v1.trained and v2.model == v1.model
    assert set(v1.embeddings) <= set(v2.embeddings) and set(v1.catalog) <= set(v2.catalog)
    own = {p for p in files_under(index, "v000002") if not p.startswith(("versions/v000002/plan/", "versions/v000002/stats"))}
    assert not any("/embeddings/" in p and int(p[-13:-8]) < v1.next_part for p in own)  # no live part was copied
    assert not any(p.endswith(".faiss") and not p.startswith("versions/v000002/shards/") for p in own)
    assert verify_version(root, "v000002").ok

    # A second night: two more images, and one of the first night's new images changed again (its
    # row in the delta shard is tombstoned: an id changed twice has a dead row in two parts).
    for i in (4, 5):
        (gallery / "new" / f"{i}.jpg").write_bytes(jpeg(ImageOps.mirror(Image.open(io.BytesIO(loose[sorted(loose)[i]])))))
    (gallery / "new" / "0.jpg").write_bytes(jpeg(Image.open(io.BytesIO(loose[sorted(loose)[9]])).rotate(90)))
    night2 = run_update(config(gallery, index, None, *sets))
    assert night2.update == UpdateCounts(added=2, changed=1, deleted=0, unchanged=37)
    v3 = read_manifest(root, "v000003")
    assert [s.tombstoned for s in v3.shards if s.delta] == [1, 0] and v3.counts.indexed == 40

    run_index(config(gallery, tmp_path / "rebuild", tiny_dinov2))
    same_as_rebuild(index, tmp_path / "rebuild")

    again = run_update(config(gallery, index, None, *sets))
    assert not again.published and again.update.unchanged == 40
    assert read_latest(root) == "v000003" and list_versions(root) == ["v000001", "v000002", "v000003"]  # no empty folder

    with pytest.raises(ConfigError, match="full rebuild"):
        run_update(config(gallery, index, "some/other-model"))

    # Compaction on request: every shard with tombstones is rebuilt without them (its parts with dead
    # rows rewritten into v000004 under the same numbers), the small delta shards are merged into one;
    # untouched shards stay referenced; the answers stay those of a rebuild.
    compacted = run_update(config(gallery, index, None, *sets), UpdateOptions(compact=True))
    assert compacted.published and compacted.update.unchanged == 40 and compacted.build.images_processed_this_run == 0
    v4 = read_manifest(root, "v000004")
    assert all(s.tombstones is None and s.tombstoned == 0 for s in v4.shards) and v4.counts.indexed == 40
    rebuilt = [s for s in v4.shards if s.shard == target][0]
    assert rebuilt.file.path.startswith("versions/v000004/shards/") and rebuilt.parts == by_number[target].parts
    merged = [s for s in v4.shards if s.delta]
    assert len(merged) == 1 and merged[0].parts == sorted(p for s in v3.shards if s.delta for p in s.parts)
    rewritten = [r for r in v4.catalog if r.path.startswith("versions/v000004/")]
    assert rewritten and all(int(r.name[5:10]) in rebuilt.parts + merged[0].parts for r in rewritten)
    untouched = {s.shard: s for s in v1.shards if s.shard != target}
    assert {s.shard: s for s in v4.shards if s.shard in untouched} == untouched
    same_as_rebuild(index, tmp_path / "rebuild")
    assert verify_version(root, "v000004").ok

    # Retraining rebuilds every shard on a new training: still the rebuild's answers.
    retrained = run_update(config(gallery, index, None, *sets), UpdateOptions(retrain=True))
    assert retrained.build.retrained and retrained.build.train_points > 0
    v5 = read_manifest(root, "v000005")
    assert v5.trained.path == "versions/v000005/trained.faiss" and v5.trained_on == 40
    assert all(s.file.path.startswith("versions/v000005/") and not s.tombstoned for s in v5.shards)
    same_as_rebuild(index, tmp_path / "rebuild")

    # Deleting old versions keeps every file a kept, live or leased version references, wherever it lives.
    from mllm_index.storage.lock import ReadLease, leased_versions
    from mllm_index.storage.versions import collect_garbage, rollback

    with ReadLease(root, "v000002", "a rerank run"):
        result = collect_garbage(root, keep=1, protected=leased_versions(root))
    assert result["deleted"] == ["v000001", "v000003", "v000004"] and result["kept"] == ["v000002", "v000005"]
    # They hold parts that v000002 / v000005 reference (v000005 retrained on parts in v1, v3, v4's folders).
    assert result["retired"] == ["v000001", "v000003", "v000004"]
    for version in ("v000002", "v000005"):
        assert verify_version(root, version).ok
    referenced = {r.path for v in ("v000002", "v000005") for r in read_manifest(root, v).files()}
    left = set().union(*(files_under(index, v) for v in ("v000001", "v000003", "v000004")))
    assert left - referenced == {f"versions/{v}/retired.json" for v in ("v000001", "v000003", "v000004")}
    rollback(root, "v000002")
    assert len(snapshot(str(index))[0]) == 38
    rollback(root, "v000005")


def test_a_failed_update_leaves_the_live_version_serving_and_a_rerun_finishes(ray_session, tiny_dinov2, tmp_path, monkeypatch):
    import mllm_index.pipelines.update as update

    gallery = tmp_path / "gallery"
    for key, data in list(views(4).items()):
        (gallery / key).parent.mkdir(parents=True, exist_ok=True)
        (gallery / key).write_bytes(data)
    run_index(config(gallery, tmp_path / "index", tiny_dinov2))
    (gallery / "new.jpg").write_bytes(views(5)[sorted(views(5))[-1]])

    def denied(*args, **kwargs):
        raise PermissionError("access denied writing the tombstones")

    monkeypatch.setattr(update, "merge_tombstones", denied)
    with pytest.raises(PermissionError, match="access denied"):
        run_update(config(gallery, tmp_path / "index", None))
    index = Location(str(tmp_path / "index"))
    assert read_latest(index) == "v000001" and IndexSearcher(index.uri).ntotal == 8  # the live version still serves
    assert not index.exists("LOCK.json")  # the lock was released on the way out
    monkeypatch.undo()
    summary = run_update(config(gallery, tmp_path / "index", None))
    assert summary.build.resumed and summary.build.version == "v000002" and summary.build.images_processed_this_run == 0
    assert IndexSearcher(index.uri).ntotal == 9  # the embedded image from the failed run was kept, not redone


def set_mtime(path: Path, mtime: str) -> None:
    """Give a file the mtime a listing printed as `mtime` (a float's repr: try the nanoseconds around it)."""
    base = int(float(mtime) * 1e9)
    for delta in sorted(range(-4096, 4097), key=abs):
        os.utime(path, ns=(base + delta, base + delta))
        if str(path.stat().st_mtime) == mtime:
            return


def test_a_format_1_index_is_updated_and_its_first_update_writes_the_new_layout(ray_session, tiny_dinov2, tmp_path):
    """tests/fixtures/format1 was written by the first release. Its update references its shards and
    parts in place, tombstones what changed, and writes the key index and the container table."""
    shutil.copytree(FORMAT_1 / "index", tmp_path / "index")
    root = Location(str(tmp_path / "index"))
    raw = root.read_json("versions", "v000001", "manifest.json")
    assert raw["format_version"] == 1
    raw["model"]["name"] = tiny_dinov2  # the fixture's model folder was a temporary one, the same tiny DINOv2
    root.write_json(raw, "versions", "v000001", "manifest.json")
    old = read_manifest(root)
    rows = [r for ref in old.catalog for r in root.read_parquet(ref.path).to_pylist()]
    # The gallery as the live catalog saw it (same size and mtime: same etag), less two images, one
    # changed, two added, and the image that failed to decode (retried, fails again).
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    photo = jpeg(Image.open(bundled_photos()[0]).convert("RGB").resize((64, 48)))
    for r in sorted(rows, key=lambda r: r["key"])[2:]:
        path = gallery / r["key"]
        path.write_bytes(photo[: r["length"]] + b"\0" * max(0, r["length"] - len(photo)))
        set_mtime(path, r["etag"].split("-", 1)[1])
        assert f"{path.stat().st_size}-{path.stat().st_mtime}" == r["etag"]
    changed = sorted(rows, key=lambda r: r["key"])[2]["key"]
    (gallery / changed).write_bytes(jpeg(ImageOps.flip(Image.open(bundled_photos()[1]).convert("RGB").resize((64, 48)))))
    for i in range(2):
        (gallery / f"added-{i}.jpg").write_bytes(jpeg(Image.open(bundled_photos()[2 + i]).convert("RGB").resize((64, 48))))
    (gallery / "broken.jpg").write_text("text content, not an image")

    summary = run_update(config(gallery, tmp_path / "index", None))
    assert summary.update == UpdateCounts(added=3, changed=1, deleted=2, unchanged=21)  # broken.jpg: retried, as added
    assert summary.build.images_processed_this_run == 4 and summary.build.counts.failed == 1
    new = read_manifest(root)
    assert new.version == "v000002" and new.format == 3 and root.read_json("versions", "v000002", "manifest.json")["format"] == 3
    assert new.key_buckets >= 1 and new.keys and new.containers is not None
    assert new.counts.indexed == 24 - 3 + 3 and new.trained == old.trained
    for before in old.shards:
        after = [s for s in new.shards if s.shard == before.shard][0]
        assert after.file == before.file and after.file.path.startswith("versions/v000001/")
    assert sum(s.tombstoned for s in new.shards) == 3
    dead = {r["image_id"] for r in sorted(rows, key=lambda r: r["key"])[:3]}  # deleted, deleted, changed
    ids, catalog, searcher = snapshot(root.uri)
    assert len(ids) == 24 and changed in catalog and not (dead - {catalog[changed]}) & ids
    queries = np.array(json.loads((FORMAT_1 / "expected.json").read_text())["queries"], np.float32)
    _, found = searcher.search(queries, k=5)
    assert not np.isin(found, list(dead - {catalog[changed]})).any()
    assert verify_version(root, "v000002").ok
    # The next update diffs against the key index the first one wrote (a failed image would be retried:
    # without it, nothing changed and nothing is published).
    (gallery / "broken.jpg").unlink()
    again = run_update(config(gallery, tmp_path / "index", None))
    assert not again.published and again.update == UpdateCounts(added=0, changed=0, deleted=0, unchanged=24)


def shard(number: int, parts: list[int], ntotal: int, tombstoned: int = 0, delta: bool = False):
    from mllm_index.storage.contracts import FileRef, ShardRef

    tombstones = FileRef(path=f"versions/v000002/tombstones/shard-{number:05d}.parquet") if tombstoned else None
    return ShardRef(file=FileRef(path=f"versions/v000001/shards/shard-{number:05d}.faiss"), shard=number, parts=parts,
                    ntotal=ntotal, tombstones=tombstones, tombstoned=tombstoned, delta=delta)


def test_shard_plan_compacts_past_the_fraction_and_merges_small_deltas_past_the_limit():
    from mllm_index.pipelines.update_shards import plan_shards

    live = [shard(0, [0, 1], 100, tombstoned=20), shard(1, [2, 3], 100, tombstoned=21), shard(2, [4], 100),
            shard(3, [5], 30, delta=True), shard(4, [6], 40, tombstoned=1, delta=True)]
    # 0.2 of the vectors: shard 1 is past it, shard 0 is not; two small deltas are within max_deltas=3.
    plan = plan_shards(live, {7: 50, 8: 50, 9: 10}, shard_size=100, part_size=50, compact_fraction=0.2, max_deltas=3,
                       compact_all=False)
    assert [s.shard for s in plan.compact] == [1] and [s.shard for s in plan.keep] == [0, 2, 3, 4]
    assert plan.groups == {5: [7, 8], 6: [9]} and plan.merged == []  # new parts: delta shards numbered after the live ones
    # Past max_deltas (3 small deltas with the new part 9 alone): small deltas and new parts are packed
    # greedily up to shard_size live vectors; shard 4's tombstoned row does not count.
    plan = plan_shards(live, {7: 50, 8: 50, 9: 10}, shard_size=100, part_size=50, compact_fraction=0.2, max_deltas=2,
                       compact_all=False)
    assert [s.shard for s in plan.merged] == [3, 4] and plan.groups == {5: [5, 6], 6: [7, 8], 7: [9]}
    assert [s.shard for s in plan.compact] == [1] and [s.shard for s in plan.keep] == [0, 2]
    # On request every shard with tombstones is compacted, and small deltas merged even within the limit.
    plan = plan_shards(live, {}, shard_size=100, part_size=50, compact_fraction=0.2, max_deltas=8, compact_all=True)
    assert [s.shard for s in plan.compact] == [0, 1] and [s.shard for s in plan.keep] == [2]
    assert plan.groups == {5: [5, 6]} and [s.shard for s in plan.merged] == [3, 4]
