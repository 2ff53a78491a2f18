"""`kimivl-edge synth`: a synthetic Kimi-VL checkpoint in exactly the Hugging Face layout.

The directory looks like a download of ``moonshotai/Kimi-VL-A3B-*``: config.json with every key, bf16 safetensors
shards + index (real tensor names, including the ``rotary_emb.inv_freq`` buffers), tiktoken.model, tokenizer_config.json
with the special tokens right after the base vocabulary, chat_template.jinja, preprocessor_config.json,
generation_config.json, and remote-code file names whose contents refuse to run (nothing may import them).

Weights are random with realistic scales, generated tensor by tensor in chunks and streamed to disk, so the a3b preset
(16.4 B parameters, ~33 GB) never sits in RAM. The output is written to a temporary sibling directory and renamed into
place at the end: an interrupted run leaves nothing behind.

    kimivl-edge synth OUTDIR [--preset tiny|a3b] [--variant instruct|thinking|thinking-2506] [--seed N] [--force]
"""
from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from .checkpoint import INDEX_FILE, TensorSpec, hf_tensor_specs
from .config import N_SPECIAL, PRESET_DIMS, PRESETS, VARIANTS, KimiVLConfig, preset_config_dict
from .errors import UsageError
from .prompt import KIMI_VL_CHAT_TEMPLATE
from .safetensors_io import f32_to_bf16, write_safetensors
from .tokenizer import train_bpe, write_tiktoken_model, write_tokenizer_config

# Shard size limits: the tiny checkpoint is still split into several shards, like the real one.
SHARD_BYTES = {"tiny": 3_000_000, "a3b": 4_000_000_000}
CHUNK_ELEMS = 1 << 24  # generate at most 16 M values at a time
IN_TOKEN_LIMIT = {"instruct": 4096, "thinking": 4096, "thinking-2506": 16384}
REMOTE_CODE_FILES = ("configuration_kimi_vl.py", "modeling_kimi_vl.py", "tokenization_moonshot.py",
                     "image_processing_kimi_vl.py", "processing_kimi_vl.py")

_COLOURS = "red green blue yellow purple orange black white grey pink brown cyan".split()
_SHAPES = "circle square triangle star rectangle ellipse cross diamond hexagon line".split()
_PLACES = "left right top bottom centre middle corner edge upper lower".split()
_TEXT = """\
You are a helpful assistant. What is in the picture? Describe the image in detail. Answer with a point (x, y).
Read the word written in the image. Compare the two images. How many shapes are there? Which side is it on?
Let me think step by step about the question before answering. Yes. No. The answer is
def main():\n    print("hello, world")\n    return 0\n
Kimi-VL is a vision-language model: mixture of experts, multi-head latent attention, MoonViT.
中文English混合 こんにちは 안녕하세요 Привет мир café naïve résumé 1234567890 3.14159 100% $5 #1 @user
"""


# The trained tiny model's task (training/tasks.py): its answers, alone on a line as the assistant turn starts
# without a space, and its questions, so that answers and prompts are short in tokens.
_ANSWERS = ("red green blue yellow purple orange circle square triangle star left right first second "
            "1 2 3").split()
_QUESTIONS = """\
What colour is the circle? What shape is the red one? How many shapes are there? Which image has more shapes?
Is the blue star on the left or the right? Where is the green square? Answer with a point (x, y).
What number is written in the image?
"""


def corpus() -> str:
    """Deterministic training text for the synthetic BPE: the words a small visual-question task needs."""
    lines = [_TEXT]
    lines += [_QUESTIONS] * 8
    lines += ["\n".join(_ANSWERS)] * 8
    lines += [f"({x}, {x + 10})\n{x}" for x in range(0, 300, 10)] * 3
    lines += [" ".join(str(n) for n in range(10, 100))] * 3
    for i, c in enumerate(_COLOURS):
        for j, sh in enumerate(_SHAPES):
            p = _PLACES[(i + j) % len(_PLACES)]
            lines.append(f"The {c} {sh} is on the {p} of the image. There are {i + j} {sh}s at ({i * 37}, {j * 23}).")
            lines.append(f"Where is the {c} {sh}? How many {c} {sh}s are there? Is the {sh} {c}?")
    return "\n".join(lines)


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


def build_vocab(n_base: int) -> list[bytes]:
    """Base vocabulary: BPE trained on corpus(); once the corpus has no pairs left, train_bpe completes it with
    synthetic tokens that are still valid merges (llama.cpp rebuilds merges from the ranks)."""
    return train_bpe([corpus()], n_base - 256)


