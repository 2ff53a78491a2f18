"""Work splitting of the numpy vision encoder (kimivl_edge/vision.py): query blocks, row chunks, worker threads
(kimivl_edge/threads.py), chunked weight decoding, the weight cache.

Oracles: a float64 softmax attention written here; the fp32 torch reference (``ReferenceModel.image_embeds``,
docs/model.md §5, §6); torch's ``F.gelu`` (tanh). (gguf-py's own dequantization is the weights' oracle in
test_vision.py.) Splitting must not change results beyond float32 rounding, whatever the block sizes, chunk sizes or
threads; decoding in smaller steps must not change them at all.
"""
from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest

from kimivl_edge import threads, vision
from shared import blocked_attention, mmproj_files
from kimivl_edge.vision import VisionEncoder, attention_items, gelu_tanh, row_chunks

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from kimivl_edge.reference.model import ReferenceModel  # noqa: E402

torch.set_num_threads(1)

# Three images of different grids; 10x30 = 300 patches is not a multiple of the block or chunk sizes used below.
GRIDS = [(10, 30), (6, 8), (4, 4)]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vision_blocks")


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint) -> Path:
    return tiny_checkpoint("instruct", seed=1)


@pytest.fixture(scope="module")
def files(ckpt, work) -> dict[str, Path]:
    return mmproj_files(ckpt, ("f32", "f16", "q8_0", "q4_0"), work / "out")


@pytest.fixture(scope="module")
def pixels() -> tuple[np.ndarray, np.ndarray]:
    n = sum(h * w for h, w in GRIDS)
    pv = np.random.default_rng(11).uniform(-1, 1, (n, 3, 14, 14)).astype(np.float32)
    return pv, np.array(GRIDS)


@pytest.fixture(scope="module")
def ref_out(ckpt, pixels) -> np.ndarray:
    return ReferenceModel(ckpt).image_embeds(*pixels).numpy()


def token_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def softmax_attention_f64(q, k, v, grids) -> np.ndarray:
    out, start = [], 0
    d = q.shape[-1]
    for gh, gw in grids:
        m = gh * gw
        qi, ki, vi = (t[start:start + m].astype(np.float64).transpose(1, 0, 2) for t in (q, k, v))
        s = qi @ ki.transpose(0, 2, 1) / math.sqrt(d)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out.append((p @ vi).transpose(1, 0, 2).reshape(m, -1))
        start += m
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------------------------
# pieces

@pytest.mark.parametrize("budget", [4, 4 * 300 * 7, 4 * 300 * 64, 4 * 300 * 300, 1 << 30])
def test_attention_items_cover_each_query_once(budget):
    heads = 3
    items = attention_items(GRIDS, heads, budget)
    seen = {}
    starts = np.cumsum([0] + [h * w for h, w in GRIDS])
    for s0, n, h, r0, r1 in items:
        img = list(starts).index(s0)
        assert n == GRIDS[img][0] * GRIDS[img][1] and 0 <= r0 < r1 <= n
        assert 4 * (r1 - r0) * n <= max(budget, 4 * n)  # within the budget, or one row when a row is larger
        for r in range(r0, r1):
            seen[(s0 + r, h)] = seen.get((s0 + r, h), 0) + 1
    assert seen == {(r, h): 1 for r in range(int(starts[-1])) for h in range(heads)}


@pytest.mark.parametrize("n,max_rows", [(1, 256), (63, 256), (64, 256), (256, 256), (300, 256), (1024, 256),
                                        (4096, 256), (1000, 37)])
def test_row_chunks(n, max_rows):
    ch = row_chunks(n, max_rows)
    assert ch[0][0] == 0 and ch[-1][1] == n and all(a < b for a, b in ch)
    assert all(b1 == a2 for (_, b1), (a2, _) in zip(ch[:-1], ch[1:]))
    assert max(b - a for a, b in ch) <= max_rows
    if n >= 4 * 64:  # small images are still split for several workers
        assert len(ch) >= 4
    if max_rows >= 64 and n >= 64:
        assert min(b - a for a, b in ch) >= 64


@pytest.mark.parametrize("budget,threads", [(4 * 300 * 70, 1), (4 * 300 * 70, 2), (4 * 300 * 1, 3),
                                            (4 * 300 * 299, 2), (1 << 30, 2)])
def test_blocked_attention_against_float64(files, budget, threads):
    """Query blocks that do not divide the image (70 rows of 300, 299 rows), one-row blocks, whole images; three
    images of different grids in one call; 1-3 workers."""
    enc = VisionEncoder(files["f32"], max_score_bytes=budget, threads=threads)
    rng = np.random.default_rng(3)
    n, heads, d = sum(h * w for h, w in GRIDS), 2, 64
    q, k, v = (rng.standard_normal((n, heads, d)).astype(np.float32) * s for s in (2.0, 2.0, 1.0))
    got = blocked_attention(enc, q, k, v, GRIDS)
    np.testing.assert_allclose(got, softmax_attention_f64(q, k, v, GRIDS), rtol=0, atol=2e-5)


def test_gelu_tanh_matches_torch():
    a = np.random.default_rng(0).normal(0, 4, (64, 700)).astype(np.float32)
    a[0, :5] = [-200.0, -30.0, 0.0, 30.0, 200.0]  # exp overflow side and the saturated ends
    want = F.gelu(torch.from_numpy(a).double(), approximate="tanh").numpy()
    got = gelu_tanh(a.copy())
    assert np.abs(got - want).max() <= 2e-7 * np.abs(a).max()
    assert got[0, 0] == 0 and got[0, 4] == 200.0


