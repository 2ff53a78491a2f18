"""The converter when things go wrong around it: full or read-only disks, interrupts between the two files, a
Thinking checkpoint in a neutral directory, NaN / Inf weights, misleading messages, where files go by default, and
the partial files a killed conversion leaves.

Oracles: file sizes and data offsets come from the written files (os.stat, gguf.GGUFReader); the variant from what
the test wrote into the checkpoint; NaN / Inf counts from the values the test poked into the shards; ENOSPC from the
kernel (/dev/full).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import gguf
import pytest

from shared import edit_json
from kimivl_edge.convert import convert_checkpoint, gguf_out, plan_conversion
from kimivl_edge.errors import KimiVLError, UsageError

ROOT = Path(__file__).resolve().parent.parent  # `python -c` from here imports this checkout's kimivl_edge
ASSET = ROOT / "kimivl_edge" / "assets" / "kimi-vl-tiny"
THINK_TEMPLATE = "{%- for m in messages -%}{{ m['content'].split('◁/think▷')[-1] }}{%- endfor -%}"


def gguf_kv(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: r.fields[k].contents() for k in r.fields}


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    return lines[0]


# --- defect 5: the free-space estimate includes headers; full disks; the pair is all or nothing ----------------

def test_size_estimate_equals_the_written_files(tiny_checkpoint, tmp_path):
    ck = tiny_checkpoint("instruct")
    plan = plan_conversion(ck, "q4_k_m", "f16", tmp_path)
    res = convert_checkpoint(ck, "q4_k_m", "f16", tmp_path)
    for gp, path in ((plan.text, res.text_path), (plan.mmproj, res.mmproj_path)):
        assert gp.file_bytes == path.stat().st_size
        assert gp.header_bytes == gguf.GGUFReader(path).data_offset  # header, metadata, tensor index, padding
    assert plan.text.header_bytes > 10_000  # the tokenizer metadata (33 KB here, MBs at real size): once left out


def test_space_check_counts_the_headers(tiny_checkpoint, tmp_path, monkeypatch):
    """Room for the tensor data but not for the headers: refused before writing, in readable units."""
    ck = tiny_checkpoint("instruct")
    plan = plan_conversion(ck, "f32", "f32", tmp_path / "o")
    tensors_only = plan.text.data_bytes + plan.mmproj.data_bytes
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10**12, used=0, free=tensors_only))
    with pytest.raises(UsageError, match="not enough free disk space") as e:
        convert_checkpoint(ck, "f32", "f32", tmp_path / "o")
    assert not list((tmp_path / "o").glob("*.gguf"))
    msg = str(e.value)
    assert "0.00 GB" not in msg and re.search(r"needs \d+\.\d\d MB, \d+\.\d\d MB free", msg), msg


def test_tiny_free_space_is_printed_in_small_units(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9 - 1500, free=1500))
    with pytest.raises(UsageError, match=r"needs \d+\.\d\d MB, 1\.50 KB free"):
        convert_checkpoint(tiny_checkpoint("instruct"), "f32", "f32", tmp_path / "o")


class _FailingFile:
    """A file object whose writes fail with ``err`` (what the kernel returns on a full or read-only disk)."""

    def __init__(self, f, err: int):
        self._f, self._err = f, err

    def write(self, data):
        raise OSError(self._err, os.strerror(self._err))

    def __getattr__(self, name):
        return getattr(self._f, name)


def _fail_when_writing(monkeypatch, prefix: str, exc: BaseException | int) -> None:
    """Make the data writes of the file whose temporary name starts with ``prefix`` fail (OSError errno ``exc``)
    or raise ``exc`` (an interrupt) when that file is started."""
    real = gguf_out._header_writer

    def header_writer(path, plan, types):
        if path.name.startswith(prefix):
            if isinstance(exc, BaseException):
                raise exc
            w = real(path, plan, types)
            w.fout[0] = _FailingFile(w.fout[0], exc)
            return w
        return real(path, plan, types)

    monkeypatch.setattr(gguf_out, "_header_writer", header_writer)


@pytest.mark.parametrize("err, words", [(errno.ENOSPC, "no space left"), (errno.EDQUOT, "quota"),
                                        (errno.EROFS, "read-only")])
@pytest.mark.parametrize("phase", [".Kimi", ".mmproj"])
def test_disk_errors_are_one_line_and_leave_nothing(tiny_checkpoint, tmp_path, monkeypatch, err, words, phase):
    _fail_when_writing(monkeypatch, phase, err)
    out = tmp_path / "o"
    with pytest.raises(KimiVLError, match=words) as e:
        convert_checkpoint(tiny_checkpoint("instruct"), "f32", "f32", out)
    assert "\n" not in str(e.value)
    assert list(out.iterdir()) == []  # no final file, no partial


def test_interrupt_in_the_mmproj_phase_keeps_the_old_text_file(tiny_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    old = out / "Kimi-VL-A3B-Instruct-F32.gguf"
    old.write_bytes(b"the previous conversion")
    _fail_when_writing(monkeypatch, ".mmproj", KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(tiny_checkpoint("instruct"), "f32", "f32", out)
    assert sorted(p.name for p in out.iterdir()) == [old.name] and old.read_bytes() == b"the previous conversion"


def test_real_enospc_from_the_kernel_via_the_cli(tiny_checkpoint, tmp_path):
    """The mmproj's temporary is /dev/full (writes fail with ENOSPC in the kernel): exit 2, one line, and the text
    file, already complete, is not left at its final name."""
    out = tmp_path / "o"
    out.mkdir()
    code = (
        "import os, sys\n"
        f"out = {str(out)!r}\n"
        "os.symlink('/dev/full', os.path.join(out, f'.mmproj-Kimi-VL-A3B-Instruct-F32.gguf.partial-{os.getpid()}'))\n"
        "from kimivl_edge.cli import main\n"
        f"sys.exit(main(['convert', {str(tiny_checkpoint('instruct'))!r}, '--outtype', 'f32', '--mmproj-type', "
        "'f32', '--outdir', out]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    one_line_error(r, "no space left")
    assert list(out.iterdir()) == []


# --- defect 6: the variant comes from the checkpoint's own files -----------------------------------------------

def _neutral(src: Path, dst: Path, readme: bool = True) -> Path:
    d = shutil.copytree(src, dst)
    if not readme:
        (d / "README.md").unlink()
    return d


def test_thinking_checkpoint_in_a_neutral_directory_is_thinking(tiny_checkpoint, tmp_path):
    d = _neutral(tiny_checkpoint("thinking"), tmp_path / "ckpt")
    text, mmproj = convert_checkpoint(d, "f32", "f32", tmp_path / "o")
    assert text.name == "Kimi-VL-A3B-Thinking-F32.gguf"
    for path in (text, mmproj):
        kv = gguf_kv(path)
        assert kv["kimivl_edge.variant"] == "thinking" and "README.md" in kv["kimivl_edge.variant_source"]
    assert abs(gguf_kv(text)["general.sampling.temp"] - 0.8) < 1e-6


def _edit_template(d: Path, template: str) -> None:
    (d / "chat_template.jinja").write_text(template)


@pytest.mark.parametrize("edit, variant, source", [
    # the template says "a Thinking variant"; the README title which one
    (lambda d: _edit_template(d, THINK_TEMPLATE), "thinking-2506", "chat template"),
    # generation_config.json's temperature 0.2 outranks the README, which is reported as ignored
    (lambda d: edit_json(d / "generation_config.json", lambda g: g.update(temperature=0.2)), "instruct",
     "ignored: README.md"),
    # config.json's _name_or_path outranks the README
    (lambda d: edit_json(d / "config.json", lambda c: c.update(_name_or_path="moonshotai/Kimi-VL-A3B-Thinking")),
     "thinking", "config.json _name_or_path"),
])
def test_sources_in_their_order_of_trust(tiny_checkpoint, tmp_path, edit, variant, source):
    d = _neutral(tiny_checkpoint("thinking-2506"), tmp_path / "ckpt")
    edit(d)
    plan = plan_conversion(d, "f32", "f32", tmp_path / "o")
    assert plan.variant == variant and source in plan.variant_source, plan.variant_source


def test_readme_code_example_names_the_repo(tiny_checkpoint, tmp_path):
    d = _neutral(tiny_checkpoint("instruct"), tmp_path / "ckpt")
    (d / "README.md").write_text("# Kimi-VL\n\nCompared with Kimi-VL-A3B-Instruct and Kimi-VL-A3B-Thinking.\n\n"
                                 "```python\nmodel_path = \"moonshotai/Kimi-VL-A3B-Thinking-2506\"\n```\n")
    assert plan_conversion(d, "f32", "f32", tmp_path / "o").variant == "thinking-2506"


def test_no_source_refuses_and_asks_for_variant(tiny_checkpoint, tmp_path, cli):
    d = _neutral(tiny_checkpoint("thinking"), tmp_path / "ckpt", readme=False)
    r = cli("convert", str(d), "--outdir", str(tmp_path / "o"), "--dry-run")
    one_line_error(r, "cannot tell which variant", "--variant")
    assert not (tmp_path / "o").exists()
    r = cli("convert", str(d), "--outdir", str(tmp_path / "o"), "--dry-run", "--variant", "thinking")
    assert r.returncode == 0 and "variant thinking (--variant)" in r.stdout, r.stderr


def test_thinking_template_alone_is_not_enough(tiny_checkpoint, tmp_path):
    d = _neutral(tiny_checkpoint("instruct"), tmp_path / "ckpt", readme=False)
    _edit_template(d, THINK_TEMPLATE)
    with pytest.raises(UsageError, match=r"chat template.*--variant thinking\|thinking-2506"):
        plan_conversion(d, "f32", "f32", tmp_path / "o")


def test_dry_run_says_which_source_decided(tiny_checkpoint, tmp_path, cli):
    d = _neutral(tiny_checkpoint("thinking-2506"), tmp_path / "ckpt")
    r = cli("convert", str(d), "--outdir", str(tmp_path / "o"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "variant thinking-2506 (README.md title names Kimi-VL-A3B-Thinking-2506)" in r.stdout


# --- defect 9: NaN / Inf weights -------------------------------------------------------------------------------

def _poke_bf16(ckpt: Path, name: str, values: dict[int, int]) -> None:
    """Set elements of tensor ``name`` (flat index -> bf16 bits) in its shard, parsing the safetensors header here."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    path = ckpt / index[name]
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    entry = json.loads(raw[8: 8 + n])[name]
    assert entry["dtype"] == "BF16"
    base = 8 + n + entry["data_offsets"][0]
    for i, bits in values.items():
        raw[base + 2 * i: base + 2 * i + 2] = struct.pack("<H", bits)
    path.write_bytes(bytes(raw))


