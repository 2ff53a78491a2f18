"""Synthetic checkpoints: the a3b layout against docs/model.md, the tiny files on disk, bad input.

The expected a3b names and shapes are written here from docs/model.md §3 (tables and counts), not from the code.
"""
from __future__ import annotations

import base64
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared import edit_json, run_cli, shards
from kimivl_edge import synth as synth_mod
from kimivl_edge.synth import writer as synth_writer
from kimivl_edge.checkpoint import Checkpoint, hf_tensor_specs
from kimivl_edge.errors import CheckpointError, UsageError
from kimivl_edge.safetensors_io import SafetensorsFile, bf16_to_f32
from kimivl_edge.synth import preset_config, preset_config_dict


def doc_a3b_tensors() -> dict[str, tuple[int, ...]]:
    """docs/model.md §3.1–3.3, transcribed."""
    t: dict[str, tuple[int, ...]] = {
        "vision_tower.patch_embed.proj.weight": (1152, 3, 14, 14),
        "vision_tower.patch_embed.proj.bias": (1152,),
        "vision_tower.patch_embed.pos_emb.weight": (64, 64, 1152),
        "vision_tower.encoder.final_layernorm.weight": (1152,),
        "vision_tower.encoder.final_layernorm.bias": (1152,),
        "multi_modal_projector.pre_norm.weight": (1152,),
        "multi_modal_projector.pre_norm.bias": (1152,),
        "multi_modal_projector.linear_1.weight": (4608, 4608),
        "multi_modal_projector.linear_1.bias": (4608,),
        "multi_modal_projector.linear_2.weight": (2048, 4608),
        "multi_modal_projector.linear_2.bias": (2048,),
        "language_model.model.embed_tokens.weight": (163840, 2048),
        "language_model.lm_head.weight": (163840, 2048),
        "language_model.model.norm.weight": (2048,),
    }
    for i in range(27):
        b = f"vision_tower.encoder.blocks.{i}."
        t |= {b + "norm0.weight": (1152,), b + "norm0.bias": (1152,), b + "norm1.weight": (1152,),
              b + "norm1.bias": (1152,), b + "wqkv.weight": (3456, 1152), b + "wqkv.bias": (3456,),
              b + "wo.weight": (1152, 1152), b + "wo.bias": (1152,), b + "mlp.fc0.weight": (4304, 1152),
              b + "mlp.fc0.bias": (4304,), b + "mlp.fc1.weight": (1152, 4304), b + "mlp.fc1.bias": (1152,)}
    for i in range(27):
        L = f"language_model.model.layers.{i}."
        t |= {L + "input_layernorm.weight": (2048,), L + "post_attention_layernorm.weight": (2048,),
              L + "self_attn.q_proj.weight": (3072, 2048), L + "self_attn.kv_a_proj_with_mqa.weight": (576, 2048),
              L + "self_attn.kv_a_layernorm.weight": (512,), L + "self_attn.kv_b_proj.weight": (4096, 512),
              L + "self_attn.o_proj.weight": (2048, 2048), L + "self_attn.rotary_emb.inv_freq": (32,)}
        if i == 0:
            t |= {L + "mlp.gate_proj.weight": (11264, 2048), L + "mlp.up_proj.weight": (11264, 2048),
                  L + "mlp.down_proj.weight": (2048, 11264)}
            continue
        t |= {L + "mlp.gate.weight": (64, 2048), L + "mlp.gate.e_score_correction_bias": (64,)}
        for e in range(64):
            x = L + f"mlp.experts.{e}."
            t |= {x + "gate_proj.weight": (1408, 2048), x + "up_proj.weight": (1408, 2048),
                  x + "down_proj.weight": (2048, 1408)}
        t |= {L + "mlp.shared_experts.gate_proj.weight": (2816, 2048),
              L + "mlp.shared_experts.up_proj.weight": (2816, 2048),
              L + "mlp.shared_experts.down_proj.weight": (2048, 2816)}
    return t


def test_a3b_layout_matches_reference_doc():
    specs = hf_tensor_specs(preset_config("a3b"))
    got = {s.name: s.shape for s in specs}
    assert len(specs) == len(got) == 5679  # §3.3 count check
    assert got == doc_a3b_tensors()
    by_part: dict[str, int] = {}
    for s in specs:  # the doc counts parameters: the 27 inv_freq buffers are not parameters
        if s.name.endswith("inv_freq"):
            continue
        by_part[s.part] = by_part.get(s.part, 0) + int(np.prod(s.shape))
    assert by_part == {"vision": 416_866_032, "projector": 30_679_808, "text": 15_960_110_208}
    assert sum(by_part.values()) == 16_407_656_048


