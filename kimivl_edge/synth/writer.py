"""Writing a whole synthetic checkpoint into a directory: the small files, the tokenizer, the weight shards."""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from ..checkpoint import INDEX_FILE, hf_tensor_specs
from ..config import KimiVLConfig
from ..safetensors_io import write_safetensors
from ..tokenizer import N_SPECIAL
from .presets import PRESET_DIMS, config_files, scaled_config_dict
from .template import KIMI_VL_CHAT_TEMPLATE
from .vocab import build_vocab, write_tiktoken_model, write_tokenizer_config
from .weights import plan_shards, tensor_chunks, weight_chunks

# Shard size limits: the tiny checkpoint is still split into several shards, like the real one.
SHARD_BYTES = {"tiny": 3_000_000, "a3b": 4_000_000_000}
REMOTE_CODE_FILES = ("configuration_kimi_vl.py", "modeling_kimi_vl.py", "tokenization_moonshot.py",
                     "image_processing_kimi_vl.py", "processing_kimi_vl.py")


def write_checkpoint(outdir: Path, preset: str, variant: str, seed: int, progress: bool = False,
                     weights: Mapping[str, np.ndarray] | None = None, layers: int | None = None) -> None:
    """Write the whole checkpoint into ``outdir`` (which must exist and be empty).

    ``weights`` (HF name -> float32 array) replaces the random values, rounded to bf16 (e.g. a trained model).
    ``layers``: text and vision depth (default: the preset's), see ``scaled_config_dict``."""
    cfg_dict = scaled_config_dict(preset, variant, layers)
    cfg = KimiVLConfig.from_dict(cfg_dict)
    base = PRESET_DIMS[preset]["base_vocab"]
    assert cfg.text.vocab_size == base + N_SPECIAL

    for name, obj in config_files(cfg_dict, variant).items():
        (outdir / name).write_text(json.dumps(obj, indent=2) + "\n")
    (outdir / "chat_template.jinja").write_text(KIMI_VL_CHAT_TEMPLATE)
    write_tiktoken_model(outdir / "tiktoken.model", {t: r for r, t in enumerate(build_vocab(base))})
    write_tokenizer_config(outdir / "tokenizer_config.json", base, chat_template=KIMI_VL_CHAT_TEMPLATE)
    for f in REMOTE_CODE_FILES:
        (outdir / f).write_text('raise RuntimeError("synthetic kimivl-edge checkpoint: its remote code must never '
                                'be imported or executed")\n')
    if weights is not None:
        (outdir / "README.md").write_text(
            f"# Trained tiny Kimi-VL-A3B-{variant.title()} ({preset})\n\nWeights trained on the synthetic visual "
            "task of training/tasks.py by `python -m training.train`, written in the Hugging Face layout (bf16).\n")
    else:
        (outdir / "README.md").write_text(
            f"# Synthetic Kimi-VL-A3B-{variant.title()} ({preset})\n\nRandom weights in the Hugging Face layout, "
            f"written by `kimivl-edge synth --preset {preset} --variant {variant} --seed {seed}`. Not a trained "
            "model.\n")

    specs = hf_tensor_specs(cfg)
    shards = plan_shards(specs, SHARD_BYTES[preset])
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = sum(2 * int(np.prod(s.shape)) for s in specs)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="synth")

    by_name = {s.name: s for s in specs}

    def produce(name: str, shape: tuple[int, ...], dtype: str) -> Iterator[np.ndarray]:
        chunks = (tensor_chunks(by_name[name], seed, cfg.text.rope_theta) if weights is None else
                  weight_chunks(by_name[name], weights, cfg.text.rope_theta))
        for chunk in chunks:
            if bar is not None:
                bar.update(chunk.nbytes)
            yield chunk

    for k, group in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        write_safetensors(outdir / fname, [(s.name, s.shape, "BF16") for s in group], produce)
        weight_map.update({s.name: fname for s in group})
    if bar is not None:
        bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (outdir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