NAN, INF, NEG_INF = 0x7FC0, 0x7F80, 0xFF80


@pytest.fixture
def nonfinite_checkpoint(tiny_checkpoint, tmp_path) -> Path:
    d = shutil.copytree(tiny_checkpoint("instruct"), tmp_path / "Kimi-VL-A3B-Instruct")
    _poke_bf16(d, "language_model.model.layers.1.self_attn.q_proj.weight", {0: NAN, 5: NAN, 700: NAN})
    _poke_bf16(d, "vision_tower.encoder.blocks.0.mlp.fc0.weight", {3: INF, 9: NEG_INF})
    return d


def test_nonfinite_weights_are_listed_and_refused(nonfinite_checkpoint, tmp_path, cli):
    out = tmp_path / "o"
    r = cli("convert", str(nonfinite_checkpoint), "--outtype", "f32", "--mmproj-type", "f32", "--outdir", str(out))
    line = one_line_error(r, "non-finite", "--allow-nonfinite")
    assert "blk.1.attn_q.weight: 3 NaN, 0 Inf" in line and "v.blk.0.ffn_up.weight: 0 NaN, 2 Inf" in line, line
    assert "in 2 tensor" in line
    assert list(out.iterdir()) == []


def test_allow_nonfinite_converts_and_reports(nonfinite_checkpoint, tmp_path):
    res = convert_checkpoint(nonfinite_checkpoint, "f32", "f32", tmp_path / "o", allow_nonfinite=True)
    assert [(t.name, t.nan, t.inf) for t in res.text.nonfinite] == [("blk.1.attn_q.weight", 3, 0)]
    assert [(t.name, t.nan, t.inf) for t in res.mmproj.nonfinite] == [("v.blk.0.ffn_up.weight", 0, 2)]
    assert res.text_path.is_file() and res.mmproj_path.is_file()


