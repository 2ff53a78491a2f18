"""The runtime end to end (our GGUF pair -> numpy vision -> llama.cpp decoder -> sampler) against the fp32 reference,
plus embedding injection, streaming, KV reuse, the thinking split and bad input.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kimivl_edge.decoder import ImageBlock
from kimivl_edge.errors import ImageError, KimiVLError, UsageError
from kimivl_edge.model import KimiVL, decode_pieces
from kimivl_edge.prompt import user_message
from shared import llama_last_logits, run_cli

VARIANTS = ("instruct", "thinking", "thinking-2506")


@pytest.fixture(scope="module")
def files(tiny_checkpoint, converted) -> dict[str, tuple[Path, Path, Path]]:
    out = {}
    for v in VARIANTS:
        ck = tiny_checkpoint(v, seed=21)
        out[v] = (ck, *converted(ck, "f32", "f32"))
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(5)
    paths = []
    for w, h in [(100, 60), (168, 224)]:
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        a[: h // 2] //= 3  # some structure so attention is not uniform
        p = d / f"{w}x{h}.png"
        Image.fromarray(a).save(p)
        paths.append(str(p))
    return paths


def ask(images: list[str], text: str) -> list[dict]:
    return [user_message(text, images)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_end_to_end_matches_the_reference(files, images, variant):
    import torch

    from kimivl_edge.reference.model import ReferenceModel

    ck, text, mm = files[variant]
    messages = ask(images, "What is in the two pictures?")
    ref = ReferenceModel(ck)
    p = ref.prepare(messages)
    with KimiVL.load(text, mm, kv_type="f32", n_ctx=512) as m:
        prompt = m.render_prompt(messages)
        keys = m.decoder.segment_keys(m.embed_prompt(prompt))
        pad = ref.config.media_placeholder_token_id
        assert [k if isinstance(k, int) else pad for k in keys] == p.input_ids  # same prompt, same framing
        assert prompt.image_tokens == p.input_ids.count(pad) and prompt.n_tokens == len(p.input_ids)
        with torch.no_grad():
            want = ref.logits(p)[-1].double().numpy()
        got = m.logits(messages)[0].astype(np.float64)
        rel = np.abs(got - want).max() / np.abs(want).max()
        assert rel <= 1e-4, f"first generated position: max relative logit error {rel:.2e}"
        ref_ids = [t for t in ref.generate_ids(p, 32) if t not in ref.tokenizer.stop_ids]
        out = m.generate(messages, temperature=0, max_tokens=32)
        assert out.tokens == ref_ids[: len(out.tokens)] and len(out.tokens) == len(ref_ids)
        # the probe, teacher-forced over a continuation: the reference's logits at the same positions
        cont = ref_ids[:5]
        assert cont
        p.input_ids = p.input_ids + cont
        with torch.no_grad():
            want = ref.logits(p)[-len(cont) - 1:].double().numpy()
        got = m.logits(messages, cont).astype(np.float64)
        assert got.shape == want.shape == (len(cont) + 1, m.decoder.n_vocab)
        rel = np.abs(got - want).max() / np.abs(want).max()
        assert rel <= 1e-4, f"teacher-forced positions: max relative logit error {rel:.2e}"


def test_embedding_rows_are_equivalent_to_tokens(files):
    import gguf

    _, text, _ = files["instruct"]
    emb = {t.name: t for t in gguf.GGUFReader(text).tensors}["token_embd.weight"]
    table = np.asarray(emb.data, dtype=np.float32).reshape(-1, emb.shape[0])
    with KimiVL.load(text, kv_type="f32") as m:
        ids = m.tokenize("<|im_user|>user<|im_middle|>Which side is the red circle on?<|im_end|>")
        a = m.decoder.prefill([ids])
        m.decoder.reset()
        b = m.decoder.prefill([ids[:3], ImageBlock(table[ids[3:9]], "rows"), ids[9:]])
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def test_streaming_equals_generate_and_keeps_utf8_whole(files, images):
    _, text, mm = files["instruct"]
    messages = ask(images[:1], "Describe it.")
    with KimiVL.load(text, mm, kv_type="f32") as m:
        full = m.generate(messages, temperature=0.9, seed=3, max_tokens=24)
        stream = m.stream(messages, temperature=0.9, seed=3, max_tokens=24)
        assert stream.stats.prompt_tokens == 0  # nothing runs before the first piece is asked for
        pieces = list(stream)
    assert "".join(p.text for p in pieces) == full.text
    assert all("\ufffd" not in p.text or "\ufffd" in full.text for p in pieces)
    st, want = stream.stats, full.stats  # the figures travel with each output
    assert (st.image_tokens, st.prompt_tokens, st.generated_tokens, st.finish_reason) == (
        want.image_tokens, want.prompt_tokens, len(full.tokens), full.finish_reason)
    assert want.image_tokens > 0 and want.prompt_tokens > want.image_tokens and want.generated_tokens > 0
    assert st.evaluated_tokens == 1  # the same prompt again: only its last position is evaluated
    assert want.prefill_seconds > 0 and want.decode_seconds > 0 and want.encode_seconds > 0


def test_second_turn_reuses_the_kv_cache_and_the_image(files, images):
    _, text, mm = files["instruct"]
    first = ask(images[:1], "What is this?")
    with KimiVL.load(text, mm, kv_type="f32") as m:
        encoded = []
        m.encode_progress = lambda *a: encoded.append(a)  # called while the vision encoder runs
        out = m.generate(first, temperature=0, max_tokens=6)
        assert encoded
        encoded.clear()
        turn2 = first + [{"role": "assistant", "content": out.text}, {"role": "user", "content": "And the colour?"}]
        cached = m.decoder.n_past
        stream = m.stream_tokens(turn2, temperature=0, max_tokens=1)
        next(stream, None)
        stream.close()
        st = stream.stats
        assert not encoded  # the image is not encoded again
        assert st.evaluated_tokens < st.prompt_tokens - st.image_tokens  # neither the image nor the first turn again
        assert st.evaluated_tokens <= st.prompt_tokens - cached + 8  # only the new tail (plus re-tokenized edges)
        before = m.decoder.n_evaluated
        got = m.logits(turn2)[0]  # the probe reuses the cache too: only the last position again
        assert m.decoder.n_evaluated - before == 1
    with KimiVL.load(text, mm, kv_type="f32") as fresh:
        want = fresh.logits(turn2)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_append_evaluates_the_next_position(files):
    """The one-token fast path of generation against llama.cpp evaluating the whole sequence in one batch."""
    _, text, _ = files["instruct"]
    with KimiVL.load(text, kv_type="f32", n_ctx=128) as m:
        ids = m.tokenize("<|im_user|>user<|im_middle|>Count to five.<|im_end|><|im_assistant|>assistant")
        m.decoder.prefill([ids])
        assert m.decoder.append(7) is None
        got = m.decoder.append(9, logits=True)
        np.testing.assert_array_equal(llama_last_logits(m.decoder), got)
        assert m.decoder.n_past == len(ids) + 2
        m.decoder.reset()
        want = m.decoder.prefill([ids + [7, 9]])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_repetition_penalty_keeps_greedy_tokens_distinct(files):
    _, text, _ = files["instruct"]
    msgs = [{"role": "user", "content": "Say something."}]
    with KimiVL.load(text, kv_type="f32") as m:
        m.tokenizer.stop_ids = ()  # generate the full length
        plain = m.generate(msgs, temperature=0, max_tokens=64).tokens
        penalized = m.generate(msgs, temperature=0, max_tokens=64, repeat_penalty=1e4).tokens
    assert len(set(plain)) < len(plain)  # the random model repeats itself without the penalty
    assert len(penalized) == 64 and len(set(penalized)) == 64


def test_thinking_split_while_streaming_with_markers_across_tokens(files):
    _, text, _ = files["thinking"]
    with KimiVL.load(text) as m:
        assert m.info.is_thinking
        synthetic = "◁think▷ The circle is left of centre. ◁/think▷ Left."
        raw = synthetic.encode()
        # one token per byte: every marker (and every multi-byte character) is split across tokens
        tok = m.tokenizer
        byte_token = {tok.token_bytes(i): i for i in range(tok.n_base)}
        byte_ids = [byte_token[bytes([b])] for b in raw]
        pieces = list(decode_pieces(byte_ids, tok, thinking=m.info.is_thinking))
    reasoning = "".join(p.text for p in pieces if p.kind == "reasoning")
    answer = "".join(p.text for p in pieces if p.kind == "answer")
    assert reasoning == "The circle is left of centre." and answer == "Left."


def test_thinking_history_keeps_only_the_answer(files):
    _, text, _ = files["thinking"]
    with KimiVL.load(text) as m:
        msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "◁think▷ secret ◁/think▷ shown"},
                {"role": "user", "content": "b"}]
        rendered = m.detokenize(m.render_prompt(msgs).ids)
    assert "secret" not in rendered and "shown" in rendered


def test_a_final_assistant_message_is_continued(files, images):
    """Assistant prefill: the answer continues the final assistant message. Oracle: the reference's greedy tokens
    after the rendered chat without that message plus the prefill's tokens. A thinking model's prefilled
    ◁think▷ ◁/think▷ (VLMEvalKit's way of turning thinking off) is kept whole, not split into reasoning."""
    from kimivl_edge.reference.model import ReferenceModel

    ck, text, mm = files["thinking"]
    messages = ask(images, "What is in the two pictures?")
    prefill = "\u25c1think\u25b7\n\n\u25c1/think\u25b7The"
    ref = ReferenceModel(ck)
    p = ref.prepare(messages)
    p.input_ids = p.input_ids + ref.tokenizer.encode(prefill)
    want = [t for t in ref.generate_ids(p, 12) if t not in ref.tokenizer.stop_ids]
    with KimiVL.load(text, mm, kv_type="f32", n_ctx=512) as m:
        out = m.generate([*messages, {"role": "assistant", "content": prefill}], temperature=0, max_tokens=12)
        assert out.tokens == want[: len(out.tokens)] and len(out.tokens) == len(want)
        assert out.reasoning is None and out.answer == out.text.strip()
        assert m.render_prompt([*messages, {"role": "assistant", "content": prefill}]).ids[-len(
            ref.tokenizer.encode(prefill)):] == ref.tokenizer.encode(prefill)
        with pytest.raises(UsageError, match="only an assistant message"):
            m.generate([{"role": "assistant", "content": "x"}])


# --- bad input ----------------------------------------------------------------------------------------------

def run(*args) -> subprocess.CompletedProcess:
    return run_cli("run", *args)


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    png = d / "ok.png"
    Image.new("RGB", (40, 30), "red").save(png)
    data = png.read_bytes()
    out = {"truncated": d / "truncated.png", "empty": d / "empty.png", "text": d / "text.png",
           "missing": d / "missing.png", "bomb": d / "bomb.png"}
    out["truncated"].write_bytes(data[: len(data) // 2])
    out["empty"].write_bytes(b"")
    out["text"].write_text("not an image")
    Image.new("1", (20000, 10000)).save(out["bomb"])  # 200 Mpx in a few KB
    return out


@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "missing", "bomb"])
def test_bad_images_exit_2(files, bad_images, kind):
    _, text, mm = files["instruct"]
    r = run("-m", str(text), "--mmproj", str(mm), "--image", str(bad_images[kind]), "-p", "hi")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_unusual_image_modes_work_like_the_hf_processor(files, tmp_path):
    _, text, mm = files["instruct"]
    paths = []
    for mode in ("CMYK", "I;16", "P", "RGBA", "L"):
        img = Image.new(mode, (50, 40))
        p = tmp_path / f"{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
        img.save(p)
        paths.append(str(p))
    with KimiVL.load(text, mm, kv_type="f32") as m:
        embs = m.encode_images(paths)
    # 50x40 pads to 56x56: a 4x4 patch grid, 4 merged tokens (docs/model.md §4)
    assert [e.shape for e in embs] == [(4, m.info.n_embd)] * 5
    assert all(np.isfinite(e).all() for e in embs)


def test_mismatched_and_foreign_files_are_refused(files, tmp_path):
    from kimivl_edge.checkpoint import Checkpoint
    from kimivl_edge.convert.gguf_out import write_gguf
    from kimivl_edge.convert.mmproj import mmproj_plan

    ck, text, mm = files["instruct"]
    wrong = tmp_path / "mmproj-wrong.gguf"
    write_gguf(wrong, mmproj_plan(Checkpoint(ck), "f32", extra_kv={"clip.vision.projection_dim": (999, None)}))
    cases = [("-m", str(text), "--mmproj", str(wrong)),  # projection dim != n_embd
             ("-m", str(mm), "--mmproj", str(mm)),  # an mmproj is not a text model
             ("-m", str(text), "--mmproj", str(text)),  # a text model is not an mmproj
             ("-m", str(tmp_path / "nope.gguf"))]
    for args in cases:
        r = run(*args, "-p", "hi")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)


def test_placeholder_count_and_context_overflow(files, images, tmp_path):
    _, text, mm = files["instruct"]
    big = tmp_path / "big.png"
    Image.new("RGB", (560, 560), "blue").save(big)  # 40x40 patches = 400 image tokens
    forged = [{"role": "user", "content": [{"type": "image", "image": images[0]},
                                           {"type": "text", "text": "and <|media_pad|>"}]}]
    with KimiVL.load(text, mm, n_ctx=64, allow_special_in_content=True) as m:  # HF's tokenization of content
        with pytest.raises(UsageError, match="placeholder"):
            m.render_prompt(forged)
    with KimiVL.load(text, mm, n_ctx=64) as m:
        assert len(m.render_prompt(forged).images) == 1  # by default the typed pad is text, not a placeholder
        assert m.decoder.n_ctx < 400
        with pytest.raises(UsageError, match="context"):
            m.generate(ask([str(big)], "What is this?"))
    with pytest.raises(KimiVLError):
        KimiVL.load(text, mm, vision_backend="cuda")
    with pytest.raises(ImageError):
        KimiVL.load(text, mm).encode_images([b"garbage"])
