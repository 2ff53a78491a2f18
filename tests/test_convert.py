"""The converter end to end on tiny synthetic checkpoints: exact tensors, llama.cpp loads and agrees with the fp32
reference, ggml-exact quantization, K-quants through llama.cpp, range safety, bad input, atomicity.

Expected layouts are written here from docs/model.md §3.4 / §11, independently of convert/text.py.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest

from shared import edit_json, run_cli, shards
from kimivl_edge.checkpoint import Checkpoint
from kimivl_edge.convert import convert_checkpoint, format_plan, format_result, plan_conversion, resolve_checkpoint
from kimivl_edge.errors import UsageError
from kimivl_edge.quant import ggml_c

GT = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def ckpts(tiny_checkpoint) -> dict[str, Path]:
    return {v: tiny_checkpoint(v, seed=11) for v in ("instruct", "thinking", "thinking-2506")}


@pytest.fixture(scope="module")
def f32_files(ckpts, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    out = tmp_path_factory.mktemp("f32")
    return {v: tuple(convert_checkpoint(p, "f32", "f32", out / v)) for v, p in ckpts.items()}


def tensors(path: Path) -> dict[str, object]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def expected_text_tensors(ck: Checkpoint) -> dict[str, np.ndarray]:
    """docs/model.md §3.4 / §11: the llama.cpp deepseek2 layout, written independently of the converter."""
    t = ck.config.text
    f = ck.float32
    out = {"token_embd.weight": f("language_model.model.embed_tokens.weight"),
           "output.weight": f("language_model.lm_head.weight"),
           "output_norm.weight": f("language_model.model.norm.weight")}
    for i in range(t.num_hidden_layers):
        L, b = f"language_model.model.layers.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = f(L + "input_layernorm.weight")
        out[b + "ffn_norm.weight"] = f(L + "post_attention_layernorm.weight")
        out[b + "attn_q.weight"] = f(L + "self_attn.q_proj.weight")
        out[b + "attn_kv_a_mqa.weight"] = f(L + "self_attn.kv_a_proj_with_mqa.weight")
        out[b + "attn_kv_a_norm.weight"] = f(L + "self_attn.kv_a_layernorm.weight")
        out[b + "attn_output.weight"] = f(L + "self_attn.o_proj.weight")
        kvb = f(L + "self_attn.kv_b_proj.weight")
        per = t.qk_nope_head_dim + t.v_head_dim
        k_b, v_b = [], []
        for h in range(t.num_attention_heads):  # head h = rows [per*h, per*h + per): first nope rows W_UK, then W_UV
            rows = kvb[per * h: per * (h + 1)]
            k_b.append(rows[: t.qk_nope_head_dim].T)  # W_UK,h transposed: [r, nope]
            v_b.append(rows[t.qk_nope_head_dim:])     # W_UV,h: [v, r]
        out[b + "attn_k_b.weight"], out[b + "attn_v_b.weight"] = np.stack(k_b), np.stack(v_b)
        if i < t.first_k_dense_replace:
            for p in ("gate", "up", "down"):
                out[b + f"ffn_{p}.weight"] = f(L + f"mlp.{p}_proj.weight")
            continue
        out[b + "ffn_gate_inp.weight"] = f(L + "mlp.gate.weight")
        out[b + "exp_probs_b.bias"] = f(L + "mlp.gate.e_score_correction_bias")
        for p in ("gate", "up", "down"):
            out[b + f"ffn_{p}_exps.weight"] = np.stack(
                [f(L + f"mlp.experts.{e}.{p}_proj.weight") for e in range(t.n_routed_experts)])
            out[b + f"ffn_{p}_shexp.weight"] = f(L + f"mlp.shared_experts.{p}_proj.weight")
    return out


def test_f32_text_tensors_equal_the_source_exactly(ckpts, f32_files):
    ck = Checkpoint(ckpts["instruct"])
    got = tensors(f32_files["instruct"][0])
    want = expected_text_tensors(ck)
    assert set(got) == set(want)  # inv_freq dropped, nothing else added
    for name, arr in want.items():
        t = got[name]
        assert t.tensor_type == GT.F32, name
        assert tuple(int(x) for x in reversed(t.shape)) == arr.shape, name
        np.testing.assert_array_equal(np.asarray(t.data).reshape(arr.shape), arr, err_msg=name)


def test_text_metadata(ckpts, f32_files):
    r = gguf.GGUFReader(f32_files["thinking-2506"][0])
    kv = {k: r.fields[k].contents() for k in r.fields}
    c = json.loads((ckpts["thinking-2506"] / "config.json").read_text())["text_config"]
    assert kv["general.architecture"] == "deepseek2"
    assert kv["deepseek2.expert_gating_func"] == 2  # sigmoid, never the softmax default
    assert kv["deepseek2.attention.head_count_kv"] == 1
    assert kv["deepseek2.attention.key_length"] == c["kv_lora_rank"] + c["qk_rope_head_dim"]
    assert kv["deepseek2.attention.value_length"] == c["kv_lora_rank"]
    assert kv["deepseek2.attention.key_length_mla"] == c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    assert kv["deepseek2.attention.value_length_mla"] == c["v_head_dim"]
    assert kv["deepseek2.leading_dense_block_count"] == 1 and kv["deepseek2.expert_weights_norm"] is True
    assert abs(kv["deepseek2.expert_weights_scale"] - 2.446) < 1e-6
    assert kv["tokenizer.ggml.pre"] == "kimi-k2" and kv["tokenizer.ggml.model"] == "gpt2"
    assert len(kv["tokenizer.ggml.merges"]) > 0
    assert kv["general.name"] == "Kimi-VL-A3B-Thinking-2506" and kv["kimivl_edge.variant"] == "thinking-2506"
    assert abs(kv["general.sampling.temp"] - 0.8) < 1e-6
    assert f32_files["thinking-2506"][0].name == "Kimi-VL-A3B-Thinking-2506-F32.gguf"
    assert f32_files["thinking-2506"][1].name == "mmproj-Kimi-VL-A3B-Thinking-2506-F32.gguf"


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=256, n_batch=256, logits_all=True, verbose=False, seed=0,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, n_threads=2)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float64)
    llm.close()
    return out


@pytest.mark.parametrize("variant", ["instruct", "thinking", "thinking-2506"])
def test_llama_cpp_logits_match_the_fp32_reference(ckpts, f32_files, variant):
    import torch

    from kimivl_edge.reference import text as text_ref
    from kimivl_edge.reference.model import ReferenceModel

    m = ReferenceModel(ckpts[variant])
    prompts = [[{"role": "user", "content": "Where is the red circle?"}],
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How many shapes are there?"},
                {"role": "assistant", "content": "Three."}, {"role": "user", "content": "Which colour?"}]]
    for messages in prompts:
        ids = m.prepare(messages).input_ids
        with torch.no_grad():
            x = text_ref.embed(m.weights, m.config.text, torch.tensor(ids), None, m.config.media_placeholder_token_id)
            ref = text_ref.decoder_forward(m.weights, m.config.text, x).double().numpy()
        got = llama_logits(f32_files[variant][0], ids)
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        assert rel <= 1e-4, f"{variant}: max relative logit error {rel:.2e}"
        assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_q8_0_and_q4_0_blocks_are_bit_exact_with_ggml(ckpts, tmp_path):
    ck = Checkpoint(ckpts["instruct"])
    want = expected_text_tensors(ck)
    for qt, gt in (("q8_0", GT.Q8_0), ("q4_0", GT.Q4_0)):
        text, _ = convert_checkpoint(ckpts["instruct"], qt, "f16", tmp_path / qt)
        got = tensors(text)
        n_quant = 0
        for name, t in got.items():
            if t.tensor_type != gt:
                continue
            n_quant += 1
            src = np.ascontiguousarray(want[name], dtype=np.float32)
            ref = ggml_c.quantize(src.reshape(-1, src.shape[-1]), gt)
            assert np.asarray(t.data).tobytes() == ref.tobytes(), name
        assert n_quant >= 10
        # norms, router and correction bias stay F32; the 128-wide k_b rows are still a 32-block type
        assert got["blk.1.ffn_gate_inp.weight"].tensor_type == GT.F32
        assert got["blk.1.exp_probs_b.bias"].tensor_type == GT.F32
        assert got["blk.0.attn_norm.weight"].tensor_type == GT.F32


def _llama_quantize(src: Path, dst: Path, outtype: str) -> None:
    """The oracle: llama.cpp's own quantizer (src/llama-quant.cpp) on a BF16 file."""
    import llama_cpp

    from kimivl_edge.quant.types import as_ftype

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = as_ftype(outtype).llama_ftype
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0


