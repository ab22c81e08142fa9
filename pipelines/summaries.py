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


class ScoringSummary(BaseModel):
    """Which scoring path ran and what it cost, over the parts finished in this run (from their part stats)."""

    backend: str  # transformers, vllm, or both joined by "+"; a classic scorer's name otherwise
    paths: dict[str, int]  # "backend/path" -> prompts scored (a symmetric pair is two prompts)
    images_encoded: int  # images processed and encoded (prefix reuse: once per image per actor call; vLLM: image
    # slots sent to the engine, whose encoder cache may serve some of them)
    visual_tokens_per_image: float | None = None  # per image slot of a prompt (the pixel budget's effect)
    tokens_per_pair: float | None = None  # full prompt length
    # Language-model tokens computed and served from a prefix cache, per prompt, over the paths that measure them
    # (the ray.data.llm stage's rows carry no per-request cache counts: its prompts are left out of these two).
    computed_tokens_per_pair: float | None = None
    cached_tokens_per_pair: float | None = None
    # The ray.data.llm stage's engines, this run: prompt tokens looked up in the prefix cache, and found there
    # (counted by a vLLM stat-logger plugin, actors/vllm_prefix_stats.py; None where no engine reported).
    engine_prefix_cache: dict[str, int] | None = None

    @classmethod
    def from_parts(cls, stats: list, engine_prefix_cache: dict | None = None) -> "ScoringSummary | None":
        paths: dict[str, int] = {}
        for s in stats:
            for path, n in s.scorer_paths.items():
                paths[path] = paths.get(path, 0) + n
        prompts = sum(paths.values())
        if not prompts:
            return None
        measured = sum(n for path, n in paths.items() if path not in UNMEASURED_CACHE_PATHS)
        total = lambda field: sum(getattr(s, field) for s in stats)  # noqa: E731
        per = lambda a, b: round(a / b, 2) if b else None  # noqa: E731
        return cls(backend="+".join(sorted({p.split("/")[0] for p in paths})), paths=dict(sorted(paths.items())),
                   images_encoded=total("images_encoded"), visual_tokens_per_image=per(total("visual_tokens"), 2 * prompts),
                   tokens_per_pair=per(total("prompt_tokens"), prompts),
                   computed_tokens_per_pair=per(total("computed_tokens"), measured),
                   cached_tokens_per_pair=per(total("cached_tokens"), measured),
                   engine_prefix_cache=engine_prefix_cache if (engine_prefix_cache or {}).get("reports") else None)


UNMEASURED_CACHE_PATHS = {"vllm/ray_data_llm"}


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
    scoring: ScoringSummary | None = None  # None: kNN order only, or nothing scored in the parts finished now


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
    return "\n".join(lines + _scoring(s.scoring) + _errors(s.errors) + _retries(s.storage_retries))


def _scoring(c: ScoringSummary | None) -> list[str]:
    if c is None:
        return []
    paths = ", ".join(f"{p} {n}" for p, n in c.paths.items())
    lm = "" if c.computed_tokens_per_pair is None else (
        f", {c.computed_tokens_per_pair:g} computed" + (f", {c.cached_tokens_per_pair:g} from the prefix cache"
                                                        if c.cached_tokens_per_pair else ""))
    engine = c.engine_prefix_cache
    cache = [] if not engine else [f"  vLLM prefix cache: {engine['hit_tokens']} of {engine['query_tokens']} prompt tokens "
                                   f"served from cached blocks ({engine['hit_tokens'] / max(engine['query_tokens'], 1):.0%})"]
    return [f"  scoring: {c.backend} ({paths} prompts); {c.visual_tokens_per_image or 0:g} visual tokens/image, "
            f"{c.tokens_per_pair or 0:g} tokens/pair{lm}; {c.images_encoded} images encoded"] + cache
