"""`kimivl-edge bench`: a tiny smoke run has every JSON field; the roofline and FLOP arithmetic against hand-computed
examples; the machine-limit helpers return positive finite numbers. No absolute time is asserted anywhere."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gguf import GGMLQuantizationType

from kimivl_edge.bench.harness import Children
from kimivl_edge.bench.probes import current_rss, gemm_peak, peak_rss, raw_read_seconds, read_bandwidth
from kimivl_edge.bench.roofline import RooflineModel, bytes_per_token, kv_bytes_per_token, vision_flops
from kimivl_edge.bench.sections import llama_convert_section, summarize
from kimivl_edge.synth import preset_config
from kimivl_edge.errors import UsageError
from kimivl_edge.gguf_file import TensorInfo

ASSET = Path(__file__).resolve().parents[1] / "kimivl_edge" / "assets" / "kimi-vl-tiny"

# The fields bench.json must have, written out here (not taken from the module).
TOP = {"schema", "command", "preset", "layers", "scaled", "scale_note", "runs", "threads", "started",
       "total_seconds", "machine", "limits", "checkpoint", "conversion", "decode", "roofline", "vision", "ttft",
       "prefix_cache", "media", "coldstart", "not_measured"}
MACHINE = {"cpu_model", "cpu_family", "cpu_model_number", "cpu_flags", "logical_cpus", "ram_bytes", "os", "python",
           "numpy", "llama_cpp_python", "load_average", "load_average_end"}
LIMITS = {"read_bandwidth_bytes_per_s", "read_bandwidth_method", "gemm_flops_per_s", "gemm_method"}
CHECKPOINT = {"preset", "text_layers", "vision_layers", "bytes", "files", "synth_seconds", "synth_peak_rss_bytes",
              "gguf_disk_peak_bytes"}
RAW_READ = {"bytes", "seconds", "bytes_per_s", "page_cache_note"}
CONVERSION = {"text_type", "mmproj_type", "text_bytes", "mmproj_bytes", "seconds", "peak_rss_bytes",
              "input_bytes_per_s", "fraction_of_raw_read"}
MMPROJ_ONLY = {"mmproj_type", "mmproj_bytes", "seconds", "peak_rss_bytes"}
DECODE = {"gguf_bytes", "n_ctx", "n_batch", "prompt_tokens", "decode_tokens", "load_mode", "methods",
          "decode_vs_raw_loop", "prefill_vs_raw_loop"}
METHODS = {"kimivl_edge", "llama_decode_loop", "llama_cpp_python"}
METHOD = {"prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes"}
ROOFLINE = {"bytes_per_token", "kv_bytes_per_token", "kv_note", "read_bandwidth_bytes_per_s", "ceiling_tokens_per_s",
            "achieved_tokens_per_s", "fraction_of_ceiling"}
ROLES = {"attention", "dense_ffn", "shared_experts", "routed_experts", "router", "norms", "head", "embedding_row",
         "other", "total"}
VISION = {"sizes", "note", "gemm_flops_per_s", "hparams", "results"}
VISION_RESULT = {"mmproj_type", "backend", "available", "error", "mmproj_bytes", "warmup_seconds", "items"}
VISION_ITEM = {"image", "grid", "patches", "tokens", "gflop", "seconds", "gflop_per_s", "fraction_of_gemm_peak",
               "peak_rss_bytes"}
TTFT = {"text_gguf_bytes", "mmproj_gguf_bytes", "image", "question", "image_tokens", "prompt_tokens", "load_seconds",
        "ttft_seconds", "encode_seconds", "prefill_seconds", "followup_seconds", "followup_evaluated_tokens",
        "rss_after_load_bytes", "peak_rss_bytes", "kv_cache_bytes", "n_ctx", "peak_rss_over_gguf"}
PREFIX = {"input", "image_tokens", "prompt_tokens", "restored_tokens", "hit_evaluated_tokens", "off_evaluated_tokens",
          "ttft_hit_seconds", "ttft_off_seconds", "ttft_fill_seconds", "load_seconds", "restore_seconds",
          "recompute_seconds", "restore_over_recompute", "cache_bytes", "cache_bytes_per_image_token"}
STAT = {"median", "min", "max", "values"}
MEDIA = {"decode_frames_per_s", "render_seconds_per_page", "frames", "pages", "page_patches", "video", "pdf",
         "peak_rss_bytes"}
MEDIA_TURN = {"ttft_seconds", "media_seconds", "encode_seconds", "prefill_seconds", "image_tokens", "prompt_tokens",
              "evaluated_tokens"}


def _has(d: dict, keys: set[str], where: str) -> None:
    missing = keys - set(d)
    assert not missing, f"{where}: missing {sorted(missing)}"


def _stat(s: dict, where: str, positive: bool = True) -> None:
    _has(s, STAT, where)
    assert s["min"] <= s["median"] <= s["max"], where
    for v in s["values"]:
        assert math.isfinite(v) and (v > 0 if positive else v >= 0), f"{where}: {v}"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real `kimivl-edge bench --preset tiny --runs 1` (one thread, so parallel test workers do not make
    llama.cpp's spinning threads crawl; budget < 90 s, not asserted)."""
    out = tmp_path_factory.mktemp("bench")
    from kimivl_edge.cli import main

    assert main(["bench", "--preset", "tiny", "--runs", "1", "--threads", "1", "--out", str(out)]) == 0
    return out, json.loads((out / "bench.json").read_text())


