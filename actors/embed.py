"""Embed stage: a Ray Data callable class around any transformers vision backbone.

Models load by Hugging Face id or local path through the transformers classes, so a
tiny model saved with `save_pretrained` in a test goes through the same code as
`facebook/dinov2-small`. Dual encoders (CLIP, SigLIP) load only their vision tower with
its projection. Output vectors are L2-normalised, so inner product = cosine.
"""

from __future__ import annotations

import gc
import json
import logging
from typing import TYPE_CHECKING

import numpy as np

from mllm_index.storage.contracts import Preprocessing

if TYPE_CHECKING:
    import torch

# torch and transformers are imported where they are used, not here: the registry imports this
# module, and every Ray worker that unpickles a stage function (plan reads, decode, writers)
# would otherwise spend ~2 s of CPU importing them at each job's start, competing with decode.

log = logging.getLogger(__name__)

POOLINGS = ("auto", "cls", "mean", "gem")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Dual encoders: the class that holds just the vision tower and the image projection.
VISION_TOWER_CLASS = {
    "clip": "CLIPVisionModelWithProjection",
    "siglip": "SiglipVisionModel",
    "siglip2": "Siglip2VisionModel",
}


def _size_of(value) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return value.get("height") or value.get("shortest_edge") or value.get("width")
    return None


def load_preprocessing(model: str, image_size: int | None = None) -> Preprocessing:
    """Input size and normalisation the backbone was trained with, from its saved processor.

    Reads `preprocessor_config.json` as plain JSON (no image-processor class, so no
    torchvision); falls back to the model config's image_size and ImageNet statistics.
    """
    from transformers import AutoConfig
    from transformers.utils import cached_file

    path = cached_file(model, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    proc = json.load(open(path)) if path else {}
    config = AutoConfig.from_pretrained(model)
    vision = getattr(config, "vision_config", None) or config
    size = image_size
    if size is None and proc:
        size = _size_of(proc.get("crop_size")) if proc.get("do_center_crop") else None
        size = size or _size_of(proc.get("size"))
    size = int(size or getattr(vision, "image_size", 224))
    mean = tuple(float(x) for x in proc.get("image_mean", IMAGENET_MEAN))
    std = tuple(float(x) for x in proc.get("image_std", IMAGENET_STD))
    return Preprocessing(image_size=size, image_mean=mean, image_std=std, fill=tuple(int(round(m * 255)) for m in mean))


def load_vision_model(model: str) -> torch.nn.Module:
    """The vision part of a checkpoint, refusing to run with any weight missing or re-initialised.

    transformers only warns when a weight does not fit and re-initialises it randomly;
    for an embedder that means silently wrong vectors, so here it is an error.
    """
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    name = VISION_TOWER_CLASS.get(config.model_type)
    kwargs = {}
    if name and getattr(config, "vision_config", None) is not None:
        vision = config.vision_config
        if getattr(config, "projection_dim", None):  # the projection size lives on the top-level config
            vision.projection_dim = config.projection_dim
        kwargs["config"] = vision
    if name is None and config.architectures:
        name = config.architectures[0] if hasattr(transformers, config.architectures[0]) else None
    cls = getattr(transformers, name) if name else transformers.AutoModel
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the text tower's weights are "unexpected" here, by design
    try:
        # safetensors only: a .bin checkpoint is a pickle, and no pickle is loaded from storage.
        loaded, info = cls.from_pretrained(model, output_loading_info=True, use_safetensors=True, **kwargs)
    except RuntimeError as exc:  # transformers' own size-mismatch error
        raise ValueError(f"{model}: weights of {cls.__name__} missing or of the wrong shape: {str(exc)[:300]}") from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
    bad = sorted(info.get("missing_keys", [])) + sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", []))
    if bad:
        raise ValueError(f"{model}: {len(bad)} weight(s) of {cls.__name__} missing or of the wrong shape "
                         f"(they would be random): {', '.join(bad[:5])}")
    return loaded.eval()


def pool_tokens(hidden: torch.Tensor, pooling: str, prefix_tokens: int, gem_p: float) -> torch.Tensor:
    """Global descriptor from token features: CLS, mean of patch tokens, or GeM of patch tokens."""
    if pooling == "cls":
        return hidden[:, 0]
    patches = hidden[:, prefix_tokens:] if hidden.shape[1] > prefix_tokens else hidden
    if pooling == "mean":
        return patches.mean(1)
    if pooling == "gem":
        return patches.clamp(min=1e-6).pow(gem_p).mean(1).pow(1.0 / gem_p)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def _pixel_conv(model, probe):
    """The Conv2d that receives the model's pixel tensor itself (same storage: no resize, crop or
    cast before it), or None. Found by running the model once, not by class or attribute names."""
    import torch

    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(m) if args and args[0].data_ptr() == probe.data_ptr() else None)
             for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels == probe.shape[1]]
    try:
        model(pixel_values=probe)
    finally:
        for h in hooks:
            h.remove()
    return seen[0] if len(seen) == 1 else None


