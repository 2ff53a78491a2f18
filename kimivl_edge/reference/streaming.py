"""The fp32 reference, layer by layer: weights streamed from the safetensors shards, one layer held at a time.

The whole-model reference (``reference.model``) widens every tensor it touches to float32 and keeps it: 4 bytes per
parameter, 64 GB at ``a3b`` size. This one runs the same formulas (``reference.vision``, ``reference.text``) in
layer-major order over a *batch* of sequences: for each vision block / decoder layer, its tensors are read from the
shards, widened to float32 on first use (only the routed experts of a MoE layer are ever read) and dropped before
the next layer. The embedding table is read by rows (only the prompt's token ids), the output head in 8 MB row
blocks. So the weights held at once are at most one layer: ``max_layer_bytes(config)``.

Tensors are read with ``pread`` from the shard files (``SafetensorsFile.read_rows``) instead of through the memory
map: mapped file pages would count in the resident set, so a 31 GB checkpoint would grow it by what it read.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..checkpoint import Checkpoint, hf_tensor_specs
from ..config import KimiVLConfig
from ..safetensors_io import bf16_to_f32
from . import text as text_ref
from . import vision as vision_ref

Progress = Callable[[str, int, int], None]  # (stage, done, total), once per layer
Draft = Callable[[int, list[int], int], list[int]]  # (prompt index, continuation so far, n) -> up to n tokens
HEAD_BLOCK_BYTES = 8 << 20


def read_f32(ckpt: Checkpoint, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of a tensor (all of it by default), read with pread and widened to float32."""
    st = ckpt.shard(ckpt.weight_map[name])
    shape = st.shape(name)
    n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    raw = st.read_rows(name, start, n_rows if stop is None else stop)
    out = bf16_to_f32(raw) if st.dtype(name) == "BF16" else raw.astype(np.float32)
    return out.reshape(shape) if stop is None else out


@dataclass
class Meter:
    """Bytes of float32 weights materialized: now, at the peak, and in total."""

    held: int = 0
    peak: int = 0
    total: int = 0

    def add(self, n: int) -> None:
        self.held += n
        self.total += n
        self.peak = max(self.peak, self.held)

    def release(self, n: int) -> None:
        self.held -= n


