"""Typed contracts between jobs: what one process writes to storage and another reads back.

The manifest of a version, the plan of a run and the per-part stats markers are pydantic
models, validated on read, frozen once built (a callee gets a copy to change, never a dict
to mutate). The manifest carries `format`: a reader knows every format up to
`MANIFEST_FORMAT`, refuses a newer one by name, and upgrades older ones on read.

Format history:
- 1: file lists were names inside the version folder (`shards[].name`, `catalog.parts`, ...);
  the number was stored as `format_version`.
- 2: every file is a `FileRef`: a path relative to the index root (so a version may reference
  files in another version's folder), with its size and, when known, its sha256.
- 3: versions reference, not copy: an update's manifest lists the live version's parts and shards
  (in their folders) plus its own parts in delta shards; ids deleted or changed since a shard was
  built are that shard's tombstones (`ShardRef.tombstones`), filtered by every reader until
  compaction; `keys` is the key index by hash bucket and `containers` the scanned tar / Parquet
  files, so the next update diffs bucket by bucket and skips unchanged containers. Formats 1 and 2
  read as versions without tombstones, key index or container table (their first update builds them).
"""

from __future__ import annotations

import posixpath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MANIFEST_FORMAT = 3


class ManifestError(ValueError):
    """A manifest that cannot be used: malformed, or written by a newer mllm-index."""


class Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileRef(Contract):
    """One immutable file of a version, addressed relative to the index root."""

    path: str
    bytes: int | None = Field(None, ge=0)
    sha256: str | None = None

    @field_validator("path")
    @classmethod
    def _inside_the_index(cls, path: str) -> str:
        clean = posixpath.normpath(path)
        if not path or "://" in path or clean.startswith(("/", "..")) or clean != path:
            raise ValueError(f"must be a normalised path relative to the index root, got {path!r}")
        return path

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)


def version_file(version: str, *parts: str) -> str:
    """Path, relative to the index root, of a file in a version's folder."""
    return posixpath.join("versions", version, *parts)


class ShardRef(Contract):
    file: FileRef
    shard: int = Field(ge=0)
    parts: list[int]  # the embeddings parts (of the version that built it) it holds
    ntotal: int = Field(ge=0)
    # The shard's ids, sorted (int64 .npy), and its float16 vectors in that order (.npy): an exact
    # re-score reads only its shortlist's rows. None in versions built before them: the re-score
    # then loads the embeddings parts, as it always did.
    ids: FileRef | None = None
    vectors: FileRef | None = None
    # Ids in this shard that are no longer live (deleted, or changed and re-embedded in a newer
    # part): Parquet (image_id int64, part int32), sorted by image_id. Readers filter them out of
    # search results and of the catalog rows of `parts`; compaction rebuilds the shard without them.
    tombstones: FileRef | None = None
    tombstoned: int = Field(0, ge=0)
    delta: bool = False  # built by an update from its own new parts, on the live trained index
    # The catalog rows (image_id, key, uri, kind, offset, length) of exactly the shard's ids, sorted
    # by id, in small row groups (storage/shard_catalog.py): a candidate's row is read from the shard
    # the search found it in. None in versions built before it: the rerank job then buckets the catalog.
    catalog: FileRef | None = None

    @property
    def live(self) -> int:
        return self.ntotal - self.tombstoned

    def files(self) -> list[FileRef]:
        """The shard's files: the index, its ids, vectors and catalog where it has them, its tombstones."""
        return [self.file, *(f for f in (self.ids, self.vectors, self.catalog, self.tombstones) if f is not None)]


class ModelSpec(Contract):
    """The embedder a version was built with: its registered kind decides how to run it."""

    name: str
    settings: dict[str, Any] = Field(default_factory=dict)  # pooling, dtype, kind-specific options
    files: dict[str, FileRef] = Field(default_factory=dict)  # fitted per version (e.g. a VLAD codebook)


class Preprocessing(Contract):
    resize: Literal["long_side_letterbox"] = "long_side_letterbox"
    image_size: int = Field(gt=0)
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    fill: tuple[int, int, int]


class SourceInfo(Contract):
    uri: str
    format: str = "auto"


class Counts(Contract):
    """Images of a version; seen = indexed + failed + skipped."""

    seen: int = Field(ge=0)
    indexed: int = Field(ge=0)
    failed: int = Field(0, ge=0)
    skipped: int = Field(0, ge=0)


class UpdateCounts(Contract):
    added: int = Field(ge=0)
    changed: int = Field(ge=0)
    deleted: int = Field(ge=0)
    unchanged: int = Field(ge=0)


