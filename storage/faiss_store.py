"""IVF-PQ indexes: choose a factory, train once, fill shards, move them to and from bytes.

Every shard is a copy of one trained index (same coarse quantizer, same PQ codebooks),
so distances from different shards are comparable and a merged top-k over shards is the
top-k of one big index. Indexes travel as FAISS's own serialization, never pickle.
"""

from __future__ import annotations

import logging
import math
import re

import numpy as np

try:
    import faiss
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "faiss is not installed. Install exactly one build: pip install -e '.[cpu]' (faiss-cpu) "
        "or pip install -e '.[gpu]' (faiss-gpu) on GPU nodes."
    ) from exc

log = logging.getLogger(__name__)

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
# Below this many vectors PQ codebooks cannot be trained well (k-means on 2^nbits
# centroids per sub-space wants ~39 points per centroid): store them uncompressed.
MIN_VECTORS_FOR_PQ = 1000


def _power_of_two_near(x: float) -> int:
    return 2 ** max(0, round(math.log2(max(x, 1.0))))


def pq_subquantizers(dim: int) -> int:
    """PQ M for a dimension: about 8 dimensions per sub-quantizer, and a divisor of dim."""
    target = max(1, dim // 8)
    for m in range(target, 0, -1):
        if dim % m == 0:
            return m
    return 1


def default_factory(n_vectors: int, dim: int) -> str:
    """IVF-PQ factory sized for a gallery: nlist ~ 4*sqrt(N) (a power of two), PQ M from dim.

    nlist is capped so every list gets >= 39 training points; tiny galleries use
    IVF-Flat (PQ would not have enough points to train), small ones 4-bit PQ codes.
    """
    nlist = _power_of_two_near(4 * math.sqrt(max(n_vectors, 1)))
    while nlist > 1 and n_vectors < 39 * nlist:
        nlist //= 2
    if n_vectors < MIN_VECTORS_FOR_PQ:
        return f"IVF{nlist},Flat"
    nbits = 8 if n_vectors >= 39 * 256 else 4
    return f"IVF{nlist},PQ{pq_subquantizers(dim)}x{nbits}"


def factory_centroids(factory: str) -> tuple[int, int]:
    """(nlist, PQ centroids per sub-space) named by a factory string (1 where absent)."""
    ivf = re.search(r"IVF(\d+)", factory)
    pq = re.search(r"PQ\d+(?:x(\d+))?", factory)
    nbits = int(pq.group(1) or 8) if pq else 0
    return (int(ivf.group(1)) if ivf else 1), (2**nbits if pq else 1)


def train_sample_size(factory: str, n_vectors: int, max_sample: int) -> int:
    """Training points: 256 per coarse centroid (>= 39 per PQ centroid), capped by N and max_sample."""
    nlist, pq_k = factory_centroids(factory)
    wanted = max(256 * nlist, 39 * pq_k)
    return int(min(n_vectors, max_sample, wanted))


def new_index(factory: str, dim: int, metric: str) -> "faiss.Index":
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    return faiss.index_factory(dim, factory, METRICS[metric])


def gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def train_index(factory: str, vectors: np.ndarray, metric: str, use_gpu: bool = True) -> "faiss.Index":
    """Train an empty index on a sample. With faiss-gpu, the IVF k-means runs on the GPUs."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = new_index(factory, vectors.shape[1], metric)
    if use_gpu and gpu_count() > 0:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            flat = faiss.IndexFlatL2(vectors.shape[1]) if metric == "l2" else faiss.IndexFlatIP(vectors.shape[1])
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(flat)
            log.info("training the coarse quantizer on %d GPU(s)", gpu_count())
    index.train(vectors)
    return index


def add_vectors(index: "faiss.Index", ids: np.ndarray, vectors: np.ndarray, use_gpu: bool = True) -> "faiss.Index":
    """Add vectors with ids; on GPUs when the index type allows it. Returns a CPU index."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if use_gpu and gpu_count() > 0:
        try:
            gpu_index = faiss.index_cpu_to_all_gpus(index)
            gpu_index.add_with_ids(vectors, ids)
            return faiss.index_gpu_to_cpu(gpu_index)
        except RuntimeError as exc:  # e.g. a PQ size the GPU kernels do not support
            log.warning("GPU add not possible for this index (%s); adding on CPU", exc)
    index.add_with_ids(vectors, ids)
    return index


def set_nprobe(index: "faiss.Index", nprobe: int) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = int(nprobe)


def index_to_bytes(index: "faiss.Index") -> bytes:
    return faiss.serialize_index(index).tobytes()


def index_from_bytes(data: bytes) -> "faiss.Index":
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def merge_topk(scores: list[np.ndarray], ids: list[np.ndarray], k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (nq, k_i) results into the global top-k (ids -1 mark empty slots)."""
    return merge_topk_tagged(scores, ids, None, k, metric)[:2]


def merge_topk_tagged(scores: list[np.ndarray], ids: list[np.ndarray], tags: list[np.ndarray] | None, k: int,
                      metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`merge_topk`, carrying a tag per result (the shard that returned it) through the same order:
    the tags come out where their ids do, so the merged ids and tags stay aligned."""
    all_scores = np.concatenate(scores, axis=1)
    all_ids = np.concatenate(ids, axis=1)
    worst = -np.inf if metric == "ip" else np.inf
    all_scores = np.where(all_ids < 0, worst, all_scores)
    order = np.argsort(-all_scores if metric == "ip" else all_scores, axis=1, kind="stable")[:, :k]
    merged_tags = None if tags is None else np.take_along_axis(np.concatenate(tags, axis=1), order, 1)
    return np.take_along_axis(all_scores, order, 1), np.take_along_axis(all_ids, order, 1), merged_tags


def stored_ids(index: "faiss.Index") -> np.ndarray:
    """Every id held by an IVF index (in list order): for audits and for diffing versions."""
    ivf = faiss.extract_index_ivf(index)
    invlists = ivf.invlists
    chunks = [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
              for i in range(invlists.nlist) if invlists.list_size(i)]
    return np.concatenate(chunks).astype(np.int64) if chunks else np.zeros(0, np.int64)