# --- defect 12: messages that say what is wrong ----------------------------------------------------------------

def test_outdir_that_is_a_file(tiny_checkpoint, tmp_path, cli):
    f = tmp_path / "models"
    f.write_text("not a directory")
    r = cli("convert", str(tiny_checkpoint("instruct")), "--outdir", str(f))
    line = one_line_error(r, "is a file")
    assert "not writable" not in line


def test_read_only_target_is_not_reported_as_full(tiny_checkpoint, tmp_path, monkeypatch):
    """A read-only file system that reports 0 bytes free (squashfs, an ISO): the error says read-only."""
    out = tmp_path / "ro"
    out.mkdir()
    ckpt = tiny_checkpoint("instruct")  # made before the patches below (its own free-space check would see them)
    real_open = os.open

    def ro_open(path, flags, *a, **k):
        if Path(path).parent == out and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9, free=0))
    with pytest.raises(UsageError, match="read-only") as e:
        convert_checkpoint(ckpt, "f32", "f32", out)
    assert "disk space" not in str(e.value)


# --- where files go by default ---------------------------------------------------------------------------------

def test_default_outdir_is_the_current_directory(tmp_path, monkeypatch):
    """The bundled model converts into the current directory, not into the package's assets/."""
    before = sorted(p.name for p in ASSET.iterdir())
    monkeypatch.chdir(tmp_path)
    text, mmproj = convert_checkpoint(ASSET, "q8_0", "f16", threads=1)
    assert text.parent.resolve() == mmproj.parent.resolve() == tmp_path.resolve()
    assert sorted(p.name for p in ASSET.iterdir()) == before


