"""The persistent prefix cache (kimivl_edge/prefix_cache.py): a restored prefix gives the logits of a recompute (in
this process and in a new one), every change of files, settings or prompt prefix is a miss, bad entries and
unwritable directories degrade to a recompute with one warning, concurrent writers leave whole entries, and the
directory stays within its size bound. The oracle is always the same prompt computed by a model without a cache.
"""
from __future__ import annotations

import errno
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kimivl_edge.errors import UsageError
from kimivl_edge.model import KimiVL
from kimivl_edge.prefix_cache import SUFFIX, Entry, PrefixCache
from kimivl_edge.prompt import user_message
from shared import llama_last_logits

ROOT = Path(__file__).resolve().parents[1]
LOGGER = "kimivl_edge.prefix_cache"


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint) -> Path:
    return tiny_checkpoint("instruct", seed=21)


@pytest.fixture(scope="module")
def pair(ckpt, converted) -> tuple[Path, Path]:
    return converted(ckpt, "f32", "f32")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(3)
    out = []
    for i, (w, h) in enumerate([(120, 90), (120, 90)]):
        p = d / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        out.append(str(p))
    return out


def q(image: str, text: str) -> list[dict]:
    return [user_message(text, [image])]


def load(text, mm, cache: PrefixCache | None, **kw) -> KimiVL:
    kw = {"kv_type": "f32", "n_ctx": 512, "n_threads": 1, **kw}
    return KimiVL.load(text, mm, prefix_cache=cache, **kw)


def recompute(pair, messages, **kw) -> np.ndarray:
    with load(*pair, None, **kw) as m:
        return m.logits(messages)


def entries(d: Path) -> list[Path]:
    return sorted(d.glob("*" + SUFFIX)) if d.is_dir() else []


def restored(pair, cache, messages, **kw) -> int:
    with load(*pair, cache, **kw) as m:
        return m.generate(messages, max_tokens=1).stats.restored_tokens


CHILD = """
import sys, numpy as np
from kimivl_edge.model import KimiVL
from kimivl_edge.prefix_cache import PrefixCache
from kimivl_edge.prompt import user_message
text, mm, cache, image, other, out = sys.argv[1:7]
with KimiVL.load(text, mm, kv_type="f32", n_ctx=512, n_threads=1, prefix_cache=PrefixCache(cache)) as m:
    second = [user_message("Describe the colours.", [image])]
    np.save(out, m.logits(second))
    print(m.decoder.n_evaluated, m.render_prompt(second).n_tokens)
    m.generate([user_message("What is it?", [other])], max_tokens=1)
    m.generate([user_message("Count the squares.", [image])], max_tokens=1)
"""


def child(pair, cache: Path, images: list[str], out: Path, fsize: int | None = None) -> tuple[int, int, str]:
    """A new process asks "Describe the colours." about images[0] with the cache (saving its logits), then asks
    about images[1] and images[0] again; with ``fsize``, files it writes are limited to that many bytes (a full
    disk: writes fail with EFBIG). Returns (positions it evaluated for the first prompt, their number, stderr)."""
    def limit():
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))

    r = subprocess.run([sys.executable, "-c", CHILD, *map(str, (*pair, cache, *images, out))], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert r.returncode == 0, r.stderr
    evaluated, n_tokens = map(int, r.stdout.split())
    return evaluated, n_tokens, r.stderr


# -- hits -------------------------------------------------------------------------------------------------------
def test_a_hit_gives_the_logits_of_a_recompute_without_the_vision_encoder(pair, images, tmp_path):
    first, second = q(images[0], "What is it?"), q(images[0], "Describe the colours.")
    want = recompute(pair, second)
    cache = PrefixCache(tmp_path)
    with load(*pair, cache) as m:
        m.logits(first)
    assert len(entries(tmp_path)) == 1
    with load(*pair, cache) as m:
        def no_encoder(*a, **k):
            raise AssertionError("the vision encoder ran on a cache hit")

        m.vision.encode = no_encoder  # type: ignore[union-attr]
        n_prompt = m.render_prompt(second).n_tokens
        got = m.logits(second)
        assert m.decoder.n_evaluated < n_prompt - 20  # the 20 image rows (and the text before them) were restored
    np.testing.assert_array_equal(got, want)
    with load(*pair, cache) as m, load(*pair, None) as plain:
        a = m.generate(second, temperature=0, max_tokens=8)
        b = plain.generate(second, temperature=0, max_tokens=8)
        assert a.stats.restored_tokens > 20 and a.tokens == b.tokens


def test_a_hit_in_a_new_process(pair, images, tmp_path):
    cache = tmp_path / "cache"
    with load(*pair, PrefixCache(cache)) as m:
        m.logits(q(images[0], "What is it?"))
    evaluated, n_tokens, err = child(pair, cache, images, tmp_path / "out.npy")
    assert err == "" and evaluated < n_tokens - 20  # the image rows came from the parent's entry
    want = recompute(pair, q(images[0], "Describe the colours."))
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), want)
    assert len(entries(cache)) == 2  # the parent's, and the child's for images[1]


