"""The index job on a multi-node cluster as cluster.yaml has it (a 0-CPU head, two worker nodes),
with one worker node removed while the job runs: nothing is lost or duplicated."""

from __future__ import annotations

import io
import tarfile
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mllm_index.configs.schema import IndexJobConfig, load_config
from mllm_index.pipelines.index import run_index
from mllm_index.storage.catalog import image_id
from mllm_index.storage.faiss_store import index_from_bytes, stored_ids
from mllm_index.storage.uris import Location
from mllm_index.storage.versions import list_versions, read_manifest

pytestmark = pytest.mark.e2e
TARS, PER_TAR = 12, 200


def write_gallery(folder) -> list[str]:
    """Tiny PNGs in tar shards; returns every key."""
    folder.mkdir()
    rng, keys = np.random.default_rng(0), []
    for t in range(TARS):
        with tarfile.open(folder / f"shard-{t:03d}.tar", "w") as tar:
            for i in range(PER_TAR):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, format="PNG")
                info = tarfile.TarInfo(f"t{t:03d}-{i:04d}.png")
                info.size = buf.tell()
                tar.addfile(info, io.BytesIO(buf.getvalue()))
                keys.append(f"t{t:03d}-{i:04d}")
    return keys


def stored(index: Location) -> tuple[np.ndarray, np.ndarray]:
    """(ids in the shards, ids in the catalog parts) of the live version, each with repeats kept."""
    m = read_manifest(index)
    shard_ids = np.concatenate([stored_ids(index_from_bytes(index.read_bytes(s.file.path))) for s in m.shards])
    catalog = np.concatenate([pq.read_table(io.BytesIO(index.read_bytes(f.path)), columns=["image_id"]).column(0)
                              .to_numpy() for f in m.catalog])
    return shard_ids, catalog


def test_index_job_survives_a_worker_node_leaving(tmp_path, ray_cluster):
    cluster, workers = ray_cluster
    keys = write_gallery(tmp_path / "gallery")
    index = Location(str(tmp_path / "index"))
    cfg = load_config(IndexJobConfig, None, {
        "source.uri": str(tmp_path / "gallery"), "index.uri": index.uri, "model.name": "bench:pixel-stats",
        "model.image_size": 12, "run.part_size": 60, "decode.batch_size": 20, "embed.batch_size": 20}).require()
    outcome: dict = {}

    def job():
        try:
            outcome["summary"] = run_index(cfg)
        except Exception as exc:  # the job may fail when its node goes; then a re-run must finish it
            outcome["error"] = exc

    thread = threading.Thread(target=job)
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline and thread.is_alive():
        names = list_versions(index) if index.exists("versions") else []
        if names and len(index.list_names("versions", names[-1], "stats")) >= 3:
            break
        time.sleep(0.1)
    assert thread.is_alive(), "the job ended before a node could be removed: the test proves nothing"
    cluster.remove_node(workers[0])
    thread.join(600)
    assert not thread.is_alive()
    if "error" in outcome:
        assert "re-run" in str(outcome["error"]) or "node" in str(outcome["error"]).lower(), outcome["error"]
        outcome["summary"] = run_index(cfg)  # on the one worker node left
    summary = outcome["summary"]
    expected = np.sort(np.array([image_id(Location(str(tmp_path / "gallery")).uri, k) for k in keys], np.int64))
    assert summary.counts.indexed == len(keys) and summary.counts.failed == 0
    shard_ids, catalog_ids = stored(index)
    assert np.array_equal(np.sort(shard_ids), expected)  # every image once: nothing lost, nothing twice
    assert np.array_equal(np.sort(catalog_ids), expected)
