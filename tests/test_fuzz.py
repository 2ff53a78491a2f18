"""Hostile files (issue 14): real tiny files, mutated, handed to every reader of ours.

The files are the real thing: the text GGUF and the mmproj of the ``converted`` tiny checkpoint, its safetensors
shards, its ``tiktoken.model`` and its JSON files. Each mutant must either load or raise a ``KimiVLError`` with a
one-line message. Never another exception (a crash), never a peak of traced allocations beyond what the input bytes
can explain (an allocation sized by a lying length or count), never a hang (an alarm fails the mutant), and never a
llama.cpp crash: every text mutant our checks let through is loaded, and a token generated, by ``KimiVL.load`` in a
child process, so a segfault or an abort fails this test instead of killing pytest.

Two parts, both deterministic: an exhaustive one (truncation at every region boundary and one byte either side;
every length, count, dimension and offset field set to each of 0, ±1, the file size, 2^32, 2^63, 2^64-1, 2^64-8;
every type field set to every other type) and a hypothesis one (``derandomize=True``) that composes structural
edits: values of the wrong type, out of range, NaN; arrays shortened, lengthened, with repeated or malformed
entries; tensors retyped, reshaped, renamed onto another, moved (unaligned, overlapping, past the end); JSON values
replaced anywhere in the tree; tiktoken lines dropped, repeated, renumbered, garbled. ``pytest -s`` prints how many
mutants ran and how many each reader accepted.

The layout walker below is this test's own (from the GGUF spec), not ``kimivl_edge.gguf_file``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kimivl_edge.checkpoint import Checkpoint
from kimivl_edge.config import KimiVLConfig
from kimivl_edge.convert.tokenizer import vocab_metadata
from kimivl_edge.errors import KimiVLError, read_json_object
from kimivl_edge.gguf_file import GGUFFile, read_metadata
from kimivl_edge.gguf_model import TextModelInfo, check_text_gguf
from kimivl_edge.mmproj import MmprojFile
from kimivl_edge.safetensors_io import SafetensorsFile
from kimivl_edge.tokenizer import Tokenizer, read_tiktoken_model

HANG_SECONDS = 60  # far beyond any reader on these files: only a loop sized by a hostile field gets here
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
FUZZ_CKPT = settings(FUZZ, max_examples=50)  # checkpoint files: each mutant runs several readers
# tracemalloc makes a header parse 8x slower: it watches every 5th GGUF mutant. The others are covered by
# construction (gguf_file checks every count and length against the bytes left before it allocates) and by the
# MemoryError or the hang an allocation sized by a lying field would cause.
TRACE_EVERY = 5
TOTALS: Counter = Counter()  # (file kind, "mutants" | "accepted" | "llama") -> count, for the summary

EDGE_U64 = (0, 1, 2**32, 2**63, 2**64 - 1, 2**64 - 8)
EDGE_U32 = (0, 1, 2**31, 2**32 - 1)


# -- running a reader on a mutant ----------------------------------------------------------------------------------

@contextlib.contextmanager
def alarm(seconds: int) -> Iterator[None]:
    def fire(*_):
        raise TimeoutError(f"no answer within {seconds} s (a hang)")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def judge(what: str, read: Callable[[], object], input_bytes: int, trace: bool = True) -> bool:
    """Run one reader: True if it loaded, False if it refused properly; AssertionError (naming the mutant)
    otherwise. With ``trace``, the traced allocation peak must stay below what the input's bytes can explain."""
    limit = 8 * input_bytes + (16 << 20)
    if trace:
        tracemalloc.start()
    try:
        with alarm(HANG_SECONDS):
            read()
        ok = True
    except KimiVLError as e:
        msg = str(e)
        assert msg and "\n" not in msg and len(msg) < 600, f"{what}: message not one short line: {msg!r}"
        ok = False
    except Exception as e:  # noqa: BLE001 - any other exception is the defect this test looks for
        raise AssertionError(f"{what}: {type(e).__name__}: {e}"[:500]) from e
    finally:
        peak = tracemalloc.get_traced_memory()[1] if trace else 0
        tracemalloc.stop()
    assert peak <= limit, f"{what}: allocated {peak} bytes for {input_bytes} bytes of input"
    return ok


# -- GGUF: an independent layout walker, and a writer for structural edits ------------------------------------------

_SCALAR = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
           GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
           GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
           GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}


@dataclass
class KV:
    key: bytes
    vtype: int
    raw: bytes  # the encoded value (without the type field)


@dataclass
class Tensor:
    name: bytes
    ne: list[int]
    ttype: int
    offset: int  # relative to the data section


@dataclass
class Gguf:
    kvs: list[KV]
    tensors: list[Tensor]
    data: bytes
    align: int = 32
    boundaries: list[int] = field(default_factory=list)          # region starts in the original file
    u64_fields: list[tuple[int, str]] = field(default_factory=list)  # (position, what) lengths/counts/dims/offsets
    u32_fields: list[tuple[int, str]] = field(default_factory=list)  # (position, what) type fields

    def to_bytes(self) -> bytes:
        out = [struct.pack("<IIQQ", 0x46554747, 3, len(self.tensors), len(self.kvs))]
        out += [_s(kv.key) + struct.pack("<I", kv.vtype) + kv.raw for kv in self.kvs]
        out += [_s(t.name) + struct.pack(f"<I{len(t.ne)}Q", len(t.ne), *t.ne) + struct.pack("<IQ", t.ttype, t.offset)
                for t in self.tensors]
        head = b"".join(out)
        return head + b"\0" * (-len(head) % self.align) + self.data

    def value(self, key: str) -> KV:
        return next(kv for kv in self.kvs if kv.key == key.encode())


