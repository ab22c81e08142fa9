"""Checksums and `mllm-index verify`: corruption is detected by readers and by verify, with the file named;
no job publishes a version whose files are not there as written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mllm_index.pipelines.cli import main as cli_main
from mllm_index.storage.integrity import IntegrityError, check_present
from mllm_index.storage.search import IndexSearcher
from mllm_index.storage.shard_store import publish_vectors
from mllm_index.storage.synthetic import clustered_vectors
from mllm_index.storage.uris import Location
from mllm_index.storage.verify import verify_version
from mllm_index.storage.versions import read_manifest

FORMAT_1 = Path(__file__).parent / "fixtures" / "format1" / "index"


@pytest.fixture
def index(tmp_path) -> Location:
    root = Location(str(tmp_path / "idx"))
    x = clustered_vectors(3000, 32, seed=3)
    publish_vectors(root, np.arange(3000, dtype=np.int64) + 7, x, "IVF8,PQ8x4", part_size=1000, parts_per_shard=1)
    return root


def flip(path: Path, start: int, end: int) -> None:
    data = bytearray(path.read_bytes())
    data[start:end] = bytes(b ^ 0xFF for b in data[start:end])
    path.write_bytes(bytes(data))


def local(index: Location, rel: str) -> Path:
    return Path(index.path(rel))


def run_verify(*args: str) -> int:
    return cli_main(["verify", *args])


def test_every_referenced_file_carries_size_and_checksum_and_verifies(index, capsys):
    manifest = read_manifest(index)
    assert all(ref.sha256 and ref.bytes for ref in manifest.files())
    assert run_verify(index.uri) == 0
    out = capsys.readouterr().out
    assert "v000001: OK" in out and f"{len(manifest.files())} files ({len(manifest.files())} by sha256" in out


def test_flipped_bytes_inside_a_shard_are_caught_by_the_searcher_and_by_verify(index, capsys):
    manifest = read_manifest(index)
    shard = manifest.shards[1].file
    flip(local(index, shard.path), 200, 260)  # the reported case: the header still parses, the answers change
    with pytest.raises(IntegrityError) as err:
        IndexSearcher(index.uri)
    message = str(err.value)
    assert index.uri in message and "v000001" in message and shard.path in message and "sha256" in message
    assert run_verify(index.uri) == 1
    out = capsys.readouterr().out
    assert "FAILED (1 problem(s))" in out and shard.path in out


def test_truncated_missing_and_unreconciled_files_are_each_reported(index, capsys):
    manifest = read_manifest(index)
    shard, part = manifest.shards[0].file, manifest.embeddings[2]
    path = local(index, shard.path)
    path.write_bytes(path.read_bytes()[:-100])
    local(index, part.path).unlink()
    check = verify_version(index, "v000001")
    assert len(check.problems) == 2, check.problems
    assert any(shard.path in p and f"{shard.bytes - 100} bytes" in p for p in check.problems)
    assert any(part.path in p and "missing" in p for p in check.problems)
    assert sorted(check_present(index, manifest.files())) == sorted(check.problems)  # the pre-publish check sees both


def test_counts_that_do_not_reconcile_fail_verify(index):
    data = index.read_json("versions", "v000001", "manifest.json")
    data["counts"]["indexed"] += 1
    data["counts"]["seen"] += 1
    index.write_text(json.dumps(data), "versions", "v000001", "manifest.json")
    check = verify_version(index, "v000001")
    assert not check.ok and all("counts.indexed = 3001" in p for p in check.problems) and len(check.problems) == 2


def test_a_format_1_version_verifies_by_size_and_structure(tmp_path, capsys):
    shutil.copytree(FORMAT_1, tmp_path / "old")
    old = Location(str(tmp_path / "old"))
    assert run_verify(old.uri, "--all") == 0
    assert "0 by sha256, 16 by size and structure" in capsys.readouterr().out
    catalog = read_manifest(old).catalog[1]
    flip(local(old, catalog.path), 4, 40)  # no checksum recorded: the structure check catches it
    shard = read_manifest(old).shards[0].file
    flip(local(old, shard.path), 0, 8)  # a damaged FAISS header: faiss's own error, now naming the file
    check = verify_version(old, "v000001")
    assert len(check.problems) == 2
    assert any(catalog.path in p and "not a readable catalog file" in p for p in check.problems)
    assert any(shard.path in p and "not a readable shard file" in p for p in check.problems)
    with pytest.raises(IntegrityError, match=shard.path):
        IndexSearcher(old.uri)


def with_shard_catalogs(index: Location) -> str:
    """The fixture's version with catalog parts and each shard's catalog file, as the index job writes
    them (publish_vectors writes neither); published as v000002."""
    import pyarrow as pa

    from mllm_index.storage.catalog import CATALOG_SCHEMA, embeddings_from_table
    from mllm_index.storage.contracts import version_file
    from mllm_index.storage.integrity import read_verified_parquet, write_parquet_ref
    from mllm_index.storage.shard_catalog import write_shard_catalog
    from mllm_index.storage.shard_vectors import load_ids
    from mllm_index.storage.versions import publish

    manifest = read_manifest(index)
    catalog = []
    for ref in manifest.embeddings:
        ids = embeddings_from_table(read_verified_parquet(index, ref))[0]
        n = len(ids)
        table = pa.table({"image_id": ids, "key": [f"k{i}" for i in ids.tolist()], "uri": ["s3://b/g.tar"] * n,
                          "kind": ["tar"] * n, "offset": np.arange(n, dtype=np.int64), "length": np.ones(n, np.int64),
                          "etag": ["e"] * n, "width": np.ones(n, np.int32), "height": np.ones(n, np.int32)},
                         schema=CATALOG_SCHEMA)
        catalog.append(write_parquet_ref(index, version_file("v000001", "catalog", ref.name), table))
    shards = [s.model_copy(update={"catalog": write_shard_catalog(index, "v000002", s.shard, [catalog[p] for p in s.parts],
                                                                  load_ids(index, s.ids), row_group=100)})
              for s in manifest.shards]
    publish(index, manifest.model_copy(update={"version": "v000002", "shards": shards, "catalog": catalog}))
    return "v000002"


def test_a_damaged_or_wrong_shard_catalog_is_caught(index):
    from mllm_index.storage.integrity import write_ref
    from mllm_index.storage.shard_catalog import write_shard_catalog
    from mllm_index.storage.versions import publish

    version = with_shard_catalogs(index)
    manifest = read_manifest(index, version)
    check = verify_version(index, version)
    assert check.ok and check.files == len(manifest.files()), check.problems
    # The writer refuses catalog rows that are not exactly the shard's ids.
    with pytest.raises(IntegrityError, match="not exactly the shard's ids"):
        write_shard_catalog(index, version, 0, manifest.catalog[:1], np.arange(5, dtype=np.int64))
    # Another shard's rows under this shard's name, with their own (valid) checksum: the ids do not match.
    first, second = manifest.shards[0], manifest.shards[1]
    data = index.read_bytes(second.catalog.path)
    wrong = first.model_copy(update={"catalog": write_ref(index, "versions/v000003/shards/wrong.catalog.parquet", data)})
    publish(index, manifest.model_copy(update={"version": "v000003", "shards": [wrong, *manifest.shards[1:]]}))
    problems = verify_version(index, "v000003").problems
    assert len(problems) == 1 and "wrong.catalog.parquet" in problems[0] and "is not shard 0's ids" in problems[0], problems
    # A changed row (its bytes flipped) fails its checksum, the file named.
    flip(local(index, second.catalog.path), 300, 330)
    problems = verify_version(index, version).problems
    assert len(problems) == 1 and second.catalog.path in problems[0] and "sha256" in problems[0], problems


def test_verify_exits_1_for_an_unknown_version(index, capsys):
    assert run_verify(index.uri, "--version", "v000009") == 1
    assert "v000009" in capsys.readouterr().out


@pytest.mark.e2e
def test_a_job_never_publishes_a_version_whose_files_are_gone_and_a_rerun_redoes_them(ray_session, tiny_dinov2, tmp_path,
                                                                                      monkeypatch):
    import mllm_index.pipelines.build as build
    from mllm_index.configs.schema import IndexJobConfig, load_config
    from mllm_index.pipelines.build import JobError
    from mllm_index.pipelines.demo import bundled_photos
    from mllm_index.pipelines.index import run_index
    from mllm_index.storage.versions import read_latest

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for photo in bundled_photos()[:6]:
        shutil.copy(photo, gallery / photo.name)
    cfg = load_config(IndexJobConfig, None, {"source.uri": str(gallery), "index.uri": str(tmp_path / "idx"),
                                             "model.name": tiny_dinov2, "run.part_size": 2})
    index = Location(cfg.index.uri)
    real = build.build_index

    def lose_a_part(b, parts, factory):  # the storage loses a finished part once the shards are built from it
        made = real(b, parts, factory)   # (lost before, the shard build itself fails on it: the shard catalog reads it)
        local(index, parts[1].files["catalog"].path).unlink()
        return made

    monkeypatch.setattr(build, "build_index", lose_a_part)
    with pytest.raises(JobError, match=r"not publishing v000001: 1 referenced file\(s\).*catalog/part-00001.parquet: missing"):
        run_index(cfg)
    assert read_latest(index) is None
    monkeypatch.undo()
    again = run_index(cfg)  # resumes: the lost part is redone, the others are kept
    assert again.resumed and again.images_processed_this_run == 2 and again.counts.indexed == 6
    assert verify_version(index, "v000001").ok
