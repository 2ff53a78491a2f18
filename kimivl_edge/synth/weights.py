"""The synthetic checkpoints' tensors: random values with realistic scales, generated in chunks (deterministic per
seed and tensor name), or given (e.g. trained) values; bf16 bits, grouped into shards.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping

import numpy as np

from ..checkpoint import TensorSpec
from ..safetensors_io import f32_to_bf16

CHUNK_ELEMS = 1 << 24  # generate at most 16 M values at a time


def weight_scale(spec: TensorSpec) -> tuple[float, float]:
    """(mean, std) of the random values of one tensor: unit-variance activations through the network."""
    name, shape = spec.name, spec.shape
    if name.endswith("inv_freq"):
        raise AssertionError("inv_freq is computed, not random")
    if "norm" in name and name.endswith(".weight"):
        return 1.0, 0.1  # LayerNorm / RMSNorm gains
    if name.endswith("e_score_correction_bias"):
        return 0.0, 0.1  # large enough to change which experts are selected
    if name.endswith(".bias"):
        return 0.0, 0.02
    if name.endswith("pos_emb.weight"):
        return 0.0, 0.2
    if name.endswith("embed_tokens.weight"):
        return 0.0, 1.0
    fan_in = int(np.prod(shape[1:]))
    return 0.0, fan_in ** -0.5


def tensor_chunks(spec: TensorSpec, seed: int, rope_theta: float) -> Iterator[np.ndarray]:
    """The tensor's bf16 bits, in chunks of the flattened tensor; deterministic per (seed, name)."""
    if spec.name.endswith("rotary_emb.inv_freq"):
        d = 2 * spec.shape[0]
        yield f32_to_bf16(1.0 / rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
        return
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    mean, std = weight_scale(spec)
    n = int(np.prod(spec.shape))
    for start in range(0, n, CHUNK_ELEMS):
        x = rng.standard_normal(min(CHUNK_ELEMS, n - start), dtype=np.float32)
        x *= std
        x += mean
        yield f32_to_bf16(x)


def plan_shards(specs: list[TensorSpec], limit: int) -> list[list[TensorSpec]]:
    """Consecutive tensors grouped into shards of at most ``limit`` bytes (a larger tensor gets its own shard)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        nbytes = 2 * int(np.prod(s.shape))
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes
    return shards


def weight_chunks(spec: TensorSpec, weights: Mapping[str, np.ndarray], rope_theta: float) -> Iterator[np.ndarray]:
    """The bf16 bits of a given (e.g. trained) float32 tensor; ``inv_freq`` buffers are computed as always."""
    if spec.name.endswith("rotary_emb.inv_freq"):
        yield from tensor_chunks(spec, 0, rope_theta)
        return
    x = np.asarray(weights[spec.name], dtype=np.float32)
    if tuple(x.shape) != tuple(spec.shape):
        raise ValueError(f"{spec.name}: given shape {list(x.shape)}, the layout needs {list(spec.shape)}")
    yield f32_to_bf16(np.ascontiguousarray(x).reshape(-1))
