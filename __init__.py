"""mllm-index: instance-level image retrieval on Ray, with an MLLM as a training-free re-ranker.

The Python API mirrors the CLI: build a validated config, call the job.

    from mllm_index import IndexJobConfig, load_config, run_index
    cfg = load_config(IndexJobConfig, "configs/gallery.yaml", overrides=["embed.batch_size=64"])
    summary = run_index(cfg)            # an IndexSummary; summary.version is the published version

Names are resolved lazily, so `import mllm_index` stays cheap (no Ray, torch or faiss import)
until a job or the searcher is actually used.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module (relative to this package) that defines it
_API = {
    "run_index": "pipelines.index",
    "run_update": "pipelines.update",
    "run_rerank": "pipelines.rerank",
    "run_demo": "pipelines.demo",
    "evaluate": "pipelines.evaluate",
    "IndexSearcher": "storage.search",
    "IndexJobConfig": "configs.schema",
    "RerankJobConfig": "configs.schema",
    "UpdateOptions": "configs.schema",
    "ConfigError": "configs.schema",
    "load_config": "configs.schema",
    "Manifest": "storage.contracts",
    "ManifestError": "storage.contracts",
    "read_manifest": "storage.versions",
    "read_latest": "storage.versions",
    "model_kinds": "actors.registry",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'mllm_index' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