def fold_normalisation(model, mean, inv_std, image_size: int) -> bool:
    """Fold the per-channel (x - mean) * inv_std into the convolution that first sees the pixels.

    Why: on a CPU, the two elementwise passes over a batch's float pixels cost about as much
    as the forward pass of a small backbone; a ViT's patch embedding (stride = kernel, no
    padding) is linear in its input, so W' = W * inv_std and b' = b - sum(W * mean * inv_std)
    give the same output from the raw 0..255 pixels. Only a conv without padding qualifies
    (zero padding of normalised pixels is not zero padding of raw ones), and the fold is kept
    only if the embeddings match the unfolded ones on a probe batch; otherwise nothing changes.
    """
    import torch

    with torch.no_grad():  # not inference_mode: the folded weights stay ordinary tensors
        raw = torch.rand(2, image_size, image_size, 3, device=mean.device).mul_(255).round_()
        normalised = ((raw - mean) * inv_std).permute(0, 3, 1, 2)
        conv = _pixel_conv(model, normalised)
        if conv is None or conv.groups != 1 or conv.padding == "same" or any(conv.padding if isinstance(conv.padding, tuple) else ()):
            return False

        def out(pixels):
            o = model(pixel_values=pixels)
            parts = [getattr(o, name, None) for name in ("image_embeds", "pooler_output", "last_hidden_state")]
            return torch.cat([t.flatten(1) for t in parts if t is not None], 1) if any(t is not None for t in parts) else None

        want = out(normalised)
        if want is None:  # nothing to compare the folded model's output with
            return False
        weight, bias = conv.weight.detach().clone(), None if conv.bias is None else conv.bias.detach().clone()
        shift = (weight * (mean * inv_std).view(1, -1, 1, 1).to(weight.dtype)).sum((1, 2, 3))
        conv.weight.copy_(weight * inv_std.view(1, -1, 1, 1).to(weight.dtype))
        if conv.bias is None:
            conv.bias = torch.nn.Parameter(-shift, requires_grad=False)
        else:
            conv.bias.copy_(bias - shift)
        got = out(raw.permute(0, 3, 1, 2))
        if torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max())):
            return True
        conv.weight.copy_(weight)
        if bias is None:
            conv.bias = None
        else:
            conv.bias.copy_(bias)
        return False


class PixelEmbedder:
    """The Ray Data side of an embedder: decoded rows in, rows with a float16 `embedding` out.

    Subclasses provide `dim` and `embed_pixels((B, S, S, 3) uint8) -> (B, dim)`. Rows that
    failed to decode pass through with a zero vector and never reach the model.
    """

    dim: int

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch.pop("pixels")
        ok = batch["ok"].astype(bool)
        embedding = np.zeros((len(ok), self.dim), np.float16)
        if ok.any():
            embedding[ok] = self.embed_pixels(pixels[ok]).astype(np.float16)
        batch["embedding"] = embedding
        return batch


class EmbedImages(PixelEmbedder):
    """A transformers vision backbone; on CUDA the forward pass runs under bf16/fp16 autocast."""

    def __init__(self, model: str, image_size: int, image_mean, image_std, pooling: str = "auto", gem_p: float = 3.0,
                 dtype: str = "auto", device: str = "auto", num_threads: int | None = None):
        import torch

        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if num_threads:
            torch.set_num_threads(max(1, int(num_threads)))
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
        self.autocast = {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
        if self.device.type != "cuda":
            self.autocast = None  # CPU inference stays float32: bf16 on CPU is slower and less exact
        self.model = load_vision_model(model).to(self.device)
        self.pooling, self.gem_p = pooling, gem_p
        config = self.model.config
        self.prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        # Normalise in NHWC, in place, then hand the model a channels-last view: half the
        # memory traffic of permute-then-normalise (which costs more than a tiny model).
        self.mean = torch.tensor(image_mean, dtype=torch.float32, device=self.device) * 255
        self.inv_std = 1.0 / (torch.tensor(image_std, dtype=torch.float32, device=self.device) * 255)
        self.folded = fold_normalisation(self.model, self.mean, self.inv_std, image_size)
        # One warm-up forward: fixes the output width, so all-failed batches keep the same shape.
        self.dim = self.embed_pixels(np.zeros((1, image_size, image_size, 3), np.uint8)).shape[1]
        # torch, transformers and the model are ~10^6 objects that live as long as the actor: out of
        # the collector's sight, the process exits in ~0.1 s instead of ~0.6 s of CPU (it exits while
        # the job trains and fills shards) and full collections do not walk them while embedding.
        gc.freeze()

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) uint8 -> (B, D) float32, L2-normalised."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)  # uint8 upload: 4x less than float
            x = x.float() if self.folded else x.float().sub_(self.mean).mul_(self.inv_std)
            x = x.permute(0, 3, 1, 2)
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                out = self.model(pixel_values=x)
                if self.pooling == "auto":
                    vec = getattr(out, "image_embeds", None)
                    if vec is None:
                        vec = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state[:, 0]
                else:
                    vec = pool_tokens(out.last_hidden_state, self.pooling, self.prefix_tokens, self.gem_p)
            vec = torch.nn.functional.normalize(vec.float(), dim=-1)
            return vec.cpu().numpy()
