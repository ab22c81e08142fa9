import pytest
from galleries import parquet_bytes, tar_bytes, write_files
from inputs import odd_files

from mllm_index.storage.catalog import image_id
from mllm_index.storage.sources import SourceSpec, assign_ids, fetch_bytes, list_source, scan_container
from mllm_index.storage.uris import Location, StorageError, check_under_roots, normalize_uri, redact, redact_text

IMAGES = {name.split("/")[-1]: data for name, (data, _) in odd_files().items()}


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    return Location(str(tmp_path / "g") if request.param == "local" else f"memory://g-{tmp_path.name}")


def scan_all(spec: SourceSpec):
    listing = list_source(spec)
    entries = list(listing.files)
    for uri, kind, etag in listing.containers:
        found, _ = scan_container(uri, kind, etag, spec)
        entries += found
    return listing, entries


def test_mixed_layouts_are_listed_and_every_entry_reads_back_with_one_range(root):
    write_files(root, {
        "loose/a.jpg": IMAGES["gray.jpg"], "loose/deep/b.webp": IMAGES["photo.webp"], "loose/noext": IMAGES["no-extension"],
        "loose/meta.json": b"{}", "loose/readme.txt": b"hi",
        "shards/00000.tar": tar_bytes({"k1.jpg": IMAGES["gray.jpg"], "k1.json": b"{}", "k2.png": IMAGES["rgba.png"]}),
        "tables/p.parquet": parquet_bytes({"r1": IMAGES["cmyk.jpg"], "r2": IMAGES["photo.tiff"]}),
    })
    spec = SourceSpec(root.uri)
    listing, entries = scan_all(spec)
    assert listing.skipped == {"json": 1, "txt": 1}
    by_key = {e["key"]: e for e in entries}
    assert set(by_key) == {"loose/a.jpg", "loose/deep/b.webp", "loose/noext", "k1", "k2", "r1", "r2"}
    table, failures = assign_ids(entries, root.uri)
    assert failures == [] and table.num_rows == 7
    rows = table.to_pylist()
    data = fetch_bytes(rows, {})
    expected = {"loose/a.jpg": IMAGES["gray.jpg"], "loose/deep/b.webp": IMAGES["photo.webp"], "loose/noext": IMAGES["no-extension"],
                "k1": IMAGES["gray.jpg"], "k2": IMAGES["rgba.png"], "r1": IMAGES["cmyk.jpg"], "r2": IMAGES["photo.tiff"]}
    for row, got in zip(rows, data):
        assert got == expected[row["key"]], row["key"]


def test_format_restricts_what_is_read(root):
    write_files(root, {"a.jpg": IMAGES["gray.jpg"], "s.tar": tar_bytes({"k.jpg": IMAGES["gray.jpg"]})})
    listing = list_source(SourceSpec(root.uri, format="webdataset"))
    assert listing.files == [] and len(listing.containers) == 1 and listing.skipped == {"jpg": 1}


def test_ids_are_stable_and_depend_on_source_and_key(root):
    write_files(root, {"x/a.jpg": IMAGES["gray.jpg"]})
    _, entries = scan_all(SourceSpec(root.uri))
    table, _ = assign_ids(entries, root.uri)
    assert table.column("image_id")[0].as_py() == image_id(root.uri, "x/a.jpg")
    assert image_id("s3://b/g", "k") != image_id("s3://b/h", "k")
    assert 0 <= image_id("s3://b/g", "k") < 2**63


def test_repeated_keys_become_failures_not_duplicates(root):
    write_files(root, {
        "s0.tar": tar_bytes({"same.jpg": IMAGES["gray.jpg"], "other.jpg": IMAGES["gray.jpg"]}),
        "s1.tar": tar_bytes({"same.jpg": IMAGES["photo.webp"], "same.png": IMAGES["rgba.png"]}),
    })
    _, entries = scan_all(SourceSpec(root.uri))
    table, failures = assign_ids(entries, root.uri)
    assert sorted(table.column("key").to_pylist()) == ["other", "same"]
    assert [f["error_type"] for f in failures] == ["duplicate_key", "duplicate_key"]
    assert len(set(table.column("image_id").to_pylist())) == table.num_rows


def test_hugging_face_image_struct_and_many_row_groups(root):
    rows = {f"r{i}": IMAGES["gray.jpg"] if i % 2 else IMAGES["photo.webp"] for i in range(10)}
    root.write_bytes(parquet_bytes(rows, hf_struct=True, row_group_size=3), "t.parquet")
    _, entries = scan_all(SourceSpec(root.uri))
    table, _ = assign_ids(entries, root.uri)
    got = fetch_bytes(table.to_pylist(), {})
    assert [g == rows[r["key"]] for g, r in zip(got, table.to_pylist())] == [True] * 10


def test_a_missing_file_is_a_read_error_not_an_exception(root):
    entries = [dict(uri=root.full_uri(root.path("gone.jpg")), kind="file", offset=0, length=10)]
    assert isinstance(fetch_bytes(entries, {})[0], Exception)


def test_uri_roots_and_redaction():
    check_under_roots("s3://b/gallery/x", ["s3://b/gallery"], "source.uri")
    with pytest.raises(StorageError, match="source.uri"):
        check_under_roots("s3://b/gallery/../secret", ["s3://b/gallery"], "source.uri")
    with pytest.raises(StorageError):
        check_under_roots("s3://b/gallery-other", ["s3://b/gallery"], "index.uri")
    assert normalize_uri("s3://b/a/../c/") == "s3://b/c"
    assert redact("https://user:pw@host/x?X-Amz-Signature=abc&a=1") == "https://host/x?X-Amz-Signature=***&a=1"
    assert "testing-secret-value-123" not in redact_text("boom testing-secret-value-123 boom")
    assert redact("s3://b/k?X-Amz-Security-Token=t0k&X-Amz-Credential=AKIA") == "s3://b/k?X-Amz-Security-Token=***&X-Amz-Credential=***"