def test_smoke_run_has_every_field(tiny_run):
    import llama_cpp

    out, r = tiny_run
    amx = "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode()
    _has(r, TOP, "top")
    _has(r["machine"], MACHINE, "machine")
    _has(r["limits"], LIMITS, "limits")
    _stat(r["limits"]["read_bandwidth_bytes_per_s"], "bandwidth")
    _stat(r["limits"]["gemm_flops_per_s"], "gemm")
    _has(r["checkpoint"], CHECKPOINT, "checkpoint")
    _has(r["conversion"]["raw_read"], RAW_READ, "raw_read")
    for tt in ("q8_0", "q4_k_m", "q4_k_edge"):
        c = r["conversion"][tt]
        _has(c, CONVERSION, f"conversion.{tt}")
        for k in ("seconds", "peak_rss_bytes", "input_bytes_per_s"):
            _stat(c[k], f"conversion.{tt}.{k}")
        d = r["decode"][tt]
        _has(d, DECODE, f"decode.{tt}")
        # every runtime in the row runs in our Decoder's default mode for the file: on a CPU with AMX (llama.cpp's
        # extra buffers abort on deepseek2) that is the mapped file in its own layout
        assert d["load_mode"] == {"mmap": True, "repack": False} if amx else d["load_mode"]["repack"] is True
        assert set(d["methods"]) == METHODS
        for name, m in d["methods"].items():
            _has(m, METHOD, f"decode.{tt}.{name}")
            _stat(m["prefill_tokens_per_s"], f"{tt}.{name}.prefill")
            _stat(m["decode_tokens_per_s"], f"{tt}.{name}.decode")
        f = r["roofline"][tt]
        _has(f, ROOFLINE, f"roofline.{tt}")
        _has(f["bytes_per_token"], ROLES, f"roofline.{tt}.bytes_per_token")
        assert set(f["fraction_of_ceiling"]) == METHODS
    ev = r["decode"]["edge_vs_llama_q4_k_m"]
    assert ev["llama_decode_loop"] == pytest.approx(
        r["decode"]["q4_k_edge"]["methods"]["kimivl_edge"]["decode_tokens_per_s"]["median"]
        / r["decode"]["q4_k_m"]["methods"]["llama_decode_loop"]["decode_tokens_per_s"]["median"])
    _has(r["conversion"]["mmproj_f16"], MMPROJ_ONLY, "mmproj_f16")
    assert "measured" in r["conversion"]["llama_convert"]
    _has(r["vision"], VISION, "vision")
    assert {(x["mmproj_type"], x["backend"]) for x in r["vision"]["results"]} == {
        (t, b) for t in ("f16", "q8_0", "q4_0") for b in ("numpy", "numpy-cached", "ggml")}
    for res in r["vision"]["results"]:
        _has(res, VISION_RESULT, f"vision {res['mmproj_type']} {res['backend']}")
        if res["backend"].startswith("numpy"):
            assert res["available"], res["error"]
        for it in res["items"] if res["available"] else []:
            _has(it, VISION_ITEM, "vision item")
            _stat(it["seconds"], "vision seconds")
    _has(r["media"], MEDIA, "media")
    _has(r["ttft"], TTFT, "ttft")
    for k in ("ttft_seconds", "encode_seconds", "prefill_seconds", "followup_seconds"):
        _stat(r["ttft"][k], f"ttft.{k}")
    for what in ("image", "pdf"):
        _has(r["prefix_cache"][what], PREFIX, f"prefix_cache.{what}")
        for k in ("ttft_hit_seconds", "ttft_off_seconds", "ttft_fill_seconds", "load_seconds", "restore_seconds",
                  "restore_over_recompute"):
            _stat(r["prefix_cache"][what][k], f"prefix_cache.{what}.{k}")
    md = (out / "bench.md").read_text()
    assert md.count("## ") >= 11
    load = r["machine"]["load_average"][0]
    assert ("the machine was idle" in md) == (load < 0.3) and "well above 0" not in md
    assert not (out / "bench-work" / "checkpoint").exists()  # the synthetic checkpoint is removed