class Manifest(Contract):
    """A published version: everything a reader needs, and every file it is made of."""

    format: int = MANIFEST_FORMAT
    version: str
    parent: str | None = None
    published_at: float | None = None
    model: ModelSpec | None = None  # None: vectors published without an embedder (publish_vectors)
    preprocessing: Preprocessing | None = None
    source: SourceInfo | None = None
    dim: int = Field(gt=0)
    metric: Literal["ip", "l2"]
    factory: str
    nprobe: int = Field(32, gt=0)  # search defaults recorded with the index
    rescore: int = Field(0, ge=0)
    counts: Counts
    trained_on: int = Field(ge=0)  # gallery size at the last IVF/PQ training
    trained: FileRef
    shards: list[ShardRef]
    embeddings: list[FileRef]  # float16 vectors by image_id, for the exact re-score
    catalog: list[FileRef] = Field(default_factory=list)
    failures: list[FileRef] = Field(default_factory=list)
    update: UpdateCounts | None = None
    # The key index: live rows (key, etag, length, image_id, uri, part) split by a hash of the key
    # into `key_buckets` files (`keys/bucket-BBBBB.parquet`, one per non-empty bucket), so that the
    # nightly diff runs bucket by bucket and never holds the catalog in one process.
    key_buckets: int = Field(0, ge=0)  # 0: no key index (format 1/2): the first update builds it
    # A bucket may have several key files (a base, then the rows later updates added) and removed files
    # (`keys/removed-BBBBB.parquet`: (image_id, part) of its rows no longer live): storage.key_runs.
    keys: list[FileRef] = Field(default_factory=list)
    key_removed: list[FileRef] = Field(default_factory=list)
    containers: FileRef | None = None  # tar / Parquet files scanned: uri, kind, etag, size, entries, key range
    loose_keys: int | None = None  # loose files (not in a container) the run listed; None: not recorded
    failed_parts: list[int] | None = None  # parts whose failures file has decode/embed rows; None: not recorded

    def files(self) -> list[FileRef]:
        """Every file the version references (some may live in earlier versions' folders)."""
        model_files = list(self.model.files.values()) if self.model else []
        shard_files = [f for s in self.shards for f in s.files()]
        containers = [self.containers] if self.containers else []
        return [self.trained, *shard_files, *self.embeddings, *self.catalog, *self.failures, *model_files, *self.keys,
                *self.key_removed, *containers]

    @property
    def ntotal(self) -> int:
        """Vectors stored in the shards, tombstoned ones included."""
        return sum(s.ntotal for s in self.shards)

    @property
    def live(self) -> int:
        """Vectors a search can return."""
        return sum(s.live for s in self.shards)

    @property
    def next_part(self) -> int:
        """The first part number an update may use: part numbers are unique along a version's lineage."""
        return 1 + max((p for s in self.shards for p in s.parts), default=-1)