@pytest.mark.parametrize("outtype", ["q4_k_m", "q5_k_m", "q6_k"])
def test_k_quants_equal_llama_model_quantize_tensor_for_tensor(ckpts, tmp_path, outtype):
    """Our one-pass K-quant file == llama_model_quantize applied to our BF16 file, tensor for tensor: same types,
    same bytes (key order, tensor order and our kimivl_edge.* keys differ, so the files as a whole do not)."""
    import llama_cpp

    ours, _ = convert_checkpoint(ckpts["instruct"], outtype, "f16", tmp_path / "ours")
    bf16, _ = convert_checkpoint(ckpts["instruct"], "bf16", "f16", tmp_path / "bf16")
    _llama_quantize(bf16, tmp_path / "oracle.gguf", outtype)
    got, want = tensors(ours), tensors(tmp_path / "oracle.gguf")
    assert sorted(got) == sorted(want)  # llama.cpp writes its own tensor order; contents are compared by name
    for name, t in want.items():
        assert got[name].tensor_type == t.tensor_type, name
        assert np.asarray(got[name].data).tobytes() == np.asarray(t.data).tobytes(), name
    types = {t.tensor_type.name for t in got.values()}
    assert types & {"Q5_0", "Q8_0"}  # 128-wide expert down rows fall back (like 1408)
    assert not [p for p in (tmp_path / "ours").iterdir() if p.name.startswith(".")]  # no temporaries left
    llm = llama_cpp.Llama(str(ours), vocab_only=True, verbose=False)
    assert len(llm.tokenize(b"hello", add_bos=False)) >= 1
    llm.close()