def test_a3b_config_values_match_reference_doc():
    c = preset_config_dict("a3b")
    t, v = c["text_config"], c["vision_config"]
    assert c["architectures"] == ["KimiVLForConditionalGeneration"] and c["model_type"] == "kimi_vl"
    assert c["media_placeholder_token_id"] == 163605 and c["vocab_size"] == 163840
    assert (t["bos_token_id"], t["eos_token_id"], t["pad_token_id"]) == (163584, 163585, 163839)
    assert (t["routed_scaling_factor"], t["rope_theta"], t["rms_norm_eps"]) == (2.446, 800000.0, 1e-05)
    assert (t["q_lora_rank"], t["rope_scaling"], t["topk_method"], t["scoring_func"]) == (None, None, "noaux_tc",
                                                                                         "sigmoid")
    assert (v["patch_size"], v["hidden_size"], v["num_hidden_layers"], v["intermediate_size"]) == (14, 1152, 27, 4304)
    assert set(c) >= {"architectures", "auto_map", "model_type", "vision_config", "text_config",
                      "media_placeholder_token_id", "ignore_index", "vocab_size", "tie_word_embeddings"}


def test_tiny_preset_exercises_every_structural_feature():
    c = preset_config("tiny")
    v, t = c.vision, c.text
    assert v.num_hidden_layers >= 3 and (v.init_pos_emb_height, v.init_pos_emb_width) != (64, 64)
    assert sum(t.is_moe_layer(i) for i in range(t.num_hidden_layers)) >= 2 and not t.is_moe_layer(0)
    assert t.n_routed_experts >= 8 and t.num_experts_per_tok >= 2 and t.n_shared_experts >= 1
    assert t.q_lora_rank is None and not t.tie_word_embeddings
    # the tiny file has the same keys as the real-size one, at every level
    a, b = preset_config_dict("a3b"), preset_config_dict("tiny")
    assert set(a) == set(b) and set(a["text_config"]) == set(b["text_config"])
    assert set(a["vision_config"]) == set(b["vision_config"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return synth_mod.synth(tmp_path_factory.mktemp("ck") / "Kimi-VL-A3B-Instruct", "tiny", "instruct", seed=7)


def test_tiny_files_andshards(tiny: Path):
    names = {p.name for p in tiny.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tiktoken.model", "tokenizer_config.json",
            "chat_template.jinja", "preprocessor_config.json", "generation_config.json"} <= names
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    size = 0
    for s in shards:
        st = SafetensorsFile(tiny / s)
        for name in st.entries:
            assert index["weight_map"][name] == s
            assert st.dtype(name) == "BF16"
            size += st.raw(name).nbytes
    assert index["metadata"]["total_size"] == size
    total = sum(p.stat().st_size for p in tiny.iterdir())
    assert total < 12e6  # "a few MB"
    assert not [p for p in tiny.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_tiny_checkpoint_loads_and_values_are_sane(tiny: Path):
    ck = Checkpoint(tiny)
    t = ck.config.text
    inv = ck.float32("language_model.model.layers.1.self_attn.rotary_emb.inv_freq")
    d = t.qk_rope_head_dim
    np.testing.assert_allclose(inv, 1.0 / 800000.0 ** (np.arange(0, d, 2) / d), rtol=4e-3)  # bf16 precision
    g = ck.float32("language_model.model.layers.0.input_layernorm.weight")
    assert abs(g.mean() - 1) < 0.05
    w = ck.float32("language_model.model.layers.1.mlp.experts.3.up_proj.weight")
    assert 0.5 < w.std() * np.sqrt(w.shape[1]) < 1.5


def test_tiny_tokenizer_files(tiny: Path):
    cfg = json.loads((tiny / "config.json").read_text())
    lines = (tiny / "tiktoken.model").read_text().splitlines()
    n_base = len(lines)
    assert cfg["vocab_size"] == n_base + 256
    first = lines[:3]
    assert [int(x.split()[1]) for x in first] == [0, 1, 2]
    assert base64.b64decode(lines[65].split()[0]) == b"A"  # single bytes first, rank = byte value
    dec = json.loads((tiny / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    names = {v["content"]: int(k) for k, v in dec.items()}
    assert len(dec) == 256 and min(map(int, dec)) == n_base
    assert names["[BOS]"] == n_base and names["[EOS]"] == n_base + 1 and names["<|im_end|>"] == n_base + 2
    assert names["<|media_pad|>"] == n_base + 21 == cfg["media_placeholder_token_id"]
    assert names["[PAD]"] == n_base + 255 == cfg["text_config"]["pad_token_id"]


def test_remote_code_files_refuse_to_run(tiny: Path):
    r = subprocess.run([sys.executable, str(tiny / "tokenization_moonshot.py")], capture_output=True, text=True)
    assert r.returncode != 0 and "must never be imported" in r.stderr


def test_synth_is_deterministic(tmp_path: Path, tiny: Path):
    again = synth_mod.synth(tmp_path / "again", "tiny", "instruct", seed=7)
    other = synth_mod.synth(tmp_path / "other", "tiny", "instruct", seed=8)
    f = shards(tiny)[0].name
    assert (again / f).read_bytes() == (tiny / f).read_bytes()
    assert (other / f).read_bytes() != (tiny / f).read_bytes()


def test_variants_differ_where_the_real_ones_do(tmp_path: Path):
    ck = synth_mod.synth(tmp_path / "t", "tiny", "thinking-2506")
    pre = json.loads((ck / "preprocessor_config.json").read_text())
    gen = json.loads((ck / "generation_config.json").read_text())
    assert pre["in_token_limit"] == 16384 and gen["eos_token_id"] == [json.loads(
        (ck / "config.json").read_text())["text_config"]["eos_token_id"]]


def test_bf16_conversion_matches_round_to_nearest_even():
    from kimivl_edge.safetensors_io import f32_to_bf16

    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -2.5, np.inf], dtype=np.float32)
    # ties (exactly half an ulp) go to the even mantissa; anything above half rounds up
    expected_bits = [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xC020, 0x7F80]
    assert f32_to_bf16(x).tolist() == expected_bits
    assert bf16_to_f32(np.array(expected_bits, np.uint16)).tolist() == [1.0, 1.0, 1.015625, 1.0078125, -2.5, np.inf]


# --- bad input --------------------------------------------------------------------------------------------------



@pytest.mark.parametrize("args, msg", [
    (["--preset", "huge"], "unknown preset"),
    (["--variant", "pro"], "unknown variant"),
    (["--seed", "x"], "invalid int value"),
    (["--seed", "-1"], "seed must be a non-negative integer"),
])
def test_synth_cli_rejects_bad_arguments(tmp_path: Path, args, msg):
    r = run_cli("synth", str(tmp_path / "out"), *args)
    assert r.returncode == 2
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_synth_cli_refuses_non_empty_dir_without_force(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_cli("synth", str(out))
    assert r.returncode == 2 and "not empty" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    r = run_cli("synth", str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_synth_leaves_nothing_when_interrupted(tmp_path: Path, monkeypatch):
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    real = synth_writer.write_safetensors
    monkeypatch.setattr(synth_writer, "write_safetensors", boom)
    with pytest.raises(KeyboardInterrupt):
        synth_mod.synth(tmp_path / "out", "tiny")
    assert list(tmp_path.iterdir()) == []


def test_synth_onto_a_read_only_file_system_is_one_line(tmp_path: Path):
    """EROFS when the output directory is created (as a read-only mount gives it, even to root)."""
    code = (
        "import errno, os, pathlib, sys\n"
        "def read_only(self, *a, **k):\n"
        "    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))\n"
        "pathlib.Path.mkdir = read_only\n"
        "from kimivl_edge.cli import main\n"
        f"sys.exit(main(['synth', {str(tmp_path / 'out')!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parent.parent)  # imports this checkout's kimivl_edge
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "read-only file system" in r.stderr.lower()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EACCES])
def test_synth_write_errors_are_usage_errors_and_leave_nothing(tmp_path: Path, monkeypatch, err):
    def fail(*a, **k):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(synth_writer, "write_safetensors", fail)
    with pytest.raises(UsageError, match=os.strerror(err)) as e:
        synth_mod.synth(tmp_path / "out", "tiny")
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == []


# --- the checkpoint loader rejects broken directories ----------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("breakage, msg", [
    (lambda d: (d / "tiktoken.model").unlink(), "missing tiktoken.model"),
    (lambda d: shards(d)[1].unlink(), "missing shard"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: edit_json(d / "config.json", lambda c: c["text_config"].update(hidden_size=512)), "shape"),
    (lambda d: edit_json(d / "config.json", lambda c: c["text_config"].pop("kv_lora_rank")), "kv_lora_rank"),
    (lambda d: edit_json(d / "config.json", lambda c: c.update(model_type="llama")), "model_type"),
    (lambda d: edit_json(d / "model.safetensors.index.json",
                          lambda c: c["weight_map"].pop("language_model.lm_head.weight")), "lm_head.weight missing"),
    (lambda d: _truncate(shards(d)[-1]), "truncated"),
])
def test_checkpoint_loader_rejects_broken_dirs(tmp_path: Path, tiny: Path, breakage, msg):
    d = _copy(tiny, tmp_path / "ck")
    breakage(d)
    with pytest.raises(CheckpointError, match=msg):
        Checkpoint(d)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])


def test_usage_error_is_a_kimivl_error():
    with pytest.raises(UsageError):
        synth_mod.synth("/nonexistent-dir-for-kimivl/x", "tiny")