def parse_manifest(data: Any, where: str) -> Manifest:
    """Validate a manifest read from storage; `where` names it (index URI, version) in errors."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: manifest.json is not a JSON object")
    fmt = data.get("format", data.get("format_version"))
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise ManifestError(f"{where}: manifest.json field 'format' must be a positive integer, got {fmt!r}")
    if fmt > MANIFEST_FORMAT:
        raise ManifestError(f"{where}: manifest.json has format {fmt}, newer than this mllm-index reads (1 to "
                            f"{MANIFEST_FORMAT}); upgrade mllm-index to read this version")
    try:
        return Manifest.model_validate(_upgrade_format_1(data) if fmt == 1 else data)
    except (ValidationError, KeyError, TypeError, AttributeError) as exc:
        raise ManifestError(f"{where}: malformed manifest.json: {_describe(exc)}") from None


def _upgrade_format_1(old: dict) -> dict:
    """Format 1 listed file names inside the version folder; format 2 references paths."""
    version = old["version"]

    def refs(section: str, folder: str) -> list[dict]:
        return [{"path": version_file(version, folder, name)} for name in (old.get(section) or {}).get("parts", [])]

    model = None
    if old.get("model"):
        settings = {k: v for k, v in old["model"].items() if k not in ("name", "codebook", "pca")}
        files = {k: {"path": version_file(version, old["model"][k])} for k in ("codebook", "pca") if old["model"].get(k)}
        model = {"name": old["model"]["name"], "settings": settings, "files": files}
    counts = dict(old["counts"])
    counts.setdefault("seen", counts.get("indexed", 0))
    new = {k: old[k] for k in ("version", "parent", "published_at", "preprocessing", "source", "dim", "metric", "factory",
                               "nprobe", "rescore", "update") if old.get(k) is not None}
    new.update(
        format=MANIFEST_FORMAT, model=model, counts=counts, trained_on=old.get("trained_on") or counts["indexed"],
        trained={"path": version_file(version, "trained.faiss")},
        shards=[{"file": {"path": version_file(version, "shards", s["name"]), "bytes": s.get("bytes")}, "shard": s["shard"],
                 "parts": s["parts"], "ntotal": s["ntotal"]} for s in old["shards"]],
        embeddings=refs("embeddings", "embeddings"), catalog=refs("catalog", "catalog"), failures=refs("failures", "failures"),
    )
    return new


def _describe(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"field {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()[:5])
    if isinstance(exc, KeyError):
        return f"field {exc.args[0]!r} is missing"
    return str(exc)


class Plan(Contract):
    """What a run will process, cut into parts; `plan/plan.json` is written last (the plan's marker)."""

    listing_failures: FileRef | None = None  # failures/listing.parquet, as written
    parts: int = Field(ge=0)
    entries: int = Field(ge=0)
    skipped: dict[str, int] = Field(default_factory=dict)  # by extension
    list_failures: int = Field(0, ge=0)
    list_errors: dict[str, int] = Field(default_factory=dict)
    seen: int = Field(ge=0)
    update: UpdateCounts | None = None  # the nightly diff, for an update's plan
    first_part: int = Field(0, ge=0)  # parts are first_part .. first_part + parts - 1
    key_buckets: int = Field(0, ge=0)
    keys: list[FileRef] = Field(default_factory=list)  # the new version's key index (see Manifest.keys)
    key_removed: list[FileRef] = Field(default_factory=list)
    containers: FileRef | None = None
    loose_keys: int | None = None
    # The diff's live rows to tombstone (deleted, or changed and re-embedded): Parquet (image_id, part)
    removed: list[FileRef] = Field(default_factory=list)

    @property
    def part_numbers(self) -> range:
        return range(self.first_part, self.first_part + self.parts)


class PartStats(Contract):
    """One finished part of an index or update run: the part's completion marker."""

    part: int = Field(ge=0)
    rows: int = Field(ge=0)
    indexed: int = Field(ge=0)
    failed: int = Field(ge=0)
    errors: dict[str, int] = Field(default_factory=dict)
    dim: int = Field(ge=0)
    carried_from: str | None = None  # an update's part copied from the live version
    files: dict[str, FileRef] = Field(default_factory=dict)  # embeddings, catalog, failures: as written, with digests
    retries: int = Field(0, ge=0)  # storage retries the workers made for this part's rows (decode reads)


class TrainedRef(Contract):
    """`trained.json`, written after trained.faiss: its reference, and how many points it was trained on."""

    file: FileRef
    train_points: int = Field(0, ge=0)  # 0: copied from the live version, not trained here


class QueryPartStats(Contract):
    """One finished part of a rerank run: the part's completion marker."""

    part: int = Field(ge=0)
    rows: int = Field(ge=0)
    queries_ok: int = Field(ge=0)
    queries_failed: int = Field(ge=0)
    results: int = Field(ge=0)
    pairs_scored: int = Field(ge=0)
    candidate_failures: int = Field(ge=0)
    errors: dict[str, int] = Field(default_factory=dict)
    retries: int = Field(0, ge=0)  # storage retries the workers made for this part (decode, search, rerank actors)
    # Scoring cost, raw counters summed over the part (the run summary derives per-image and per-pair figures):
    scorer_paths: dict[str, int] = Field(default_factory=dict)  # "backend/path" -> prompts scored that way
    images_encoded: int = Field(0, ge=0)  # images processed and encoded (prefix reuse: once per image per call)
    visual_tokens: int = Field(0, ge=0)  # image tokens in the prompts (two image slots per prompt)
    prompt_tokens: int = Field(0, ge=0)  # full prompt lengths
    computed_tokens: int = Field(0, ge=0)  # tokens through the language model, where the path measures it
    cached_tokens: int = Field(0, ge=0)  # prompt tokens served from a prefix cache, where the path measures it


def read_contract(location, cls: type[Contract], *parts: str) -> Contract:
    """A contract file (plan, part stats) from storage, validated."""
    return cls.model_validate(location.read_json(*parts))


def write_contract(location, obj: BaseModel, *parts: str) -> None:
    location.write_json(obj.model_dump(mode="json"), *parts)