def test_q4_k_edge_is_q4_k_m_but_for_the_unfit_down_projections(ckpts, tmp_path):
    import llama_cpp

    edge, _ = convert_checkpoint(ckpts["instruct"], "q4_k_edge", "f16", tmp_path / "edge")
    q4km, _ = convert_checkpoint(ckpts["instruct"], "q4_k_m", "f16", tmp_path / "q4km")
    got, ref = tensors(edge), tensors(q4km)
    assert sorted(got) == sorted(ref)
    differ = {}
    for name, t in ref.items():
        if got[name].tensor_type == t.tensor_type:
            assert np.asarray(got[name].data).tobytes() == np.asarray(t.data).tobytes(), name
        else:
            differ[name] = (t.tensor_type.name, got[name].tensor_type.name)
    # tiny: 3 layers (layer 2 is use_more_bits), expert down rows of 128 (shared ones too, but they keep Q4_K_M's
    # types: in the real model their rows of 2816 take K-quants, so only the routed experts change)
    assert differ == {"blk.1.ffn_down_exps.weight": ("Q5_0", "Q4_0"), "blk.2.ffn_down_exps.weight": ("Q8_0", "Q5_0"),
                      "token_embd.weight": ("Q4_K", "Q8_0")}
    meta = gguf.GGUFReader(edge).fields
    assert meta["general.file_type"].parts[-1][0] == 15  # MOSTLY_Q4_K_M: llama.cpp has no number for ours
    assert bytes(meta["kimivl_edge.file_type"].parts[-1]).decode() == "Q4_K_EDGE"
    llm = llama_cpp.Llama(str(edge), vocab_only=True, verbose=False)
    assert len(llm.tokenize(b"hello", add_bos=False)) >= 1
    llm.close()


def test_text_plan_shapes_match_the_stored_tensors_and_the_written_file(ckpts, tmp_path):
    """The plan's shapes come from the config (convert.text.text_tensors); they must be those of the checkpoint's
    own safetensors (experts stacked, kv_b_proj split per head) and of the GGUF llama.cpp's reader sees."""
    ck = Checkpoint(ckpts["instruct"])
    t = ck.config.text
    plan = plan_conversion(ckpts["instruct"], "q8_0", "f16", tmp_path)
    for x in plan.text.tensors:
        stored = [tuple(ck.shard(ck.weight_map[n]).shape(n)) for n in x.sources]
        if x.name.endswith(("attn_k_b.weight", "attn_v_b.weight")):
            H, nope, v, r = t.num_attention_heads, t.qk_nope_head_dim, t.v_head_dim, t.kv_lora_rank
            assert stored == [(H * (nope + v), r)]
            assert tuple(x.shape) == ((H, r, nope) if "k_b" in x.name else (H, v, r)), x.name
        elif "_exps." in x.name:
            assert len(set(stored)) == 1 and tuple(x.shape) == (len(stored), *stored[0]), x.name
        else:
            assert stored == [tuple(x.shape)], x.name
    text, _ = convert_checkpoint(ckpts["instruct"], "q8_0", "f16", tmp_path)
    assert {n: tuple(reversed(g.shape.tolist())) for n, g in tensors(text).items()} == {
        x.name: tuple(x.shape) for x in plan.text.tensors}


