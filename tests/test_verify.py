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

    def lose_a_part(b, parts, factory):  # the storage loses a finished part while the shards are built
        local(index, parts[1].files["catalog"].path).unlink()
        return real(b, parts, factory)

    monkeypatch.setattr(build, "build_index", lose_a_part)
    with pytest.raises(JobError, match=r"not publishing v000001: 1 referenced file\(s\).*catalog/part-00001.parquet: missing"):
        run_index(cfg)
    assert read_latest(index) is None
    monkeypatch.undo()
    again = run_index(cfg)  # resumes: the lost part is redone, the others are kept
    assert again.resumed and again.images_processed_this_run == 2 and again.counts.indexed == 6
    assert verify_version(index, "v000001").ok
