"""Offline baselines: SIFT + RANSAC spatial verification, and SIFT-VLAD global descriptors."""

import io
import random

import numpy as np
import pytest
from PIL import Image

from mllm_index.storage.integrity import write_ref
from mllm_index.storage.uris import Location
from mllm_index.actors.classic import SpatialVerifier, VladEmbedImages, codebook_bytes, codebook_from_bytes, fit_codebook, root_sift, vlad
from mllm_index.pipelines.demo import bundled_photos
from mllm_index.pipelines.demo_set import _perspective


@pytest.fixture(scope="module")
def photos():
    return [Image.open(p).convert("RGB").resize((512, 320)) for p in bundled_photos()[:4]]


def test_spatial_verification_separates_same_object_from_other_photos(photos):
    warped = _perspective(photos[0].crop((60, 40, 400, 280)), random.Random(0), 0.08)
    verifier = SpatialVerifier()
    same = verifier.inliers(photos[0], warped)
    others = [verifier.inliers(photos[0], p) for p in photos[1:]]
    assert same >= 15 and max(others) < same / 3, (same, others)
    scores = verifier.score([(photos[0], warped), (photos[0], photos[1])])
    assert 0 <= scores[1] < scores[0] < 1


def test_vlad_is_normalised_and_discriminative(photos, tmp_path):
    descs = [root_sift(np.asarray(p.convert("L")), 300)[1] for p in photos]
    centroids = fit_codebook(np.concatenate(descs), 8)
    codebook = write_ref(Location(str(tmp_path)), "cb.npy", codebook_bytes(centroids))
    embedder = VladEmbedImages(str(tmp_path), codebook, {}, fill=(128, 128, 128))
    pixels = np.stack([np.asarray(p.resize((256, 256))) for p in photos] + [np.asarray(photos[0].resize((256, 256)).rotate(3))])
    v = embedder.embed_pixels(pixels)
    assert v.shape == (5, 8 * 128) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    sims = v @ v.T
    assert sims[0, 4] > max(sims[0, 1:4])  # a slightly rotated copy is closer than other photos
    assert np.allclose(vlad(np.zeros((0, 128), np.float32), centroids), 0)


def test_codebooks_never_load_pickle():
    assert np.array_equal(codebook_from_bytes(codebook_bytes(np.eye(3, dtype=np.float32))), np.eye(3))
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        codebook_from_bytes(buf.getvalue())


def test_vlad_pca_reduces_and_keeps_neighbours(photos, tmp_path):
    from mllm_index.actors.classic import fit_pca, project

    descs = [root_sift(np.asarray(p.convert("L")), 300)[1] for p in photos]
    centroids = fit_codebook(np.concatenate(descs), 8)
    full = np.stack([vlad(d, centroids) for d in descs])
    pca = fit_pca(full, 3)
    root = Location(str(tmp_path))
    codebook, pca_ref = write_ref(root, "cb.npy", codebook_bytes(centroids)), write_ref(root, "pca.npy", codebook_bytes(pca))
    embedder = VladEmbedImages(str(tmp_path), codebook, {}, fill=(128, 128, 128), pca=pca_ref)
    assert embedder.dim == 3
    reduced = project(full, pca)
    assert reduced.shape == (4, 3) and np.allclose(np.linalg.norm(reduced, axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="pca_dim"):
        fit_pca(full, 10)
