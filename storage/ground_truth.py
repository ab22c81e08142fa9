"""Ground-truth tables, and importers from the layouts benchmarks ship.

A ground-truth table (Parquet or JSON lines) has one row per query:
    query_id    the query's key (as in the results' `query_key`)
    positives   gallery keys that show the query's object or place
    junk        gallery keys ignored in scoring (neither right nor wrong)
    conditions  optional key -> label, e.g. "occluded"; several labels joined by commas

Revisited Oxford/Paris ship their ground truth as a Python pickle, which can run code when
loaded. `import_revisitop` therefore reads only a local file named on the command line by
the user, converts it once, and everything after reads the Parquet it wrote. No other
path in mllm-index loads pickle.
"""

from __future__ import annotations

import io
import json
import logging
import pickle  # noqa: S403 - only in import_revisitop, on a local file the user names explicitly
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mllm_index.storage.uris import Location

log = logging.getLogger(__name__)

GT_SCHEMA = pa.schema([("query_id", pa.string()), ("positives", pa.list_(pa.string())), ("junk", pa.list_(pa.string())),
                       ("conditions", pa.map_(pa.string(), pa.string()))])


@dataclass
class QueryTruth:
    positives: set[str]
    junk: set[str] = field(default_factory=set)
    conditions: dict[str, list[str]] = field(default_factory=dict)  # key -> labels


def read_ground_truth(uri: str, storage_options: dict | None = None) -> dict[str, QueryTruth]:
    data = Location(uri, storage_options).read_bytes()  # retried, like every storage call
    if uri.endswith((".jsonl", ".json")):
        rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    else:
        rows = pq.read_table(io.BytesIO(data)).to_pylist()
    truth = {}
    for row in rows:
        conditions = row.get("conditions") or {}
        if isinstance(conditions, list):  # a Parquet map comes back as (key, value) pairs
            conditions = dict(conditions)
        truth[str(row["query_id"])] = QueryTruth(
            set(row.get("positives") or []), set(row.get("junk") or []),
            {k: [label.strip() for label in v.split(",") if label.strip()] for k, v in conditions.items()})
    return truth


def write_ground_truth(rows: list[dict], uri: str, storage_options: dict | None = None) -> None:
    table = pa.Table.from_pylist([dict(r, conditions=list((r.get("conditions") or {}).items())) for r in rows], schema=GT_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    Location(uri, storage_options).write_bytes(buf.getvalue())


REVISITOP_PROTOCOLS = {  # protocol -> (positive groups, groups added to junk)
    "easy": (("easy",), ("hard",)),
    "medium": (("easy", "hard"), ()),
    "hard": (("hard",), ("easy",)),
}


def import_revisitop(gnd_pickle: str, out_uri: str, key_format: str = "{}.jpg", images_uri: str | None = None,
                     storage_options: dict | None = None) -> list[str]:
    """gnd_roxford5k.pkl / gnd_rparis6k.pkl -> gt_easy / gt_medium / gt_hard.parquet (+ queries.parquet).

    queries.parquet (key, uri, bbox as [x, y, w, h]) is written when `images_uri` (the folder
    with the dataset's jpg files) is given: it is a rerank query table as it stands.
    """
    path = Path(gnd_pickle)
    if "://" in gnd_pickle or not path.is_file():
        raise ValueError(f"{gnd_pickle}: give a local file; a pickle is only ever loaded from a path you name")
    log.warning("loading %s with pickle (the format revisitop ships): pickle can run code, so only do this with a file "
                "from a source you trust; it is converted to Parquet once and never loaded again", gnd_pickle)
    with path.open("rb") as f:
        gnd = pickle.load(f)  # noqa: S301 - explicit, local, user-requested conversion (see above)
    names, queries = gnd["imlist"], gnd["qimlist"]
    written = []
    for protocol, (positive_groups, junk_groups) in REVISITOP_PROTOCOLS.items():
        rows = []
        for query, info in zip(queries, gnd["gnd"]):
            positives = [key_format.format(names[i]) for g in positive_groups for i in info.get(g, [])]
            junk = [key_format.format(names[i]) for g in ("junk",) + junk_groups for i in info.get(g, [])]
            conditions = {key_format.format(names[i]): g for g in positive_groups for i in info.get(g, [])}
            rows.append({"query_id": key_format.format(query), "positives": positives, "junk": junk, "conditions": conditions})
        target = f"{out_uri.rstrip('/')}/gt_{protocol}.parquet"
        write_ground_truth(rows, target, storage_options)
        written.append(target)
    if images_uri:
        table = pa.table({
            "key": [key_format.format(q) for q in queries],
            "uri": [f"{images_uri.rstrip('/')}/{key_format.format(q)}" for q in queries],
            "bbox": [[float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])] for b in (g["bbx"] for g in gnd["gnd"])],
        })
        buf = io.BytesIO()
        pq.write_table(table, buf)
        target = f"{out_uri.rstrip('/')}/queries.parquet"
        Location(target, storage_options).write_bytes(buf.getvalue())
        written.append(target)
    return written


def _quartile_label(name: str, value: float, edges: np.ndarray) -> str:
    group = int(np.searchsorted(edges, value, side="right"))
    bounds = [-np.inf, *edges, np.inf]
    return f"{name}:q{group + 1}[{bounds[group]:.3g}..{bounds[group + 1]:.3g})"  # no comma: it separates labels


def import_ilias(dataset_uri: str, out_uri: str, key_format: str = "{}", storage_options: dict | None = None) -> list[str]:
    """ILIAS image_ids/*.txt -> gt.parquet: positives of a query = positives of its instance
    (the first path component of an id). Conditions: the quartile of each positive's object
    scale and of its clutter, as in the benchmark's per-scale / per-clutter breakdowns."""
    root = Location(dataset_uri, storage_options)
    queries = [line.split(",")[0].strip() for line in root.read_text("image_ids", "image_query_ids.txt").splitlines() if line.strip()]
    positives = [line.split(",") for line in root.read_text("image_ids", "positive_ids.txt").splitlines() if line.strip()]
    scales = np.array([float(p[1]) for p in positives])
    clutters = np.array([float(p[2]) for p in positives])
    scale_edges, clutter_edges = np.quantile(scales, [0.25, 0.5, 0.75]), np.quantile(clutters, [0.25, 0.5, 0.75])
    by_instance = defaultdict(list)
    for (pid, scale, clutter), s, c in zip(positives, scales, clutters):
        by_instance[pid.split("/")[0]].append((key_format.format(pid),
                                               f"{_quartile_label('scale', s, scale_edges)},{_quartile_label('clutter', c, clutter_edges)}"))
    rows = [{"query_id": key_format.format(q), "positives": [k for k, _ in by_instance[q.split("/")[0]]], "junk": [],
             "conditions": dict(by_instance[q.split("/")[0]])} for q in sorted(queries)]
    target = f"{out_uri.rstrip('/')}/gt.parquet"
    write_ground_truth(rows, target, storage_options)
    return [target]