def test_dry_run_plan_predicts_the_written_k_quant_types(ckpts, tmp_path):
    plan = plan_conversion(ckpts["instruct"], "q4_k_m", "f16", tmp_path)
    r = convert_checkpoint(ckpts["instruct"], "q4_k_m", "f16", tmp_path)
    want = {t.name: t.qtype.value for t in plan.text.tensors}
    assert {n: t.tensor_type.name for n, t in tensors(r.text_path).items()} == want
    assert {t.name: t.qtype.value for t in r.text.tensors} == want and not r.text.range_fallbacks
    assert r.text.file_bytes == r.text_path.stat().st_size


def test_f16_range_safety_keeps_out_of_range_tensors_in_bf16(ckpts, tmp_path):
    from kimivl_edge.safetensors_io import SafetensorsFile

    d = tmp_path / "Kimi-VL-A3B-Instruct"
    shutil.copytree(ckpts["instruct"], d)
    name = "language_model.model.layers.1.self_attn.o_proj.weight"
    shard = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][name]
    offset = SafetensorsFile(d / shard).offset(name)
    with open(d / shard, "r+b") as fh:  # put bf16 1e5 (0x47C3) as the tensor's first value
        fh.seek(offset)
        fh.write(np.array([0x47C3], np.uint16).tobytes())
    plan = plan_conversion(d, "f16", "f16", tmp_path / "o")
    planned = {t.name: t for t in plan.text.tensors}["blk.1.attn_output.weight"]
    assert planned.qtype.value == "F16"
    assert "found while writing" in format_plan(plan)  # the dry run says a range fallback is not in it
    r = convert_checkpoint(d, "f16", "f16", tmp_path / "o")  # found while writing: that tensor is rewritten
    w = {t.name: t for t in r.text.tensors}["blk.1.attn_output.weight"]
    assert w.qtype.value == "BF16" and w.range_fallback.startswith("range") and "99840" in w.range_fallback
    assert [t.name for t in r.text.range_fallbacks] == ["blk.1.attn_output.weight"]
    assert {t.name: t for t in r.plan.text.tensors}["blk.1.attn_output.weight"].qtype.value == "F16"  # plan as is
    assert "blk.1.attn_output.weight: written BF16 (range: max |x| 99840 overflows F16 -> BF16)" in format_result(r)
    got = tensors(r.text_path)
    assert got["blk.1.attn_output.weight"].tensor_type == GT.BF16
    # the header was rewritten for the new type: every other tensor still reads back exactly (F16 of the source)
    ck = Checkpoint(d)
    want = expected_text_tensors(ck)
    for name in ("blk.1.ffn_norm.weight", "blk.1.ffn_down_exps.weight", "output.weight", "blk.2.attn_q.weight"):
        w = want[name]
        if got[name].tensor_type == GT.F16:
            w = w.astype(np.float16)
        assert np.array_equal(np.asarray(got[name].data).reshape(w.shape), w), name
    assert float(np.asarray(got["blk.1.attn_output.weight"].data).view(np.uint16).reshape(-1)[0]) == 0x47C3
    assert all(np.isfinite(np.asarray(x.data, dtype=np.float32)).all() if x.tensor_type == GT.F16 else True
               for x in got.values())


