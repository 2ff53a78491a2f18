"""`kimivl-edge imatrix` and `convert --imatrix` (issue 19): statistics against the fp32 reference, llama.cpp's
own tools as the oracle for the file format and the quantized bytes, the default calibration set, bad input.

Oracles: the reference's activations (kimivl_edge.reference.text, fed the same token ids and image rows) with the
routing recomputed here in numpy from the router weights; ``llama-quantize`` built from the same llama.cpp
(kimivl_edge.bench.llama_tools) reading our file and quantizing our BF16 file.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from kimivl_edge.calibration import default_chats, default_prompts
from kimivl_edge.quant.imatrix_file import Entry, Imatrix, read_imatrix, write_imatrix

PROMPTS = ("Describe the sea in two sentences.", "请用两句话介绍一下长城。", "Explique la photosynthèse.",
           "Zähle drei Primzahlen auf.")


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    """A JSONL calibration file: four text prompts and two image chats (PNG files)."""
    from kimivl_edge.verify import default_image

    d = tmp_path_factory.mktemp("calib")
    lines = [{"prompt": p} for p in PROMPTS]
    for k, (w, h) in enumerate(((96, 80), (150, 220))):
        path = d / f"im{k}.png"
        default_image(w, h, seed=k).save(path)
        lines.append({"prompt": "What shapes do you see?", "images": [str(path)]})
    f = d / "calib.jsonl"
    f.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n", encoding="utf-8")
    return f


@pytest.fixture(scope="module")
def f32_pair(tiny_checkpoint, converted) -> tuple[Path, Path, Path]:
    ckpt = tiny_checkpoint()
    text, mmproj = converted(ckpt, "f32", "f32")
    return ckpt, text, mmproj


@pytest.fixture(scope="module")
def collected(f32_pair, calibration):
    from kimivl_edge.calibration import read_chats
    from kimivl_edge.imatrix import collect

    _, text, mmproj = f32_pair
    return collect(text, mmproj, read_chats(str(calibration)), str(calibration), n_threads=1)


def _inputs(text: Path, mmproj: Path, calibration: Path) -> list[tuple[list[int], np.ndarray | None]]:
    """Per chat: the token ids (one media pad per image row) and image rows our runtime feeds the decoder."""
    from kimivl_edge.calibration import read_chats
    from kimivl_edge.decoder import ImageBlock
    from kimivl_edge.model import KimiVL

    out = []
    with KimiVL.load(text, mmproj, n_threads=1, kv_type="f32") as m:
        for chat in read_chats(str(calibration)):
            p = m.render_prompt(chat.messages)
            rows = [s.rows for s in m.embed_prompt(p) if isinstance(s, ImageBlock)]
            n_rows = iter([len(r) for r in rows])
            ids = [t for i in p.ids for t in ([i] * next(n_rows) if i == p.media_pad_id else [i])]
            out.append((ids, np.concatenate(rows) if rows else None))
    return out


@pytest.fixture(scope="module")
def reference_activations(f32_pair, calibration):
    """The fp32 reference run over the same inputs, recording each layer's attention and FFN inputs."""
    import torch

    from kimivl_edge.reference import text as text_ref
    from kimivl_edge.reference.model import ReferenceModel

    ckpt, text, mmproj = f32_pair
    ref = ReferenceModel(ckpt)
    seen: dict[str, list[np.ndarray]] = {}
    orig_mla, orig_dense, orig_moe = text_ref.mla, text_ref.dense_mlp, text_ref.moe

    def record(key: str, x) -> None:
        seen.setdefault(key, []).append(x.detach().double().numpy())

    def mla(x, weights, prefix, cfg, positions):
        record(prefix + "in", x)
        return orig_mla(x, weights, prefix, cfg, positions)

    def dense(x, weights, prefix):
        record(prefix + "in", x)
        return orig_dense(x, weights, prefix)

    def moe(x, weights, prefix, cfg):
        record(prefix + "in", x)
        return orig_moe(x, weights, prefix, cfg)

    mp = pytest.MonkeyPatch()
    mp.setattr(text_ref, "mla", mla)
    mp.setattr(text_ref, "dense_mlp", dense)
    mp.setattr(text_ref, "moe", moe)
    try:
        with torch.no_grad():
            for ids, rows in _inputs(text, mmproj, calibration):
                emb = None if rows is None else torch.from_numpy(rows)
                x = text_ref.embed(ref.weights, ref.config.text, torch.tensor(ids), emb,
                                   ref.config.media_placeholder_token_id)
                text_ref.decoder_forward(ref.weights, ref.config.text, x)
    finally:
        mp.undo()
    return ref, {k: np.concatenate(v) for k, v in seen.items()}


