"""Prefix reuse for the Qwen-VL families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) on transformers.

With the prompt layout of `mllm.prompt_messages`, a pair's tokens are
    A  <query image tokens>  B  <candidate image tokens>  C
where A, B, C are fixed text (B ends with the candidate's vision-start token). Per call:
1. every unique image is processed (resize, patchify) and encoded by the vision tower once,
   whether it is a query, a candidate, or both, and however many pairs it is in;
2. per query, the prefix A+Q+B runs through the language model once (batch 1), and its KV
   cache is expanded over each batch of that query's candidates;
3. the suffix (candidate image tokens + C) is left-padded, masked, and given its slice of the
   full sequence's 3-D M-RoPE positions (`get_rope_index` on the whole prompt, cached per pair
   of image grids), so positions are what a full forward would use;
4. only the last position's hidden state meets the LM head, and only its yes/no rows.
Qwen3-VL's DeepStack features are added at the visual positions of the part that holds them.
The model's cached `rope_deltas` (a generation helper) is cleared before and after each call.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from mllm_index.actors.mllm import cap_pixels, p_yes


@dataclass
class Encoded:
    embeds: torch.Tensor  # (tokens, hidden): the image's input embeddings
    deepstack: list[torch.Tensor] | None  # Qwen3-VL: per DeepStack layer, (tokens, hidden)
    grid: tuple[int, int, int]  # (t, h, w) patches

    @property
    def tokens(self) -> int:
        return self.embeds.shape[0]


def token_runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, t in enumerate(ids + [None]):
        if t == token and start is None:
            start = i
        elif t != token and start is not None:
            runs.append((start, i))
            start = None
    return runs


class PrefixReuse:
    def __init__(self, model, processor, text: str):
        self.model, self.core, self.processor = model, model.model, processor
        self.lm = self.core.language_model
        self.image_token = int(model.config.image_token_id)
        self.deepstack = "deepstack_visual_embeds" in inspect.signature(self.lm.forward).parameters
        self.rope_params = set(inspect.signature(self.core.get_rope_index).parameters)
        # The fixed text parts, from the processor's own output for two small images (so special
        # tokens, BOS and the template are exactly what a full prompt gets).
        from PIL import Image

        dummy = Image.new("RGB", (32, 32))
        ids = processor(images=[[dummy, dummy]], text=[text], return_tensors="pt")["input_ids"][0].tolist()
        (s1, e1), (s2, e2) = token_runs(ids, self.image_token)
        self.a, self.b, self.c = ids[:s1], ids[e1:s2], ids[e2:]
        self.positions: dict[tuple, torch.Tensor] = {}

    def _ids(self, n_query: int, n_candidate: int) -> list[int]:
        return self.a + [self.image_token] * n_query + self.b + [self.image_token] * n_candidate + self.c

    def _full_positions(self, q: Encoded, c: Encoded) -> torch.Tensor:
        """(3, L) M-RoPE positions of the whole prompt, from the model's own `get_rope_index`."""
        key = (q.grid, c.grid)
        if key not in self.positions:
            ids = torch.tensor([self._ids(q.tokens, c.tokens)], device=self.model.device)
            kwargs = {"input_ids": ids, "image_grid_thw": torch.tensor([q.grid, c.grid], device=ids.device)}
            if "mm_token_type_ids" in self.rope_params:
                kwargs["mm_token_type_ids"] = (ids == self.image_token).int()
            self.positions[key] = self.core.get_rope_index(**kwargs)[0][:, 0]
        return self.positions[key]

    def _encode(self, images: list, batch_size: int) -> list[Encoded]:
        out = []
        for i in range(0, len(images), batch_size):
            inputs = self.processor.image_processor(images=images[i : i + batch_size], return_tensors="pt")
            grid = inputs["image_grid_thw"].to(self.model.device)
            pixels = inputs["pixel_values"].to(self.model.device, self.model.dtype)
            feats = self.core.get_image_features(pixels, grid)
            embeds = feats.pooler_output if hasattr(feats, "pooler_output") else feats[0]
            deep = getattr(feats, "deepstack_features", None) if self.deepstack else None
            for j, e in enumerate(embeds):
                out.append(Encoded(e, [layer[j] for layer in deep] if deep else None, tuple(grid[j].tolist())))
        return out

    def _run(self, embeds, positions, mask=None, cache=None, visual=None, deep=None):
        kwargs = {}
        if self.deepstack and deep is not None:
            kwargs = {"visual_pos_masks": visual, "deepstack_visual_embeds": deep}
        return self.lm(inputs_embeds=embeds, position_ids=positions, attention_mask=mask, past_key_values=cache,
                       use_cache=True, **kwargs)

    def _prefix(self, q: Encoded, positions: torch.Tensor):
        ids = torch.tensor(self.a + [self.image_token] * q.tokens + self.b, device=self.model.device)
        embeds = self.lm.embed_tokens(ids).clone()
        visual = ids == self.image_token
        embeds[visual] = q.embeds.to(embeds.dtype)
        out = self._run(embeds[None], positions[:, None, : len(ids)], visual=visual[None], deep=q.deepstack)
        return [(layer.keys, layer.values) for layer in out.past_key_values.layers], len(ids)

    def _suffixes(self, q: Encoded, cands: list[Encoded], kv, prefix_len: int, scorer) -> torch.Tensor:
        dev, n = self.model.device, len(cands)
        lengths = [c.tokens + len(self.c) for c in cands]
        width = max(lengths)
        ids = torch.full((n, width), self.c[-1], device=dev)
        mask = torch.zeros((n, prefix_len + width), dtype=torch.long, device=dev)
        mask[:, :prefix_len] = 1
        positions = torch.zeros((3, n, width), dtype=torch.long, device=dev)
        for r, (c, length) in enumerate(zip(cands, lengths)):
            ids[r, width - length:] = torch.tensor([self.image_token] * c.tokens + self.c, device=dev)
            mask[r, prefix_len + width - length:] = 1
            positions[:, r, width - length:] = self._full_positions(q, c)[:, prefix_len:]
        embeds = self.lm.embed_tokens(ids).clone()
        visual = ids == self.image_token
        embeds[visual] = torch.cat([c.embeds for c in cands]).to(embeds.dtype)  # row-major: rows in order
        deep = None
        if cands[0].deepstack is not None:
            deep = [torch.cat([c.deepstack[i] for c in cands]) for i in range(len(cands[0].deepstack))]
        cache = DynamicCache(ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in kv],
                             config=self.lm.config)
        hidden = self._run(embeds, positions, mask, cache, visual, deep).last_hidden_state[:, -1]
        yes, no = scorer.answer_logits(hidden)
        s = scorer.stats
        s.forwards, s.computed_tokens = s.forwards + 1, s.computed_tokens + sum(lengths)
        s.prompt_tokens += sum(prefix_len + length for length in lengths)
        return p_yes(yes, no)

    @torch.inference_mode()
    def score(self, pairs: list, keys: list[tuple], scorer) -> np.ndarray:
        self.core.rope_deltas = None  # a generation cache; stale values must not leak between calls
        self.positions.clear()  # per call: bounded by its pairs, however many image shapes a job meets
        try:
            return self._score(pairs, keys, scorer)
        finally:
            self.core.rope_deltas = None

    def _score(self, pairs: list, keys: list[tuple], scorer) -> np.ndarray:
        images: dict = {}
        for (q, c), (kq, kc) in zip(pairs, keys):
            images.setdefault(kq, q)
            images.setdefault(kc, c)
        order = list(images)
        capped = [cap_pixels(images[k], scorer.max_pixels) for k in order]
        encoded = dict(zip(order, self._encode(capped, scorer.batch_size)))
        s = scorer.stats
        s.images, s.pairs = s.images + len(order), s.pairs + len(pairs)
        s.visual_tokens += sum(encoded[kq].tokens + encoded[kc].tokens for kq, kc in keys)  # per prompt slot
        by_query: dict = {}
        for i, (kq, _) in enumerate(keys):
            by_query.setdefault(kq, []).append(i)
        scores = np.zeros(len(pairs), np.float32)
        for kq, rows in by_query.items():
            q = encoded[kq]
            kv, prefix_len = self._prefix(q, self._full_positions(q, encoded[keys[rows[0]][1]]))
            s.forwards, s.computed_tokens = s.forwards + 1, s.computed_tokens + prefix_len
            for i in range(0, len(rows), scorer.batch_size):
                chunk = rows[i : i + scorer.batch_size]
                p = self._suffixes(q, [encoded[keys[r][1]] for r in chunk], kv, prefix_len, scorer)
                scores[chunk] = p.cpu().numpy()
        return scores