def test_dry_run_prints_every_tensor_and_writes_nothing(ckpts, tmp_path):
    r = run_cli("convert", str(ckpts["instruct"]), "--outtype", "q4_k_m", "--outdir", str(tmp_path / "o"),
                "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "blk.1.ffn_down_exps.weight" in r.stdout and "fallback" in r.stdout
    assert "Kimi-VL-A3B-Instruct-Q4_K_M.gguf" in r.stdout and "bits/weight" in r.stdout
    assert not (tmp_path / "o").exists()


def test_repo_id_resolves_in_the_local_hf_cache(ckpts, tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--moonshotai--Kimi-VL-A3B-Instruct" / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    shutil.copytree(ckpts["instruct"], snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_checkpoint("moonshotai/Kimi-VL-A3B-Instruct") == snap
    with pytest.raises(UsageError, match="local Hugging Face cache"):
        resolve_checkpoint("moonshotai/Kimi-VL-A3B-Thinking")


# --- bad input: exit code 2, one line, no file at the target ---------------------------------------------------

def _break(kind: str, d: Path) -> None:
    if kind == "no-config":
        (d / "config.json").unlink()
    elif kind == "arch":
        edit_json(d / "config.json", lambda c: c.update(architectures=["LlamaForCausalLM"]))
    elif kind == "missing-shard":
        shards(d)[1].unlink()
    elif kind == "truncated":
        p = shards(d)[-1]
        p.write_bytes(p.read_bytes()[:-4096])
    elif kind == "corrupt":
        p = shards(d)[0]
        p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + p.read_bytes()[24:])
    elif kind == "shape":
        edit_json(d / "config.json", lambda c: c["text_config"].update(moe_intermediate_size=64))
    elif kind == "media-id":
        edit_json(d / "config.json", lambda c: c.update(media_placeholder_token_id=c["media_placeholder_token_id"] + 1))
    elif kind == "no-tokenizer":
        (d / "tiktoken.model").unlink()
    elif kind == "pickle":
        for p in d.glob("*.safetensors"):
            p.unlink()
        (d / "model.safetensors.index.json").unlink()
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind, msg", [
    ("no-config", "config.json"), ("arch", "architectures"), ("missing-shard", "missing shard"),
    ("truncated", "truncated"), ("corrupt", "corrupt"), ("shape", "shape"), ("media-id", "media"),
    ("no-tokenizer", "tiktoken.model"), ("pickle", "pickle"),
])
def test_bad_checkpoints_exit_2_with_one_line(ckpts, tmp_path, kind, msg):
    d = tmp_path / "Kimi-VL-A3B-Instruct"
    shutil.copytree(ckpts["instruct"], d)
    _break(kind, d)
    out = tmp_path / "out"
    r = run_cli("convert", str(d), "--outdir", str(out))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr and msg.lower() in lines[0].lower(), r.stderr
    assert not out.exists() or not list(out.iterdir())


def test_bad_arguments_and_unwritable_outdir(ckpts, tmp_path):
    r = run_cli("convert", str(ckpts["instruct"]), "--outtype", "q3_k")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("convert", str(tmp_path / "nope"))
    assert r.returncode == 2 and "no such checkpoint" in r.stderr
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "file").write_text("x")
    r = run_cli("convert", str(ckpts["instruct"]), "--outdir", str(ro / "file" / "sub"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_not_enough_disk_is_refused_before_writing(ckpts, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9 - 1000, free=1000))
    with pytest.raises(UsageError, match="not enough free disk"):
        convert_checkpoint(ckpts["instruct"], "q8_0", "f16", tmp_path / "o")
    assert not list((tmp_path / "o").iterdir())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_conversion_leaves_no_file_at_the_target(ckpts, tmp_path, sig):
    """Kill the converter while it writes (slowed down by a hook in a wrapper script): no final file appears."""
    out = tmp_path / "out"
    code = (
        "import sys, time\n"
        "import kimivl_edge.quant.codec as codec\n"
        "orig = codec.quantize\n"
        "def slow(a, q, **k):\n"
        "    time.sleep(0.05)\n"
        "    return orig(a, q, **k)\n"
        "codec.quantize = slow\n"
        "from kimivl_edge.cli import main\n"
        f"sys.exit(main(['convert', {str(ckpts['instruct'])!r}, '--outtype', 'f32', '--outdir', {str(out)!r}]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parent.parent)  # imports this checkout's kimivl_edge
    deadline = time.time() + 60
    while time.time() < deadline and not (out.exists() and any(p.name.startswith(".") for p in out.iterdir())):
        time.sleep(0.05)
    assert out.exists(), proc.communicate()
    time.sleep(0.3)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not list(out.glob("*.gguf"))  # nothing at a final name
    if sig == signal.SIGTERM:
        assert not list(out.iterdir())  # and the temporary was cleaned up
