"""`kimivl-edge verify` and the layer-streaming fp32 reference it runs (kimivl_edge/verify.py,
kimivl_edge/reference/streaming.py).

Oracles: the whole-model reference (``ReferenceModel``: every weight widened at once, ``decoder_forward``,
``greedy_generate``) for the streaming one; tracemalloc (numpy's weight buffers are traced) for the weights held at
once; metric values worked out by hand below; GGUF files broken here at the byte level (two experts swapped, all
shifted by one, a tensor overflowed to F16 infinity, the vision Q/K rows put back in the checkpoint's interleaved
order while the file still says they are split) for verify's verdicts.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from kimivl_edge.checkpoint import Checkpoint, hf_tensor_specs
from kimivl_edge.gguf_file import GGUFFile
from kimivl_edge.prompt import user_message
from kimivl_edge.synth.presets import preset_config
from kimivl_edge.verify import image_metrics, logit_metrics, top_k_overlap

torch = pytest.importorskip("torch")

from kimivl_edge.reference.model import ReferenceModel  # noqa: E402
from kimivl_edge.reference.streaming import StreamingReference, max_layer_bytes  # noqa: E402

ASSET = Path(__file__).resolve().parent.parent / "kimivl_edge" / "assets" / "kimi-vl-tiny"


# -- metrics against hand-computed values ---------------------------------------------------------------------

def test_image_metrics_by_hand():
    test = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    ref = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    m = image_metrics(test, ref)  # cosines 1, 1/sqrt(2), 1
    c = 1 / math.sqrt(2)
    assert m["tokens"] == 3
    assert m["cos_mean"] == pytest.approx((2 + c) / 3, abs=1e-12)
    assert m["cos_min"] == pytest.approx(c, abs=1e-12)
    # 1st percentile of the sorted [c, 1, 1], linear interpolation at rank 0.01 * 2 = 0.02
    assert m["cos_p1"] == pytest.approx(c + 0.02 * (1 - c), abs=1e-12)


def test_logit_metrics_by_hand():
    ln = np.log
    ref = ln(np.array([[0.5, 0.25, 0.25, 1e-9, 1e-9, 1e-9, 1e-9], [0.7, 0.1, 0.1, 0.05, 0.05, 1e-9, 1e-9]]))
    test = ln(np.array([[0.25, 0.5, 0.25, 1e-9, 1e-9, 1e-9, 1e-9], [0.7, 0.1, 0.1, 0.05, 0.05, 1e-9, 1e-9]]))
    m = logit_metrics(test, ref)
    # row 0: KL = 0.5 ln(0.5/0.25) + 0.25 ln(0.25/0.5) = 0.25 ln 2 (the 1e-9 entries add ~0); row 1: 0
    assert m["positions"] == 2
    assert m["kld_max"] == pytest.approx(0.25 * math.log(2), abs=1e-7)
    assert m["kld_mean"] == pytest.approx(0.125 * math.log(2), abs=1e-7)
    assert m["top1"] == 0.5  # argmax 0 vs 1 in row 0, the same in row 1
    assert m["top5"] == 1.0
    assert logit_metrics(test, ref, chunk=1) == m  # row chunks pool to the same figures
    only0 = logit_metrics(test, ref, rows=np.array([0]))
    assert only0["positions"] == 1 and only0["top1"] == 0.0
    assert only0["kld_mean"] == pytest.approx(0.25 * math.log(2), abs=1e-7)


def test_top5_overlap_by_hand():
    ref = np.array([[9, 8, 7, 6, 5, 0, 0, 0.0]])
    test = np.array([[9, 8, 0, 0, 0, 7, 6, 5.0]])  # shares {0, 1} of ref's top-5 {0..4}
    assert top_k_overlap(test, ref) == pytest.approx(2 / 5)
    assert top_k_overlap(ref, ref) == 1.0


# -- the layer-streaming reference ----------------------------------------------------------------------------

def _image(w: int, h: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def whole_and_stream(tiny_checkpoint):
    path = tiny_checkpoint()
    return ReferenceModel(path), StreamingReference(Checkpoint(path))


def test_streaming_logits_equal_whole_model(whole_and_stream):
    whole, stream = whole_and_stream
    p = whole.prepare([user_message("What is in the picture?", [_image(70, 50, 0), _image(30, 90, 1)])])
    want = whole.logits(p)
    emb = stream.encode_images(p.pixel_values, p.grid_hws)
    torch.testing.assert_close(emb, whole.image_embeds(p.pixel_values, p.grid_hws), rtol=0, atol=1e-6)
    got = stream.forward([stream.embed(p.input_ids, emb)])[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def _greedy_prompts(whole, stream) -> tuple[list, list]:
    """A text chat and an image chat, prepared by the whole-model reference, and as the streaming reference's
    (token ids, image embeddings) prompts."""
    chats = [[user_message("Hello there")], [user_message("Describe it.", [_image(40, 40, 2)])]]
    prepared = [whole.prepare(c) for c in chats]
    prompts = []
    for p in prepared:
        emb = None if p.pixel_values is None else stream.encode_images(p.pixel_values, p.grid_hws)
        prompts.append((p.input_ids, emb))
    return prepared, prompts


def test_streaming_greedy_equals_whole_model(whole_and_stream):
    whole, stream = whole_and_stream
    prepared, prompts = _greedy_prompts(whole, stream)
    out = stream.greedy(prompts, 6, sorted(whole.tokenizer.stop_ids))
    for p, (cont, states) in zip(prepared, out):
        assert cont == whole.generate_ids(p, 6)
        # the last pass ran prompt + cont[:-1]: its positions predict tokens 1 .. the last of cont
        want = whole.logits(type(p)(p.input_ids + cont[:-1], p.pixel_values, p.grid_hws))
        torch.testing.assert_close(stream.head([states])[0], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["right", "wrong", "half", "past-stop"])
def test_a_draft_gives_the_same_greedy_continuation_in_fewer_passes(whole_and_stream, kind):
    """Proposed tokens (speculative decoding's greedy check) change the number of passes over the layers, never
    the continuation: the oracle is the whole-model reference's own greedy generation."""
    whole, stream = whole_and_stream
    prepared, prompts = _greedy_prompts(whole, stream)
    n = 6
    wants = [whole.generate_ids(p, n) for p in prepared]
    stops = sorted(whole.tokenizer.stop_ids)
    n_vocab = whole.config.text.vocab_size

    def draft(k: int, accepted: list[int], m: int) -> list[int]:
        want = wants[k]
        assert accepted == want[: len(accepted)] and m == n - len(accepted) - 1
        right = want[len(accepted): len(accepted) + m]
        if kind == "right":
            return right
        if kind == "past-stop":  # tokens after the reference's stop (or its last token) are never taken
            return right + [stops[0]] * 3
        wrong = [(t + 1) % n_vocab for t in right]
        return wrong if kind == "wrong" else right[:2] + wrong[2:]

    out = stream.greedy(prompts, n, stops, draft)
    for p, want, (cont, states) in zip(prepared, wants, out):
        assert cont == want
        ref = whole.logits(type(p)(p.input_ids + cont[:-1], p.pixel_values, p.grid_hws))
        torch.testing.assert_close(stream.head([states])[0], ref, rtol=0, atol=1e-6)
    longest = max(len(w) for w in wants)
    assert stream.passes == {"right": 1, "past-stop": 1, "wrong": longest, "half": -(-longest // 3)}[kind]


def test_streaming_holds_one_layer_of_weights(tiny_checkpoint):
    path = tiny_checkpoint()
    ckpt = Checkpoint(path)
    largest_tensor = max(2 * int(np.prod(s.shape)) for s in hf_tensor_specs(ckpt.config))
    all_fp32 = sum(4 * int(np.prod(s.shape)) for s in hf_tensor_specs(ckpt.config))
    stream = StreamingReference(ckpt)
    p = ReferenceModel(path).prepare([user_message("Count the shapes.", [_image(60, 60, 3)])])
    tracemalloc.start()
    try:
        emb = stream.encode_images(p.pixel_values, p.grid_hws)
        stream.forward([stream.embed(p.input_ids, emb)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    bound = max_layer_bytes(ckpt.config) + largest_tensor + (256 << 10)  # + one bf16 read buffer + small objects
    assert stream.meter.peak <= max_layer_bytes(ckpt.config)
    assert peak <= bound, (peak, bound)
    assert all_fp32 > 2.5 * bound  # the whole model would not fit under the bound


def test_a3b_bound_from_the_config():
    """The largest unit at a3b size is a MoE decoder layer: routed + shared experts, router, MLA, norms."""
    t = preset_config("a3b").text
    H, F, E = t.hidden_size, t.moe_intermediate_size, t.n_routed_experts
    S = F * t.n_shared_experts
    heads, dn, dr, dv, r = t.num_attention_heads, t.qk_nope_head_dim, t.qk_rope_head_dim, t.v_head_dim, t.kv_lora_rank
    mla = H * heads * (dn + dr) + H * (r + dr) + r + heads * (dn + dv) * r + heads * dv * H + dr // 2
    moe = 3 * E * F * H + 3 * S * H + E * H + E
    want = 4 * (mla + moe + 2 * H)
    assert max_layer_bytes(preset_config("a3b")) == want
    assert 2.3e9 < want < 2.4e9  # README: 2.34 GB


# -- verify on GGUF pairs ---------------------------------------------------------------------------------------

def _edit(path: Path, name: str, fn) -> None:
    """Change one tensor's bytes in place: ``fn(bytes as uint8 memmap, TensorInfo)``."""
    with GGUFFile(path) as g:
        info = g.tensors[name]
    mm = np.memmap(path, np.uint8, "r+", offset=info.offset, shape=(info.nbytes,))
    fn(mm, info)
    mm.flush()
    del mm


def swap_experts(path: Path, a: int = 0, b: int = 1) -> None:
    """Experts a and b trade places in every routed-expert tensor."""
    order = list(range(max(a, b) + 1))
    order[a], order[b] = b, a
    permute_experts(path, order)


def permute_experts(path: Path, order: list[int]) -> None:
    """Every routed-expert tensor's expert slabs reordered: slab k takes what slab order[k] held (the first
    len(order) experts; the rest stay)."""
    with GGUFFile(path) as g:
        names = [n for n in g.tensors if "_exps." in n]
    assert names

    def permute(mm, info):
        s = info.nbytes // info.shape[0]  # one expert's slab
        old = mm[:len(order) * s].copy()
        for k, j in enumerate(order):
            mm[k * s:(k + 1) * s] = old[j * s:(j + 1) * s]

    for n in names:
        _edit(path, n, permute)


def overflow_f16(path: Path, name: str) -> None:
    """A few weights of an F16 tensor become +inf (0x7C00): what narrowing a value above 65504 gives."""
    def inf(mm, info):
        assert info.type.name == "F16"
        mm.view(np.uint16)[:8] = 0x7C00
    _edit(path, name, inf)


def interleave_vision_qk(path: Path, heads: int) -> None:
    """Put the Q/K rows of an F32 mmproj back in the checkpoint's interleaved order (llama.cpp's layout) but keep
    the ``rope_layout`` key that says they are split: row j of a head holds original row order[j], with order =
    the pairs (4i, 4i+1) of all i, then the pairs (4i+2, 4i+3) (docs/model.md §5.4)."""
    with GGUFFile(path) as g:
        assert g.metadata["kimivl_edge.vision.rope_layout"] == "ggml_split"
        names = [n for n in g.tensors if n.endswith((".attn_q.weight", ".attn_q.bias", ".attn_k.weight",
                                                     ".attn_k.bias"))]

    def undo(mm, info):
        assert info.type.name == "F32"
        a = mm.view(np.float32).reshape(info.shape[0], -1)
        d = a.shape[0] // heads
        order = [r for i in range(d // 4) for r in (4 * i, 4 * i + 1)] + \
                [r for i in range(d // 4) for r in (4 * i + 2, 4 * i + 3)]
        idx = (np.arange(heads)[:, None] * d + np.array(order)[None, :]).reshape(-1)
        orig = np.empty_like(a)
        orig[idx] = a
        a[:] = orig
    for n in names:
        _edit(path, n, undo)


def verify(cli, *args: str, **kw):
    return cli("verify", str(ASSET), "--threads", "1", *args, **kw)


def lines(out: str, word: str) -> list[str]:
    return [x for x in out.splitlines() if x.startswith(word)]


@pytest.fixture(scope="module")
def q8(converted):
    return converted(ASSET, "q8_0", "q8_0")


def test_faithful_pair_passes_and_writes_json(cli, q8, tmp_path):
    text, mmproj = q8
    out = tmp_path / "report.json"
    r = verify(cli, "-m", str(text), "--mmproj", str(mmproj), "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    passes = lines(r.stdout, "PASS")
    assert len(passes) == 2 and "(Q8_0)" in passes[0] and "image tokens" in passes[1], r.stdout
    rep = json.loads(out.read_text())
    assert [v["pass"] for v in rep["verdicts"]] == [True, True]
    names = [p["case"] for p in rep["prompts"]]
    assert len(names) == 7 and sum(n.startswith("image") for n in names) == 3  # 4 texts + 3 images
    # docs/model.md §4, the asset's in_token_limit of 196 patches: 61x47 (4*3 patches) pads to 84x56 (6x4 patches);
    # 150x400 has 10*28 = 280 > 196 patches, is resized by sqrt(196/280) to 125x334 and padded to 140x336 (10x24);
    # 640x480 has 45*34 = 1530, is resized by sqrt(196/1530) to 229x171 and padded to 252x196 (18x14): 4 patches a
    # token
    assert [i["tokens"] for i in rep["images"]] == [6, 60, 63]
    v = rep["verdicts"][0]
    assert v["positions"] == sum(p["positions"] for p in rep["prompts"])
    assert v["kld_max"] == max(p["kld_max"] for p in rep["prompts"])
    assert rep["reference_peak_weight_bytes"] <= max_layer_bytes(Checkpoint(ASSET).config)
    assert sorted(os.listdir(tmp_path)) == ["report.json"]  # no temporary file left


def test_swapped_experts_fail(cli, q8, tmp_path):
    broken = tmp_path / "swapped.gguf"
    shutil.copy(q8[0], broken)
    swap_experts(broken)
    r = verify(cli, "-m", str(broken))
    assert r.returncode == 1, r.stdout + r.stderr
    assert len(lines(r.stdout, "FAIL")) == 1 and "swapped.gguf (Q8_0)" in r.stdout


def test_every_quantized_text_type_has_its_own_bounds():
    """The IQ mixes and IQ4_EDGE fell back to Q4_0's bounds (issue 19): every `convert --outtype` has its own."""
    from kimivl_edge.convert.pipeline import TEXT_TYPES
    from kimivl_edge.verify import TEXT_BOUNDS

    assert {t.upper() for t in TEXT_TYPES} <= set(TEXT_BOUNDS)


@pytest.fixture(scope="module")
def iq_pair(cli, tmp_path_factory):
    """(outtype) -> the text GGUF of the trained tiny model in that mix, with an imatrix from the default set."""
    d = tmp_path_factory.mktemp("iq")
    im = d / "tiny.imatrix.gguf"
    r = cli("imatrix", str(ASSET), "-o", str(im), "--threads", "1")
    assert r.returncode == 0, r.stderr

    def get(outtype: str) -> Path:
        r = cli("convert", str(ASSET), "--outtype", outtype, "--mmproj-type", "q8_0", "--outdir", str(d / outtype),
                "--imatrix", str(im), "--threads", "1")
        assert r.returncode == 0, r.stderr
        return next((d / outtype).glob("Kimi-*.gguf"))
    return get


@pytest.mark.parametrize("outtype", ["iq4_edge", "iq3_xxs"])
def test_iq_files_pass_their_own_bounds(cli, iq_pair, outtype):
    from kimivl_edge.verify import TEXT_BOUNDS

    kld, top1, top5 = TEXT_BOUNDS[outtype.upper()]
    r = verify(cli, "-m", str(iq_pair(outtype)))
    assert r.returncode == 0, r.stdout + r.stderr
    (line,) = lines(r.stdout, "PASS")
    assert f"({outtype.upper()})" in line and f"KLD mean <= {kld:g}, top-1 >= {100 * top1:g} %" in line


def test_shifted_experts_fail_in_an_iq4_edge_file(cli, iq_pair, tmp_path):
    """Every layer's experts one place off (expert k holds expert k+1's weights), as an off-by-one in a writer would
    leave them. On the current asset this measures KLD 0.787, top-1 72.3 %, against the clean file's 0.015, 96.4 % (its
    bounds: 0.25, 82 %). Swapping only experts 0 and 1 moves it far less there (0.122, 92.6 %: a pair the router
    seldom tells apart), and passes."""
    broken = tmp_path / "shifted.gguf"
    shutil.copy(iq_pair("iq4_edge"), broken)
    with GGUFFile(broken) as g:
        n_expert = g.metadata["deepseek2.expert_count"]
    permute_experts(broken, [(k + 1) % n_expert for k in range(n_expert)])
    r = verify(cli, "-m", str(broken))
    assert r.returncode == 1, r.stdout + r.stderr
    assert len(lines(r.stdout, "FAIL")) == 1 and "shifted.gguf (IQ4_EDGE)" in r.stdout


def test_f16_overflowed_tensor_fails(cli, converted, tmp_path):
    broken = tmp_path / "overflow.gguf"
    shutil.copy(converted(ASSET, "f16", "f32")[0], broken)
    overflow_f16(broken, "blk.1.ffn_down_shexp.weight")
    r = verify(cli, "-m", str(broken))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "KLD mean nan" in lines(r.stdout, "FAIL")[0]


def test_wrong_rope_layout_fails(cli, converted, q8, tmp_path):
    broken = tmp_path / "mmproj-wrong-rope.gguf"
    shutil.copy(converted(ASSET, "q8_0", "f32")[1], broken)
    interleave_vision_qk(broken, Checkpoint(ASSET).config.vision.num_attention_heads)
    r = verify(cli, "-m", str(q8[0]), "--mmproj", str(broken))
    assert r.returncode == 1, r.stdout + r.stderr
    fails = lines(r.stdout, "FAIL")
    assert any("mmproj-wrong-rope.gguf (F32)" in f for f in fails), r.stdout


# -- one-line errors ------------------------------------------------------------------------------------------

def one_error_line(r) -> str:
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr


def test_without_torch_names_the_install_command(cli, q8, tmp_path):
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named torch')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    err = one_error_line(verify(cli, "-m", str(q8[0]), env=env))
    assert "pip install 'kimivl-edge[reference]'" in err


def test_bad_inputs_are_one_line_errors(cli, q8, tmp_path):
    text = str(q8[0])
    assert "missing" in one_error_line(cli("verify", str(tmp_path), "-m", text))
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    assert "line 2" in one_error_line(verify(cli, "-m", text, "--prompts", str(bad)))
    assert "directory does not exist" in one_error_line(verify(cli, "-m", text, "--json", str(tmp_path / "no/x.json")))
    assert "no such file" in one_error_line(verify(cli, "-m", str(tmp_path / "none.gguf")))
    img = tmp_path / "x.png"
    img.write_text("not a png")
    one_error_line(verify(cli, "-m", text, "--mmproj", str(q8[1]), "--image", str(img)))
    assert "--max-new-tokens" in one_error_line(verify(cli, "-m", text, "--max-new-tokens", "0"))


def test_pair_from_another_checkpoint_is_refused():
    from types import SimpleNamespace

    from kimivl_edge.errors import UsageError
    from kimivl_edge.verify import check_pair

    ref = SimpleNamespace(config=Checkpoint(ASSET).config)
    check_pair(SimpleNamespace(info=SimpleNamespace(n_vocab=1024, n_embd=256)), ref)
    with pytest.raises(UsageError, match="not converted from this checkpoint"):
        check_pair(SimpleNamespace(info=SimpleNamespace(n_vocab=163840, n_embd=2048)), ref)


# -- terminal progress and Ctrl-C -----------------------------------------------------------------------------

class _Terminal:
    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


def test_progress_per_layer_on_a_terminal_only(tiny_checkpoint):
    from kimivl_edge.verify import terminal_progress

    assert terminal_progress(_Terminal(False)) is None
    term = _Terminal(True)
    stream = StreamingReference(Checkpoint(tiny_checkpoint()), progress=terminal_progress(term))
    stream.forward([stream.embed([1, 2, 3], None)])
    n = stream.config.text.num_hidden_layers
    shown = [f"reference: decoder, layer {i}/{n}" for i in range(1, n + 1)]
    assert all(s in term.text for s in shown), term.text
    assert term.text.endswith("\r\033[K")  # the status line is cleared when the stage ends


def test_ctrl_c_leaves_no_json(q8, tmp_path):
    import signal
    import subprocess
    import sys

    prompts = tmp_path / "many.jsonl"
    # enough prompts that the comparisons still run when the signal lands (60 were done first once, in CI)
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {k}."}) + "\n" for k in range(400)))
    out = tmp_path / "report.json"
    proc = subprocess.Popen([sys.executable, "-m", "kimivl_edge", "verify", str(ASSET), "-m", str(q8[0]),
                             "--threads", "1", "--max-new-tokens", "2", "--prompts", str(prompts), "--json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the first per-prompt line: the comparison is under way
    assert first.startswith("  line 1:"), first
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["kimivl-edge verify: interrupted"]
    assert sorted(os.listdir(tmp_path)) == ["many.jsonl"]


def test_json_is_written_atomically(tmp_path):
    from kimivl_edge.verify import write_json_atomic

    target = tmp_path / "out.json"
    with pytest.raises(TypeError):  # fails half-way through the dump, after "a" was written
        write_json_atomic(str(target), {"a": list(range(1000)), "b": object()})
    assert os.listdir(tmp_path) == []
    write_json_atomic(str(target), {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["out.json"]


def test_default_inputs():
    from kimivl_edge.image import ImageProcessorConfig
    from kimivl_edge.verify import MAX_IMAGE_PATCHES, default_cases

    plain, thinking = default_cases(False), default_cases(True)
    assert len(thinking) == len(plain) + 1 and any(c.name == "thinking" for c in thinking)
    texts = [c.messages[0]["content"] for c in plain if not c.images]
    assert len(texts) == 4 and any("\u0301" in t for t in texts) and any("\u0300" in t for t in texts)
    sizes = [c.images[0].size for c in plain if c.images]
    patch = ImageProcessorConfig.from_checkpoint(ASSET).patch_size
    assert all(w % (2 * patch) and h % (2 * patch) for w, h in sizes)  # every image is padded
    assert any((w // patch) * (h // patch) > MAX_IMAGE_PATCHES for w, h in sizes)  # one is resized