@pytest.mark.parametrize("mtype", ["f32", "f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("weight_cache", [True, False])
def test_chunked_decode_changes_nothing(files, pixels, monkeypatch, mtype, weight_cache):
    """Weights decoded in row steps of 100 elements (steps that divide neither the rows nor the fused QKV buffer's
    parts) give bit for bit the encode of whole-tensor steps, for every mmproj type and both weight modes."""
    monkeypatch.setattr(vision, "DECODE_ELEMS", 1 << 30)
    whole = VisionEncoder(files[mtype], weight_cache=weight_cache, threads=2).encode(*pixels)
    monkeypatch.setattr(vision, "DECODE_ELEMS", 100)
    steps = []
    real = vision.decode_rows_into

    def counted(out, raw, ttype, shape, a, b):
        steps.append(b - a)
        real(out, raw, ttype, shape, a, b)

    monkeypatch.setattr(vision, "decode_rows_into", counted)
    chunked = VisionEncoder(files[mtype], weight_cache=weight_cache, threads=2).encode(*pixels)
    assert max(steps) < 128 and min(steps) < max(steps)  # the 128-wide rows of a 128x128 tensor: several steps
    for a, b in zip(whole, chunked):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# whole encodes

@pytest.mark.parametrize("threads,row_chunk,budget", [(1, 256, 1 << 20), (2, 256, 1 << 20), (3, 37, 4 * 300 * 41),
                                                      (2, 1000, 1 << 30)])
def test_encode_splits_against_reference(files, pixels, ref_out, threads, row_chunk, budget):
    """Row chunks that straddle image boundaries (37 rows), one chunk for everything, small and whole attention
    blocks, 1-3 workers: every split matches the fp32 reference (same bound as test_vision.py's F32 case)."""
    enc = VisionEncoder(files["f32"], threads=threads, row_chunk=row_chunk, max_score_bytes=budget)
    out = np.concatenate(enc.encode(*pixels))
    assert out.shape == ref_out.shape
    cos = token_cos(out, ref_out)
    rel = np.linalg.norm(out - ref_out, axis=-1) / np.linalg.norm(ref_out, axis=-1)
    assert cos.min() >= 0.99999 and rel.max() <= 2e-5, (cos.min(), rel.max())


def test_threads_do_not_change_the_result(files, pixels):
    outs = [np.concatenate(VisionEncoder(files["q4_0"], threads=t).encode(*pixels)) for t in (1, 2, 3)]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=0, atol=1e-6 * np.abs(outs[0]).max())


def test_weight_cache(files, pixels, monkeypatch):
    """With the cache, weights are decoded by the first encode only; without, by every encode (into the same
    buffers). Decoding is counted in ``vision.decode_rows_into``, which every weight goes through."""
    decoded = []
    real = vision.decode_rows_into

    def counted(out, raw, ttype, shape, a, b):
        decoded.append(out.size)
        real(out, raw, ttype, shape, a, b)

    monkeypatch.setattr(vision, "decode_rows_into", counted)
    enc = VisionEncoder(files["q4_0"], weight_cache=True, threads=2)
    first = enc.encode(*pixels)
    per_encode = sum(decoded)
    assert per_encode == sum(int(np.prod(t.shape)) for t in gguf.GGUFReader(files["q4_0"]).tensors)  # all, once
    second = enc.encode(*pixels)
    assert sum(decoded) == per_encode  # everything came from the cache
    for a, b in zip(first, second):
        assert np.array_equal(a, b)
    plain = VisionEncoder(files["q4_0"], threads=2)
    for k in range(2):  # the per-layer mode decodes again on each call, into the same buffers
        again = plain.encode(*pixels)
        assert sum(decoded) == (k + 2) * per_encode
        for a, b in zip(first, again):
            assert np.array_equal(a, b)


def test_interrupted_encode_leaves_no_half_decoded_cache(files, pixels):
    enc = VisionEncoder(files["q4_0"], weight_cache=True, threads=2)

    def stop(done, total, unit):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        enc.encode(*pixels, progress=stop)
    again = enc.encode(*pixels)
    fresh = VisionEncoder(files["q4_0"], threads=2).encode(*pixels)
    for a, b in zip(again, fresh):
        assert np.array_equal(a, b)


def _openblas_get_threads():
    import ctypes

    for path in threads.openblas_libraries():
        lib = ctypes.CDLL(path)
        for name in ("openblas_get_num_threads", "scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_int
                return fn
    return None


def test_blas_single_threaded_during_encode_then_restored(files, pixels):
    """OpenBLAS's own getter: one thread while the workers run (no nested BLAS threads), the old count after."""
    get = _openblas_get_threads()
    if threads.blas_thread_setter() is None or get is None:
        pytest.skip("numpy's BLAS is not an OpenBLAS with openblas_set_num_threads_local")
    setter = threads.blas_thread_setter()
    before = setter(2)
    try:
        seen = []
        VisionEncoder(files["f32"], threads=2).encode(*pixels, progress=lambda *_: seen.append(get()))
        assert seen and set(seen) == {1}
        assert get() == 2
    finally:
        setter(before)


def test_bad_settings(files):
    from kimivl_edge.errors import UsageError

    for kw in ({"threads": 0}, {"threads": True}, {"row_chunk": 0}, {"max_score_bytes": 3}, {"threads": 1.5}):
        with pytest.raises(UsageError) as e:
            VisionEncoder(files["f32"], **kw)
        assert "\n" not in str(e.value)