def test_text_only_state_round_trip(pair):
    """The decoder's state hooks on a text-only prefix (the API stores only prefixes that end with an image)."""
    ids = list(range(5, 45))
    with load(*pair, None) as a, load(*pair, None) as b:
        a.decoder.prefill([ids[:30]])
        state = a.decoder.save_state()
        assert b.decoder.load_state(state, ids[:30])
        before = b.decoder.n_evaluated
        got = b.decoder.prefill([ids])
        assert b.decoder.n_evaluated - before == 10
        a.decoder.reset()
        want = a.decoder.prefill([ids])
        # states llama.cpp refuses (cut short, garbage, or not holding as many positions as the keys say): False,
        # and the decoder is empty and usable
        for bad, keys in ((state[:-100], ids[:30]), (bytes(len(state)), ids[:30]), (state, ids[:29])):
            assert not b.decoder.load_state(bad, keys)
            assert b.decoder.n_past == 0
            np.testing.assert_array_equal(b.decoder.prefill([ids]), want)
    np.testing.assert_array_equal(got, want)


# -- misses -----------------------------------------------------------------------------------------------------
def test_misses(pair, ckpt, converted, images, tmp_path, caplog):
    cache = PrefixCache(tmp_path)
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    base = history + q(images[0], "What is it?")
    assert restored(pair, cache, base) == 0
    assert restored(pair, cache, history + q(images[0], "Other question")) > 20  # the control: a hit
    text16, _ = converted(ckpt, "f16", "f32")
    _, mm16 = converted(ckpt, "f32", "f16")
    edited = [{"role": "user", "content": "Hey"}, *base[1:]]
    assert restored(pair, cache, history + q(images[1], "What is it?")) == 0, "changed image"
    assert restored(pair, cache, edited) == 0, "edited earlier turn"
    assert restored((text16, pair[1]), cache, base) == 0, "another text GGUF"
    assert restored((pair[0], mm16), cache, base) == 0, "another mmproj"
    assert restored(pair, cache, base, kv_type="f16") == 0, "another KV type"
    assert restored(pair, cache, base, vision_backend="ggml") == 0, "another vision backend"
    assert len(entries(tmp_path)) == 7
    assert not [r for r in caplog.records if r.name == LOGGER]  # each a plain miss, not a refused entry


# -- bad entries and directories --------------------------------------------------------------------------------
def _flip(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x40
    p.write_bytes(bytes(b))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-1000])


def _garbage(p: Path) -> None:
    p.write_bytes(b"\x00" * 100)


@pytest.mark.parametrize("damage", [_flip, _truncate, _garbage, "foreign"])
def test_a_bad_entry_is_recomputed_with_one_warning_and_rewritten(pair, images, tmp_path, caplog, damage):
    first, second = q(images[0], "What is it?"), q(images[0], "Describe the colours.")
    cache = PrefixCache(tmp_path)
    with load(*pair, cache) as m:
        m.logits(first)
    [p] = entries(tmp_path)
    if damage == "foreign":  # a whole entry of another image, under this prefix's name
        other = PrefixCache(tmp_path / "other")
        with load(*pair, other) as m:
            m.logits(q(images[1], "What is it?"))
        os.replace(entries(tmp_path / "other")[0], p)
    else:
        damage(p)
    with load(*pair, cache) as m:
        caplog.clear()
        got = m.logits(second)
    assert [r.levelname for r in caplog.records if r.name == LOGGER] == ["WARNING"]
    np.testing.assert_array_equal(got, recompute(pair, second))
    assert restored(pair, cache, second) > 20  # rewritten: whole again


def test_a_full_directory_degrades_to_recompute_with_one_warning(pair, images, tmp_path):
    cache = tmp_path / "cache"
    evaluated, n_tokens, err = child(pair, cache, images, tmp_path / "out.npy", fsize=1 << 14)  # entries: ~160 kB
    lines = err.splitlines()
    assert len(lines) == 1 and "prefix cache: cannot write" in lines[0], err
    assert evaluated == n_tokens
    want = recompute(pair, q(images[0], "Describe the colours."))
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), want)
    assert list(cache.iterdir()) == []  # no entry, no temporary file left


