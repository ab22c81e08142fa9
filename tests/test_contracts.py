"""Typed contracts: a format-1 index written by the previous release still loads and searches;
a malformed or newer manifest is a clear error naming the index, the version and the field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mllm_index.pipelines.cli import main as cli_main
from mllm_index.storage.contracts import (MANIFEST_FORMAT, FileRef, Manifest, ManifestError, PartStats, Plan,
                                          parse_manifest)
from mllm_index.storage.search import Catalog, IndexSearcher
from mllm_index.storage.uris import Location
from mllm_index.storage.versions import read_manifest, version_table

# Written by mllm-index before this change (format 1, `format_version`), with the searcher's answers then.
FORMAT_1 = Path(__file__).parent / "fixtures" / "format1"


@pytest.fixture
def old_index(tmp_path) -> Location:
    shutil.copytree(FORMAT_1 / "index", tmp_path / "index")
    return Location(str(tmp_path / "index"))


def test_a_format_1_index_still_loads_and_searches_exactly_as_before(old_index):
    raw = old_index.read_json("versions", "v000001", "manifest.json")
    assert raw["format_version"] == 1 and "format" not in raw  # the fixture really is the old format
    manifest = read_manifest(old_index)
    assert manifest.format == MANIFEST_FORMAT and manifest.counts.indexed == 24 and manifest.dim == 32
    assert manifest.shards[0].file.path == "versions/v000001/shards/shard-00000.faiss"
    assert [r.path for r in manifest.catalog][-1] == "versions/v000001/catalog/part-00003.parquet"
    assert manifest.model.settings["pooling"] == "auto" and manifest.preprocessing.image_size == 56
    assert all(old_index.exists(ref.path) for ref in manifest.files())

    expected = json.loads((FORMAT_1 / "expected.json").read_text())
    searcher = IndexSearcher(old_index.uri)
    queries = np.array(expected["queries"], np.float32)
    for rescore in (0, 10):
        scores, ids = searcher.search(queries, k=5, nprobe=4, rescore=rescore)
        np.testing.assert_array_equal(ids, expected[f"rescore_{rescore}"]["ids"])
        np.testing.assert_allclose(scores, expected[f"rescore_{rescore}"]["scores"], atol=1e-6)
    rows = Catalog(old_index, manifest).lookup(ids[0])
    assert all(r is not None and r["key"].startswith("img-") for r in rows)
    assert version_table(old_index)[0]["format"] == MANIFEST_FORMAT


def test_the_current_format_round_trips(old_index):
    manifest = read_manifest(old_index)
    again = parse_manifest(json.loads(json.dumps(manifest.model_dump(mode="json"))), "test")
    assert again == manifest


def write_manifest(index: Location, data) -> None:
    index.write_text(data if isinstance(data, str) else json.dumps(data), "versions", "v000001", "manifest.json")


@pytest.mark.parametrize("change, field", [
    (lambda m: m.update(format=MANIFEST_FORMAT + 1), "format"),
    (lambda m: m.update(format="two"), "format"),
    (lambda m: m.pop("format"), "format"),
    (lambda m: m["shards"][0].update(ntotal=-1), "shards.0.ntotal"),
    (lambda m: m.pop("metric"), "metric"),
    (lambda m: m.update(metric="cosine"), "metric"),
    (lambda m: m["shards"][0]["file"].update(path="../../etc/passwd"), "shards.0.file.path"),
    (lambda m: m["embeddings"][0].update(path="s3://elsewhere/x.parquet"), "embeddings.0.path"),
])
def test_a_bad_manifest_names_the_index_version_and_field(old_index, change, field):
    data = read_manifest(old_index).model_dump(mode="json")
    change(data)
    write_manifest(old_index, data)
    with pytest.raises(ManifestError) as err:
        read_manifest(old_index)
    message = str(err.value)
    assert old_index.uri in message and "v000001" in message and field in message, message
    if data.get("format") == MANIFEST_FORMAT + 1:
        assert "newer" in message and "upgrade mllm-index" in message


def test_a_corrupted_manifest_is_an_error_and_the_cli_exits_1(old_index, capsys):
    write_manifest(old_index, '{"format": 2, "version": "v0000')  # cut off mid-write
    with pytest.raises(ManifestError, match="v000001.*not valid JSON"):
        read_manifest(old_index)
    assert cli_main(["versions", old_index.uri]) == 1
    assert "v000001" in capsys.readouterr().err


def test_file_refs_stay_inside_the_index_root():
    assert FileRef(path="versions/v000002/shards/shard-00000.faiss").name == "shard-00000.faiss"
    for bad in ("", "/abs/path", "versions/../../x", "versions//x", "s3://b/k"):
        with pytest.raises(ValueError):
            FileRef(path=bad)


def test_contracts_are_frozen_and_strict():
    stats = PartStats(part=0, rows=3, indexed=2, failed=1, errors={"empty": 1}, dim=8)
    with pytest.raises(ValueError):
        stats.indexed = 5  # a callee cannot change what it was handed
    with pytest.raises(ValueError, match="unexpected"):
        Plan.model_validate({"parts": 1, "entries": 1, "seen": 1, "unexpected": True})
    assert Manifest.model_fields["format"].default == MANIFEST_FORMAT
