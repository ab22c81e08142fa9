"""Job configs: one validated object per job, from YAML, CLI shortcuts and `--set a.b=value`.

Precedence: defaults < YAML file < CLI shortcuts (positional URIs, --model) < --set.
Every error names the field and, where the field is a choice, the allowed values.
Credentials never live here: storage.options refuses key/secret/token-like entries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mllm_index.storage.retry import RetryPolicy, with_policy
from mllm_index.storage.uris import find_credential_options


class ConfigError(ValueError):
    """A config problem, phrased for the person who wrote the config."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def _require(self, fields: dict[str, Any], where: str) -> None:
        """Fields without a default that a run needs (they may come from the CLI)."""
        missing = [name for name, value in fields.items() if not value]
        if missing:
            raise ConfigError(f"missing required setting(s): {', '.join(missing)} (give them in the config file, "
                              f"{where}, or with --set)")


class SourceConfig(Section):
    uri: str | None = None
    format: Literal["auto", "files", "webdataset", "parquet"] = "auto"
    image_extensions: list[str] | None = None  # None: the built-in list (jpg, png, webp, tiff, gif, svg, ...)
    image_column: str = "image"
    key_column: str | None = "key"


class ModelConfig(Section):
    name: str | None = None  # Hugging Face id or local path of a vision backbone
    pooling: Literal["auto", "cls", "mean", "gem"] = "auto"
    gem_p: float = Field(3.0, gt=0)
    image_size: int | None = Field(None, gt=0)  # None: from the model's preprocessor config
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    vlad_clusters: int = Field(16, gt=1)  # classic:sift-vlad only: codebook size (dim = clusters x 128)
    codebook_sample: int = Field(256, gt=0)  # classic:sift-vlad only: gallery images the codebook is fit on
    pca_dim: int | None = Field(None, gt=0)  # classic:sift-vlad only: PCA-reduce VLAD to this many dimensions


class DecodeConfig(Section):
    max_pixels: int = Field(89_478_485, gt=0)  # refuse larger images before decoding (decompression bombs)
    max_bytes: int = Field(64 * 2**20, gt=0)
    batch_size: int = Field(64, gt=0)
    num_cpus: float = Field(0.5, gt=0)
    timeout_s: float | None = Field(30.0, gt=0)  # one image's decode past this is a `decode_timeout` failure; None: no limit


class EmbedConfig(Section):
    batch_size: int = Field(128, gt=0)
    concurrency: int | None = Field(None, gt=0)  # None: one actor per GPU, or one on a CPU-only cluster
    num_gpus: float | None = Field(None, ge=0)  # None: 1 when the cluster has GPUs, else 0
    num_cpus: float | None = Field(None, gt=0)  # None: 1 with a GPU; on CPU a share that leaves room for decode
    device: Literal["auto", "cpu", "cuda"] = "auto"


class IndexConfig(Section):
    uri: str | None = None
    factory: str = "auto"  # "auto" sizes IVF-PQ from the gallery; or any FAISS factory, e.g. "IVF4096,PQ48"
    metric: Literal["ip", "l2"] = "ip"
    shard_size: int = Field(1_000_000, gt=0)  # vectors per shard file
    train_sample_max: int = Field(1_000_000, gt=0)
    nprobe: int = Field(32, gt=0)  # default for searches, recorded in the manifest
    rescore: int = Field(400, ge=0)  # default exact re-score shortlist: 4x the rerank default top_k 100 (benchmarks/scale_search.py)
    use_gpu: bool = True  # train/add with faiss-gpu when the node has GPUs
    keep_versions: int | None = Field(None, gt=0)  # after a publish, delete older versions beyond this many (never
    # the live one, nor one a reader holds a lease on); None keeps every version
    lock_ttl: float = Field(3600.0, gt=0)  # seconds; renewed as parts finish; a crashed run's lock expires after it
    # Nightly update: a shard whose tombstoned share of vectors passes compact_fraction is rebuilt without them;
    # small delta shards (fewer than shard_size vectors) are merged once there are more than max_delta_shards.
    compact_fraction: float = Field(0.2, gt=0, le=1)
    max_delta_shards: int = Field(8, ge=1)


