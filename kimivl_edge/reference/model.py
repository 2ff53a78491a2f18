"""The fp32 reference model: an HF checkpoint directory -> answers, with no quantization and no llama.cpp.

Data flows one way: messages -> chat template -> tokens (media pads expanded) and images -> preprocessing ->
MoonViT -> projector -> rows injected at the media pads -> decoder -> greedy tokens -> text.
This is the yardstick the quantized runtime is measured against; it is exact, not fast.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..errors import CheckpointError
from ..image import ImageProcessorConfig, ImageSource, image_token_counts, preprocess
from ..prompt import expand_media, load_chat_template, render
from ..tokenizer import Tokenizer
from . import text as text_ref
from . import vision as vision_ref

CACHE_LIMIT_PARAMS = 1_000_000_000  # above this (fp32 = 4 GB), tensors are widened on each use instead of cached


class LazyWeights(Mapping):
    """HF tensor name -> float32 torch tensor, widened from the memory-mapped bf16 shards on first access."""

    def __init__(self, ckpt: Checkpoint, cache: bool):
        self._ck, self._cache = ckpt, cache
        self._store: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._store:
            return self._store[name]
        if name not in self._ck.weight_map:
            raise KeyError(name)
        t = torch.from_numpy(self._ck.float32(name))
        if self._cache:
            self._store[name] = t
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self._ck.weight_map)

    def __len__(self) -> int:
        return len(self._ck.weight_map)


def image_parts(messages: list[dict]) -> list[ImageSource]:
    """The image sources of all messages, in textual order (the order of the media pads)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            for part in content:
                if part.get("type") == "image" or "image" in part or "image_url" in part:
                    src = part.get("image", part.get("image_url"))
                    if isinstance(src, dict):  # OpenAI style {"image_url": {"url": ...}}
                        src = src.get("url")
                    out.append(src)
    return out


@dataclass
class Prepared:
    input_ids: list[int]
    pixel_values: np.ndarray | None
    grid_hws: np.ndarray | None


class ReferenceModel:
    def __init__(self, path: str | Path):
        self.ckpt = Checkpoint(path)
        self.config = self.ckpt.config
        self.tokenizer = Tokenizer.from_checkpoint(path)
        self.image_config = ImageProcessorConfig.from_checkpoint(path)
        self.chat_template = load_chat_template(path)
        if self.tokenizer.media_pad_id != self.config.media_placeholder_token_id:
            raise CheckpointError(
                f"<|media_pad|> is id {self.tokenizer.media_pad_id} in tokenizer_config.json but "
                f"media_placeholder_token_id is {self.config.media_placeholder_token_id} in config.json")
        n_params = sum(int(np.prod(self.ckpt.shard(s).shape(n))) for n, s in self.ckpt.weight_map.items())
        self.weights = LazyWeights(self.ckpt, cache=n_params <= CACHE_LIMIT_PARAMS)

    # -- stages -----------------------------------------------------------------------------------------------
    def prepare(self, messages: list[dict], max_patches: int | None = None) -> Prepared:
        prompt = render(self.chat_template, messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(prompt)
        images = image_parts(messages)
        if not images:
            return Prepared(expand_media(ids, self.tokenizer.media_pad_id, []), None, None)
        pv, grid = preprocess(images, self.image_config, max_patches=max_patches)
        ids = expand_media(ids, self.tokenizer.media_pad_id, image_token_counts(grid))
        return Prepared(ids, pv, grid)

    @torch.no_grad()
    def image_embeds(self, pixel_values: np.ndarray, grid_hws: np.ndarray) -> torch.Tensor:
        grids = [(int(h), int(w)) for h, w in grid_hws]
        return vision_ref.encode_images(self.weights, self.config.vision, torch.from_numpy(pixel_values), grids)

    def _embeds(self, p: Prepared) -> torch.Tensor | None:
        if p.pixel_values is None or p.grid_hws is None:
            return None
        return self.image_embeds(p.pixel_values, p.grid_hws)

    @torch.no_grad()
    def logits(self, p: Prepared) -> torch.Tensor:
        emb = self._embeds(p)
        x = text_ref.embed(self.weights, self.config.text, torch.tensor(p.input_ids), emb,
                           self.config.media_placeholder_token_id)
        return text_ref.decoder_forward(self.weights, self.config.text, x)

    @torch.no_grad()
    def generate_ids(self, p: Prepared, max_new_tokens: int = 32) -> list[int]:
        emb = self._embeds(p)
        return text_ref.greedy_generate(self.weights, self.config.text, torch.tensor(p.input_ids), emb,
                                        self.config.media_placeholder_token_id, max_new_tokens,
                                        sorted(self.tokenizer.stop_ids))

    def generate(self, messages: list[dict], max_new_tokens: int = 32) -> str:
        """Greedy answer to ``messages`` (stop tokens excluded from the text)."""
        return self.decode_answer(self.generate_ids(self.prepare(messages), max_new_tokens))

    def decode_answer(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.tokenizer.stop_ids])