def test_smoke_run_figures_are_consistent(tiny_run):
    _, r = tiny_run
    cfg = preset_config("tiny")
    assert r["scaled"] is False and r["layers"] is None and r["runs"] == 1 and r["threads"] == 1
    assert (r["checkpoint"]["text_layers"], r["checkpoint"]["vision_layers"]) == (
        cfg.text.num_hidden_layers, cfg.vision.num_hidden_layers)
    # conversion speed relative to the raw read: read seconds / conversion seconds
    read = r["conversion"]["raw_read"]
    for tt in ("q8_0", "q4_k_m", "q4_k_edge"):
        c = r["conversion"][tt]
        assert c["fraction_of_raw_read"] == pytest.approx(read["seconds"]["median"] / c["seconds"]["median"])
        assert c["input_bytes_per_s"]["median"] == pytest.approx(read["bytes"] / c["seconds"]["median"])
        f = r["roofline"][tt]
        b = f["bytes_per_token"]
        assert b["total"] == sum(v for k, v in b.items() if k != "total")
        assert b["routed_experts"] > 0 and b["shared_experts"] > 0 and b["dense_ffn"] > 0 and b["other"] == 0
        assert f["ceiling_tokens_per_s"] == pytest.approx(
            f["read_bandwidth_bytes_per_s"] / (b["total"] + f["kv_bytes_per_token"]))
        # the text GGUF is read whole except the embedding table and the unused experts
        assert b["total"] < r["decode"][tt]["gguf_bytes"]
    # an image of 448x448 is 32x32 patches = 256 tokens after the 2x2 merge (docs/model.md §4)
    assert r["ttft"]["image_tokens"] == 256
    first = next(x for x in r["vision"]["results"] if x["backend"] == "numpy")
    assert first["items"][0]["grid"] == [32, 32] and first["items"][0]["tokens"] == 256
    # KV cache: positions x 27... here the tiny model's layers x 576-style (kv_lora_rank + rope) values x 2 bytes
    t = cfg.text
    assert r["ttft"]["kv_cache_bytes"] == (t.num_hidden_layers * r["ttft"]["n_ctx"]
                                           * (t.kv_lora_rank + t.qk_rope_head_dim) * 2)
    # the prefix cache: the hit restored the image and the text before it, evaluated only the rest; the entry holds
    # at least the f16 KV of the restored positions and the float32 embeddings of the image
    kv_per_token = t.num_hidden_layers * (t.kv_lora_rank + t.qk_rope_head_dim) * 2
    assert r["prefix_cache"]["image"]["image_tokens"] == 256
    # the same ten pages at the same page budget as the media section's PDF
    assert r["prefix_cache"]["pdf"]["image_tokens"] == r["media"]["pdf"]["first"]["image_tokens"]
    for p in r["prefix_cache"].values():
        assert p["image_tokens"] < p["restored_tokens"] < p["prompt_tokens"]
        assert p["hit_evaluated_tokens"] == p["prompt_tokens"] - p["restored_tokens"]
        assert p["off_evaluated_tokens"] == p["prompt_tokens"]
        assert p["cache_bytes"] >= p["restored_tokens"] * kv_per_token + p["image_tokens"] * t.hidden_size * 4
        assert p["cache_bytes_per_image_token"] == pytest.approx(p["cache_bytes"] / p["image_tokens"])