class RunConfig(Section):
    part_size: int = Field(4096, gt=0)  # images per resumable unit of work
    key_bucket_rows: int = Field(1_000_000, gt=0)  # rows per key-index bucket at a first build (a listing task's bound)
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a new local Ray; "auto" or host:port joins a cluster
    connect_timeout_s: float = Field(60.0, gt=0)  # joining a cluster that does not answer within this fails
    seed: int = 0


class RetryConfig(Section):
    """One retry policy for every storage call, in the driver and in the workers."""

    attempts: int = Field(5, ge=1)  # tries per call, the first included
    base_delay: float = Field(0.2, ge=0)  # seconds before the first retry; doubles each time, with jitter
    max_delay: float = Field(10.0, ge=0)  # cap on one pause


class StorageConfig(Section):
    options: dict[str, Any] = Field(default_factory=dict)  # fsspec storage_options, e.g. {endpoint_url: ...}
    allowed_roots: list[str] = Field(default_factory=list)  # when set, every URI must be under one of them
    retry: RetryConfig = Field(default_factory=RetryConfig)

    @field_validator("options")
    @classmethod
    def _no_credentials(cls, options: dict[str, Any]) -> dict[str, Any]:
        bad = find_credential_options(options)
        if bad:
            raise ValueError(
                f"credentials are not accepted in configs ({', '.join(bad)}); use AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or the instance role instead"
            )
        return options

    def options_with_retry(self) -> dict[str, Any]:
        """The storage options the job hands to every process: fsspec's, carrying `retry` (see storage/retry.py)."""
        return with_policy(self.options, RetryPolicy(**self.retry.model_dump()))


