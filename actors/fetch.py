"""Candidate stage, ahead of the scorer: catalog rows by id, then the candidate images, as Ray tasks.

Fetching and decoding are CPU and network work; done here, in tasks that Ray Data runs
ahead of the scoring actors, a GPU scorer never waits on storage. Each call looks up the
catalog rows of all its candidates: from the catalog file of the shard the search found each in
(`knn_shards`; one row group per id, see storage/shard_catalog.py), or, for versions built before
shards had catalog files, from the run's id buckets (storage/catalog_index.py). It fetches the
unique candidates of the re-ranked depth once per batch (a candidate shared by several queries
is read and decoded once) and caps each image to the scorer's pixel budget. A candidate that cannot be had keeps its kNN position and is
reported as a failure note; it never fails the batch.
"""

from __future__ import annotations

import json

import numpy as np

from mllm_index.actors.decode import DecodeFailure, cap_pixels, open_image
from mllm_index.storage.catalog_index import CatalogBuckets
from mllm_index.storage.shard_catalog import ShardCatalogs
from mllm_index.storage.retry import RetryMeter
from mllm_index.storage.sources import fetch_bytes
from mllm_index.storage.uris import Location, redact_text


def decoded(data, decode: dict, max_pixels: int, bbox=None):
    """A capped RGB image from fetched bytes; DecodeFailure (with a reason) for anything else."""
    if isinstance(data, BaseException):
        raise DecodeFailure(type(data).__name__, redact_text(str(data)))
    draft = int(2 * max_pixels ** 0.5)  # JPEG draft decoding to ~2x what the scorer keeps
    image, _, _ = open_image(data, decode["max_pixels"], decode["max_bytes"], draft_long_side=draft, bbox=bbox,
                             timeout_s=decode.get("timeout_s"))
    return cap_pixels(image, max_pixels)


def catalog_rows(batch: dict[str, np.ndarray], storage_options: dict, catalog_uri: str | None,
                 index_uri: str | None, shard_catalogs: list[tuple] | None) -> list[dict | None]:
    """The catalog row of every (query, rank) of the batch, flattened: from the shards' catalogs
    when the run uses them and the search said where each id is, else from the run's id buckets."""
    ids = np.asarray(batch["knn_ids"]).reshape(-1)
    if shard_catalogs is not None and index_uri and "knn_shards" in batch:
        catalogs = ShardCatalogs.from_plain(Location(index_uri, storage_options), shard_catalogs)
        return catalogs.lookup(ids, np.asarray(batch["knn_shards"]).reshape(-1))
    if catalog_uri is None:
        raise ValueError("fetch_candidates: no catalog to look candidates up in (catalog_uri is None and the batch "
                         "has no knn_shards or the run no shard catalogs)")
    return CatalogBuckets(Location(catalog_uri, storage_options)).lookup(ids)


def fetch_candidates(batch: dict[str, np.ndarray], *, storage_options: dict, image_column: str, depth: int, decode: dict,
                     max_pixels: int, catalog_uri: str | None = None, index_uri: str | None = None,
                     shard_catalogs: list[tuple] | None = None) -> dict[str, np.ndarray]:
    """Searched query rows in; the same rows with catalog columns for every rank and, for the first
    `depth` ranks, the decoded candidate images (`candidates`: per query a list, None where missing).

    `shard_catalogs` (`storage.shard_catalog.plain_catalogs` of the version's shards) and `index_uri`:
    rows are read from the shards' catalog files by `knn_shards`; otherwise `catalog_uri`, the run's
    catalog by id."""
    retries = RetryMeter()
    ids = batch["knn_ids"]
    n, k = ids.shape
    rows = catalog_rows(batch, storage_options, catalog_uri, index_uri, shard_catalogs)
    where = [[rows[q * k + pos] for pos in range(k)] for q in range(n)]
    batch["result_keys"] = np.array([json.dumps([r and str(r["key"]) for r in w]) for w in where], dtype=object)
    batch["result_uris"] = np.array([json.dumps([r and str(r["uri"]) for r in w]) for w in where], dtype=object)
    notes: list[list[dict]] = [[] for _ in range(n)]
    images: dict[int, object] = {}
    failed: dict[int, tuple[dict, str, str]] = {}
    if depth:
        unique = {}
        for q in range(n):
            if not batch["ok"][q]:
                continue
            for pos in range(min(depth, k)):
                cid = int(ids[q, pos])
                if cid >= 0 and cid not in unique:
                    unique[cid] = where[q][pos]
        known = {i: r for i, r in unique.items() if r is not None}
        failed.update({i: ({"uri": None, "key": None}, "not_in_catalog", "id missing from the index catalog")
                       for i, r in unique.items() if r is None})
        for (i, r), data in zip(known.items(), fetch_bytes(list(known.values()), storage_options, image_column)):
            try:
                images[i] = decoded(data, decode, max_pixels)
            except DecodeFailure as exc:
                failed[i] = (r, exc.error_type, str(exc))
    candidates = np.empty(n, dtype=object)
    for q in range(n):
        row_images = []
        for pos in range(min(depth, k)):
            cid = int(ids[q, pos])
            if batch["ok"][q] and cid in failed:
                r, error_type, message = failed[cid]
                notes[q].append({"image_id": cid, "uri": r["uri"], "key": r["key"], "stage": "candidate",
                                 "error_type": error_type, "message": message[:500]})
            row_images.append(images.get(cid))
        candidates[q] = row_images
    batch["candidates"] = candidates
    batch["candidate_failures"] = np.array([json.dumps(x, default=str) for x in notes], dtype=object)
    if "retries" in batch:
        batch["retries"] = retries.add_to(batch["retries"])
    return batch