def test_never_writes_into_the_hf_cache_or_the_package(tiny_checkpoint, tmp_path, monkeypatch, cli):
    snap = tmp_path / "hub" / "models--moonshotai--Kimi-VL-A3B-Instruct" / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    shutil.copytree(tiny_checkpoint("instruct"), snap)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    before = sorted(p.name for p in snap.iterdir())
    with pytest.raises(UsageError, match="inside the Hugging Face cache"):
        convert_checkpoint(snap, "f32", "f32", snap)
    assert sorted(p.name for p in snap.iterdir()) == before
    r = cli("convert", str(tiny_checkpoint("instruct")), "--outdir", str(ASSET))
    one_line_error(r, "inside the installed kimivl_edge package")


# --- stale partial files of killed conversions ------------------------------------------------------------------

def test_stale_partials_of_dead_processes_are_removed(tiny_checkpoint, tmp_path, cli):
    out = tmp_path / "o"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".Kimi-VL-A3B-Instruct-F32.gguf.partial-{dead.pid}"
    stale_header = out / f".Kimi-VL-A3B-Instruct-F32.gguf.partial-{dead.pid}.header"
    live = out / f".Kimi-VL-A3B-Instruct-Q8_0.gguf.partial-{os.getpid()}"  # this process: running
    mine = out / f".notes.partial-{dead.pid}"  # not ours: kept
    for p in (stale, stale_header, live, mine):
        p.write_bytes(b"x")
    r = cli("convert", str(tiny_checkpoint("instruct")), "--outtype", "f32", "--mmproj-type", "f32",
            "--outdir", str(out))
    assert r.returncode == 0, r.stderr
    assert not stale.exists() and not stale_header.exists() and live.exists() and mine.exists()
    said = [line for line in r.stdout.splitlines() if "stale partial" in line]
    assert len(said) == 1 and "removed 2" in said[0] and stale.name in said[0], r.stdout
