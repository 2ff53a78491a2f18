"""kimivl_edge.gguf_file: the one GGUF reader, checked against gguf-py's GGUFReader (the independent oracle) on real
converted files, and against hostile files (every lie must be a one-line GGUFFileError, never a crash)."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUF_MAGIC, GGMLQuantizationType, GGUFReader, GGUFValueType

from kimivl_edge.errors import GGUFFileError, KimiVLError
from kimivl_edge.gguf_file import GGUFFile, read_metadata

# (text outtype, mmproj type): together they cover F32, F16, BF16, Q8_0, Q4_0 and the K-quants.
TYPES = [("q4_k_m", "q8_0"), ("bf16", "f16"), ("q4_0", "q4_0"), ("f32", "f32")]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from kimivl_edge.synth import synth

    return synth(tmp_path_factory.mktemp("gguf_file") / "tiny", "tiny", "instruct", seed=5, layers=1)


@pytest.fixture(scope="module", params=TYPES, ids=["-".join(t) for t in TYPES])
def converted(request, ckpt, tmp_path_factory) -> tuple[Path, Path]:
    from kimivl_edge.convert import convert_checkpoint

    r = convert_checkpoint(ckpt, *request.param, tmp_path_factory.mktemp("out"))
    return Path(r.text_path), Path(r.mmproj_path)


def same_value(ours: object, theirs: object) -> bool:
    if isinstance(ours, np.ndarray):
        return ours.tolist() == list(theirs)
    if isinstance(ours, float):
        return np.float32(ours) == np.float32(theirs)
    return type(ours) is type(theirs) and ours == theirs


@pytest.mark.parametrize("which", ["text", "mmproj"])
def test_matches_gguf_py(converted, which):
    path = converted[0] if which == "text" else converted[1]
    ref = GGUFReader(path)
    with GGUFFile(path) as f:
        keys = [k for k in ref.fields if not k.startswith("GGUF.")]
        assert list(f.metadata) == keys
        for k in keys:
            assert same_value(f.metadata[k], ref.fields[k].contents()), k
        assert list(f.tensors) == [t.name for t in ref.tensors]
        for t in ref.tensors:
            info = f.info(t.name)
            assert info.type == t.tensor_type and isinstance(info.type, GGMLQuantizationType)
            assert info.ne == tuple(int(d) for d in t.shape)
            assert info.shape == tuple(reversed(info.ne))
            assert info.n_elements == t.n_elements
            assert info.offset == t.data_offset and info.nbytes == t.n_bytes
            data = f.data(t.name)
            if info.type == GGMLQuantizationType.BF16:  # ours: uint16 elements; gguf-py: uint8 row bytes
                assert data.dtype == np.uint16 and data.shape == info.shape
                assert data.view(np.uint8).shape == t.data.shape
            else:
                assert data.dtype == t.data.dtype and data.shape == t.data.shape, t.name
            assert data.tobytes() == t.data.tobytes(), t.name
            assert not data.flags.writeable
    assert list(read_metadata(path)) == keys


def test_types_covered(converted):
    """The parametrisation really reaches quantized, half and bf16 tensors (not only F32)."""
    seen = set()
    for p in converted:
        with GGUFFile(p) as f:
            seen |= {t.type for t in f.tensors.values()}
    assert GGMLQuantizationType.F32 in seen
    assert {t.name for t in seen} >= EXPECTED[Path(converted[0]).stem.rsplit("-", 1)[1]]


EXPECTED = {"Q4_K_M": {"Q4_K", "Q6_K", "Q8_0"}, "BF16": {"BF16", "F16"}, "Q4_0": {"Q4_0"}, "F32": {"F32"}}


def test_header_only(converted):
    with GGUFFile(converted[0], tensors=False) as f:
        assert f.tensors == {} and "tokenizer.ggml.tokens" in f.metadata
        assert f.get("no.such.key", 7) == 7
    md = read_metadata(converted[0])
    assert isinstance(md["tokenizer.ggml.tokens"], list) and isinstance(md["tokenizer.ggml.tokens"][0], str)


def test_missing_tensor_is_one_line(converted):
    with GGUFFile(converted[1]) as f, pytest.raises(GGUFFileError, match="missing tensor nope"):
        f.info("nope")


# -- hostile files -------------------------------------------------------------------------------------------------

def _str(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def build(kv: list[tuple[bytes, int, bytes]], tensors: list[tuple[bytes, list[int], int, int]], data: bytes,
          n_kv: int | None = None, n_tensors: int | None = None, align: int = 32) -> tuple[bytes, dict[str, int]]:
    """A GGUF v3 file from raw parts, and the byte offset where each region starts (to truncate at)."""
    head = struct.pack("<IIQQ", GGUF_MAGIC, 3, len(tensors) if n_tensors is None else n_tensors,
                       len(kv) if n_kv is None else n_kv)
    kvb = b"".join(_str(k) + struct.pack("<I", t) + v for k, t, v in kv)
    idx = b"".join(_str(n) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne) + struct.pack("<IQ", t, o)
                   for n, ne, t, o in tensors)
    body = head + kvb + idx
    pad = b"\0" * (-len(body) % align)
    regions = {"header": len(head), "kv": len(head) + len(kvb), "index": len(body), "data": len(body + pad)}
    return body + pad + data, regions


KV = [(b"general.architecture", GGUFValueType.STRING, _str(b"test")),
      (b"general.list", GGUFValueType.ARRAY, struct.pack("<IQ", GGUFValueType.STRING, 2) + _str(b"a") + _str(b"bc"))]
F32 = GGMLQuantizationType.F32


def good() -> tuple[bytes, dict[str, int]]:
    return build(KV, [(b"a", [4, 2], F32, 0), (b"b", [8], F32, 32)], np.arange(16, dtype=np.float32).tobytes())


def expect_error(tmp_path: Path, blob: bytes, match: str | None = None) -> str:
    p = tmp_path / "x.gguf"
    p.write_bytes(blob)
    with pytest.raises(GGUFFileError, match=match) as e:
        GGUFFile(p)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400 and isinstance(e.value, KimiVLError)
    return msg


def test_hand_built_file_reads(tmp_path):
    p = tmp_path / "ok.gguf"
    p.write_bytes(good()[0])
    with GGUFFile(p) as f:
        assert f.metadata == {"general.architecture": "test", "general.list": ["a", "bc"]}
        assert f.data("a").tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
        assert f.data("b").tolist() == list(range(8, 16))
    ref = GGUFReader(p)
    assert [t.name for t in ref.tensors] == ["a", "b"]


@pytest.mark.parametrize("region", ["header", "kv", "index", "data"])
@pytest.mark.parametrize("where", [-1, -7])
def test_truncated_at_each_region(tmp_path, region, where):
    blob, regions = good()
    cut = regions[region] + where if region != "data" else len(blob) + where
    expect_error(tmp_path, blob[:cut])


def test_every_truncation(tmp_path):
    blob = good()[0]
    for cut in range(len(blob)):
        expect_error(tmp_path, blob[:cut])


def test_huge_string_length(tmp_path):
    for n in (2**64 - 1, 2**64 - 8, 2**63):
        kv = [(b"k", GGUFValueType.STRING, struct.pack("<Q", n) + b"abc")]
        expect_error(tmp_path, build(kv, [], b"")[0], "past the end")
        key = [(b"", GGUFValueType.UINT8, b"\0")]
        blob = build(key, [], b"")[0]
        blob = blob[:24] + struct.pack("<Q", n) + blob[32:]  # the key's own length
        expect_error(tmp_path, blob)


def test_huge_array_count(tmp_path):
    for etype in (GGUFValueType.STRING, GGUFValueType.UINT64, GGUFValueType.UINT8):
        kv = [(b"k", GGUFValueType.ARRAY, struct.pack("<IQ", etype, 2**64 - 1))]
        expect_error(tmp_path, build(kv, [], b"")[0])


def test_counts_past_file_size(tmp_path):
    expect_error(tmp_path, build(KV, [], b"", n_kv=2**63)[0], "cannot fit")
    expect_error(tmp_path, build(KV, [], b"", n_tensors=2**40)[0], "cannot fit")
    expect_error(tmp_path, build(KV, [], b"", n_kv=3)[0])  # one more than there is


def test_unknown_ggml_type(tmp_path):
    blob = build(KV, [(b"a", [32], 9999, 0)], b"\0" * 128)[0]
    expect_error(tmp_path, blob, "unknown ggml type 9999")


def test_unknown_value_type(tmp_path):
    expect_error(tmp_path, build([(b"k", 77, b"\0" * 8)], [], b"")[0], "unsupported value type")


def test_tensor_data_past_eof(tmp_path):
    blob = build(KV, [(b"a", [4, 2], F32, 0), (b"b", [8], F32, 32)], b"\0" * 60)[0]
    expect_error(tmp_path, blob, "run past the end")
    blob = build(KV, [(b"a", [2**40, 2**20], F32, 0)], b"\0" * 64)[0]
    expect_error(tmp_path, blob, "run past the end")


def test_overlapping_tensors(tmp_path):
    blob = build(KV, [(b"a", [16], F32, 0), (b"b", [8], F32, 32)], b"\0" * 96)[0]
    expect_error(tmp_path, blob, "overlap")


def test_unaligned_offset(tmp_path):
    blob = build(KV, [(b"a", [4], F32, 4)], b"\0" * 64)[0]
    expect_error(tmp_path, blob, "not aligned")


def test_duplicate_tensor_and_bad_dims(tmp_path):
    expect_error(tmp_path, build(KV, [(b"a", [4], F32, 0), (b"a", [4], F32, 32)], b"\0" * 64)[0], "twice")
    expect_error(tmp_path, build(KV, [(b"a", [0], F32, 0)], b"\0" * 64)[0], "dimensions")
    expect_error(tmp_path, build(KV, [(b"a", [1] * 5, F32, 0)], b"\0" * 64)[0], "dimensions")
    q8 = GGMLQuantizationType.Q8_0
    expect_error(tmp_path, build(KV, [(b"a", [31], q8, 0)], b"\0" * 64)[0], "block")


def test_bad_alignment_key(tmp_path):
    kv = KV + [(b"general.alignment", GGUFValueType.UINT32, struct.pack("<I", 3))]
    expect_error(tmp_path, build(kv, [(b"a", [4], F32, 0)], b"\0" * 64)[0], "power of two")


def test_bad_magic_version_utf8(tmp_path):
    blob = good()[0]
    expect_error(tmp_path, b"GGUX" + blob[4:], "bad magic")
    expect_error(tmp_path, blob[:4] + struct.pack("<I", 1) + blob[8:], "version")
    bad = [(b"\xff\xfe", GGUFValueType.UINT8, b"\0")]
    expect_error(tmp_path, build(bad, [], b"")[0], "UnicodeDecodeError")


def test_newline_in_name_stays_one_line(tmp_path):
    blob = build(KV, [(b"a\nb", [4], 9999, 0)], b"\0" * 64)[0]
    expect_error(tmp_path, blob)


def test_duplicate_key(tmp_path):
    kv = KV + [(b"general.architecture", GGUFValueType.STRING, _str(b"other"))]
    expect_error(tmp_path, build(kv, [], b"")[0], "general.architecture listed twice")


def test_directory_empty_missing_fifo(tmp_path):
    with pytest.raises(GGUFFileError, match="directory"):
        GGUFFile(tmp_path)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFFileError, match="not a GGUF file \\(empty\\)"):
        GGUFFile(tmp_path / "empty.gguf")
    os.mkfifo(tmp_path / "fifo.gguf")  # open() would block here without a writer
    with pytest.raises(GGUFFileError, match="not a regular file"):
        GGUFFile(tmp_path / "fifo.gguf")
    with pytest.raises(GGUFFileError, match="no such file"):
        read_metadata(tmp_path / "missing.gguf")


def test_closed_file_data(tmp_path):
    p = tmp_path / "ok.gguf"
    p.write_bytes(good()[0])
    f = GGUFFile(p)
    f.close()
    with pytest.raises(GGUFFileError, match="closed"):
        f.data("a")