def test_a_read_only_directory_degrades_to_recompute_with_one_warning(pair, images, tmp_path, caplog, monkeypatch):
    # Tests run as root here, where permissions do not stop writes: the directory's refusal is injected where
    # the cache creates its file (what open(2) returns in a read-only directory).
    import kimivl_edge.prefix_cache as pc

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(pc.tempfile, "mkstemp", read_only)
    second = q(images[0], "Describe the colours.")
    with load(*pair, PrefixCache(tmp_path)) as m:
        caplog.clear()
        m.logits(q(images[0], "What is it?"))
        m.logits(q(images[1], "What is it?"))
        got = m.logits(second)
    assert [r.levelname for r in caplog.records if r.name == LOGGER] == ["WARNING"]
    np.testing.assert_array_equal(got, recompute(pair, second))
    assert entries(tmp_path) == []


# -- the store itself -------------------------------------------------------------------------------------------
def _entry(seed: int, n_state: int) -> Entry:
    rng = np.random.default_rng(seed)
    keys = [1, 2, *((f"img{seed}", i) for i in range(4)), 3]
    return Entry(keys, rng.bytes(n_state), {f"img{seed}": rng.standard_normal((4, 8)).astype(np.float32)})


def _writer(directory: str, rounds: int) -> None:
    cache = PrefixCache(directory)
    want = _entry(0, 8 << 20)
    for _ in range(rounds):
        assert cache.store("id", _entry(0, 8 << 20))
        got = cache.load("id", want.keys)
        assert got is not None and got.state == want.state


def test_two_processes_writing_the_same_entry_leave_a_valid_cache(tmp_path, caplog):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), 15)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    want = _entry(0, 8 << 20)
    got = PrefixCache(tmp_path).load("id", want.keys)
    assert got is not None and got.state == want.state and got.keys == want.keys
    np.testing.assert_array_equal(got.embeddings["img0"], want.embeddings["img0"])
    assert [p.name for p in tmp_path.iterdir()] == [entries(tmp_path)[0].name]  # no temporary file left
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_the_size_bound_evicts_the_least_recently_used(tmp_path):
    one = len(Path(_store(PrefixCache(tmp_path / "probe"), 0)).read_bytes())
    cache = PrefixCache(tmp_path / "c", max_bytes=3 * one + 100)
    paths = [_store(cache, s) for s in range(3)]
    for age, p in zip((300, 200, 100), paths):  # stored 300, 200 and 100 s ago
        t = os.path.getmtime(p) - age
        os.utime(p, (t, t))
    assert cache.load("id", _entry(0, 1000).keys) is not None  # entry 0 is now the most recent
    _store(cache, 3)
    assert cache.total_bytes() <= cache.max_bytes
    assert [p.exists() for p in paths] == [True, False, True]  # entry 1 was the least recently used
    assert not cache.store("id", _entry(9, 4 * one))  # larger than the bound: not stored
    assert cache.total_bytes() <= cache.max_bytes


def _store(cache: PrefixCache, seed: int) -> Path:
    e = _entry(seed, 1000)
    assert cache.store("id", e)
    return cache.path("id", e.keys)


def test_bad_settings_are_one_line_errors(pair, cli, tmp_path):
    with pytest.raises(UsageError, match="prefix_cache must be a PrefixCache"):
        load(*pair, str(tmp_path))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="max_bytes"):
        PrefixCache(tmp_path, -1)
    r = cli("run", "-m", str(pair[0]), "-p", "hi", "--cache-max-mb", "-1")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "--cache-max-mb" in r.stderr


# -- the CLI ----------------------------------------------------------------------------------------------------
def test_run_uses_the_cache_by_default_and_not_with_no_cache(pair, images, cli, tmp_path):
    text, mm = map(str, pair)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    common = ("run", "-m", text, "--mmproj", mm, "--image", images[0], "--kv-type", "f32", "--ctx", "512",
              "--threads", "1", "--temp", "0", "--max-tokens", "6", "--stats")
    off = cli(*common, "-p", "Describe the colours.", "--no-cache", env=env)
    assert off.returncode == 0, off.stderr
    assert not (tmp_path / "xdg").exists()
    first = cli(*common, "-p", "What is it?", env=env)
    assert first.returncode == 0 and "restored 0 tok" in first.stderr, first.stderr
    assert len(entries(tmp_path / "xdg" / "kimivl-edge")) == 1
    again = cli(*common, "-p", "Describe the colours.", env=env)
    assert again.returncode == 0 and "restored 0 tok" not in again.stderr, again.stderr
    assert again.stdout == off.stdout
    other = cli(*common, "-p", "Describe the colours.", "--cache-dir", str(tmp_path / "mine"), env=env)
    assert other.returncode == 0 and len(entries(tmp_path / "mine")) == 1