# --------------------------------------------------------------------------------------------------------------
# roofline arithmetic, by hand

def _t(name: str, ne: tuple[int, ...], nbytes: int) -> TensorInfo:
    """A tensor-index entry; the roofline reads only its name, ``ne`` and bytes."""
    return TensorInfo(name, ne, GGMLQuantizationType.F32, 0, nbytes)


HAND_TENSORS = [
    _t("token_embd.weight", (64, 1000), 64_000),          # one row: 64 bytes
    _t("output.weight", (64, 1000), 34_000),
    _t("output_norm.weight", (64,), 256),
    _t("blk.0.attn_norm.weight", (64,), 256),
    _t("blk.0.attn_q.weight", (64, 96), 6_528),
    _t("blk.0.attn_kv_a_mqa.weight", (64, 40), 2_720),
    _t("blk.0.attn_kv_a_norm.weight", (32,), 128),
    _t("blk.0.attn_k_b.weight", (16, 32, 4), 2_176),
    _t("blk.0.attn_v_b.weight", (32, 16, 4), 2_176),
    _t("blk.0.attn_output.weight", (64, 64), 4_352),
    _t("blk.0.ffn_norm.weight", (64,), 256),
    _t("blk.0.ffn_gate.weight", (64, 128), 8_704),
    _t("blk.0.ffn_up.weight", (64, 128), 8_704),
    _t("blk.0.ffn_down.weight", (128, 64), 8_704),
    _t("blk.1.ffn_gate_inp.weight", (64, 8), 2_048),
    _t("blk.1.exp_probs_b.bias", (8,), 32),
    _t("blk.1.ffn_gate_exps.weight", (64, 32, 8), 17_408),  # 2176 per expert
    _t("blk.1.ffn_up_exps.weight", (64, 32, 8), 17_408),
    _t("blk.1.ffn_down_exps.weight", (32, 64, 8), 16_000),  # 2000 per expert
    _t("blk.1.ffn_gate_shexp.weight", (64, 32), 2_176),
    _t("blk.1.ffn_up_shexp.weight", (64, 32), 2_176),
    _t("blk.1.ffn_down_shexp.weight", (32, 64), 2_000),
]


def test_bytes_per_token_hand_example():
    got = bytes_per_token(HAND_TENSORS, n_expert=8, n_expert_used=2)
    want = {
        "attention": 6_528 + 2_720 + 2_176 + 2_176 + 4_352,      # 17 952
        "norms": 256 + 256 + 128 + 256,                          # 896
        "dense_ffn": 3 * 8_704,                                  # 26 112
        "router": 2_048 + 32,                                    # 2 080
        "routed_experts": 2 * 2_176 + 2 * 2_176 + 2 * 2_000,     # 12 704
        "shared_experts": 2_176 + 2_176 + 2_000,                 # 6 352
        "head": 34_000,
        "embedding_row": 64,
        "other": 0,
    }
    want["total"] = 100_160
    assert sum(v for k, v in want.items() if k != "total") == want["total"]
    assert got == want


def test_bytes_per_token_all_experts_and_errors():
    every = bytes_per_token(HAND_TENSORS, n_expert=8, n_expert_used=8)
    assert every["routed_experts"] == 17_408 + 17_408 + 16_000
    with pytest.raises(ValueError):
        bytes_per_token(HAND_TENSORS, n_expert=8, n_expert_used=9)
    with pytest.raises(ValueError):  # the stacked axis does not hold 6 experts
        bytes_per_token(HAND_TENSORS, n_expert=6, n_expert_used=2)


def test_kv_bytes_hand_example():
    # Kimi-VL: 27 layers x 552 positions x (512 latent + 64 rope) values x 2 bytes (f16), docs/model.md §9.4
    assert kv_bytes_per_token(27, 552, 576) == 17_169_408
    assert kv_bytes_per_token(27, 552, 576, bytes_per_value=4) == 2 * 17_169_408