class IndexJobConfig(Section):
    source: SourceConfig = Field(default_factory=SourceConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    def require(self) -> "IndexJobConfig":
        self._require({"source.uri": self.source.uri, "index.uri": self.index.uri, "model.name": self.model.name},
                      "as positional arguments / --model")
        return self


class UpdateOptions(Section):
    """How `mllm-index update` treats the trained IVF/PQ index of the live version."""

    retrain: bool = False  # retrain on the updated gallery
    retrain_factor: float = Field(2.0, gt=0)  # retrain when the gallery grew this many times since the last training
    compact: bool = False  # compact every shard with tombstones (and merge small delta shards), whatever the fractions


class QueriesConfig(Section):
    uri: str | None = None  # folder/prefix of images, WebDataset shards, or Parquet (key + bytes, or key + uri)
    format: Literal["auto", "files", "webdataset", "parquet"] = "auto"
    image_extensions: list[str] | None = None
    image_column: str = "image"
    key_column: str | None = "key"
    uri_column: str = "uri"  # Parquet query tables may point at images instead of holding them
    bbox_column: str = "bbox"  # Parquet: optional [x, y, w, h] per query, in pixels of the upright image
    bboxes_uri: str | None = None  # folder/WebDataset sets: a Parquet or JSON-lines table of key, bbox


class SearchConfig(Section):
    top_k: int = Field(100, gt=0)
    nprobe: int | None = Field(None, gt=0)  # None: the value recorded in the index manifest
    rescore: int | None = Field(None, ge=0)  # None: the manifest's exact re-score shortlist
    concurrency: int = Field(1, gt=0)  # actors per shard group
    num_cpus: float = Field(0.5, gt=0)
    batch_size: int = Field(256, gt=0)
    # One search actor holds a group of shards: at most this many bytes of FAISS files (plus 8 B per
    # image of sorted ids where it re-scores) and/or this many shards; None: no limit of that kind.
    max_bytes_per_actor: int | None = Field(8 * 2**30, gt=0)
    shards_per_actor: int | None = Field(None, gt=0)
    cache_dir: str | None = None  # local disk folder for the shards' vector files (re-score); None: the temp dir


class RerankerConfig(Section):
    model: str | None = None  # HF id or local path of an image-text-to-text model; None: kNN order only
    prompt: str = "Do these two images show the same object or place? Answer yes or no."
    yes_words: list[str] = Field(default_factory=lambda: ["yes"])
    no_words: list[str] = Field(default_factory=lambda: ["no"])
    depth: int = Field(100, gt=0)  # how many kNN candidates per query are re-scored
    max_pixels: int = Field(448 * 448, gt=0)  # per image, bounds the visual tokens
    batch_size: int = Field(8, gt=0)  # pairs per forward pass
    queries_per_batch: int = Field(4, gt=0)  # queries handed to one actor call (their candidates are fetched once)
    symmetric: bool = False  # average the (query, candidate) and (candidate, query) prompts
    fusion_weight: float = Field(0.0, ge=0, le=1)  # final = (1-w) * rerank + w * kNN score
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    concurrency: int | None = Field(None, gt=0)
    num_gpus: float | None = Field(None, ge=0)
    num_cpus: float | None = Field(None, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: vllm on a GPU where the [vllm] extra is installed, transformers elsewhere (CPU, families vLLM lacks)
    backend: Literal["auto", "transformers", "vllm"] = "auto"
    min_pixels: int | None = Field(None, gt=0)  # per image (small images are upscaled to it); None: the checkpoint's
    # Prompt layout: [system_prompt] [instruction] <query image> [between_images] <candidate image> [prompt]
    system_prompt: str | None = None
    instruction: str | None = None
    between_images: str | None = None
    vllm_engine: dict[str, Any] = Field(default_factory=dict)  # vLLM engine options over the defaults (block_size, ...)
    accelerator_type: str | None = None  # ray.data.llm vLLM stage: GPU type of its replicas, e.g. "H100"


    @field_validator("yes_words", "no_words", mode="before")
    @classmethod
    def _words_not_booleans(cls, words):
        if isinstance(words, list) and any(isinstance(w, bool) for w in words):
            raise ValueError("YAML read an unquoted yes/no as a boolean; quote the words, e.g. ['yes']")
        return words


class RerankRunConfig(Section):
    part_size: int = Field(256, gt=0)  # queries per result part (the resumable unit)
    run_id: str | None = None  # None: derived from the settings
    catalog_bucket_rows: int = Field(2048, gt=0)  # rows per file of the catalog partitioned by image id
    ray_address: str | None = None  # as in the index job's run.ray_address
    connect_timeout_s: float = Field(60.0, gt=0)


class RerankJobConfig(Section):
    queries: QueriesConfig = Field(default_factory=QueriesConfig)
    index_uri: str | None = None
    index_version: str | None = None  # None: LATEST at the start of the run (recorded for resumes)
    output_uri: str | None = None
    query_model: str | None = None  # if set, must equal the index's model (a check, not a choice)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    reranker: RerankerConfig = Field(default_factory=RerankerConfig)
    run: RerankRunConfig = Field(default_factory=RerankRunConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    def require(self) -> "RerankJobConfig":
        self._require({"queries.uri": self.queries.uri, "index_uri": self.index_uri, "output_uri": self.output_uri},
                      "as positional arguments")
        return self


def _format_error(cls: type[BaseModel], err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown setting; allowed here: {', '.join(_allowed_names(cls, e['loc'][:-1]))}")
        elif e["loc"][0] == "storage":  # never echo storage values: they may hold a secret
            lines.append(f"{field}: {e['msg']}")
        else:
            lines.append(f"{field}: {e['msg']} (got {str(e.get('input'))[:80]!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def _allowed_names(cls: type[BaseModel], loc: tuple) -> list[str]:
    model = cls
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            break
        model = field.annotation
    return sorted(model.model_fields)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `section.field=value` (value parsed as YAML: numbers, booleans, lists, null)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected section.field=value")
    path, raw = assignment.split("=", 1)
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {assignment!r}: empty field name")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {key} is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        node[keys[-1]] = raw


def load_config(cls: type[BaseModel], path: str | None = None, shortcuts: dict[str, Any] | None = None,
                overrides: list[str] | None = None) -> Any:
    """Build a job config from a YAML file, CLI shortcuts ({"a.b": value}) and --set overrides."""
    data: dict[str, Any] = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
    for dotted, value in (shortcuts or {}).items():
        if value is not None:
            _set(data, dotted, value)
    for assignment in overrides or []:
        apply_override(data, assignment)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(cls, err)) from None


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, last = dotted.split(".")
    node = data
    for key in sections:
        node = node.setdefault(key, {})
    node[last] = value
