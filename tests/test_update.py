"""Nightly cycle: build v1, add ~10%, delete ~5%, change ~5%, update; the live index must answer
like a full rebuild over the new gallery would."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from mllm_index.configs.schema import ConfigError, IndexJobConfig, load_config
from mllm_index.pipelines.demo import bundled_photos
from mllm_index.pipelines.index import run_index
from mllm_index.pipelines.update import run_update
from mllm_index.storage.contracts import UpdateCounts
from mllm_index.storage.faiss_store import index_from_bytes, stored_ids
from mllm_index.storage.search import IndexSearcher
from mllm_index.storage.uris import Location
from mllm_index.storage.versions import list_versions, read_latest

pytestmark = pytest.mark.e2e


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


def config(source: Path, index: Path, model: str | None) -> IndexJobConfig:
    return load_config(IndexJobConfig, None, {"source.uri": str(source), "index.uri": str(index), "model.name": model,
                                              "run.part_size": 8, "decode.batch_size": 8, "embed.batch_size": 8})


def snapshot(index_uri: str) -> tuple[set, dict, IndexSearcher]:
    searcher = IndexSearcher(index_uri)
    loc, m = searcher.location, searcher.manifest
    ids = np.concatenate([stored_ids(index_from_bytes(loc.read_bytes(s.file.path))) for s in m.shards])
    assert len(ids) == len(set(ids.tolist()))  # no id twice
    catalog = {}
    for ref in m.catalog:
        for row in loc.read_parquet(ref.path).to_pylist():
            catalog[row["key"]] = row["image_id"]
    return set(ids.tolist()), catalog, searcher


def test_nightly_update_matches_a_full_rebuild(ray_session, tiny_dinov2, tmp_path):
    gallery = tmp_path / "gallery"
    files = views(18)  # 36 images
    for key, data in files.items():
        (gallery / key).parent.mkdir(parents=True, exist_ok=True)
        (gallery / key).write_bytes(data)
    run_index(config(gallery, tmp_path / "index", tiny_dinov2))

    keys = sorted(files)
    for key in keys[:2]:  # delete ~5%
        (gallery / key).unlink()
    for key in keys[2:4]:  # change ~5%: another picture under the same name
        (gallery / key).write_bytes(jpeg(ImageOps.mirror(Image.open(io.BytesIO(files[key])))))
    for i, key in enumerate(keys[4:8]):  # add ~10%
        (gallery / "new" / f"{i}.jpg").parent.mkdir(exist_ok=True)
        (gallery / "new" / f"{i}.jpg").write_bytes(jpeg(ImageOps.flip(Image.open(io.BytesIO(files[key])))))

    summary = run_update(config(gallery, tmp_path / "index", None))
    assert summary.published and summary.build.version == "v000002" and not summary.build.retrained
    assert summary.update == UpdateCounts(added=4, changed=2, deleted=2, unchanged=32)
    assert summary.build.images_processed_this_run == 6  # only added + changed were decoded and embedded
    assert summary.build.counts.indexed == 38

    run_index(config(gallery, tmp_path / "rebuild", tiny_dinov2))
    ids, catalog, searcher = snapshot(str(tmp_path / "index"))
    rebuilt_ids, rebuilt_catalog, rebuilt = snapshot(str(tmp_path / "rebuild"))
    assert ids == rebuilt_ids and catalog == rebuilt_catalog
    # The same queries find the same images (the changed ones included: their new vectors, not the old).
    order = np.argsort(rebuilt.ids)
    queries = rebuilt.vectors[order][:, :].astype(np.float32)
    _, live_top = searcher.search(queries, k=1, rescore=20)
    _, rebuilt_top = rebuilt.search(queries, k=1, rescore=20)
    assert (live_top[:, 0] == rebuilt_top[:, 0]).mean() == 1.0

    again = run_update(config(gallery, tmp_path / "index", None))
    assert not again.published and again.update.unchanged == 38
    assert read_latest(Location(str(tmp_path / "index"))) == "v000002"
    assert list_versions(Location(str(tmp_path / "index"))) == ["v000001", "v000002"]  # no empty folder left behind

    with pytest.raises(ConfigError, match="full rebuild"):
        run_update(config(gallery, tmp_path / "index", "some/other-model"))


def test_a_failed_update_leaves_the_live_version_serving_and_a_rerun_finishes(ray_session, tiny_dinov2, tmp_path, monkeypatch):
    import mllm_index.pipelines.update as update

    gallery = tmp_path / "gallery"
    for key, data in list(views(4).items()):
        (gallery / key).parent.mkdir(parents=True, exist_ok=True)
        (gallery / key).write_bytes(data)
    run_index(config(gallery, tmp_path / "index", tiny_dinov2))
    (gallery / "new.jpg").write_bytes(views(5)[sorted(views(5))[-1]])

    def denied(*args, **kwargs):
        raise PermissionError("access denied writing the carried-over catalog")

    monkeypatch.setattr(update, "carry_over", denied)
    with pytest.raises(PermissionError, match="access denied"):
        run_update(config(gallery, tmp_path / "index", None))
    index = Location(str(tmp_path / "index"))
    assert read_latest(index) == "v000001" and IndexSearcher(index.uri).ntotal == 8  # the live version still serves
    assert not index.exists("LOCK.json")  # the lock was released on the way out
    monkeypatch.undo()
    summary = run_update(config(gallery, tmp_path / "index", None))
    assert summary.build.resumed and summary.build.version == "v000002" and summary.build.images_processed_this_run == 0
    assert IndexSearcher(index.uri).ntotal == 9  # the embedded image from the failed run was kept, not redone