class LayerWeights(Mapping):
    """The tensors named ``prefix...``, each widened on first access and kept until ``close()``."""

    def __init__(self, ckpt: Checkpoint, prefix: str, meter: Meter):
        self._ck, self._prefix, self._meter = ckpt, prefix, meter
        self._store: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._store:
            if not name.startswith(self._prefix) or name not in self._ck.weight_map:
                raise KeyError(name)
            t = torch.from_numpy(read_f32(self._ck, name))
            self._meter.add(t.nbytes)
            self._store[name] = t
        return self._store[name]

    def __iter__(self) -> Iterator[str]:
        return (n for n in self._ck.weight_map if n.startswith(self._prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def close(self) -> None:
        self._meter.release(sum(t.nbytes for t in self._store.values()))
        self._store.clear()


def max_layer_bytes(cfg: KimiVLConfig) -> int:
    """float32 bytes of the largest unit held at once: a decoder layer, a vision block, the vision stem (patch
    embedding + pos-emb table) or the projector, from the config alone (``hf_tensor_specs``)."""
    units: dict[str, int] = {}
    for s in hf_tensor_specs(cfg):
        unit = _unit(s.name)
        if unit is not None:
            units[unit] = units.get(unit, 0) + 4 * int(np.prod(s.shape, dtype=np.int64))
    return max(units.values())


def _unit(name: str) -> str | None:
    """The streaming unit a tensor belongs to; None for the row-streamed embedding table and output head."""
    if name in (text_ref.MODEL + "embed_tokens.weight", text_ref.LM + "lm_head.weight"):
        return None
    parts = name.split(".")
    if name.startswith((text_ref.MODEL + "layers.", vision_ref.TOWER + "encoder.blocks.")):
        return ".".join(parts[:4])  # one decoder layer / one vision block
    if name.startswith(vision_ref.PROJ):
        return vision_ref.PROJ
    return ".".join(parts[:2])  # the vision stem, the final norms


class StreamingReference:
    """Layer-major fp32 reference over one checkpoint. ``meter`` records the weight bytes held."""

    def __init__(self, ckpt: Checkpoint, progress: Progress | None = None):
        self.ckpt, self.config = ckpt, ckpt.config
        self.meter = Meter()
        self.progress = progress
        self.passes = 0  # decoder passes of the last ``greedy``

    @contextmanager
    def layer(self, prefix: str) -> Iterator[LayerWeights]:
        w = LayerWeights(self.ckpt, prefix, self.meter)
        try:
            yield w
        finally:
            w.close()

    def _tick(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)

    # -- vision (mirrors vision_ref.encode_images) ----------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixel_values: np.ndarray, grid_hws: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Projected embeddings of packed images, [Σ gh·gw/4, text hidden] (docs/model.md §5, §6)."""
        cfg = self.config.vision
        grids = [(int(h), int(w)) for h, w in grid_hws]
        vision_ref.check_grids(cfg, grids, pixel_values.shape[0])
        with self.layer(vision_ref.TOWER + "patch_embed.") as w:
            x = vision_ref.patch_embed(w, torch.from_numpy(pixel_values).to(torch.float32))
            table = w[vision_ref.TOWER + "patch_embed.pos_emb.weight"]
            x = x + torch.cat([vision_ref.pos_emb_resample(table, gh, gw) for gh, gw in grids])
            del table
        angles = torch.cat([vision_ref.rope2d_angles(gh, gw, cfg.head_dim, cfg.rope_theta) for gh, gw in grids])
        seqlens = [gh * gw for gh, gw in grids]
        n = cfg.num_hidden_layers
        for i in range(n):
            with self.layer(vision_ref.BLOCK.format(i)) as w:
                x = vision_ref.vision_block(w, i, cfg, x, angles, seqlens)
            self._tick("vision", i + 1, n)
        final = vision_ref.TOWER + "encoder.final_layernorm."
        with self.layer(final) as w:
            x = vision_ref.layer_norm(x, w[final + "weight"], w[final + "bias"], cfg.layer_norm_eps)
        feats = torch.cat([vision_ref.merge_2x2(p, gh, gw) for p, (gh, gw) in zip(x.split(seqlens), grids)])
        with self.layer(vision_ref.PROJ) as w:
            return vision_ref.projector(w, feats)

    # -- text (mirrors text_ref.embed / decoder_forward) --------------------------------------------------------
    def embed(self, ids: Sequence[int], image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings [T, hidden], read row by row; media-pad rows replaced, in order, by ``image_embeds``."""
        name = text_ref.MODEL + "embed_tokens.weight"
        rows = {i: torch.from_numpy(read_f32(self.ckpt, name, i, i + 1)[0]) for i in sorted(set(ids))}
        e = torch.stack([rows[i] for i in ids])
        slots = torch.tensor(list(ids)) == self.config.media_placeholder_token_id
        n_rows = 0 if image_embeds is None else int(image_embeds.shape[0])
        if int(slots.sum()) != n_rows:
            raise ValueError(f"{int(slots.sum())} media placeholders but {n_rows} image embedding rows")
        if image_embeds is not None and n_rows:
            e[slots] = image_embeds.to(e.dtype)
        return e

    @torch.no_grad()
    def hidden(self, embeds: Sequence[torch.Tensor], stage: str = "decoder") -> list[torch.Tensor]:
        """The final-normed hidden states [T, hidden] of each sequence ``embeds[k]`` ([T, hidden]), all sequences
        through one layer before the next (§9.2)."""
        cfg = self.config.text
        hs = [e.float() for e in embeds]
        positions = [torch.arange(h.shape[0]) for h in hs]
        n = cfg.num_hidden_layers
        for i in range(n):
            with self.layer(text_ref.layer_prefix(i)) as w:
                hs = [text_ref.decoder_layer(h, w, cfg, i, p) for h, p in zip(hs, positions)]
            self._tick(stage, i + 1, n)
        norm = text_ref.MODEL + "norm.weight"
        with self.layer(norm) as w:
            return [text_ref.rms_norm(h, w[norm], cfg.rms_norm_eps) for h in hs]

    @torch.no_grad()
    def head(self, hs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Logits h @ lm_headᵀ of each [T, hidden], the head read in row blocks of at most HEAD_BLOCK_BYTES."""
        outs: list[list[torch.Tensor]] = [[] for _ in hs]
        for block in self.ckpt.row_blocks(text_ref.LM + "lm_head.weight", HEAD_BLOCK_BYTES):
            w = torch.from_numpy(block())
            self.meter.add(w.nbytes)
            for out, h in zip(outs, hs):
                out.append(h @ w.T)
            self.meter.release(w.nbytes)
        return [torch.cat(o, dim=-1) for o in outs]

    def forward(self, embeds: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Logits [T, vocab] of every position of each sequence."""
        return self.head(self.hidden(embeds))

    @torch.no_grad()
    def greedy(self, prompts: Sequence[tuple[Sequence[int], torch.Tensor | None]], max_new_tokens: int,
               stop_ids: Sequence[int], draft: Draft | None = None) -> list[tuple[list[int], torch.Tensor]]:
        """Each prompt's greedy continuation (up to and including a stop token) and the final-normed hidden states
        of prompt + continuation[:-1] (``head`` makes them logits), all prompts through one layer before the next.
        Prompts are (token ids with one media pad per image row, image embeddings).

        Every pass reads all the layers. Without ``draft`` a pass adds one token. With ``draft(k, continuation,
        n)`` (up to ``n`` tokens proposed for prompt ``k`` after ``continuation``, e.g. the quantized file's own
        greedy tokens), a pass checks the proposal as speculative decoding does: the proposal is kept up to the
        first token the reference would not choose, and the reference's token there is added. The continuation is
        the same either way; a right draft makes it one pass. ``passes`` counts the passes of the last call."""
        stop = {int(s) for s in stop_ids}
        conts: list[list[int]] = [[] for _ in prompts]
        states: list[torch.Tensor] = [torch.empty(0) for _ in prompts]
        active = list(range(len(prompts)))
        self.passes = 0
        while active:
            props = {k: _until_stop(draft(k, list(conts[k]), max_new_tokens - len(conts[k]) - 1), stop)
                     if draft else [] for k in active}
            embeds = [self.embed([*prompts[k][0], *conts[k], *props[k]], prompts[k][1]) for k in active]
            self.passes += 1
            hs = self.hidden(embeds, stage=f"decoder pass {self.passes}")
            starts = [len(prompts[k][0]) + len(conts[k]) - 1 for k in active]  # the row predicting the next token
            for k, h, lg in zip(active, hs, self.head([h[a:] for h, a in zip(hs, starts)])):
                for i, tok in enumerate(lg.argmax(-1).tolist()):
                    conts[k].append(int(tok))
                    if tok in stop or len(conts[k]) >= max_new_tokens or i >= len(props[k]) or tok != props[k][i]:
                        break
                states[k] = h[: len(prompts[k][0]) + len(conts[k]) - 1]
            active = [k for k in active if conts[k][-1] not in stop and len(conts[k]) < max_new_tokens]
        return list(zip(conts, states))


def _until_stop(tokens: Sequence[int], stop: set[int]) -> list[int]:
    """``tokens`` up to and including the first stop token."""
    out: list[int] = []
    for t in tokens:
        out.append(int(t))
        if t in stop:
            break
    return out