def _config_files(cfg: dict, variant: str, base: int) -> dict[str, object]:
    t = cfg["text_config"]
    gen = ({"eos_token_id": [t["eos_token_id"]]} if variant == "thinking-2506" else
           {"bos_token_id": t["bos_token_id"], "eos_token_id": t["eos_token_id"],
            "pad_token_id": t["pad_token_id"]})
    gen["transformers_version"] = cfg["transformers_version"]
    pre = {
        "auto_map": {"AutoImageProcessor": "image_processing_kimi_vl.KimiVLImageProcessor",
                     "AutoProcessor": "processing_kimi_vl.KimiVLProcessor"},
        "image_processor_type": "KimiVLImageProcessor",
        "processor_class": "KimiVLProcessor",
        "patch_size": cfg["vision_config"]["patch_size"],
        "merge_kernel_size": cfg["vision_config"]["merge_kernel_size"],
        "pad_input": True,
        "in_token_limit": IN_TOKEN_LIMIT[variant],
        "num_pooled_tokens": 1024,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    return {"config.json": cfg, "generation_config.json": gen, "preprocessor_config.json": pre}


def weight_chunks(spec: TensorSpec, weights: Mapping[str, np.ndarray], rope_theta: float) -> Iterator[np.ndarray]:
    """The bf16 bits of a given (e.g. trained) float32 tensor; ``inv_freq`` buffers are computed as always."""
    if spec.name.endswith("rotary_emb.inv_freq"):
        yield from tensor_chunks(spec, 0, rope_theta)
        return
    x = np.asarray(weights[spec.name], dtype=np.float32)
    if tuple(x.shape) != tuple(spec.shape):
        raise ValueError(f"{spec.name}: given shape {list(x.shape)}, the layout needs {list(spec.shape)}")
    yield f32_to_bf16(np.ascontiguousarray(x).reshape(-1))


def scaled_config_dict(preset: str, variant: str, layers: int | None = None) -> dict:
    """The preset's config.json; with ``layers``, the text and vision towers are ``layers`` deep (a scaled-down
    model for benchmarks on small disks; every other dimension stays the preset's)."""
    cfg = preset_config_dict(preset, variant)
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise UsageError(f"layers must be a positive integer, got {layers!r}")
        cfg["text_config"]["num_hidden_layers"] = layers
        cfg["vision_config"]["num_hidden_layers"] = layers
    return cfg


def write_checkpoint(outdir: Path, preset: str, variant: str, seed: int, progress: bool = False,
                     weights: Mapping[str, np.ndarray] | None = None, layers: int | None = None) -> None:
    """Write the whole checkpoint into ``outdir`` (which must exist and be empty).

    ``weights`` (HF name -> float32 array) replaces the random values, rounded to bf16 (e.g. a trained model).
    ``layers``: text and vision depth (default: the preset's), see ``scaled_config_dict``."""
    cfg_dict = scaled_config_dict(preset, variant, layers)
    cfg = KimiVLConfig.from_dict(cfg_dict)
    base = PRESET_DIMS[preset]["base_vocab"]
    assert cfg.text.vocab_size == base + N_SPECIAL

    for name, obj in _config_files(cfg_dict, variant, base).items():
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

    def produce(name, shape, dtype, _specs={s.name: s for s in specs}):
        chunks = (tensor_chunks(_specs[name], seed, cfg.text.rope_theta) if weights is None else
                  weight_chunks(_specs[name], weights, cfg.text.rope_theta))
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


def synth(outdir: str | Path, preset: str = "tiny", variant: str = "instruct", seed: int = 0,
          force: bool = False, progress: bool = False, weights: Mapping[str, np.ndarray] | None = None,
          layers: int | None = None) -> Path:
    """Create a synthetic checkpoint at ``outdir`` atomically (temporary sibling directory, then rename); with
    ``weights`` its tensors are those values (bf16) instead of random ones. ``layers`` scales the text and vision
    depth down (random weights of the kept layers are those of the full-depth checkpoint: per seed and name)."""
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    if variant not in VARIANTS:
        raise UsageError(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} exists and is not empty (use --force to replace it)")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"parent directory {parent} does not exist")
    need = sum(2 * int(np.prod(s.shape)) for s in hf_tensor_specs(KimiVLConfig.from_dict(
        scaled_config_dict(preset, variant, layers))))
    free = shutil.disk_usage(parent).free
    if need > free:
        raise UsageError(f"not enough disk space in {parent}: need {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
    tmp = parent / f".{out.name}.partial-{os.getpid()}"
    tmp.mkdir()
    try:
        write_checkpoint(tmp, preset, variant, seed, progress=progress, weights=weights, layers=layers)
        if out.is_dir():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    from .cli import OneLineParser

    ap = OneLineParser(prog="kimivl-edge synth", description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", help="directory to create (must not exist or be empty, unless --force)")
    ap.add_argument("--preset", default="tiny", help="tiny (a few MB) or a3b (the real dimensions, ~33 GB)")
    ap.add_argument("--variant", default="instruct", help="instruct, thinking or thinking-2506")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace a non-empty OUTDIR")
    args = ap.parse_args(argv)
    out = synth(args.outdir, args.preset, args.variant, args.seed, args.force, progress=args.preset == "a3b")
    print(f"wrote {args.preset} {args.variant} checkpoint to {out}")
    return 0
