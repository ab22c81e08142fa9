"""Ray Data stages shared by the jobs, and the resources their actor pools may take.

On a CPU-only cluster every actor pool holds its CPUs for the whole run; if the pools take
them all, Ray Data cannot schedule a single decode task and the job hangs (two 1-CPU
actors on a 2-core machine do exactly that). `plan_actor_pools` refuses such settings.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from mllm_index.actors.decode import decode_batch
from mllm_index.actors.registry import EmbedContext, embedder_kind
from mllm_index.configs.schema import ConfigError
from mllm_index.storage.contracts import ModelSpec, Preprocessing
from mllm_index.storage.shard_store import part_file
from mllm_index.storage.uris import Location


def actor_resources(section, field: str) -> dict:
    """Resources of one actor pool from a config section with device/num_gpus/num_cpus/concurrency."""
    cluster = ray.cluster_resources()
    cpus, gpus = cluster.get("CPU", 0), cluster.get("GPU", 0)
    use_gpu = section.device != "cpu" and section.num_gpus != 0 and ((section.num_gpus or 0) > 0 or gpus > 0)
    num_gpus = (section.num_gpus if section.num_gpus is not None else 1) if use_gpu else 0
    concurrency = section.concurrency or (max(1, int(gpus // max(num_gpus, 1e-9))) if use_gpu else 1)
    num_cpus = section.num_cpus or (1.0 if use_gpu else max(0.5, cpus // 4))
    return {"field": field, "num_gpus": num_gpus, "num_cpus": num_cpus, "concurrency": concurrency,
            "device": "cuda" if use_gpu else "cpu", "num_threads": max(1, int(num_cpus))}


def plan_actor_pools(pools: list[dict], decode_cpus: float) -> None:
    """Refuse pools whose CPUs leave no room for one decode task."""
    cpus = ray.cluster_resources().get("CPU", 0)
    held = sum(p["num_cpus"] * p["concurrency"] for p in pools)
    if held > cpus - min(1.0, decode_cpus):
        names = ", ".join(f"{p['field']}.num_cpus x {p['field']}.concurrency = {p['num_cpus'] * p['concurrency']:g}" for p in pools)
        raise ConfigError(f"actor pools hold {held:g} of the cluster's {cpus:g} CPUs ({names}), leaving none for "
                          "decode and write tasks; lower num_cpus (fractions are allowed) or concurrency")


def read_plan_parts(batch: dict[str, np.ndarray], *, folder: Location) -> pa.Table:
    """Ray Data task: the plan rows of the parts named in the batch (read here, not by the driver)."""
    return pa.concat_tables([folder.read_parquet("plan", part_file(int(p))) for p in batch["part"]])


def plan_rows(folder: Location, parts: list[int]) -> "ray.data.Dataset":
    """The planned rows of `parts` of a job folder, read by tasks, one part per batch: the driver holds
    only the part numbers (the rows of a 10^9-image plan never pass through it). The reads hold no CPU
    (one small Parquet file each: on a small cluster a CPU share for them would starve decode), and one
    reader per 16 cluster CPUs keeps ahead of decode without crowding a small machine with processes."""
    readers = max(1, int(ray.cluster_resources().get("CPU", 0) // 16))
    return ray.data.from_items([{"part": p} for p in parts], override_num_blocks=max(1, min(len(parts), 512))).map_batches(
        read_plan_parts, batch_size=1, batch_format="numpy", num_cpus=0, concurrency=readers, fn_kwargs=dict(folder=folder))


def decode_and_embed(rows: "list[pa.Table] | ray.data.Dataset", cfg, spec: ModelSpec, prep: Preprocessing,
                     image_column: str, embed_res: dict, index_uri: str,
                     keep_max_pixels: int | None = None) -> "ray.data.Dataset":
    """Catalog-like rows (tables in hand, or a dataset such as `plan_rows`) -> decoded, letterboxed
    pixels (tasks) -> L2-normalised embeddings (actors).

    The embedder class and its arguments come from the model's registered kind; `index_uri`
    is where the kind's per-version files (if any) are read from.
    """
    kind = embedder_kind(spec.name)
    context = EmbedContext(index_uri, cfg.storage.options_with_retry(), embed_res["device"], embed_res["num_threads"])
    # SPREAD puts decode on every CPU node. The two explicit, different strategies also keep
    # Ray Data from fusing decode into the embed actors (it fuses ops whose remote args
    # match), which would run all decoding serially inside the actors.
    ds = rows if isinstance(rows, ray.data.Dataset) else ray.data.from_arrow(rows)
    return ds.map_batches(
        decode_batch, batch_size=cfg.decode.batch_size, batch_format="numpy", num_cpus=cfg.decode.num_cpus,
        scheduling_strategy="SPREAD",
        fn_kwargs=dict(image_size=prep.image_size, fill=tuple(prep.fill), max_pixels=cfg.decode.max_pixels,
                       max_bytes=cfg.decode.max_bytes, storage_options=cfg.storage.options_with_retry(), image_column=image_column,
                       timeout_s=cfg.decode.timeout_s, keep_max_pixels=keep_max_pixels),
    ).map_batches(
        kind.actor, batch_size=cfg.embed.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=embed_res["concurrency"]), scheduling_strategy="DEFAULT",
        num_gpus=embed_res["num_gpus"], num_cpus=embed_res["num_cpus"],
        fn_constructor_kwargs=kind.actor_kwargs(spec, prep, context),
    )
