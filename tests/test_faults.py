"""Fault tolerance: an embedding actor killed in the middle of a job."""

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mllm_index.configs.schema import IndexJobConfig, load_config
from mllm_index.pipelines.demo import bundled_photos
from mllm_index.pipelines.index import run_index
from mllm_index.storage.faiss_store import index_from_bytes, stored_ids
from mllm_index.storage.search import IndexSearcher

pytestmark = pytest.mark.e2e


def index_ids(uri: str) -> np.ndarray:
    s = IndexSearcher(uri, load_vectors=False)
    return np.concatenate([stored_ids(index_from_bytes(s.location.read_bytes(sh.file.path))) for sh in s.manifest.shards])


def embed_actor_pids() -> list[int]:
    """Worker processes of embed actors: Ray titles them ray::MapWorker(MapBatches(EmbedImages))."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"EmbedImages" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_killed_embedding_actor_is_restarted_and_nothing_is_lost(ray_session, tiny_dinov2, tmp_path):
    gallery = Path(tmp_path / "g")
    gallery.mkdir()
    for i in range(60):
        img = Image.open(bundled_photos()[i % 18]).convert("RGB").resize((320 + i, 200))
        img.save(gallery / f"{i:03d}.jpg", quality=85)
    sets = ["run.part_size=4", "decode.batch_size=4", "embed.batch_size=2"]
    make = lambda name: load_config(IndexJobConfig, None, {"source.uri": str(gallery), "index.uri": str(tmp_path / name),  # noqa: E731
                                                           "model.name": tiny_dinov2}, sets)
    result = {}
    job = threading.Thread(target=lambda: result.update(summary=run_index(make("idx"))))
    job.start()
    stats = tmp_path / "idx" / "versions" / "v000001" / "stats"
    killed = None
    deadline = time.time() + 120
    while killed is None and time.time() < deadline and job.is_alive():
        actors = embed_actor_pids()
        if actors and stats.exists() and len(list(stats.iterdir())) >= 1:
            killed = actors[0]
            os.kill(killed, signal.SIGKILL)  # the actor's worker process dies mid-job
        time.sleep(0.05)
    job.join(timeout=300)
    assert killed is not None, "the job finished before an embedding actor could be killed"
    assert result["summary"].counts.model_dump() == {"seen": 60, "indexed": 60, "failed": 0, "skipped": 0}
    ids = index_ids(str(tmp_path / "idx"))
    run_index(make("clean"))
    assert len(ids) == len(set(ids.tolist())) == 60
    assert set(ids.tolist()) == set(index_ids(str(tmp_path / "clean")).tolist())
