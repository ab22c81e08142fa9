"""The embed actor must give what the reference transformers call gives, L2-normalised."""

import numpy as np
import pytest
import torch

from mllm_index.actors.embed import EmbedImages, fold_normalisation, load_preprocessing


def pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def normalised_input(px: np.ndarray, prep: dict) -> torch.Tensor:
    x = torch.from_numpy(px).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(prep.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


def reference(vec: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(vec, dim=-1).detach().numpy()


def make(model: str, pooling: str = "auto") -> tuple[EmbedImages, dict]:
    prep = load_preprocessing(model)
    return EmbedImages(model, prep.image_size, prep.image_mean, prep.image_std, pooling=pooling, device="cpu"), prep


def test_preprocessing_comes_from_the_saved_processor(tiny_dinov2, tiny_clip, tiny_siglip):
    assert load_preprocessing(tiny_dinov2).image_size == 56  # crop_size, not the resize size
    assert load_preprocessing(tiny_clip).image_size == 32
    siglip = load_preprocessing(tiny_siglip)
    assert siglip.image_size == 32 and siglip.image_mean == (0.5, 0.5, 0.5)
    assert load_preprocessing(tiny_dinov2, image_size=84).image_size == 84


def test_dinov2_cls_matches_transformers(tiny_dinov2):
    from transformers import Dinov2Model

    embedder, prep = make(tiny_dinov2)
    px = pixels(3, 56)
    ours = embedder.embed_pixels(px)
    with torch.no_grad():
        ref = Dinov2Model.from_pretrained(tiny_dinov2).eval()(pixel_values=normalised_input(px, prep)).pooler_output
    np.testing.assert_allclose(ours, reference(ref), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean", "gem"])
def test_dinov2_token_poolings(tiny_dinov2, pooling):
    from transformers import Dinov2Model

    embedder, prep = make(tiny_dinov2, pooling)
    px = pixels(2, 56, seed=1)
    with torch.no_grad():
        hidden = Dinov2Model.from_pretrained(tiny_dinov2).eval()(pixel_values=normalised_input(px, prep)).last_hidden_state
    patches = hidden[:, 1:]
    expected = {"cls": hidden[:, 0], "mean": patches.mean(1), "gem": patches.clamp(min=1e-6).pow(3).mean(1).pow(1 / 3)}[pooling]
    np.testing.assert_allclose(embedder.embed_pixels(px), reference(expected), atol=1e-5)


def test_clip_uses_the_projected_image_embedding(tiny_clip):
    from transformers import CLIPModel

    embedder, prep = make(tiny_clip)
    px = pixels(2, 32, seed=2)
    with torch.no_grad():
        ref = CLIPModel.from_pretrained(tiny_clip).eval().get_image_features(pixel_values=normalised_input(px, prep)).pooler_output
    assert embedder.dim == 24  # projection_dim, not the tower's hidden size
    np.testing.assert_allclose(embedder.embed_pixels(px), reference(ref), atol=1e-5)


def test_siglip_uses_the_pooled_image_embedding(tiny_siglip):
    from transformers import SiglipModel

    embedder, prep = make(tiny_siglip)
    px = pixels(2, 32, seed=3)
    with torch.no_grad():
        ref = SiglipModel.from_pretrained(tiny_siglip).eval().get_image_features(pixel_values=normalised_input(px, prep)).pooler_output
    np.testing.assert_allclose(embedder.embed_pixels(px), reference(ref), atol=1e-5)


def test_failed_rows_pass_through_with_zero_vectors(tiny_dinov2):
    embedder, _ = make(tiny_dinov2)
    batch = {"image_id": np.arange(3), "ok": np.array([True, False, True]), "pixels": pixels(3, 56)}
    out = embedder(batch)
    assert "pixels" not in out and out["embedding"].dtype == np.float16
    assert out["embedding"].shape == (3, embedder.dim)
    assert not out["embedding"][1].any() and out["embedding"][0].any()
    all_failed = embedder({"image_id": np.arange(2), "ok": np.array([False, False]), "pixels": pixels(2, 56)})
    assert all_failed["embedding"].shape == (2, embedder.dim)


def test_unknown_pooling_is_refused(tiny_dinov2):
    with pytest.raises(ValueError, match="pooling must be one of"):
        make(tiny_dinov2, "max")


def test_a_checkpoint_that_does_not_fit_is_an_error_not_random_weights(tiny_dinov2, tmp_path):
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dinov2, broken)
    config = json.loads((broken / "config.json").read_text())
    config["hidden_size"] = 48  # the saved weights are 32 wide
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing or of the wrong shape"):
        make(str(broken))


def test_normalisation_is_folded_into_the_patch_embedding(tiny_dinov2, tiny_clip, tiny_siglip):
    """The three backbones above match transformers with the fold in place; here: it is in place."""
    for model in (tiny_dinov2, tiny_clip, tiny_siglip):
        assert make(model)[0].folded, model


class _Output:
    def __init__(self, hidden):
        self.last_hidden_state = hidden


class _ConvNet(torch.nn.Module):
    """The transformers calling convention (`pixel_values=`), with a first conv we choose."""

    def __init__(self, padding: int, peek: bool = False):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 4, stride=4, padding=padding)
        self.peek = peek

    def forward(self, pixel_values):
        hidden = self.conv(pixel_values).flatten(2).transpose(1, 2)
        if self.peek:  # a model that also reads the pixels elsewhere: folding would change its output
            hidden = hidden + pixel_values.mean()
        return _Output(hidden)


@pytest.mark.parametrize("padding, peek, folds", [(0, False, True), (1, False, False), (0, True, False)])
def test_folding_only_where_the_output_stays_the_same(padding, peek, folds):
    torch.manual_seed(0)
    net = _ConvNet(padding, peek).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]) * 255
    inv_std = 1 / (torch.tensor([0.229, 0.224, 0.225]) * 255)
    raw = torch.from_numpy(pixels(2, 16).astype(np.float32)).permute(0, 3, 1, 2)
    normalised = (raw - mean.view(1, 3, 1, 1)) * inv_std.view(1, 3, 1, 1)
    with torch.no_grad():
        want = net(pixel_values=normalised).last_hidden_state
        weight = net.conv.weight.clone()
        assert fold_normalisation(net, mean, inv_std, 16) is folds
        if folds:
            torch.testing.assert_close(net(pixel_values=raw).last_hidden_state, want, rtol=1e-4, atol=1e-4)
        else:  # left exactly as it was
            assert torch.equal(net.conv.weight, weight)
            torch.testing.assert_close(net(pixel_values=normalised).last_hidden_state, want)


def test_stage_modules_do_not_import_torch():
    """Every Ray worker that runs a plan read, decode or writer task unpickles functions from these
    modules: importing torch and transformers there cost ~2 s of CPU per worker at each job's start."""
    import subprocess
    import sys

    code = ("import sys, mllm_index.pipelines.stages, mllm_index.pipelines.part_chunks, mllm_index.actors.registry; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