def test_roofline_model_reads_the_text_gguf(tmp_path):
    """RooflineModel.read (the project's GGUF reader) against gguf-py's own GGUFReader and the checkpoint's config:
    the same tensors, shapes and bytes, the config's expert counts, layers and MLA cache width."""
    import gguf

    from kimivl_edge.convert import convert_checkpoint

    res = convert_checkpoint(ASSET, "q4_k_m", "q8_0", tmp_path, threads=1)
    got = RooflineModel.read(res.text_path)
    ref = gguf.GGUFReader(res.text_path)
    assert [(t.name, t.ne, t.nbytes) for t in got.tensors] == [
        (t.name, tuple(int(x) for x in t.shape), int(t.n_bytes)) for t in ref.tensors]
    t = json.loads((ASSET / "config.json").read_text())["text_config"]
    assert (got.n_expert, got.n_expert_used, got.n_layer, got.kv_values_per_position) == (
        t["n_routed_experts"], t["num_experts_per_tok"], t["num_hidden_layers"],
        t["kv_lora_rank"] + t["qk_rope_head_dim"])
    bpt = got.bytes_per_token()
    assert bpt["routed_experts"] > 0 and bpt["other"] == 0
    assert got.kv_bytes_per_token(100) == kv_bytes_per_token(got.n_layer, 100, got.kv_values_per_position)


def test_vision_flops_hand_example():
    # 2x2 grid: n = 4 patches, D = 4, one layer, MLP 8, patch 1, merge 2, projection 3
    # patch embed 2*4*3*4 = 96; QKV 2*4*4*12 = 384; scores 2*16*4 = 128; weights·V 128; wo 2*4*4*4 = 128;
    # MLP 2*(2*4*4*8) = 512; projector: 1 token of 16: 2*16*16 = 512 and 2*16*3 = 96
    assert vision_flops((2, 2), hidden=4, layers=1, intermediate=8, patch=1, merge=2, projection_dim=3) == 1_984


# --------------------------------------------------------------------------------------------------------------
# machine-limit helpers

def test_bandwidth_and_gemm_are_positive_and_finite(tmp_path):
    for threads in (1, 2):
        bw = read_bandwidth(1 << 24, threads=threads, passes=1)
        assert math.isfinite(bw) and bw > 0
    g = gemm_peak(128, passes=1)
    assert math.isfinite(g) and g > 0
    f = tmp_path / "x.bin"
    f.write_bytes(b"\0" * (3 << 20))
    s = raw_read_seconds([f], chunk=1 << 20)
    assert math.isfinite(s) and s > 0
    assert peak_rss() > 0 and current_rss() > 0


def test_llama_convert_is_timed_or_reported(tmp_path):
    """--llama-convert runs the given script (here a stand-in that writes its --outfile) once per run, or reports
    why it could not be measured."""
    script = tmp_path / "convert_hf_to_gguf.py"
    script.write_text("import sys\nout = sys.argv[sys.argv.index('--outfile') + 1]\n"
                      "open(out, 'wb').write(b'x' * 123)\n")
    ch = Children(tmp_path, threads=1)
    got = llama_convert_section(script, ch, tmp_path, tmp_path, ckpt_bytes=1000, runs=2)
    assert got["measured"] and got["text_bytes"] == 123 and len(got["seconds"]["values"]) == 2
    assert got["peak_rss_bytes"]["min"] > 0
    assert not (tmp_path / "llama-convert-Q8_0.gguf").exists()
    script.write_text("import sys\nprint('no such model architecture')\nsys.exit(1)\n")
    got = llama_convert_section(script, ch, tmp_path, tmp_path, ckpt_bytes=1000, runs=2)
    assert not got["measured"] and "exit code 1" in got["reason"] and "architecture" in got["reason"]


