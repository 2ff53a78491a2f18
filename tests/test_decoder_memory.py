"""Peak memory of a process with the text model loaded (issue 8: ≤ 1.1 × GGUF size + KV cache).

llama.cpp's CPU backend repacks Q4_0 / Q4_K / IQ4_NL weights into interleaved copies; with the file memory-mapped,
the pages read for the copies stay mapped, so the process would hold both. The test model is the tiny synthetic
checkpoint deepened to 16 MoE layers of 64 experts of width 256 in Q4_0 (~110 MB, nearly all repacked; like the
real model, no single tensor is a large part of the file, since llama.cpp stages one tensor at a time). Every
measurement runs in its own child process and reads that process's VmHWM (peak RSS) after loading, a prompt and a
few generated tokens. The baseline is the same child on the original tiny file (same interpreter, libraries,
vocabulary, context and KV cache), so the difference is what the weights cost.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kimivl_edge.decoder import Decoder, DecoderSettings, repacked_tensors

N_MOE_LAYERS, N_EXPERT, N_FF_EXP = 16, 64, 256
Q4_0_BLOCK = (32, 18)  # values, bytes (ggml-common.h: fp16 scale + 16 bytes of nibbles)

CHILD = r"""
import json, sys
from kimivl_edge.decoder import Decoder, DecoderSettings
path, mmap, repack = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
dec = Decoder(path, DecoderSettings(n_ctx=256, n_threads=1, mmap=mmap, repack=repack))
dec.prefill([[5, 6, 7, 8, 9, 10, 11, 12]])
for t in range(8):
    dec.append(20 + t)
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"vmhwm": hwm, "mmap": dec.mmap}))
"""


def q4_0_random(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Q4_0 bytes for a tensor of logical ``shape`` (numpy order, rows last): random nibbles, scale 0.01."""
    n_blocks = shape[-1] // Q4_0_BLOCK[0]
    data = rng.integers(0, 256, size=(*shape[:-1], n_blocks, Q4_0_BLOCK[1]), dtype=np.uint8)
    data[..., :2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    return data.reshape(*shape[:-1], n_blocks * Q4_0_BLOCK[1])


def _moe_tensor(kind: str, rng: np.random.Generator, n_embd: int, n_shared: int) -> tuple[np.ndarray, bool]:
    """(data, is Q4_0) of a widened MoE tensor, or (None, False) for any other kind."""
    shapes = {"ffn_gate_exps": (N_EXPERT, N_FF_EXP, n_embd), "ffn_up_exps": (N_EXPERT, N_FF_EXP, n_embd),
              "ffn_down_exps": (N_EXPERT, n_embd, N_FF_EXP), "ffn_gate_shexp": (N_FF_EXP * n_shared, n_embd),
              "ffn_up_shexp": (N_FF_EXP * n_shared, n_embd), "ffn_down_shexp": (n_embd, N_FF_EXP * n_shared)}
    if kind in shapes:
        return q4_0_random(rng, shapes[kind]), True
    if kind == "ffn_gate_inp":
        return rng.standard_normal((N_EXPERT, n_embd), dtype=np.float32) * 0.05, False
    if kind == "exp_probs_b":
        return np.zeros(N_EXPERT, dtype=np.float32), False
    return None, False


def widen_experts(src: Path, dst: Path) -> None:
    """Copy a deepseek2 GGUF (one dense layer, then MoE layers) with N_MOE_LAYERS MoE layers like its first one, of
    N_EXPERT experts of width N_FF_EXP in Q4_0."""
    import gguf

    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    n_embd = int(r.fields[f"{arch}.embedding_length"].contents())
    n_shared = int(r.fields[f"{arch}.expert_shared_count"].contents())
    assert int(r.fields[f"{arch}.leading_dense_block_count"].contents()) == 1
    w = gguf.GGUFWriter(dst, arch)
    new = {f"{arch}.expert_count": N_EXPERT, f"{arch}.expert_feed_forward_length": N_FF_EXP,
           f"{arch}.block_count": 1 + N_MOE_LAYERS}
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        w.add_key_value(name, new.get(name, f.contents()), f.types[0],
                        sub_type=f.types[-1] if len(f.types) > 1 else None)
    rng = np.random.default_rng(0)
    template = [t for t in r.tensors if t.name.startswith("blk.1.")]
    for t in r.tensors:
        if not t.name.startswith("blk.") or t.name.startswith("blk.0."):
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    for layer in range(1, 1 + N_MOE_LAYERS):
        for t in template:
            name = f"blk.{layer}." + t.name.split(".", 2)[2]
            data, q4 = _moe_tensor(t.name.split(".")[-2], rng, n_embd, n_shared)
            if data is None:
                w.add_tensor(name, t.data, raw_dtype=t.tensor_type)
            else:
                w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.Q4_0 if q4 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory, tiny_checkpoint, converted) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mem")
    small, _ = converted(tiny_checkpoint("instruct", seed=2), "q8_0", "q8_0")
    wide = root / "wide-Q4_0.gguf"
    widen_experts(small, wide)
    return small, wide


def peak_rss(path: Path, mmap: bool | None, repack: bool = True) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(path), json.dumps(mmap), json.dumps(repack)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_wide_file_is_mostly_repacked_weights(ggufs):
    small, wide = ggufs
    names = repacked_tensors(wide)
    if not names:
        pytest.skip("this llama.cpp build repacks no Q4_0 weights on this CPU")
    assert {n.split(".")[-2] for n in names} >= {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}
    assert wide.stat().st_size - small.stat().st_size > 100e6


