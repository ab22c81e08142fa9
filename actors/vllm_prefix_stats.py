"""Prefix-cache hits of the ray.data.llm vLLM stage, counted by a vLLM stat-logger plugin.

The rows that `ray.data.llm` returns do not carry vLLM's per-request `num_cached_tokens`, and
its engine metrics go only to Ray's Prometheus endpoint. vLLM starts every engine with the stat
loggers registered under the entry-point group `vllm.stat_logger_plugins` (pyproject.toml
registers `PrefixCacheLogger`). The logger sums the scheduler's prefix-cache counters (prompt
tokens looked up, tokens found in cached blocks) and, each time the engine's frontend logs its
stats (ray.data.llm does after every batch, before the batch's task ends), adds them to the Ray
actor named by MLLM_INDEX_PREFIX_TALLY. The rerank job creates that actor and passes its name to
the engine replicas in their runtime environment. Engines started without the variable (any
other use of vLLM in the same environment) only add up two integers.
"""

from __future__ import annotations

import logging
import os

import ray

try:  # the logger class is only ever loaded by vLLM; the tally is used by the rerank driver
    from vllm.v1.metrics.loggers import StatLoggerBase
except ImportError:  # pragma: no cover (no vLLM: nothing loads the logger)
    StatLoggerBase = object

log = logging.getLogger(__name__)
ENV = "MLLM_INDEX_PREFIX_TALLY"


@ray.remote(num_cpus=0)
class PrefixCacheTally:
    """Prefix-cache counters of one run's engines: prompt tokens looked up and tokens served from cache."""

    def __init__(self):
        self.queries = self.hits = self.reports = 0

    def add(self, queries: int, hits: int) -> None:
        self.queries, self.hits, self.reports = self.queries + queries, self.hits + hits, self.reports + 1

    def totals(self) -> dict:
        return {"query_tokens": self.queries, "hit_tokens": self.hits, "reports": self.reports}


class PrefixCacheLogger(StatLoggerBase):
    """vLLM per-engine stat logger (StatLoggerBase): sums prefix-cache counters, reports them on `log()`."""

    def __init__(self, vllm_config=None, engine_index: int = 0):
        self.sink = os.environ.get(ENV)
        self.queries = self.hits = 0

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        stats = getattr(scheduler_stats, "prefix_cache_stats", None)
        if stats is not None:
            self.queries += int(stats.queries)
            self.hits += int(stats.hits)

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        if not self.sink or not self.queries:
            return
        try:
            ray.get(ray.get_actor(self.sink).add.remote(self.queries, self.hits), timeout=60)
        except Exception as exc:  # the counts are a report, never a reason to fail scoring
            log.warning("could not report prefix-cache counts to %s: %s", self.sink, exc)
            return
        self.queries = self.hits = 0