def _topk_numpy(x: np.ndarray, gate: np.ndarray, bias: np.ndarray, k: int) -> np.ndarray:
    """docs/model.md §9.5, written here: sigmoid affinities, the k largest of affinity + correction bias."""
    s = 1.0 / (1.0 + np.exp(-(x @ gate.T)))
    return np.argsort(-(s + bias), axis=1, kind="stable")[:, :k]


def test_expert_counts_and_sums_follow_the_reference_routing(collected, reference_activations):
    ref, acts = reference_activations
    cfg = ref.config.text
    entries = collected.imatrix.entries
    n_moe = 0
    for i in range(cfg.num_hidden_layers):
        if not cfg.is_moe_layer(i):
            continue
        n_moe += 1
        p = f"language_model.model.layers.{i}.mlp."
        x = acts[p + "in"]
        idx = _topk_numpy(x, ref.weights[p + "gate.weight"].double().numpy(),
                          ref.weights[p + "gate.e_score_correction_bias"].double().numpy(), cfg.num_experts_per_tok)
        want_counts = np.bincount(idx.reshape(-1), minlength=cfg.n_routed_experts)
        want_sums = np.zeros((cfg.n_routed_experts, x.shape[1]))
        for slot in range(idx.shape[1]):
            np.add.at(want_sums, idx[:, slot], x * x)
        for w in ("gate", "up"):
            e = entries[f"blk.{i}.ffn_{w}_exps.weight"]
            np.testing.assert_array_equal(e.counts, want_counts)
            np.testing.assert_allclose(e.sums, want_sums, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(entries[f"blk.{i}.ffn_down_exps.weight"].counts, want_counts)
        assert want_counts.sum() == x.shape[0] * cfg.num_experts_per_tok
    assert n_moe >= 1 and collected.n_image_tokens > 0


def test_dense_sums_equal_the_reference_activations(collected, reference_activations):
    ref, acts = reference_activations
    entries = collected.imatrix.entries
    n = collected.n_tokens
    L = "language_model.model.layers."
    x = acts[L + "0.mlp.in"]  # the dense layer's FFN input
    assert x.shape[0] == n
    for name in ("blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"):
        np.testing.assert_array_equal(entries[name].counts, [n])
        np.testing.assert_allclose(entries[name].sums[0], (x * x).sum(0), rtol=1e-4)
    for i in range(ref.config.text.num_hidden_layers):
        a = acts[f"{L}{i}.self_attn.in"]
        for name in (f"blk.{i}.attn_q.weight", f"blk.{i}.attn_kv_a_mqa.weight"):
            np.testing.assert_array_equal(entries[name].counts, [n])
            np.testing.assert_allclose(entries[name].sums[0], (a * a).sum(0), rtol=1e-4)


def test_file_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    im = Imatrix({"blk.1.ffn_up_exps.weight": Entry(rng.random((4, 8), np.float32), np.array([3, 0, 5, 1])),
                  "blk.0.attn_q.weight": Entry(rng.random((1, 8), np.float32), np.array([9]))}, ("set.jsonl",), 6, 2)
    write_imatrix(tmp_path / "m.gguf", im)
    back = read_imatrix(tmp_path / "m.gguf")
    assert (back.datasets, back.chunk_count, back.chunk_size) == (("set.jsonl",), 6, 2)
    for name, e in im.entries.items():
        np.testing.assert_array_equal(back.entries[name].sums, e.sums)
        np.testing.assert_array_equal(back.entries[name].counts, e.counts)
    # llama-quantize's load_imatrix: sums / count per expert, ones where no token went
    w = back.entries["blk.1.ffn_up_exps.weight"].quantize_weights
    np.testing.assert_array_equal(w[1], np.ones(8, np.float32))
    np.testing.assert_array_equal(w[2], im.entries["blk.1.ffn_up_exps.weight"].sums[2] / np.float32(5))
    r = gguf.GGUFReader(tmp_path / "m.gguf")  # llama-imatrix's layout: no architecture key, in_sum2 [ne0, n_mat]
    assert "general.architecture" not in r.fields
    t = {x.name: x for x in r.tensors}
    assert [int(v) for v in t["blk.1.ffn_up_exps.weight.in_sum2"].shape] == [8, 4]
    assert [int(v) for v in t["blk.1.ffn_up_exps.weight.counts"].shape] == [1, 4]


# ------------------------------------------------------------------------------------------------ llama.cpp


@pytest.fixture(scope="session")
def llama_quantize() -> Path:
    from kimivl_edge.bench import llama_tools

    llama_tools.build()
    return llama_tools.tool("llama-quantize")


@pytest.fixture(scope="session")
def llama_imatrix(llama_quantize) -> Path:
    from kimivl_edge.bench import llama_tools

    return llama_tools.tool("llama-imatrix")


@pytest.fixture(scope="module")
def cli_imatrix(cli, f32_pair, calibration, tmp_path_factory) -> Path:
    """The imatrix our CLI writes for the tiny checkpoint from the calibration file."""
    _, text, mmproj = f32_pair
    out = tmp_path_factory.mktemp("imx") / "imatrix.gguf"
    r = cli("imatrix", str(text), "--mmproj", str(mmproj), "--calibration", str(calibration), "-o", str(out),
            "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "6 chats" in r.stdout and out.is_file()
    return out


@pytest.fixture(scope="module")
def bf16_file(f32_pair, tmp_path_factory) -> Path:
    from kimivl_edge.convert import convert_checkpoint

    ckpt = f32_pair[0]
    return Path(convert_checkpoint(ckpt, "bf16", "f16", tmp_path_factory.mktemp("bf16")).text_path)


def _tensors(path: Path) -> dict[str, object]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("outtype", ["q4_k_m", "q5_k_m", "q6_k", "iq4_xs", "iq2_xxs"])
def test_convert_with_imatrix_equals_llama_quantize_tensor_for_tensor(llama_quantize, cli_imatrix, bf16_file,
                                                                       f32_pair, tmp_path, outtype):
    """llama-quantize reads our file (its own loader) and quantizes our BF16 file with it: our one-pass file has the
    same types and bytes, tensor by tensor; the imatrix changed them (against the file without one)."""
    from kimivl_edge.convert import convert_checkpoint

    ckpt = f32_pair[0]
    oracle = tmp_path / "oracle.gguf"
    r = subprocess.run([str(llama_quantize), "--imatrix", str(cli_imatrix), str(bf16_file), str(oracle),
                        outtype.upper(), "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    n_entries = len(read_imatrix(cli_imatrix).entries)
    assert f"loaded {n_entries} importance matrix entries" in r.stdout
    ours = Path(convert_checkpoint(ckpt, outtype, "f16", tmp_path / "ours", imatrix=cli_imatrix).text_path)
    got, want = _tensors(ours), _tensors(oracle)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].tensor_type == t.tensor_type, name
        assert np.asarray(got[name].data).tobytes() == np.asarray(t.data).tobytes(), name
    meta = gguf.GGUFReader(ours).fields
    assert meta["quantize.imatrix.entries_count"].parts[-1][0] == n_entries
    if outtype != "iq2_xxs":  # it cannot be made without one
        plain = _tensors(convert_checkpoint(ckpt, outtype, "f16", tmp_path / "plain").text_path)
        changed = [n for n, t in got.items() if np.asarray(t.data).tobytes() != np.asarray(plain[n].data).tobytes()]
        assert "blk.1.ffn_up_exps.weight" in changed and "blk.0.attn_q.weight" in changed


def test_imatrix_from_a_checkpoint(cli, f32_pair, calibration, collected, tmp_path):
    """From a checkpoint directory: converted to BF16 + F16 on the side (removed afterwards), same weights listed,
    same tokens counted as from the F32 file."""
    out = tmp_path / "ck.gguf"
    r = cli("imatrix", str(f32_pair[0]), "--calibration", str(calibration), "-o", str(out), "--threads", "1")
    assert r.returncode == 0, r.stderr
    got = read_imatrix(out)
    assert got.datasets == (str(calibration),) and got.chunk_count == 6
    assert sorted(got.entries) == sorted(collected.imatrix.entries)
    np.testing.assert_array_equal(got.entries["blk.0.attn_q.weight"].counts, [collected.n_tokens])
    assert [p.name for p in tmp_path.iterdir()] == ["ck.gguf"]


def test_ctrl_c_leaves_nothing_behind(f32_pair, tmp_path):
    """Interrupted while collecting (the default set takes tens of seconds): exit 130, one line, no output file
    and no temporary in the output directory."""
    import signal
    import sys
    import time

    _, text, mmproj = f32_pair
    out = tmp_path / "m.gguf"
    p = subprocess.Popen([sys.executable, "-m", "kimivl_edge", "imatrix", str(text), "--mmproj", str(mmproj), "-o",
                          str(out), "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(6)  # past the model load, inside the chats
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err.strip().splitlines() == ["kimivl-edge imatrix: interrupted"]
    assert list(tmp_path.iterdir()) == []


def test_collector_equals_llama_imatrix_on_text(f32_pair, llama_imatrix, tmp_path):
    """llama.cpp's own llama-imatrix on the same F32 file and text chunks (128 tokens, one chunk per batch, F32 KV
    cache, as our collector runs them): the same weights, the same counts (per expert too), the same sums within
    float32 accumulation (llama-imatrix adds in float32, we in float64)."""
    import llama_cpp

    from kimivl_edge.activations import Collector
    from kimivl_edge.decoder import Decoder, DecoderSettings

    _, text, _ = f32_pair
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n".join(default_prompts()[:80]), encoding="utf-8")
    theirs = tmp_path / "llama.imatrix.gguf"
    r = subprocess.run([str(llama_imatrix), "-m", str(text), "-f", str(corpus), "-o", str(theirs),
                        "-c", "128", "-b", "128", "-ub", "128", "-t", "1", "--no-ppl", "-ctk", "f32", "-ctv", "f32",
                        "-fa", "off"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    c = Collector()
    d = Decoder(text, DecoderSettings(n_ctx=256, n_batch=128, n_ubatch=128, n_threads=1, kv_type="f32"),
                eval_callback=c.callback)
    vocab = llama_cpp.llama_model_get_vocab(d.model)
    raw = corpus.read_bytes()
    buf = (llama_cpp.llama_token * (len(raw) + 16))()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, len(buf), True, False)  # as common_tokenize
    ids = list(buf[:n])
    assert not llama_cpp.llama_vocab_get_add_bos(vocab)  # else llama-imatrix puts BOS first in every chunk
    for k in range(n // 128):
        d.reset()
        d.prefill([ids[128 * k: 128 * (k + 1)]], n_logits=128)  # every position an output, as llama-imatrix asks
        c.check()
    d.close()
    ours, want = c.entries(), read_imatrix(theirs).entries
    assert sorted(ours) == sorted(want) and any(e.counts.size > 1 for e in want.values())
    for name, e in want.items():
        np.testing.assert_array_equal(ours[name].counts, e.counts, err_msg=name)
        np.testing.assert_allclose(ours[name].sums, e.sums, rtol=1e-3, atol=1e-3 * float(e.sums.max()), err_msg=name)


# ------------------------------------------------------------------------------------------------ defaults


def test_default_calibration_set():
    chats = default_chats()
    prompts = default_prompts()
    assert len(prompts) == 320 and len(set(prompts)) == 320
    images = [c for c in chats if c.n_images]
    assert len(images) == 80 and len(chats) == 400
    assert {c.name.split()[0] for c in chats} == {"en", "zh", "fr", "de", "es", "ja", "ru", "hi"}
    again = [c for c in default_chats() if c.n_images]  # generated, deterministic
    assert all(a.images[0].tobytes() == b.images[0].tobytes() for a, b in zip(images, again))
    assert len({im.images[0].size for im in images}) == 5


# ------------------------------------------------------------------------------------------------ bad input


def _one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_convert_refuses_bad_importance_matrices(cli, f32_pair, cli_imatrix, tmp_path):
    ckpt, text, _ = f32_pair
    base = ("convert", str(ckpt), "--outdir", str(tmp_path / "out"), "--dry-run")
    _one_line_error(cli(*base, "--outtype", "q4_k_m", "--imatrix", str(tmp_path / "none.gguf")), "no such file")
    _one_line_error(cli(*base, "--outtype", "q4_k_m", "--imatrix", str(text)), "not an importance matrix")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    _one_line_error(cli(*base, "--outtype", "q4_k_m", "--imatrix", str(tmp_path / "junk.gguf")), "not a GGUF")
    _one_line_error(cli(*base, "--outtype", "q8_0", "--imatrix", str(cli_imatrix)), "K-quant and IQ mixes")
    _one_line_error(cli(*base, "--outtype", "iq2_xxs"), "requires an importance matrix", "--imatrix")
    good = read_imatrix(cli_imatrix)
    # made for another model: a weight of another size, or one this model does not have
    other = dict(good.entries)
    other["blk.0.attn_q.weight"] = Entry(np.ones((1, 64), np.float32), np.array([5]))
    write_imatrix(tmp_path / "other.gguf", Imatrix(other, ("x",), 1, 1))
    _one_line_error(cli(*base, "--outtype", "q4_k_m", "--imatrix", str(tmp_path / "other.gguf")),
                    "another model", "blk.0.attn_q.weight")
    deeper = dict(good.entries)
    deeper["blk.9.attn_q.weight"] = good.entries["blk.0.attn_q.weight"]
    write_imatrix(tmp_path / "deeper.gguf", Imatrix(deeper, ("x",), 1, 1))
    _one_line_error(cli(*base, "--outtype", "q4_k_m", "--imatrix", str(tmp_path / "deeper.gguf")),
                    "another model", "blk.9.attn_q.weight")
    # an imatrix without the entry a requiring type needs
    partial = {k: v for k, v in good.entries.items() if k != "blk.1.ffn_up_exps.weight"}
    write_imatrix(tmp_path / "partial.gguf", Imatrix(partial, ("x",), 1, 1))
    _one_line_error(cli(*base, "--outtype", "iq2_xxs", "--imatrix", str(tmp_path / "partial.gguf")),
                    "no entry for blk.1.ffn_up_exps.weight")


def test_imatrix_verb_refuses_bad_input(cli, f32_pair, converted, calibration, tmp_path):
    ckpt, text, mmproj = f32_pair
    out = str(tmp_path / "m.gguf")
    _one_line_error(cli("imatrix", str(tmp_path / "missing.gguf"), "-o", out), "no such file")
    q4, _ = converted(ckpt, "q4_k_m", "f16")
    _one_line_error(cli("imatrix", str(q4), "-o", out), "Q4_K_M", "unquantized")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    _one_line_error(cli("imatrix", str(text), "--calibration", str(bad), "-o", out), "--calibration", "line 2")
    only_images = tmp_path / "images.jsonl"
    only_images.write_text(calibration.read_text().splitlines()[-1] + "\n")
    _one_line_error(cli("imatrix", str(text), "--calibration", str(only_images), "-o", out), "--mmproj")
    _one_line_error(cli("imatrix", str(text), "--mmproj", str(text), "-o", out))
    assert not Path(out).exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

