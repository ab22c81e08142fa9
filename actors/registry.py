"""The one place that knows the model kinds: what a model name in a config means.

A kind is data, not a branch in the jobs: how to read its preprocessing, which Ray Data
callable class embeds with it and with which constructor arguments, and (optionally) a
per-version fit whose files are stored with the version (a VLAD codebook). Re-rankers map
a name to a scorer with `score(pairs) -> P(same)`. A name registered here ("classic:...")
picks its kind; any other name is a transformers checkpoint (Hugging Face id or local path).
Adding a kind (a vLLM scorer, a local-feature embedder) is one `register_*` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from PIL import Image

from mllm_index.storage.contracts import FileRef, ModelSpec, Preprocessing

TRANSFORMERS = "transformers"  # the kind of every name not registered below


@dataclass(frozen=True)
class EmbedContext:
    """Where an embedding actor runs and reads from; the same for gallery and queries."""

    index_uri: str
    storage_options: dict
    device: str = "cpu"
    num_threads: int = 1


@dataclass(frozen=True)
class EmbedderKind:
    name: str
    actor: type  # a PixelEmbedder: Ray Data callable class, decoded pixels in, `embedding` out
    preprocessing: Callable[[str, int | None], Preprocessing]
    actor_kwargs: Callable[[ModelSpec, Preprocessing, EmbedContext], dict]
    # fit(version location, version name, sample rows, spec, preprocessing, storage_options, image_column, seed)
    #   -> files to reference from the manifest; run once per version, before any embedding.
    fit: Callable[..., dict[str, FileRef]] | None = None
    fit_sample: Callable[[ModelSpec], int] | None = None  # gallery images the fit wants


class Scorer(Protocol):
    def score(self, pairs: list[tuple[Image.Image, Image.Image]]) -> Any: ...


@dataclass(frozen=True)
class RerankerKind:
    name: str
    make: Callable[[dict], Scorer]  # reranker settings (the config section, plus device/num_threads) -> scorer
    default_max_pixels: int  # per image, when a caller does not choose


EMBEDDERS: dict[str, EmbedderKind] = {}
RERANKERS: dict[str, RerankerKind] = {}


def register_embedder(kind: EmbedderKind) -> None:
    EMBEDDERS[kind.name] = kind


def register_reranker(kind: RerankerKind) -> None:
    RERANKERS[kind.name] = kind


def embedder_kind(model_name: str) -> EmbedderKind:
    return EMBEDDERS.get(model_name, EMBEDDERS[TRANSFORMERS])


def reranker_kind(model_name: str) -> RerankerKind:
    return RERANKERS.get(model_name, RERANKERS[TRANSFORMERS])


def model_kinds() -> dict[str, list[str]]:
    """Registered names, by role (`transformers` stands for any checkpoint id or path)."""
    return {"embedders": sorted(EMBEDDERS), "rerankers": sorted(RERANKERS)}


# -- transformers checkpoints ------------------------------------------------------------------
def _transformers_preprocessing(name: str, image_size: int | None) -> Preprocessing:
    from mllm_index.actors.embed import load_preprocessing

    return load_preprocessing(name, image_size)


def _transformers_kwargs(spec: ModelSpec, prep: Preprocessing, ctx: EmbedContext) -> dict:
    s = spec.settings
    return dict(model=spec.name, image_size=prep.image_size, image_mean=prep.image_mean, image_std=prep.image_std,
                pooling=s.get("pooling", "auto"), gem_p=s.get("gem_p", 3.0), dtype=s.get("dtype", "auto"),
                device=ctx.device, num_threads=ctx.num_threads)


def _mllm_scorer(r: dict) -> Scorer:
    """A checkpoint scored by its `reranker.backend`: transformers, vllm (extra [vllm]), or auto (vllm on a GPU)."""
    from mllm_index.actors.mllm import MLLMScorer, scorer_kwargs
    from mllm_index.actors.vllm_scorer import resolve_backend

    if resolve_backend(r) == "vllm":
        from mllm_index.actors.vllm_scorer import VLLMScorer

        return VLLMScorer(**scorer_kwargs(r), engine=r.get("vllm_engine"))
    return MLLMScorer(**scorer_kwargs(r))


# -- classic local features (extra `classic`) --------------------------------------------------
def _vlad_kwargs(spec: ModelSpec, prep: Preprocessing, ctx: EmbedContext) -> dict:
    return dict(index_uri=ctx.index_uri, codebook=spec.files["codebook"], pca=spec.files.get("pca"),
                storage_options=ctx.storage_options, fill=prep.fill)


def _register_builtins() -> None:
    from mllm_index.actors import classic, pixel_stats
    from mllm_index.actors.embed import EmbedImages

    register_embedder(EmbedderKind(TRANSFORMERS, EmbedImages, _transformers_preprocessing, _transformers_kwargs))
    register_embedder(EmbedderKind(classic.SIFT_VLAD, classic.VladEmbedImages, classic.classic_preprocessing,
                                   _vlad_kwargs, fit=classic.fit_vlad_files,
                                   fit_sample=lambda spec: int(spec.settings.get("codebook_sample", 256))))
    register_embedder(EmbedderKind(pixel_stats.PIXEL_STATS, pixel_stats.PixelStatsEmbedder,
                                   pixel_stats.pixel_stats_preprocessing, pixel_stats.pixel_stats_kwargs))
    register_reranker(RerankerKind(TRANSFORMERS, _mllm_scorer, default_max_pixels=448 * 448))
    register_reranker(RerankerKind(classic.SIFT_RANSAC, lambda r: classic.SpatialVerifier(), default_max_pixels=640 * 480))


_register_builtins()
