"""What each job returns (and saves as its stats.json / summary.json), and how the CLI prints it.

Typed, so the Python API, the CLI's `--json` and the saved files carry the same fields;
`model_dump(mode="json")` is the JSON form.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from mllm_index.storage.contracts import Counts, UpdateCounts


class Summary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def to_json(self) -> dict:
        return self.model_dump(mode="json")


class StorageRetries(BaseModel):
    """Storage calls retried after a transient error (throttling, 5xx, resets, timeouts) in this run."""

    driver: int = 0  # the job's own process: listing, plan, markers, manifest, lock
    workers: int = 0  # decode tasks (and, for rerank, search and rerank actors), summed from the part stats


class IndexSummary(Summary):
    """One built version (by `index` or `update`)."""

    version: str
    resumed: bool
    index_uri: str
    source_uri: str
    published: bool = False
    images_processed_this_run: int = 0
    images_per_second: float | None = None
    startup_seconds: float | None = None  # to the first finished part: actor start and model load
    counts: Counts | None = None
    skipped_by_extension: dict[str, int] = Field(default_factory=dict)
    errors: dict[str, int] = Field(default_factory=dict)
    factory: str | None = None
    dim: int | None = None
    metric: str | None = None
    train_points: int = 0  # 0: the trained index was reused
    shards: int = 0
    index_bytes: int = 0
    index_bytes_per_vector: float | None = None
    flat_float32_bytes_per_vector: int | None = None
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    wall_seconds: float = 0.0
    garbage_collected: list[str] = Field(default_factory=list)
    # an update's version
    live_before: str | None = None
    update: UpdateCounts | None = None
    retrained: bool | None = None
    storage_retries: StorageRetries = Field(default_factory=StorageRetries)


class UpdateSummary(Summary):
    """A nightly update: the diff, and the version it published (None when nothing changed)."""

    live_before: str
    update: UpdateCounts
    published: bool
    build: IndexSummary | None = None
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    wall_seconds: float = 0.0


class QueryCounts(BaseModel):
    seen: int
    ok: int
    failed: int
    skipped: int


class RerankSummary(Summary):
    run_id: str
    index_version: str
    reranker: str
    queries: QueryCounts
    results: int
    pairs_scored_this_run: int
    pairs_per_second: float | None = None
    candidate_failures: int
    errors: dict[str, int] = Field(default_factory=dict)
    parts: int
    parts_this_run: int
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    wall_seconds: float
    output_uri: str
    startup_seconds: float | None = None
    storage_retries: StorageRetries = Field(default_factory=StorageRetries)


def _stages(stages: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}s" for k, v in stages.items())


def _errors(errors: dict[str, int]) -> list[str]:
    return ["  failures by type: " + ", ".join(f"{k} {v}" for k, v in sorted(errors.items()))] if errors else []


def _retries(r: StorageRetries) -> list[str]:
    return [f"  storage retries: driver {r.driver}, workers {r.workers}"] if r.driver or r.workers else []


def format_index(s: IndexSummary) -> str:
    c = s.counts
    lines = [
        f"index version {s.version} published at {s.index_uri}{' (resumed)' if s.resumed else ''}",
        f"  images: seen {c.seen} = indexed {c.indexed} + failed {c.failed} + skipped {c.skipped}",
        f"  index: {s.factory}, dim {s.dim}, {s.shards} shard(s), "
        f"{s.index_bytes_per_vector:.1f} bytes/vector (flat float32: {s.flat_float32_bytes_per_vector})",
        f"  throughput: {s.images_per_second or '-'} images/s (decode+embed, incl. {s.startup_seconds or 0:.1f}s "
        f"to the first part), wall {s.wall_seconds:.1f}s",
        "  stages: " + _stages(s.stage_seconds),
    ]
    return "\n".join(lines + _errors(s.errors) + _retries(s.storage_retries))


def format_update(s: UpdateSummary) -> str:
    u = s.update
    head = f"update: added {u.added}, changed {u.changed}, deleted {u.deleted}, unchanged {u.unchanged}"
    if not s.published or s.build is None:
        return f"{head}\nnothing changed: no new version published; {s.live_before} stays live ({s.wall_seconds:.1f}s)"
    return f"{head}; {'retrained' if s.build.retrained else 'same trained index'}\n{format_index(s.build)}"


def format_rerank(s: RerankSummary) -> str:
    q = s.queries
    lines = [
        f"rerank run {s.run_id} ({s.reranker}) over index version {s.index_version} -> {s.output_uri}",
        f"  queries: seen {q.seen} = ok {q.ok} + failed {q.failed} + skipped {q.skipped}; "
        f"{s.results} result rows; parts {s.parts_this_run}/{s.parts} run now",
        f"  pairs scored: {s.pairs_scored_this_run} ({s.pairs_per_second or '-'} pairs/s); "
        f"candidate failures: {s.candidate_failures}",
        "  stages: " + _stages(s.stage_seconds) + f"; wall {s.wall_seconds:.1f}s",
    ]
    return "\n".join(lines + _errors(s.errors) + _retries(s.storage_retries))