def test_peak_rss_with_the_model_loaded_stays_near_the_file_size(ggufs):
    small, wide = ggufs
    if not repacked_tensors(wide):
        pytest.skip("this llama.cpp build repacks no Q4_0 weights on this CPU")
    base = peak_rss(small, None)["vmhwm"]
    extra = wide.stat().st_size - small.stat().st_size
    default = peak_rss(wide, None)
    assert default["mmap"] is False
    assert default["vmhwm"] - base <= 1.1 * extra, (
        f"peak RSS {default['vmhwm'] / 2**20:.0f} MiB: {(default['vmhwm'] - base) / 2**20:.0f} MiB above the tiny "
        f"model's for {extra / 2**20:.0f} MiB more weights")
    # the other way: the file mapped, its weights used without repacked copies
    plain = peak_rss(wide, None, repack=False)
    assert plain["mmap"] is True and plain["vmhwm"] - base <= 1.1 * extra
    # the measurement can tell: memory-mapped, llama.cpp keeps the file pages and the repacked copy
    mapped = peak_rss(wide, True)
    assert mapped["mmap"] is True
    assert mapped["vmhwm"] - base > 1.5 * extra


def test_loading_without_mmap_gives_the_same_logits(ggufs):
    _, wide = ggufs
    ids = [[3, 14, 15, 92, 65, 35, 89, 79]]
    out = []
    for mmap in (True, False):
        dec = Decoder(wide, DecoderSettings(n_ctx=64, n_threads=1, kv_type="f32", mmap=mmap))
        assert dec.mmap is mmap
        out.append(dec.prefill(ids))
        dec.close()
    assert np.isfinite(out[0]).all()
    np.testing.assert_array_equal(out[1], out[0])


def test_extra_buffers_are_refused_only_where_amx_is_on(ggufs, monkeypatch):
    """llama.cpp's AMX buffer aborts the process on deepseek2 (3-D MLA matrices); CPU_REPACK alone is fine. The
    machine is llama.cpp's system info line: on an AVX2 CPU without AMX the wide file's Q4_0 experts are repacked,
    on a Sapphire Rapids one (AMX) nothing is, as the weights stay in their file layout there."""
    import llama_cpp

    from kimivl_edge.decoder import extra_buffers_safe

    zen3 = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | AVX512 = 0 | AMX_INT8 = 0 | REPACK = 1 | "
    spr = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 | "
    assert extra_buffers_safe(zen3) and not extra_buffers_safe(spr)
    repacked = {}
    for name, info in (("zen3", zen3), ("spr", spr)):
        monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda info=info: info.encode())
        repacked[name] = repacked_tensors(ggufs[1])
    assert {n.split(".")[-2] for n in repacked["zen3"]} >= {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}
    assert repacked["spr"] == []


LOAD_QUANTIZED = r"""
import sys
from kimivl_edge.decoder import Decoder, DecoderSettings
dec = Decoder(sys.argv[1], DecoderSettings(n_ctx=64, n_threads=1, repack=True))
print(int(dec.prefill([[5, 6, 7, 8]]).argmax()), dec.repack)
"""


@pytest.mark.parametrize("outtype", ["q8_0", "q4_k_m", "q6_k"])
def test_quantized_files_load_and_evaluate_with_repack_on(tiny_checkpoint, converted, outtype):
    """Default settings on every quantized text type, in a child process: on an AMX CPU, llama.cpp's AMX buffer
    used to abort it (GGML_ASSERT, exit -6) at the first context. The logits must equal those without repacking."""
    text, _ = converted(tiny_checkpoint("instruct"), outtype, "f16")
    got = subprocess.run([sys.executable, "-c", LOAD_QUANTIZED, str(text)], capture_output=True, text=True,
                         timeout=300)
    assert got.returncode == 0, got.stderr[-1500:]
    dec = Decoder(text, DecoderSettings(n_ctx=64, n_threads=1, repack=False))
    assert got.stdout.split()[0] == str(int(dec.prefill([[5, 6, 7, 8]]).argmax()))
    dec.close()


def test_loading_a_model_parses_the_text_header_once(converted, monkeypatch):
    """KimiVL.load reads the text GGUF's metadata (163 840 vocabulary strings at full size, about a second) once:
    the tokenizer, the decoder's guard and its repack decision come from the same parse."""
    import os

    import kimivl_edge.gguf_file as gf
    from kimivl_edge.model import KimiVL

    text, mmproj = converted(Path(__file__).resolve().parents[1] / "kimivl_edge" / "assets" / "kimi-vl-tiny", "q8_0",
                             "f16")
    opened: list[str] = []
    real = gf.GGUFFile.__init__

    def counting(self, path, *a, **k):
        opened.append(os.path.realpath(path))
        real(self, path, *a, **k)

    monkeypatch.setattr(gf.GGUFFile, "__init__", counting)
    with KimiVL.load(text, mmproj, n_ctx=256, n_threads=1) as m:
        assert m.generate([{"role": "user", "content": "Hi"}], max_tokens=1).tokens is not None
    assert opened.count(os.path.realpath(text)) == 1, opened
