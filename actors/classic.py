"""Offline baselines from local features (extra `classic`, OpenCV): no weights, no network.

- `classic:sift-vlad`, an embedder: RootSIFT descriptors aggregated into a VLAD vector over a
  small codebook fit on a sample of the gallery (stored with the index version), power-law
  and intra-normalised, L2-normalised. Same Ray Data interface as `EmbedImages`.
- `classic:sift-ransac`, a re-ranker: RootSIFT matches with Lowe's ratio test, verified by a
  RANSAC homography; the score grows with the inlier count. Same `score(pairs)` interface as
  the MLLM scorer. This is the spatial verification that MLLM re-ranking is compared with.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from mllm_index.actors.embed import PixelEmbedder
from mllm_index.storage.contracts import FileRef, ModelSpec, Preprocessing, version_file
from mllm_index.storage.integrity import digest
from mllm_index.storage.shard_vectors import load_npy

SIFT_VLAD, SIFT_RANSAC = "classic:sift-vlad", "classic:sift-ransac"
CODEBOOK = "classic/vlad_codebook.npy"
PCA = "classic/vlad_pca.npy"  # optional: row 0 the mean, rows 1.. the principal directions


def _cv2():
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("the classic backends need OpenCV: pip install -e '.[classic]'") from exc
    return cv2


def root_sift(gray: np.ndarray, max_features: int, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(keypoint xy (n, 2), RootSIFT descriptors (n, 128)): L1-normalised, square-rooted SIFT."""
    cv2 = _cv2()
    keypoints, desc = cv2.SIFT_create(nfeatures=max_features).detectAndCompute(gray, mask)
    if desc is None or not len(keypoints):
        return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32)
    desc = np.sqrt(desc / (np.abs(desc).sum(1, keepdims=True) + 1e-7)).astype(np.float32)
    return np.array([k.pt for k in keypoints], np.float32), desc


def _gray(image) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
    return (arr[..., :3] @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)


def content_mask(pixels: np.ndarray, fill: tuple[int, int, int], margin: int = 4) -> np.ndarray:
    """Where the image is, inside a letterbox: no keypoints on the padding or its edge."""
    cv2 = _cv2()
    mask = (np.abs(pixels.astype(np.int16) - np.array(fill, np.int16)).sum(-1) > 0).astype(np.uint8) * 255
    return cv2.erode(mask, np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)) if margin else mask