def _s(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def parse_gguf(blob: bytes) -> Gguf:
    """Split a GGUF v3 file into parts, recording every region start and every numeric field's position."""
    pos = 24
    g = Gguf([], [], b"", boundaries=[4, 8, 16, 24])
    g.u64_fields += [(8, "n_tensors"), (16, "n_kv")]
    n_tensors, n_kv = struct.unpack_from("<QQ", blob, 8)

    def string(what: str) -> bytes:
        nonlocal pos
        g.u64_fields.append((pos, what + " length"))
        (n,) = struct.unpack_from("<Q", blob, pos)
        pos += 8 + n
        return blob[pos - n:pos]

    for _ in range(n_kv):
        g.boundaries.append(pos)
        key = string("key")
        g.u32_fields.append((pos, f"{key.decode()} type"))
        (vtype,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        start = pos
        g.boundaries.append(pos)
        if vtype == GGUFValueType.STRING:
            string(key.decode())
        elif vtype == GGUFValueType.ARRAY:
            g.u32_fields.append((pos, f"{key.decode()} element type"))
            etype, count = struct.unpack_from("<IQ", blob, pos)
            g.u64_fields.append((pos + 4, f"{key.decode()} count"))
            pos += 12
            for i in range(count):
                if etype == GGUFValueType.STRING:
                    if i in (0, count - 1):
                        string(f"{key.decode()}[{i}]")
                    else:
                        pos += 8 + struct.unpack_from("<Q", blob, pos)[0]
                else:
                    pos += struct.calcsize(_SCALAR[GGUFValueType(etype)])
        else:
            pos += struct.calcsize(_SCALAR[GGUFValueType(vtype)])
        g.kvs.append(KV(key, vtype, blob[start:pos]))
        if key == b"general.alignment":
            g.align = struct.unpack_from("<I", blob, start)[0]
    for _ in range(n_tensors):
        g.boundaries.append(pos)
        name = string("tensor name")
        (n_dims,) = struct.unpack_from("<I", blob, pos)
        g.u32_fields.append((pos, f"{name.decode()} n_dims"))
        ne = list(struct.unpack_from(f"<{n_dims}Q", blob, pos + 4))
        g.u64_fields += [(pos + 4 + 8 * i, f"{name.decode()} ne[{i}]") for i in range(n_dims)]
        pos += 4 + 8 * n_dims
        g.u32_fields.append((pos, f"{name.decode()} ggml type"))
        g.u64_fields.append((pos + 4, f"{name.decode()} offset"))
        ttype, offset = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        g.tensors.append(Tensor(name, ne, ttype, offset))
    data_start = -(-pos // g.align) * g.align
    g.data = blob[data_start:]
    g.boundaries.append(data_start)
    for t in g.tensors:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(t.ttype)]
        g.boundaries += [data_start + t.offset, data_start + t.offset + t.ne[0] // block * size * math.prod(t.ne[1:])]
    assert g.to_bytes() == blob  # the walker understood the whole file
    return g


def truncations(blob: bytes, boundaries: list[int]) -> Iterator[tuple[str, bytes]]:
    """The file cut at every region boundary and one byte before it (and one byte before its end)."""
    for cut in sorted({c + d for c in boundaries for d in (-1, 0)} | {len(blob) - 1}):
        if 0 <= cut < len(blob):
            yield f"truncated at {cut}", blob[:cut]


def rotate(pool: list[int], k: int, n: int) -> set[int]:
    """``n`` values of ``pool`` for the ``k``-th field: consecutive fields take consecutive values, so every value
    meets every kind of field (the 46 tensors' name lengths, their ne, their offsets) without the full product."""
    return {pool[(k * n + j) % len(pool)] for j in range(n)} if pool else set()


def field_edits(blob: bytes, g: Gguf) -> Iterator[tuple[str, int, bytes]]:
    """(what, position, new bytes): every u64 field set to its own value + 1 and to three of 0, 1, 2^32, 2^63,
    2^64-1, 2^64-8, the file size, its own value - 1; every type field set to an unknown type and to two others,
    every n_dims to each of 0..5 and 2^32-1."""
    for k, (pos, what) in enumerate(g.u64_fields):
        (orig,) = struct.unpack_from("<Q", blob, pos)
        for v in sorted({*rotate([*EDGE_U64, len(blob), max(orig - 1, 0)], k, 3), orig + 1} - {orig}):
            yield f"{what} = {v}", pos, struct.pack("<Q", v)
    for k, (pos, what) in enumerate(g.u32_fields):
        (orig,) = struct.unpack_from("<I", blob, pos)
        if what.endswith("ggml type"):
            values = {9999} | rotate([int(t) for t in GGMLQuantizationType], k, 2)
        elif what.endswith("n_dims"):
            values = {0, 1, 2, 3, 4, 5, 2**32 - 1}
        else:
            values = {13, 2**32 - 1} | rotate([int(t) for t in GGUFValueType], k, 2)
        for v in sorted(values - {orig}):
            yield f"{what} = {v}", pos, struct.pack("<I", v)


# value encoders for structural edits
def enc(vtype: int, v: object) -> bytes:
    if vtype == GGUFValueType.STRING:
        assert isinstance(v, (str, bytes))
        return _s(v.encode() if isinstance(v, str) else v)
    return struct.pack(_SCALAR[GGUFValueType(vtype)], v)


def enc_array(etype: int, values: list) -> bytes:
    return struct.pack("<IQ", etype, len(values)) + b"".join(enc(etype, v) for v in values)


def dec_array(raw: bytes) -> tuple[int, list]:
    etype, count = struct.unpack_from("<IQ", raw, 0)
    pos, out = 12, []
    for _ in range(count):
        if etype == GGUFValueType.STRING:
            (n,) = struct.unpack_from("<Q", raw, pos)
            out.append(raw[pos + 8:pos + 8 + n])
            pos += 8 + n
        else:
            fmt = _SCALAR[GGUFValueType(etype)]
            out.append(struct.unpack_from(fmt, raw, pos)[0])
            pos += struct.calcsize(fmt)
    return etype, out


HOSTILE_NUMBERS = (0, 1, -1, 2, 3, 7, 2**31 - 1, 2**31, 2**32 - 1, 2**63, float("nan"), float("inf"), -float("inf"),
                   1e30, -0.5)
HOSTILE_STRINGS = ("", " ", "a", "a b c", "x\ny", "\uffff", "Ġ Ġ", "[EMPTY_0]", "<|im_end|>", "gpt2", "clip",
                   "kimivl", "deepseek2", "llama", "a" * 300)
SCALAR_TYPES = [t for t in _SCALAR]


def _fits(vtype: int, v: object) -> bool:
    try:
        enc(vtype, v)
        return True
    except (struct.error, TypeError, AssertionError, OverflowError):
        return False


@st.composite
def kv_edit(draw, g: Gguf) -> tuple[str, Callable[[Gguf], None]]:
    i = draw(st.integers(0, len(g.kvs) - 1))
    kv = g.kvs[i]
    name = kv.key.decode()
    op = draw(st.sampled_from(["value", "retype", "drop", "duplicate", "array"]))
    if op == "drop":
        return f"drop {name}", lambda m: m.kvs.pop(i)
    if op == "duplicate":
        return f"duplicate {name}", lambda m: m.kvs.insert(i + 1, replace(m.kvs[i]))
    if op == "array" and kv.vtype == GGUFValueType.ARRAY:
        etype, values = dec_array(kv.raw)
        how = draw(st.sampled_from(["shorter", "longer", "empty", "repeat", "swap", "element", "retype"]))
        vals = list(values)
        j = draw(st.integers(0, max(len(vals) - 1, 0)))
        if how == "shorter" and vals:
            vals.pop(j)
        elif how == "longer":
            vals.append(vals[j] if vals else 0)
        elif how == "empty":
            vals = []
        elif how == "repeat" and len(vals) > 1:
            vals[j] = vals[(j + 1) % len(vals)]
        elif how == "swap" and len(vals) > 1:
            vals[0], vals[j] = vals[j], vals[0]
        elif how == "element" and vals:
            pool = HOSTILE_STRINGS if etype == GGUFValueType.STRING else HOSTILE_NUMBERS
            v = draw(st.sampled_from(pool))
            if _fits(etype, v):
                vals[j] = v
        elif how == "retype":
            new = draw(st.sampled_from([GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.FLOAT32,
                                        GGUFValueType.UINT8, GGUFValueType.STRING]))
            conv = [(str(v) if new == GGUFValueType.STRING else 1) for v in vals]
            return f"{name}: array of {GGUFValueType(new).name}", lambda m: setattr(
                m.kvs[i], "raw", enc_array(new, conv))
        raw = enc_array(etype, vals)
        return f"{name}: array {how} at {j}", lambda m: setattr(m.kvs[i], "raw", raw)
    if op == "retype" or kv.vtype == GGUFValueType.ARRAY:
        new = draw(st.sampled_from([*SCALAR_TYPES, GGUFValueType.STRING, GGUFValueType.ARRAY]))
        if new == GGUFValueType.STRING:
            raw = enc(new, draw(st.sampled_from(HOSTILE_STRINGS)))
        elif new == GGUFValueType.ARRAY:
            raw = enc_array(GGUFValueType.UINT32, [2, 2])
        else:
            raw = enc(new, 1 if new != GGUFValueType.FLOAT32 else 1.0)
        return f"{name} as {GGUFValueType(new).name}", lambda m: setattr(m.kvs[i], "vtype", new) or setattr(
            m.kvs[i], "raw", raw)
    pool = HOSTILE_STRINGS if kv.vtype == GGUFValueType.STRING else HOSTILE_NUMBERS
    v = draw(st.sampled_from([x for x in pool if _fits(kv.vtype, x)] or [0]))
    if not _fits(kv.vtype, v):
        return f"{name} unchanged", lambda m: None
    raw = enc(kv.vtype, v)
    return f"{name} = {v!r}"[:120], lambda m: setattr(m.kvs[i], "raw", raw)


@st.composite
def tensor_edit(draw, g: Gguf) -> tuple[str, Callable[[Gguf], None]]:
    i = draw(st.integers(0, len(g.tensors) - 1))
    t = g.tensors[i]
    name = t.name.decode()
    op = draw(st.sampled_from(["type", "shape", "rename", "drop", "offset"]))
    if op == "type":
        new = draw(st.sampled_from([int(x) for x in GGMLQuantizationType]))
        return f"{name} type {new}", lambda m: setattr(m.tensors[i], "ttype", new)
    if op == "shape":
        how = draw(st.sampled_from(["swap", "plus1", "double", "half", "flat", "extra", "one"]))
        ne = list(t.ne)
        if how == "swap" and len(ne) > 1:
            ne[0], ne[1] = ne[1], ne[0]
        elif how == "plus1":
            ne[-1] += 1
        elif how == "double":
            ne[0] *= 2
        elif how == "half":
            ne[-1] = max(1, ne[-1] // 2)
        elif how == "flat":
            ne = [math.prod(ne)]
        elif how == "extra":
            ne = ne + [1]
        elif how == "one":
            ne = [1] * len(ne)
        return f"{name} ne {ne}", lambda m: setattr(m.tensors[i], "ne", ne)
    if op == "rename":
        other = g.tensors[draw(st.integers(0, len(g.tensors) - 1))].name
        new = draw(st.sampled_from([other, b"blk.999.attn_norm.weight", b"x" * 70, name.encode() + b".x"]))
        return f"{name} renamed {new[:40]!r}", lambda m: setattr(m.tensors[i], "name", new)
    if op == "drop":
        return f"drop tensor {name}", lambda m: m.tensors.pop(i)
    how = draw(st.sampled_from(["unaligned", "overlap", "past_end", "zero"]))
    other = g.tensors[draw(st.integers(0, len(g.tensors) - 1))].offset
    off = {"unaligned": t.offset + 4, "overlap": other, "past_end": len(g.data), "zero": 0}[how]
    return f"{name} offset {how}", lambda m: setattr(m.tensors[i], "offset", off)


def gguf_mutant(draw, g: Gguf) -> tuple[str, bytes]:
    m = Gguf([replace(kv) for kv in g.kvs], [replace(t, ne=list(t.ne)) for t in g.tensors], g.data, g.align)
    names = []
    for _ in range(draw(st.integers(1, 3))):
        name, edit = draw(st.one_of(kv_edit(g), tensor_edit(g)))
        with contextlib.suppress(IndexError):  # an earlier edit dropped the entry
            edit(m)
        names.append(name)
    return "; ".join(names), m.to_bytes()


# -- the readers ----------------------------------------------------------------------------------------------------

def read_text(path: Path) -> None:
    with GGUFFile(path) as f:
        for name in f.tensors:
            f.data(name)
    read_metadata(path)
    check_text_gguf(path)
    info = TextModelInfo.read(path)
    info.tokenizer.decode(info.tokenizer.encode("Hello <|im_end|> world"))


def read_mmproj(path: Path) -> None:
    mm = MmprojFile(path)
    mm.image_processor_config()
    for name in mm.expected_shapes():
        mm.tensor(name)


GGUF_READERS = {"text": read_text, "mmproj": read_mmproj}


class Bench:
    """A scratch file per kind, rewritten per mutant (patched in place where only a field changes: rewriting the
    whole file dominates the run otherwise). Accepted mutants of each kind are kept (a deterministic sample of at
    most ``KEEP``) for the llama.cpp pass: text ones for ``KimiVL.load``, mmproj ones for clip (``--vision-backend
    ggml``)."""

    KEEP = 40

    def __init__(self, root: Path):
        self.root = root
        self.accepted: dict[str, list[tuple[str, Path]]] = {"text": [], "mmproj": []}
        self._seen: Counter = Counter()
        self._rng = random.Random(14)

    def gguf(self, kind: str, what: str, blob: bytes) -> None:
        p = self.root / f"{kind}.gguf"
        p.write_bytes(blob)
        self._judge(kind, what, p, len(blob))

    def patches(self, kind: str, blob: bytes, edits: Iterator[tuple[str, int, bytes]]) -> None:
        p = self.root / f"{kind}.gguf"
        p.write_bytes(blob)
        with open(p, "r+b") as f:
            for what, pos, raw in edits:
                os.pwrite(f.fileno(), raw, pos)
                try:
                    self._judge(kind, what, p, len(blob))
                finally:
                    os.pwrite(f.fileno(), blob[pos:pos + len(raw)], pos)

    def _judge(self, kind: str, what: str, p: Path, size: int) -> None:
        TOTALS[kind, "mutants"] += 1
        trace = TOTALS[kind, "mutants"] % TRACE_EVERY == 1
        TOTALS[kind, "traced"] += trace
        if not judge(f"{kind} mutant [{what}]", lambda: GGUF_READERS[kind](p), size, trace):
            return
        TOTALS[kind, "accepted"] += 1
        if what != "original":  # reservoir sample: every accepted mutant equally likely
            kept = self.accepted[kind]
            self._seen[kind] += 1
            slot = len(kept) if len(kept) < self.KEEP else self._rng.randrange(self._seen[kind])
            if slot < self.KEEP:
                keep = self.root / f"accepted-{kind}{slot}.gguf"
                shutil.copyfile(p, keep)
                if slot == len(kept):
                    kept.append((what, keep))
                else:
                    kept[slot] = (what, keep)


@pytest.fixture(scope="module")
def pair(tiny_checkpoint, converted) -> tuple[Path, Path]:
    return converted(tiny_checkpoint(), "q8_0", "q8_0")  # Q8_0: a quarter of F32's bytes to rewrite per mutant


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Bench:
    return Bench(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("kind", ["text", "mmproj"])
def test_gguf_exhaustive(pair, bench, kind):
    blob = pair[0 if kind == "text" else 1].read_bytes()
    g = parse_gguf(blob)
    bench.gguf(kind, "original", blob)
    assert TOTALS[kind, "accepted"] == 1, "the unmutated file must load"
    for what, mutant in truncations(blob, g.boundaries):
        bench.gguf(kind, what, mutant)
    bench.patches(kind, blob, field_edits(blob, g))


@pytest.mark.parametrize("kind", ["text", "mmproj"])
def test_gguf_structural(pair, bench, kind):
    g = parse_gguf(pair[0 if kind == "text" else 1].read_bytes())

    @FUZZ
    @given(st.data())
    def run(data):
        what, blob = gguf_mutant(data.draw, g)
        bench.gguf(kind, what, blob)

    run()


LLAMA_CHILD = textwrap.dedent("""
    import sys
    from kimivl_edge.errors import KimiVLError
    from kimivl_edge.model import KimiVL
    from kimivl_edge.sampling import SamplingSettings
    for path in sys.argv[1:]:
        print("START", path, flush=True)
        try:
            with KimiVL.load(path, n_ctx=64, n_threads=1, kv_type="f32") as m:
                m.generate([{"role": "user", "content": "Hi"}], SamplingSettings(temperature=0, max_tokens=2))
            print("LOADED", path, flush=True)
        except KimiVLError as e:
            assert "\\n" not in str(e)
            print("REFUSED", path, flush=True)
""")

CLIP_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from kimivl_edge.errors import KimiVLError
    from kimivl_edge.vision_ggml import GgmlVisionEncoder
    for path in sys.argv[1:]:
        print("START", path, flush=True)
        try:
            with GgmlVisionEncoder(path, threads=1) as enc:
                p, m = enc.hparams.patch_size, enc.hparams.merge_size
                patches = np.linspace(-1, 1, m * m * 3 * p * p, dtype=np.float32).reshape(m * m, 3, p, p)
                enc.encode(patches, [[m, m]])
            print("LOADED", path, flush=True)
        except KimiVLError as e:
            assert "\\n" not in str(e)
            print("REFUSED", path, flush=True)
""")


def survive_children(tool: str, script: str, files: dict[str, str]) -> list[str]:
    """Runs ``script`` on ``files`` ({path: what}) in child processes, one after another in one child until one
    dies; the next child starts after the file it died on. Counts every verdict in TOTALS[tool, ...]; returns the
    crashes, each naming its mutant."""
    todo, crashed = list(files), []
    while todo:
        r = subprocess.run([sys.executable, "-c", script, *todo], capture_output=True, text=True, timeout=600,
                           cwd=Path(__file__).resolve().parents[1])
        for line in r.stdout.splitlines():
            if line.startswith(("LOADED", "REFUSED")):
                verdict, path = line.split(" ", 1)
                TOTALS[tool, verdict.lower()] += 1
                TOTALS[tool, f"original {verdict.lower()}"] += files[path] == "original"
        if r.returncode == 0:
            break
        started = [line.split(" ", 1)[1] for line in r.stdout.splitlines() if line.startswith("START")]
        culprit = started[-1] if started else todo[0]
        crashed.append(f"{files[culprit]} (exit {r.returncode}: {r.stderr.strip()[-300:]})")
        todo = todo[todo.index(culprit) + 1:]
    return crashed


def test_llama_sees_only_safe_files(bench, pair):
    """Every text mutant our checks accepted (the test_gguf_* ones above ran first) is loaded by llama.cpp through
    ``KimiVL.load`` and generates a token, in child processes: a crash names its mutant; the rest keep going."""
    assert bench.accepted["text"], "run with the test_gguf_* tests"
    files = {str(p): what for what, p in bench.accepted["text"]} | {str(pair[0]): "original"}
    crashed = survive_children("llama", LLAMA_CHILD, files)
    assert not crashed, f"llama.cpp crashed on files we accepted: {crashed}"
    assert TOTALS["llama", "original loaded"] == 1, "the child process must load the unmutated file"


def test_clip_sees_only_safe_mmproj_files(bench, pair):
    """Every mmproj mutant our reader accepted goes to llama.cpp's clip (``--vision-backend ggml``:
    ``GgmlVisionEncoder``, i.e. ``clip_init``, then one image encoded), in child processes. No crash or abort: clip
    either loads the file or our checks refuse it with a one-line ``KimiVLError``."""
    assert bench.accepted["mmproj"], "run with the test_gguf_* tests"
    files = {str(p): what for what, p in bench.accepted["mmproj"]} | {str(pair[1]): "original"}
    crashed = survive_children("clip", CLIP_CHILD, files)
    assert not crashed, f"llama.cpp's clip crashed on mmproj files we accepted: {crashed}"
    assert TOTALS["clip", "original loaded"] == 1, "the child process must load and encode with the unmutated file"


# -- checkpoint files: safetensors shards, JSON, tiktoken.model -----------------------------------------------------

def read_shard(path: Path) -> None:
    sf = SafetensorsFile(path)
    for name in sf.entries:
        shape = sf.shape(name)
        sf.float32(name)
        sf.read_rows(name, 0, math.prod(shape[:-1]) if len(shape) > 1 else 1)


def checkpoint_readers(d: Path) -> dict[str, Callable[[], object]]:
    from kimivl_edge.image import ImageProcessorConfig

    return {"config": lambda: KimiVLConfig.from_checkpoint(d), "checkpoint": lambda: Checkpoint(d),
            "tokenizer": lambda: Tokenizer.from_checkpoint(d), "gguf vocabulary": lambda: vocab_metadata(d),
            "preprocessor": lambda: ImageProcessorConfig.from_checkpoint(d)}


# The readers of each file (besides its own parser). A .safetensors name stands for every shard.
READERS_OF = {"config.json": ("config", "checkpoint", "tokenizer", "gguf vocabulary"),
              "tokenizer_config.json": ("tokenizer", "gguf vocabulary"),
              "generation_config.json": ("tokenizer", "gguf vocabulary"),
              "model.safetensors.index.json": ("checkpoint",),
              "preprocessor_config.json": ("preprocessor",),
              "tiktoken.model": ("tokenizer", "gguf vocabulary"),
              ".safetensors": ("checkpoint",)}


class Scratch:
    """A private copy of the tiny checkpoint; ``mutate(name, what, blob)`` swaps one file in, runs its own parser
    and every reader that reads it, and puts the original back."""

    def __init__(self, src: Path, root: Path):
        self.d = root / "ckpt"
        shutil.copytree(src, self.d)
        self.readers = checkpoint_readers(self.d)

    def mutate(self, fname: str, what: str, blob: bytes) -> None:
        p = self.d / fname
        orig = p.read_bytes()
        p.write_bytes(blob)
        kind = ".safetensors" if fname.endswith(".safetensors") else fname
        TOTALS[kind, "mutants"] += 1
        own = {".safetensors": read_shard, "tiktoken.model": read_tiktoken_model}.get(kind, read_json_object)
        readers = {"parser": lambda: own(p)} | {r: self.readers[r] for r in READERS_OF[kind]}
        try:
            size = sum(f.stat().st_size for f in self.d.iterdir())
            accepted = [judge(f"{fname} mutant [{what}] via {r}", fn, size) for r, fn in readers.items()]
            TOTALS[kind, "accepted"] += all(accepted)
        finally:
            p.write_bytes(orig)


@pytest.fixture(scope="module")
def scratch(tiny_checkpoint, tmp_path_factory) -> Scratch:
    return Scratch(tiny_checkpoint(), tmp_path_factory.mktemp("fuzz_ckpt"))


def shard_parts(blob: bytes) -> tuple[int, dict, list[int]]:
    (n,) = struct.unpack_from("<Q", blob)
    header = json.loads(blob[8:8 + n])
    bounds = [8, 8 + n] + [8 + n + o for e in header.values() if isinstance(e, dict) and "data_offsets" in e
                             for o in e["data_offsets"]]
    return n, header, bounds


def first_shard(s: Scratch) -> str:
    """The smallest shard (the last one): every reader's work per mutant is proportional to it."""
    return min(s.d.glob("*.safetensors"), key=lambda p: p.stat().st_size).name


def test_safetensors_exhaustive(scratch):
    fname = first_shard(scratch)
    blob = (scratch.d / fname).read_bytes()
    n, header, bounds = shard_parts(blob)
    for what, mutant in truncations(blob, bounds):
        scratch.mutate(fname, what, mutant)
    for v in {*EDGE_U64, len(blob), n + 1, n - 1, len(blob) - 8}:
        scratch.mutate(fname, f"header length {v}", struct.pack("<Q", v) + blob[8:])


HOSTILE_JSON = (None, True, 0, -1, 1, 2**31, 2**63, 10**400, 1e308, 0.5, "", "x", "../../etc/passwd", [], [1, 2, 3],
                {}, {"a": 1}, [[[[0]]]])


def json_paths(obj, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            out += json_paths(v, prefix + (i,))
    return out


def json_edit(draw, obj) -> tuple[str, object]:
    """A deep copy of ``obj`` with one value replaced (or a key dropped) somewhere in the tree."""
    obj = json.loads(json.dumps(obj))
    path = draw(st.sampled_from(json_paths(obj)))
    if not path:
        return "whole document replaced", draw(st.sampled_from(HOSTILE_JSON))
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if isinstance(parent, dict) and draw(st.booleans()) and draw(st.booleans()):
        del parent[path[-1]]
        return f"drop {'/'.join(map(str, path))}", obj
    v = draw(st.one_of(st.sampled_from(HOSTILE_JSON), st.floats(allow_nan=True, allow_infinity=True)))
    parent[path[-1]] = v
    return f"{'/'.join(map(str, path))} = {v!r}"[:120], obj


def dump(obj) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def test_safetensors_structural(scratch):
    fname = first_shard(scratch)
    blob = (scratch.d / fname).read_bytes()
    n, header, _ = shard_parts(blob)
    data = blob[8 + n:]

    @FUZZ_CKPT
    @given(st.data())
    def run(d):
        what, h = json_edit(d.draw, header)
        raw = dump(h)
        scratch.mutate(fname, what, struct.pack("<Q", len(raw)) + raw + data)

    run()


JSON_FILES = ("config.json", "tokenizer_config.json", "generation_config.json", "model.safetensors.index.json",
              "preprocessor_config.json")


@pytest.mark.parametrize("fname", JSON_FILES)
def test_json_files(scratch, fname):
    blob = (scratch.d / fname).read_bytes()
    doc = json.loads(blob)
    for cut in sorted({0, 1, len(blob) // 2, len(blob) - 1}):
        scratch.mutate(fname, f"truncated at {cut}", blob[:cut])
    for what, text in (("deep nesting", b"[" * 100_000 + b"]" * 100_000), ("NaN", b'{"x": NaN}'),
                       ("1e999", b'{"x": 1e999}'), ("not UTF-8", b'{"\xff": 1}'), ("a list", b"[1]"),
                       ("a 5000-digit int", b'{"x": ' + b"9" * 5000 + b"}")):
        scratch.mutate(fname, what, text)

    @settings(FUZZ_CKPT, max_examples=30)
    @given(st.data())
    def run(d):
        what, obj = json_edit(d.draw, doc)
        scratch.mutate(fname, what, dump(obj))

    run()


def test_tiktoken_model(scratch):
    blob = (scratch.d / "tiktoken.model").read_bytes()
    lines = blob.splitlines(keepends=True)
    ends = np.cumsum([len(x) for x in lines]).tolist()
    for what, mutant in truncations(blob, [0, *ends[:3], *ends[-3:], *ends[::97]]):
        scratch.mutate("tiktoken.model", what, mutant)

    @FUZZ_CKPT
    @given(st.data())
    def run(d):
        i = d.draw(st.integers(0, len(lines) - 1))
        tok, rank = lines[i].split()
        how = d.draw(st.sampled_from(["drop", "repeat", "rank", "token", "fields", "swap"]))
        new = list(lines)
        if how == "drop":
            del new[i]
        elif how == "repeat":
            new.insert(i, lines[i])
        elif how == "rank":
            r = d.draw(st.sampled_from([b"-1", b"0", b"x", b"1.5", b"99999999999999999999", str(len(lines)).encode(),
                                        b"1_0", b"\xff"]))
            new[i] = tok + b" " + r + b"\n"
        elif how == "token":
            t = d.draw(st.sampled_from([b"", b"!!!", b"AA==", b"=", b"\x00", lines[(i + 1) % len(lines)].split()[0]]))
            new[i] = t + b" " + rank + b"\n"
        elif how == "fields":
            new[i] = tok + b" " + rank + b" 7\n"
        else:
            j = d.draw(st.integers(0, len(lines) - 1))
            new[i] = tok + b" " + lines[j].split()[1] + b"\n"
        scratch.mutate("tiktoken.model", f"line {i}: {how}", b"".join(new))

    run()


def test_summary(pair):
    """Printed with ``pytest -s``: how many mutants each file kind got, and how many every reader accepted."""
    lines = [f"{kind:>28}: {TOTALS[kind, 'mutants']:6d} mutants, {TOTALS[kind, 'accepted']:5d} accepted"
             for kind in sorted({k for k, _ in TOTALS} - {"llama", "clip"})]
    total = sum(v for (_, what), v in TOTALS.items() if what == "mutants")
    print(f"\nfuzz: {total} mutants in all; of the accepted text mutants, llama.cpp (KimiVL.load in a child "
          f"process) loaded {TOTALS['llama', 'loaded']} and generated, refused {TOTALS['llama', 'refused']}, "
          f"crashed on none; of the accepted mmproj mutants, llama.cpp's clip (GgmlVisionEncoder in a child process) "
          f"loaded {TOTALS['clip', 'loaded']} and encoded, refused {TOTALS['clip', 'refused']}, crashed on none\n"
          + "\n".join(lines))
    assert total > 0


# -- regression tests: the minimal mutant of each defect class, as a deterministic unit test ------------------------

def edited(src: Path, dst: Path, edit: Callable[[Gguf], None]) -> Path:
    g = parse_gguf(src.read_bytes())
    edit(g)
    dst.write_bytes(g.to_bytes())
    return dst


def set_value(key: str, vtype: int, raw: bytes) -> Callable[[Gguf], None]:
    def edit(g: Gguf) -> None:
        kv = g.value(key)
        kv.vtype, kv.raw = vtype, raw
    return edit


def set_u32(key: str, v: int) -> Callable[[Gguf], None]:
    return set_value(key, GGUFValueType.UINT32, struct.pack("<I", v))


def edit_array(key: str, fn: Callable[[list], None]) -> Callable[[Gguf], None]:
    def edit(g: Gguf) -> None:
        kv = g.value(key)
        etype, values = dec_array(kv.raw)
        fn(values)
        kv.raw = enc_array(etype, values)
    return edit


def refused(read: Callable[[], object], match: str) -> str:
    with pytest.raises(KimiVLError, match=match) as e, alarm(HANG_SECONDS):
        read()
    assert "\n" not in str(e.value)
    return str(e.value)


def _dup_token(v: list) -> None:
    v[300] = v[301]


def _byte_token_renamed(v: list) -> None:  # the text of the single-byte token "A" replaced by a new unique text
    v[v.index(b"A")] = "ĠAĠ".encode()


# Each: a header a hostile file could carry, which llama.cpp aborts on (GGML_ASSERT), reads out of bounds, or
# which our own readers crashed on (an exception other than KimiVLError) before they checked it.
TEXT_DEFECTS = {
    "duplicate token text": (edit_array("tokenizer.ggml.tokens", _dup_token), "repeated token"),
    "token types shorter than tokens": (edit_array("tokenizer.ggml.token_type", list.pop), "entries for"),
    "no single-byte token A": (edit_array("tokenizer.ggml.tokens", _byte_token_renamed), "single-byte"),
    "block_count 0": (set_u32("deepseek2.block_count", 0), "block_count = 0"),
    "block_count 513": (set_u32("deepseek2.block_count", 513), "out of range"),
    "more experts used than exist": (set_u32("deepseek2.expert_used_count", 99), "expert_used_count"),
    "head_count 0": (set_u32("deepseek2.attention.head_count", 0), "head_count = 0"),
    "RoPE as wide as the key head": (set_u32("deepseek2.rope.dimension_count", 64), "RoPE dimension"),
    "embedding_length as a string": (set_value("deepseek2.embedding_length", GGUFValueType.STRING, _s(b"x")),
                                     "is STRING, expected UINT32"),
    "NaN temperature": (set_value("general.sampling.temp", GGUFValueType.FLOAT32, struct.pack("<f", math.nan)),
                        "general.sampling.temp = nan"),
    "NaN rms epsilon": (set_value("deepseek2.attention.layer_norm_rms_epsilon", GGUFValueType.FLOAT32,
                                  struct.pack("<f", math.nan)), "nan"),
    "eos id outside the vocabulary": (set_u32("tokenizer.ggml.eos_token_id", 5000), "eos_token_id = 5000"),
    "unknown scaling type": (lambda g: g.kvs.append(KV(b"deepseek2.rope.scaling.type", GGUFValueType.STRING,
                                                       _s(b"warp"))), "RoPE scaling"),
}


OURS_ONLY = ("no single-byte token A", "NaN temperature")  # what only our tokenizer / sampler read


@pytest.mark.parametrize("defect", list(TEXT_DEFECTS))
def test_text_defect_refused(pair, tmp_path, defect):
    edit, match = TEXT_DEFECTS[defect]
    p = edited(pair[0], tmp_path / "bad.gguf", edit)
    refused(lambda: TextModelInfo.read(p), match)
    if defect not in OURS_ONLY:  # the check before llama.cpp sees the file
        refused(lambda: check_text_gguf(p), match)


LLAMA_PROBE = textwrap.dedent("""
    import sys, llama_cpp
    llama_cpp.llama_backend_init()
    quiet = llama_cpp.llama_log_callback(lambda *a: None)
    llama_cpp.llama_log_set(quiet, None)
    mp = llama_cpp.llama_model_default_params()
    m = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), mp)
    print("loaded" if m else "refused")
""")


@pytest.mark.parametrize("defect", ["duplicate token text", "block_count 0", "more experts used than exist",
                                    "unknown scaling type"])
def test_llama_aborts_where_we_refuse(pair, tmp_path, defect):
    """The hazard each check guards against: llama.cpp itself, handed the file directly, kills the process
    (SIGABRT from a GGML_ASSERT). Through our Decoder the same file is a one-line ModelFileError."""
    from kimivl_edge.decoder import Decoder, DecoderSettings

    p = edited(pair[0], tmp_path / "bad.gguf", TEXT_DEFECTS[defect][0])
    r = subprocess.run([sys.executable, "-c", LLAMA_PROBE, str(p)], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGABRT, (r.returncode, r.stdout)
    refused(lambda: Decoder(p, DecoderSettings(n_ctx=64, n_threads=1)), TEXT_DEFECTS[defect][1])


MMPROJ_DEFECTS = {
    "4 billion layers": (set_u32("clip.vision.block_count", 2**32 - 1), "block_count = 4294967295"),
    "patch size as a string": (set_value("clip.vision.patch_size", GGUFValueType.STRING, _s(b"x")), "patch_size"),
    "architecture as an array": (set_value("general.architecture", GGUFValueType.ARRAY,
                                           enc_array(GGUFValueType.UINT32, [1, 2])), "not a vision projector"),
    "NaN layer-norm epsilon": (set_value("clip.vision.attention.layer_norm_epsilon", GGUFValueType.FLOAT32,
                                         struct.pack("<f", math.nan)), "layer_norm_epsilon"),
    "zero image std": (set_value("clip.vision.image_std", GGUFValueType.ARRAY,
                                 enc_array(GGUFValueType.FLOAT32, [0.5, 0.0, 0.5])), "positive"),
}


@pytest.mark.parametrize("defect", list(MMPROJ_DEFECTS))
def test_mmproj_defect_refused(pair, tmp_path, defect):
    edit, match = MMPROJ_DEFECTS[defect]
    p = edited(pair[1], tmp_path / "bad.gguf", edit)
    refused(lambda: MmprojFile(p), match)


def _add_audio_encoder(g: Gguf) -> None:  # an audio encoder whose first key clip reads is in the wrong type
    g.kvs += [KV(b"clip.has_audio_encoder", GGUFValueType.BOOL, b"\x01"),
              KV(b"clip.audio.embedding_length", GGUFValueType.INT32, struct.pack("<i", 128))]


# Each: an mmproj our reader (the numpy backend) accepts, which llama.cpp's clip_init aborts on (GGML_ASSERT in
# gguf_get_val_*: a scalar read in another type); found by test_clip_sees_only_safe_mmproj_files.
CLIP_DEFECTS = {
    "patch size as INT32": (set_value("clip.vision.patch_size", GGUFValueType.INT32, struct.pack("<i", 14)),
                            "clip.vision.patch_size is INT32"),
    "an audio encoder": (_add_audio_encoder, "clip.has_audio_encoder is set"),
}

CLIP_PROBE = textwrap.dedent("""
    import sys
    from kimivl_edge.vision_ggml import clip_library
    print("loaded" if clip_library().init(sys.argv[1]) else "refused")
""")


@pytest.mark.parametrize("defect", list(CLIP_DEFECTS))
def test_clip_aborts_where_we_refuse(pair, tmp_path, defect):
    """The hazard ``check_clip_keys`` guards against: llama.cpp's clip_init, handed the file directly, kills the
    process (SIGABRT). The numpy backend's reader accepts the file (it reads every integer type); the ggml backend
    refuses it with a one-line MmprojError before clip sees it."""
    from kimivl_edge.vision_ggml import GgmlVisionEncoder

    edit, match = CLIP_DEFECTS[defect]
    p = edited(pair[1], tmp_path / "bad.gguf", edit)
    r = subprocess.run([sys.executable, "-c", CLIP_PROBE, str(p)], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGABRT, (r.returncode, r.stdout)
    MmprojFile(p)
    refused(lambda: GgmlVisionEncoder(p, threads=1), match)


def test_directory_given_as_gguf(pair, tmp_path):
    """Issue 14, defect 12: a directory given as a model file says so (it said "no such file")."""
    from kimivl_edge.model import KimiVL

    for read in (lambda: GGUFFile(tmp_path), lambda: TextModelInfo.read(tmp_path), lambda: MmprojFile(tmp_path),
                 lambda: KimiVL.load(tmp_path), lambda: KimiVL.load(pair[0], tmp_path)):
        msg = refused(read, "is a directory")
        assert "no such" not in msg


def shard_with(tmp_path: Path, header: object, data: bytes = b"\0" * 16) -> Path:
    raw = json.dumps(header).encode()
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return p


SAFETENSORS_DEFECTS = {
    "header is a list": ([1, 2], "not a JSON object"),
    "shape overflows int64": ({"a": {"dtype": "F32", "shape": [2**62, 4], "data_offsets": [0, 0]}}, "inconsistent"),
    "offsets are a string": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": "ab"}}, "data_offsets"),
    "negative shape": ({"a": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}}, "shape"),
    "overlapping tensors": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                             "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, "overlaps"),
    "entry is a number": ({"a": 7}, "not a JSON object"),
}


@pytest.mark.parametrize("defect", list(SAFETENSORS_DEFECTS))
def test_safetensors_defect_refused(tmp_path, defect):
    header, match = SAFETENSORS_DEFECTS[defect]
    p = shard_with(tmp_path, header)
    refused(lambda: read_shard(p), match)


def _edit_json(d: Path, name: str, fn: Callable[[dict], object]) -> None:
    doc = json.loads((d / name).read_text())
    fn(doc)
    (d / name).write_text(json.dumps(doc, allow_nan=True))


CHECKPOINT_DEFECTS = {
    "config nested 100 000 deep": ("config.json", None, "not valid JSON"),
    "NaN rms_norm_eps": ("config.json", lambda d: d["text_config"].update(rms_norm_eps=math.nan), "NaN"),
    "vocab_size a string": ("config.json", lambda d: d["text_config"].update(vocab_size="x"), "vocab_size"),
    "a billion layers": ("config.json", lambda d: d["text_config"].update(num_hidden_layers=10**9),
                         "num_hidden_layers"),
    "zero vision heads": ("config.json", lambda d: d["vision_config"].update(num_attention_heads=0),
                          "num_attention_heads"),
    "shard named None": ("model.safetensors.index.json",
                         lambda d: d["weight_map"].update({next(iter(d["weight_map"])): None}), "not a file name"),
    "shard outside the directory": ("model.safetensors.index.json",
                                    lambda d: d["weight_map"].update({k: "../ckpt/" + v for k, v in
                                                                      d["weight_map"].items()}), "not a file name"),
    "special id 2^40": ("tokenizer_config.json",
                        lambda d: d["added_tokens_decoder"].update({str(2**40): {"content": "<|x|>"}}),
                        "special block"),
    "stop id -1": ("generation_config.json", lambda d: d.update(eos_token_id=-1), "not in the vocabulary"),
    "400-digit image mean": ("preprocessor_config.json", lambda d: d.update(image_mean=[10**400, 0, 0]),
                             "image_mean"),
}


@pytest.mark.parametrize("defect", list(CHECKPOINT_DEFECTS))
def test_checkpoint_defect_refused(scratch, tmp_path, defect):
    from kimivl_edge.image import ImageProcessorConfig

    fname, fn, match = CHECKPOINT_DEFECTS[defect]
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in scratch.d.iterdir():  # the shards are only read: linked, not copied
        (d / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copyfile(f, d / f.name)
    if fn is None:
        (d / fname).write_text("[" * 100_000 + "]" * 100_000)
    else:
        _edit_json(d, fname, fn)
    read = {"config.json": lambda: Checkpoint(d), "model.safetensors.index.json": lambda: Checkpoint(d),
            "tokenizer_config.json": lambda: Tokenizer.from_checkpoint(d),
            "generation_config.json": lambda: Tokenizer.from_checkpoint(d),
            "preprocessor_config.json": lambda: ImageProcessorConfig.from_checkpoint(d)}[fname]
    refused(read, match)
