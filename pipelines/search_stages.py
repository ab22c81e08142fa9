"""The rerank job's kNN search as Ray Data stages: one actor pool per shard group.

No search actor holds the version. `plan_search` cuts the shards into groups under
`search.max_bytes_per_actor` / `search.shards_per_actor`, and `add_search_stages` appends one
`map_batches` stage per group, each an actor pool of `search.concurrency` actors holding only
that group's shards. A query block passes every stage and carries its running shortlist: the
PQ top-`depth` merged over the groups so far. With an exact re-score, the shortlist is complete
after the last PQ stage, so that stage also re-scores the candidates its own shards hold, and
further stages (grouped by the 8 B per image of sorted ids they keep) re-score the rest from the
shards' vector files, read row by row from local copies. The last stage orders and cuts to
`search.top_k`: the ids and scores of one process searching every shard (IndexSearcher), and
`knn_shards`, the shard where each id is live (its PQ search returned it), carried beside the ids
through every merge: the fetch stage reads a candidate's catalog row from that shard's catalog file.

A version built before shards had vector files, searched with a re-score, runs the old way:
one stage whose actors hold every shard and every vector (and write no `knn_shards`).

Tombstones (ids an update deleted or changed since a shard was built) are filtered by the stage
holding the shard; a stage's memory counts them (`storage.search.shard_bytes`), so the groups
stay within the budget until compaction drops them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import ray

from mllm_index.actors.search import SearchIndex, SearchShardGroup
from mllm_index.storage.contracts import Manifest
from mllm_index.storage.search import group_bytes, has_shard_vectors, plan_groups

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchStage:
    shards: list[int]  # manifest positions PQ-searched here
    rescore_shards: list[int]  # manifest positions whose shortlist candidates are re-scored here
    final: bool


@dataclass(frozen=True)
class SearchPlan:
    top_k: int
    nprobe: int
    rescore: int
    depth: int  # shortlist carried between stages: max(top_k, rescore) with a re-score, else top_k
    stages: list[SearchStage] = field(default_factory=list)
    legacy: bool = False  # one SearchIndex pool holding the whole version
    num_cpus: float = 0.5
    concurrency: int = 1
    cache_dir: str | None = None

    @property
    def resources(self) -> dict:
        """All search pools together, for `plan_actor_pools`."""
        pools = 1 if self.legacy else len(self.stages)
        return {"field": "search", "num_cpus": self.num_cpus, "concurrency": self.concurrency * pools, "num_gpus": 0}


def plan_search(manifest: Manifest, search) -> SearchPlan:
    """The stages searching `manifest` under a `SearchConfig`."""
    log.info("version %s: %d searchable vectors in %d shards (%d tombstoned, filtered until compaction)",
             manifest.version, manifest.live, len(manifest.shards), manifest.ntotal - manifest.live)
    nprobe = search.nprobe or manifest.nprobe
    rescore = search.rescore if search.rescore is not None else manifest.rescore
    depth = max(search.top_k, rescore) if rescore else search.top_k
    common = dict(top_k=search.top_k, nprobe=nprobe, rescore=rescore, depth=depth, num_cpus=search.num_cpus,
                  concurrency=search.concurrency, cache_dir=search.cache_dir)
    if rescore and not has_shard_vectors(manifest):
        log.warning("version %s has no per-shard vector files (built before them): each search actor holds every "
                    "shard and every vector; rebuild or update the index to search it by shard groups", manifest.version)
        return SearchPlan(legacy=True, **common)
    shards, budget, per_actor = manifest.shards, search.max_bytes_per_actor, search.shards_per_actor
    shared = manifest.trained.bytes or 0  # the coarse quantizer and codebooks: held once per group
    pq_groups = plan_groups(shards, budget, per_actor, index=True, shared=shared) or [[]]
    if not rescore:
        stages = [SearchStage(g, [], final=j == len(pq_groups) - 1) for j, g in enumerate(pq_groups)]
        return SearchPlan(stages=stages, **common)
    last = pq_groups[-1]
    fuse = not budget or group_bytes([shards[p] for p in last], index=True, ids=True, shared=shared) <= budget
    rest = [p for p in range(len(shards)) if not (fuse and p in last)]
    rs_groups = [[rest[i] for i in g] for g in plan_groups([shards[p] for p in rest], budget, per_actor, index=False, ids=True)]
    stages = [SearchStage(g, [], final=False) for g in pq_groups[:-1]]
    stages.append(SearchStage(last, last if fuse else [], final=not rs_groups))
    stages += [SearchStage([], g, final=j == len(rs_groups) - 1) for j, g in enumerate(rs_groups)]
    return SearchPlan(stages=stages, **common)


def add_search_stages(ds: "ray.data.Dataset", plan: SearchPlan, index_uri: str, version: str,
                      storage_options: dict, batch_size: int) -> "ray.data.Dataset":
    """Embedded query rows (`embedding`, `ok`) in; the same rows with `knn_ids` / `knn_scores` out, and
    `knn_shards` (B, top_k) int64 unless the plan is legacy."""
    def common() -> dict:
        return dict(batch_size=batch_size, batch_format="numpy", num_cpus=plan.num_cpus,
                    compute=ray.data.ActorPoolStrategy(size=plan.concurrency))

    if plan.legacy:
        return ds.map_batches(SearchIndex, **common(), fn_constructor_kwargs=dict(
            index_uri=index_uri, version=version, storage_options=storage_options, top_k=plan.top_k, nprobe=plan.nprobe,
            rescore=plan.rescore))
    for stage in plan.stages:
        ds = ds.map_batches(SearchShardGroup, **common(), fn_constructor_kwargs=dict(
            index_uri=index_uri, version=version, storage_options=storage_options, shards=stage.shards,
            rescore_shards=stage.rescore_shards, top_k=plan.top_k, depth=plan.depth, nprobe=plan.nprobe,
            rescore=bool(plan.rescore), final=stage.final, cache_dir=plan.cache_dir))
    return ds