def test_synth_layers_scales_depth_and_keeps_values(tmp_path):
    """--layers N writes the preset with N text and N vision layers; the kept tensors hold the full-depth values."""
    from kimivl_edge.synth import synth

    full, small = synth(tmp_path / "full", "tiny", seed=3), synth(tmp_path / "small", "tiny", seed=3, layers=2)
    cfg = json.loads((small / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 2 and cfg["vision_config"]["num_hidden_layers"] == 2
    names = json.loads((small / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(".layers.1." in n for n in names) and not any(".layers.2." in n for n in names)
    assert any(".blocks.1." in n for n in names) and not any(".blocks.2." in n for n in names)

    def tensors(d):
        """name -> raw bytes, read by the safetensors layout itself (u64 header size, JSON header, data)."""
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            raw = f.read_bytes()
            n = int.from_bytes(raw[:8], "little")
            header = json.loads(raw[8:8 + n])
            for name, info in header.items():
                if name != "__metadata__":
                    lo, hi = info["data_offsets"]
                    out[name] = raw[8 + n + lo: 8 + n + hi]
        return out

    a, b = tensors(full), tensors(small)
    assert set(b) < set(a)
    for n in b:
        assert a[n] == b[n], n
    with pytest.raises(UsageError):
        synth(tmp_path / "bad", "tiny", layers=0)


def test_summarize_by_hand():
    assert summarize([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "values": [3.0, 1.0, 2.0]}
    assert summarize([4.0, 1.0])["median"] == 2.5


def test_usage_errors_are_one_line(tmp_path, capsys):
    from kimivl_edge.cli import main

    assert main(["bench", "--preset", "tiny", "--layers", "1", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--preset", "tiny", "--runs", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("kimivl-edge bench: error:") for e in err)


def test_media_section_on_the_tiny_preset(tiny_checkpoint, converted, tmp_path):
    """Section 8 alone, in a child as the bench runs it, on the tiny preset's synthetic checkpoint (F32 files)."""
    from kimivl_edge.bench.sections import media_section

    text, mm = converted(tiny_checkpoint("instruct"), "f32", "f32")
    m = media_section(Children(tmp_path, 1), text, mm, tmp_path, runs=1)
    _has(m, MEDIA, "media")
    for k in ("decode_frames_per_s", "render_seconds_per_page"):
        _stat(m[k], f"media.{k}")
    # 16 s at 2 fps, capped at 16 frames; 640x360 under 768 patches -> 528x297 -> 38x22 patches -> 209 tokens
    assert (m["frames"], m["pages"]) == (16, 10) and m["video"]["first"]["image_tokens"] == 16 * 209
    for what in ("video", "pdf"):   # the second question evaluates only its new tokens
        first, second = m[what]["first"], m[what]["second"]
        _has(first, MEDIA_TURN, what)
        assert second["image_tokens"] == first["image_tokens"] and second["evaluated_tokens"] < 64
        assert first["evaluated_tokens"] == first["prompt_tokens"]


def test_decode_module_runs_sections_2_and_3_on_a_file(tiny_checkpoint, converted, tmp_path, capsys):
    """`python -m kimivl_edge.bench.decode`: one bandwidth measured first divides every row; the three methods run
    in one load mode; a missing file is one line, exit 2."""
    from kimivl_edge.bench.decode import main

    text, _ = converted(tiny_checkpoint("instruct"), "q4_k_m", "f32")
    for bad, why in ((["--model", str(tmp_path / "nope.gguf")], "no such file"),
                     (["--model", str(text), "--runs", "0"], ">= 1")):
        with pytest.raises(SystemExit) as e:
            main([*bad, "--out", str(tmp_path)])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0], err
    assert main(["--model", str(text), "--runs", "1", "--decode-tokens", "4", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "decode.json").read_text())
    bw = r["limits"]["read_bandwidth_bytes_per_s"]["median"]
    rf = r["roofline"]
    assert rf["read_bandwidth_bytes_per_s"] == bw
    assert rf["ceiling_tokens_per_s"] == pytest.approx(bw / (rf["bytes_per_token"]["total"] + rf["kv_bytes_per_token"]))
    for k, v in r["decode"]["methods"].items():
        achieved = v["decode_tokens_per_s"]["median"]
        assert rf["fraction_of_ceiling"][k] == pytest.approx(achieved / rf["ceiling_tokens_per_s"])
    assert set(r["decode"]["load_mode"]) == {"mmap", "repack"}