def fit_codebook(descriptors: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    import faiss

    kmeans = faiss.Kmeans(descriptors.shape[1], k, niter=25, seed=seed, verbose=False)
    kmeans.train(np.ascontiguousarray(descriptors, np.float32))
    return kmeans.centroids.astype(np.float32)


def codebook_bytes(centroids: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, centroids.astype(np.float32), allow_pickle=False)
    return buf.getvalue()


def codebook_from_bytes(data: bytes) -> np.ndarray:
    return load_npy(data)  # plain array: no pickle is ever loaded


def vlad(descriptors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Residuals summed per nearest centroid, signed square root, intra- then L2-normalised."""
    k, d = centroids.shape
    out = np.zeros((k, d), np.float32)
    if len(descriptors):
        nearest = ((descriptors[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
        np.add.at(out, nearest, descriptors - centroids[nearest])
    out = np.sign(out) * np.sqrt(np.abs(out))
    out /= np.linalg.norm(out, axis=1, keepdims=True) + 1e-12
    flat = out.reshape(-1)
    return flat / (np.linalg.norm(flat) + 1e-12)


def fit_pca(vectors: np.ndarray, dim: int) -> np.ndarray:
    """[mean; top `dim` principal directions] of the rows of `vectors` (dim <= number of rows)."""
    if dim > min(vectors.shape):
        raise ValueError(f"model.pca_dim={dim} needs at least {dim} sample images with features (got {len(vectors)})")
    mean = vectors.mean(0)
    _, _, vt = np.linalg.svd(vectors - mean, full_matrices=False)
    return np.vstack([mean, vt[:dim]]).astype(np.float32)


def project(vectors: np.ndarray, pca: np.ndarray) -> np.ndarray:
    reduced = (vectors - pca[0]) @ pca[1:].T
    return reduced / (np.linalg.norm(reduced, axis=1, keepdims=True) + 1e-12)


class VladEmbedImages(PixelEmbedder):
    """The SIFT-VLAD embedder, with the Ray Data interface of `EmbedImages`."""

    def __init__(self, index_uri: str, codebook: FileRef, storage_options: dict, fill, max_features: int = 500,
                 pca: FileRef | None = None):
        from mllm_index.storage.integrity import read_verified
        from mllm_index.storage.uris import Location

        index = Location(index_uri, storage_options)
        self.centroids = codebook_from_bytes(read_verified(index, codebook))
        self.pca = codebook_from_bytes(read_verified(index, pca)) if pca else None
        self.fill, self.max_features = tuple(fill), max_features
        self.dim = self.centroids.size if self.pca is None else len(self.pca) - 1

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        if not len(pixels):
            return np.zeros((0, self.dim), np.float32)
        vectors = np.stack([vlad(root_sift(_gray(p), self.max_features, content_mask(p, self.fill))[1], self.centroids)
                            for p in pixels])
        return vectors if self.pca is None else project(vectors, self.pca)


class SpatialVerifier:
    """Scores (query, candidate) pairs by RANSAC-verified SIFT matches; same interface as MLLMScorer."""

    def __init__(self, ratio: float = 0.8, ransac_px: float = 8.0, max_features: int = 1000, half_score_inliers: int = 15):
        self.ratio, self.ransac_px, self.max_features, self.half = ratio, ransac_px, max_features, half_score_inliers
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _features(self, image: Image.Image):
        key = id(image)  # the rerank actor decodes each image once and pairs the same object many times
        if key not in self._cache:
            self._cache[key] = root_sift(_gray(image), self.max_features)
        return self._cache[key]

    def inliers(self, query: Image.Image, candidate: Image.Image) -> int:
        cv2 = _cv2()
        (qxy, qd), (cxy, cd) = self._features(query), self._features(candidate)
        if len(qd) < 2 or len(cd) < 2:
            return 0
        matches = cv2.BFMatcher(cv2.NORM_L2).knnMatch(qd, cd, k=2)
        good = [m[0] for m in matches if len(m) == 2 and m[0].distance < self.ratio * m[1].distance]
        if len(good) < 4:
            return 0
        src = qxy[[m.queryIdx for m in good]]
        dst = cxy[[m.trainIdx for m in good]]
        _, mask = cv2.findHomography(src, dst, cv2.RANSAC, self.ransac_px, maxIters=2000, confidence=0.995)
        return int(mask.sum()) if mask is not None else 0

    def score(self, pairs: list[tuple[Image.Image, Image.Image]]) -> np.ndarray:
        """inliers / (inliers + half_score_inliers): 0 for no geometric agreement, towards 1 for many inliers."""
        counts = np.array([self.inliers(q, c) for q, c in pairs], np.float32)
        self._cache.clear()
        return counts / (counts + self.half) if len(counts) else np.zeros(0, np.float32)


def classic_preprocessing(name: str, image_size: int | None = None) -> Preprocessing:
    """Local features: a larger input than a ViT's, and no learned normalisation."""
    return Preprocessing(image_size=int(image_size or 512), image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                         fill=(128, 128, 128))


def fit_vlad_files(version, version_name: str, entries: list[dict], spec: ModelSpec, prep: Preprocessing,
                   storage_options: dict, image_column: str, seed: int) -> dict[str, FileRef]:
    """The version's codebook (and PCA), fit once: a re-run finds the codebook and fits nothing."""
    s = spec.settings
    if not version.exists(CODEBOOK):
        settings = {"image_size": prep.image_size, "fill": prep.fill, "clusters": s.get("vlad_clusters", 16),
                    "max_features": 500, "storage_options": storage_options, "image_column": image_column,
                    "seed": seed, "pca_dim": s.get("pca_dim")}
        fit_vlad_codebook(version, entries, settings)
    names = {"codebook": CODEBOOK, **({"pca": PCA} if s.get("pca_dim") else {})}
    return {key: digest(version_file(version_name, name), version.read_bytes(name)) for key, name in names.items()}


def fit_vlad_codebook(version, entries: list[dict], settings: dict) -> dict:
    """Fit the VLAD codebook on a sample of the gallery and store it in the version folder.

    `settings`: image_size, fill, clusters, max_features, storage_options, image_column, seed.
    Decoded exactly like the images that will be embedded (letterbox, content mask).
    """
    from mllm_index.actors.decode import DecodeFailure, decode_image, letterbox
    from mllm_index.storage.sources import fetch_bytes

    rng = np.random.default_rng(settings["seed"])
    descriptors, per_image, used = [], [], 0
    for entry, data in zip(entries, fetch_bytes(entries, settings["storage_options"], settings["image_column"])):
        if isinstance(data, BaseException):
            continue
        try:
            pixels = letterbox(decode_image(data, settings["image_size"], 10**9, 1 << 30)[0], settings["image_size"], settings["fill"])
        except DecodeFailure:
            continue
        _, desc = root_sift(_gray(pixels), settings["max_features"], content_mask(pixels, settings["fill"]))
        if len(desc):
            descriptors.append(desc[rng.permutation(len(desc))[:200]])
            per_image.append(desc)
            used += 1
    if not descriptors or sum(len(d) for d in descriptors) < settings["clusters"] * 4:
        raise ValueError(f"too few SIFT features in {len(entries)} sample images to fit {settings['clusters']} VLAD clusters")
    centroids = fit_codebook(np.concatenate(descriptors), settings["clusters"], settings["seed"])
    info = {"codebook": CODEBOOK, "clusters": settings["clusters"], "images": used, "descriptors": int(sum(map(len, descriptors)))}
    if settings.get("pca_dim"):  # fit on the VLAD vectors of the same sample images
        version.write_bytes(codebook_bytes(fit_pca(np.stack([vlad(d, centroids) for d in per_image]), settings["pca_dim"])), PCA)
        info["pca"] = PCA
    version.write_bytes(codebook_bytes(centroids), CODEBOOK)  # last: its presence marks the fit done
    return info