@pytest.mark.parametrize("parallel", [[], ["--parallel", "2"]], ids=["one-slot", "parallel-2"])
def test_serve_reuses_the_cache_across_restarts(pair, images, tmp_path, parallel):
    """Two servers one after the other, loaded by `kimivl-edge serve`'s own options: the second one's first
    request, a new question about the first one's image, comes mostly from the cache (with ``--parallel`` too:
    its slots restore and store entries as the single decoder does)."""
    import httpx

    from kimivl_edge.cli_common import load_model
    from kimivl_edge.serve import build_parser, config
    from kimivl_edge.server.app import create_app
    from test_server import ThreadServer, ask, data_uri

    args = build_parser().parse_args(["-m", str(pair[0]), "--mmproj", str(pair[1]), "--kv-type", "f32", "--ctx", "512",
                                 "--threads", "1", "--cache-dir", str(tmp_path), *parallel])
    cached = []
    for question in ("What is it?", "Describe the colours."):
        srv = ThreadServer(create_app(config(args), lambda: load_model(args)))
        try:
            srv.wait_ready()
            r = httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
                "model": pair[0].name, "messages": ask(question, data_uri(Path(images[0]))), "max_tokens": 1})
            assert r.status_code == 200, r.text
            cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
        finally:
            srv.stop()
    assert cached[0] == 0 and cached[1] > 20 and len(entries(tmp_path)) == 1


def test_chat_uses_the_cache_of_an_earlier_process(pair, images, cli, tmp_path):
    text, mm = map(str, pair)
    common = ("chat", "-m", text, "--mmproj", mm, "--kv-type", "f32", "--ctx", "512", "--threads", "1",
              "--max-tokens", "4", "--cache-dir", str(tmp_path))
    first = cli(*common, stdin=f"/image {images[0]}\nWhat is it?\n")
    assert first.returncode == 0, first.stderr
    [p] = entries(tmp_path)
    os.utime(p, (1e9, 1e9))  # long unused
    again = cli(*common, stdin=f"/image {images[0]}\nDescribe the colours.\n")
    assert again.returncode == 0, again.stderr
    assert entries(tmp_path) == [p] and p.stat().st_mtime > 1e9  # read (an entry is touched when restored)


def test_a_conversation_going_on_is_not_cut_to_store_its_prefix(pair, images, tmp_path):
    """Turn 2 of a chat whose entry was removed meanwhile (another process, the size bound): the KV cache holds the
    image and the first turn, so only the new tokens are evaluated, and nothing is stored."""
    cache = PrefixCache(tmp_path)
    first = q(images[0], "What is it?")
    with load(*pair, cache) as m:
        answer = m.generate(first, max_tokens=3).text
        [p] = entries(tmp_path)
        p.unlink()
        follow = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
        held = m.decoder.cached_prefix(m.decoder.segment_keys(m.embed_prompt(m.render_prompt(follow))))
        st = m.generate(follow, max_tokens=1).stats
    assert held > 20 and st.evaluated_tokens == st.prompt_tokens - held
    assert entries(tmp_path) == []


def test_a_parallel_slot_restores_an_entry_of_the_single_decoder(pair, images, tmp_path):
    """An entry stored by the single decoder, restored into slot 1 of a ``--parallel`` context, gives the logits
    of the same prompt recomputed in slot 0 of that context, without the vision encoder; and a slot stores its own
    entries, which the single decoder restores with the logits of its recompute."""
    from kimivl_edge.batch_decoder import BatchDecoder, SequenceView

    first, second = q(images[0], "What is it?"), q(images[0], "Describe the colours.")
    cache = PrefixCache(tmp_path / "a")
    with load(*pair, cache) as m:
        m.logits(first)
    with load(*pair, cache) as m:
        bd = BatchDecoder(m.decoder, 2)
        try:
            prompt = m.render_prompt(second)
            size, m.image_cache_size = m.image_cache_size, 0  # the recompute's rows are not kept in memory
            segments = m.embed_prompt(prompt)  # the recompute's image rows (encoded here)
            m.image_cache_size = size
            bd.prefill(0, segments)
            want = llama_last_logits(bd)

            def no_encoder(*a, **k):
                raise AssertionError("the vision encoder ran on a cache hit")
            m.vision.encode = no_encoder  # type: ignore[union-attr]
            assert m.restore_prefix(prompt, SequenceView(bd, 1)) > 20
            assert bd.prefill(1, m.embed_prompt(prompt)) < prompt.n_tokens - 20
            np.testing.assert_array_equal(llama_last_logits(bd), want)
        finally:
            bd.close()
    other = PrefixCache(tmp_path / "b")
    with load(*pair, other) as m:
        bd = BatchDecoder(m.decoder, 2)
        try:
            prompt = m.render_prompt(first)
            segments = m.embed_prompt(prompt)
            m.store_prefix(prompt, segments, SequenceView(bd, 1))
        finally:
            bd.close()
    assert len(entries(tmp_path / "b")) == 1
    want = recompute(pair, second)
    with load(*pair, other) as m:
        got = m.logits(second)
        assert m.decoder.n_evaluated < m.render_prompt(second).n_tokens - 20
    np.testing.assert_array_equal(got, want)
