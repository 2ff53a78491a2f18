"""The numpy vision encoder (kimivl_edge/vision.py) on mmproj GGUFs (kimivl_edge/mmproj.py).

Independent sides:
- the fp32 torch reference (``ReferenceModel.image_embeds`` on the HF checkpoint, docs/model.md §5, §6);
- the same reference run on the weights decoded from the mmproj file by gguf-py's own ``gguf.quants.dequantize``
  (not our codec), with the Q/K rows un-permuted by an inverse of the §5.4 order written here: this isolates the
  numpy implementation from the quantization loss of each type;
- a llama.cpp-layout file (interleaved Q/K rows, no ``kimivl_edge.*`` keys) made here by rewriting our F32 file;
- torch's ``F.interpolate`` (bicubic), ``math.erf`` and ``F.gelu`` for the pieces; a float64 softmax written here
  for the blocked attention.

Bounds. Per-token cosine against the fp32 reference: F32 >= 0.99999, F16 >= 0.9995, Q8_0 >= 0.995. Q4_0: mean
>= 0.98 and min >= 0.95 (on the random tiny checkpoint the worst token of Q4_0 sits at 0.969-0.978 over seeds 0-2,
mean 0.983-0.985, so a per-token 0.98 floor measures the synthetic weights, not the code; the file-weights
comparison below holds every type to 0.99999).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
from PIL import Image

from kimivl_edge import vision
from kimivl_edge.config import KimiVLConfig
from shared import blocked_attention, mmproj_files, mmproj_float32
from kimivl_edge.errors import KimiVLError, UsageError
from kimivl_edge.image import preprocess
from kimivl_edge.mmproj import MmprojError, MmprojFile
from kimivl_edge.vision import VisionEncoder, check_patches, erf, gelu_erf, resample_pos_emb

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from kimivl_edge.reference import vision as RV  # noqa: E402
from kimivl_edge.reference.model import ReferenceModel  # noqa: E402

torch.set_num_threads(1)

GT = gguf.GGMLQuantizationType
TYPES = ("f32", "f16", "q8_0", "q4_0")
MIN_COS = {"f32": 0.99999, "f16": 0.9995, "q8_0": 0.995, "q4_0": 0.95}
MEAN_COS_Q4_0 = 0.98
SAME_WEIGHTS_COS = 0.99999
# Same weights on both sides, fp32 both: per-token ||numpy - ref|| / ||ref|| is ~1e-6. The cosine alone would miss
# e.g. a tanh GELU in the projector (~2e-4 relative, cosine 1 - 1e-8), so this bound is also checked.
REL_TOL = 2e-5
# (width, height, max_patches): square on the 16x16 table (no resampling), non-square (upsampled width), upsampled
# 20x20, downsampled 6x8, and an over-budget 640x480 squeezed under a 256-patch cap (both resampled).
IMAGES = [(224, 224, None), (300, 200, None), (280, 270, None), (100, 60, None), (640, 480, 256)]


# ---------------------------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vision")


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint) -> Path:
    return tiny_checkpoint("instruct", seed=0)


@pytest.fixture(scope="module")
def files(ckpt, work) -> dict[str, Path]:
    return mmproj_files(ckpt, TYPES, work / "out")


@pytest.fixture(scope="module")
def llama_file(files, work, ckpt) -> Path:
    """Our F32 file as llama.cpp's converter would write it: Q/K rows in the checkpoint's interleaved order (§10.2a)
    and none of our ``kimivl_edge.*`` keys."""
    heads = KimiVLConfig.from_checkpoint(ckpt).vision.num_attention_heads

    def unpermute(name: str, a: np.ndarray) -> np.ndarray:
        return unpermute_qk(a, heads) if name.endswith((".attn_q.weight", ".attn_q.bias", ".attn_k.weight",
                                                        ".attn_k.bias")) else a

    dst = work / "mmproj-llama-layout.gguf"
    rewrite_gguf(files["f32"], dst, drop_key_prefix="kimivl_edge.", tensor_fn=unpermute)
    return dst


@pytest.fixture(scope="module")
def reference(ckpt) -> ReferenceModel:
    return ReferenceModel(ckpt)


@pytest.fixture(scope="module")
def inputs(files) -> tuple[np.ndarray, np.ndarray]:
    """pixel_values and grids of all IMAGES in one batch (the preprocessing settings come from the file)."""
    cfg = MmprojFile(files["f32"]).image_processor_config()
    rng = np.random.default_rng(7)
    pvs, grids = [], []
    for w, h, cap in IMAGES:
        img = Image.fromarray(smooth_image(rng, h, w))
        pv, g = preprocess([img], cfg, max_patches=cap)
        pvs.append(pv)
        grids.append(g)
    grid = np.concatenate(grids)
    assert grid.tolist()[:4] == [[16, 16], [16, 22], [20, 20], [6, 8]]  # §4: ceil to multiples of 28, /14
    assert int(np.prod(grid[4])) < (644 // 14) * (504 // 14)  # the over-budget image was resized down
    return np.concatenate(pvs), grid


@pytest.fixture(scope="module")
def ref_out(reference, inputs) -> list[np.ndarray]:
    pv, grid = inputs
    return split_tokens(reference.image_embeds(pv, grid).numpy(), grid)


# ---------------------------------------------------------------------------------------------------------------
# helpers

def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A photo-like uint8 RGB image: low-frequency colour gradients plus a little noise."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    chans = [np.sin(2 * np.pi * (a * xx + b * yy) + c) for a, b, c in rng.uniform(0.5, 3, (3, 3))]
    img = (np.stack(chans, -1) * 100 + 128 + rng.normal(0, 12, (h, w, 3)))
    return np.clip(img, 0, 255).astype(np.uint8)


def split_tokens(x: np.ndarray, grid: np.ndarray) -> list[np.ndarray]:
    sizes = [int(h) * int(w) // 4 for h, w in grid]
    return np.split(x, np.cumsum(sizes)[:-1])


def token_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def split_order(d: int) -> np.ndarray:
    """§5.4, ggml_split: new row j of a head holds old row order[j] = (4i, 4i+1) for all i, then (4i+2, 4i+3)."""
    first = [r for i in range(d // 4) for r in (4 * i, 4 * i + 1)]
    second = [r for i in range(d // 4) for r in (4 * i + 2, 4 * i + 3)]
    return np.array(first + second)


def unpermute_qk(a: np.ndarray, heads: int) -> np.ndarray:
    """Undo the ggml_split permutation on a Q or K weight [heads*d, in] / bias [heads*d]."""
    d = a.shape[0] // heads
    idx = (np.arange(heads)[:, None] * d + split_order(d)[None, :]).reshape(-1)
    out = np.empty_like(a)
    out[idx] = a
    return out


def rewrite_gguf(src: Path, dst: Path, drop_key_prefix: str | None = None, tensor_fn=None,
                 drop_tensors: tuple[str, ...] = ()) -> None:
    """Copy an all-F32 GGUF, optionally dropping keys / tensors and transforming tensors (numpy shapes)."""
    rd = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, rd.fields["general.architecture"].contents())
    for name, f in rd.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if drop_key_prefix and name.startswith(drop_key_prefix):
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), f.types[0], sub)
    for t in rd.tensors:
        if t.name in drop_tensors:
            continue
        assert t.tensor_type == GT.F32, t.name
        a = np.array(t.data, dtype=np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))
        w.add_tensor(t.name, tensor_fn(t.name, a) if tensor_fn else a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def hf_weights_from_gguf(path: Path, heads: int, layers: int) -> dict[str, torch.Tensor]:
    """HF-named float32 weights decoded by gguf-py (not our codec), Q/K un-permuted, wqkv re-fused (§3.1, §3.4)."""
    rd = gguf.GGUFReader(path)
    split = "kimivl_edge.vision.rope_layout" in rd.fields
    g = {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32) for t in rd.tensors}
    tw, bl, pj = "vision_tower.", "vision_tower.encoder.blocks.{}.", "multi_modal_projector."
    pos = g["v.position_embd.weight"]
    side = math.isqrt(pos.shape[0])
    w = {tw + "patch_embed.proj.weight": g["v.patch_embd.weight"], tw + "patch_embed.proj.bias": g["v.patch_embd.bias"],
         tw + "patch_embed.pos_emb.weight": pos.reshape(side, side, -1),
         tw + "encoder.final_layernorm.weight": g["v.post_ln.weight"],
         tw + "encoder.final_layernorm.bias": g["v.post_ln.bias"]}
    for a, b in (("pre_norm", "mm.input_norm"), ("linear_1", "mm.1"), ("linear_2", "mm.2")):
        for s in ("weight", "bias"):
            w[pj + f"{a}.{s}"] = g[f"{b}.{s}"]
    for i in range(layers):
        p, q = bl.format(i), f"v.blk.{i}."
        for s in ("weight", "bias"):
            parts = [g[q + f"attn_{x}.{s}"] for x in "qkv"]
            if split:
                parts[:2] = [unpermute_qk(x, heads) for x in parts[:2]]
            w[p + f"wqkv.{s}"] = np.concatenate(parts)
            for a, b in (("norm0", "ln1"), ("norm1", "ln2"), ("wo", "attn_out"), ("mlp.fc0", "ffn_up"),
                         ("mlp.fc1", "ffn_down")):
                w[p + f"{a}.{s}"] = g[q + f"{b}.{s}"]
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in w.items()}


def first_images(inputs: tuple[np.ndarray, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    pv, grid = inputs
    return pv[:int(sum(int(h) * int(w) for h, w in grid[:k]))], grid[:k]


def encode_all(path_or_enc, pv: np.ndarray, grid: np.ndarray) -> list[np.ndarray]:
    enc = path_or_enc if isinstance(path_or_enc, VisionEncoder) else VisionEncoder(path_or_enc)
    return enc.encode(pv, grid)


# ---------------------------------------------------------------------------------------------------------------
# the file

def test_hparams_and_processor_config(files, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    vc = cfg["vision_config"]
    hp = MmprojFile(files["q8_0"]).hparams
    assert (hp.hidden_size, hp.num_heads, hp.num_layers, hp.intermediate_size, hp.patch_size) == (
        vc["hidden_size"], vc["num_attention_heads"], vc["num_hidden_layers"], vc["intermediate_size"],
        vc["patch_size"])
    assert (hp.pos_emb_height, hp.pos_emb_width) == (vc["init_pos_emb_height"], vc["init_pos_emb_width"])
    assert hp.projection_dim == cfg["text_config"]["hidden_size"]
    assert hp.layer_norm_eps == pytest.approx(1e-5)
    assert hp.rope_layout == "ggml_split" and hp.in_token_limit == pre["in_token_limit"] and hp.pad_input is True
    ipc = MmprojFile(files["q8_0"]).image_processor_config()
    assert ipc.in_token_limit == pre["in_token_limit"]
    assert list(ipc.image_mean) == pytest.approx(pre["image_mean"]) and list(ipc.image_std) == pytest.approx(
        pre["image_std"])
    assert ipc.patch_size == vc["patch_size"] and tuple(ipc.merge_kernel_size) == tuple(vc["merge_kernel_size"])


def test_tensor_access(files, ckpt):
    f = MmprojFile(files["q4_0"])
    raw, ttype, shape = f.tensor("v.blk.0.attn_v.weight")
    assert ttype == "Q4_0" and shape == (128, 128) and raw.dtype == np.uint8
    # V rows are not permuted (§5.4): the file's V equals the checkpoint's wqkv rows [2D, 3D) up to Q4_0 error.
    from safetensors import safe_open

    name = "vision_tower.encoder.blocks.0.wqkv.weight"
    shard = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(ckpt / shard, framework="pt") as sf:
        v_ref = sf.get_tensor(name).float().numpy()[256:384]
    v = mmproj_float32(f, "v.blk.0.attn_v.weight")
    assert v.dtype == np.float32 and token_cos(v.reshape(1, -1), v_ref.reshape(1, -1))[0] > 0.99
    assert np.array_equal(mmproj_float32(f, "v.blk.0.attn_v.weight"),
                          np.asarray(gguf.quants.dequantize(*_raw(files["q4_0"], "v.blk.0.attn_v.weight"))))


def _raw(path: Path, name: str):
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    return t.data, t.tensor_type


def test_bad_files(files, work):
    clip = work / "other-clip.gguf"
    w = gguf.GGUFWriter(clip, "clip")
    w.add_string("clip.projector_type", "qwen2vl_merger")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_tensor("v.patch_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    junk = work / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    missing = work / "missing-tensor.gguf"
    rewrite_gguf(files["f32"], missing, drop_tensors=("mm.2.weight",))
    cases = [(files["text"], "not a vision projector"), (clip, "kimivl"), (junk, "not a GGUF file"),
             (missing, "missing tensor mm.2.weight"), (work / "nope.gguf", "no such")]
    for path, words in cases:
        for ctor in (MmprojFile, VisionEncoder):
            with pytest.raises(MmprojError) as e:
                ctor(path)
            msg = str(e.value)
            assert isinstance(e.value, KimiVLError) and words in msg and "\n" not in msg, msg


# ---------------------------------------------------------------------------------------------------------------
# numerics against the references

@pytest.mark.parametrize("mtype", TYPES)
def test_against_fp32_reference(files, inputs, ref_out, mtype):
    pv, grid = inputs
    out = encode_all(files[mtype], pv, grid)
    assert len(out) == len(IMAGES)
    cos = []
    for o, r, (h, w) in zip(out, ref_out, grid):
        assert o.dtype == np.float32 and o.shape == (h * w // 4, r.shape[1]) == r.shape
        cos.append(token_cos(o, r))
    cos = np.concatenate(cos)
    assert cos.min() >= MIN_COS[mtype], (mtype, cos.min())
    if mtype == "f32":  # the same float32 weights as the reference (bf16 values stored exactly)
        o, r = np.concatenate(out), np.concatenate(ref_out)
        rel = np.linalg.norm(o - r, axis=-1) / np.linalg.norm(r, axis=-1)
        assert rel.max() <= REL_TOL, rel.max()
    if mtype == "q4_0":
        assert cos.mean() >= MEAN_COS_Q4_0, cos.mean()


@pytest.mark.parametrize("mtype", TYPES)
def test_against_reference_on_file_weights(files, inputs, ckpt, mtype):
    """Same weights on both sides (decoded by gguf-py): any gap is the implementation, whatever the type."""
    vcfg = KimiVLConfig.from_checkpoint(ckpt).vision
    weights = hf_weights_from_gguf(files[mtype], vcfg.num_attention_heads, vcfg.num_hidden_layers)
    pv, grid = inputs
    ref = RV.encode_images(weights, vcfg, torch.from_numpy(pv), [tuple(map(int, g)) for g in grid]).numpy()
    out = np.concatenate(encode_all(files[mtype], pv, grid))
    cos = token_cos(out, ref)
    rel = np.linalg.norm(out - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() >= SAME_WEIGHTS_COS and rel.max() <= REL_TOL, (mtype, cos.min(), rel.max())


def test_llama_cpp_layout(files, llama_file, inputs, ref_out):
    f = MmprojFile(llama_file)
    hp = f.hparams
    assert hp.rope_layout == "hf_interleaved" and hp.in_token_limit is None and hp.pad_input is None
    assert (hp.pos_emb_height, hp.pos_emb_width) == (16, 16)  # sqrt of the 256 table rows
    assert f.image_processor_config().in_token_limit == 4096  # documented fallback
    ours = MmprojFile(files["f32"])
    assert not np.array_equal(mmproj_float32(f, "v.blk.0.attn_q.weight"), mmproj_float32(ours, "v.blk.0.attn_q.weight"))
    pv, grid = inputs
    for mm in (f, ours):
        cos = token_cos(np.concatenate(encode_all(mm, pv, grid)), np.concatenate(ref_out))
        assert cos.min() >= MIN_COS["f32"], (mm, cos.min())
        # the declared layout matters: reading the rows in the other layout is clearly wrong
        wrong = VisionEncoder(mm)
        other = "ggml_split" if mm.hparams.rope_layout == "hf_interleaved" else "hf_interleaved"
        wrong.hparams = dataclasses.replace(mm.hparams, rope_layout=other)
        pv2, grid2 = first_images(inputs, 2)
        bad = token_cos(np.concatenate(encode_all(wrong, pv2, grid2)), np.concatenate(ref_out[:2]))
        assert bad.min() < 0.999, bad.min()


def test_weight_cache_and_threads_identical(files, inputs):
    pv, grid = first_images(inputs, 2)
    cached = VisionEncoder(files["q8_0"], weight_cache=True)
    a = encode_all(cached, pv, grid)
    b = encode_all(cached, pv, grid)  # from the cache
    c = encode_all(VisionEncoder(files["q8_0"], weight_cache=False), pv, grid)
    d = encode_all(VisionEncoder(files["q8_0"], weight_cache=False, threads=1), pv, grid)
    for x, y, z, u in zip(a, b, c, d):
        assert np.array_equal(x, y) and np.array_equal(x, z)
        np.testing.assert_allclose(u, x, rtol=0, atol=1e-6 * np.abs(x).max())  # 1 vs 2 workers: float32 rounding


def test_multi_image_call_equals_single_calls(files, inputs):
    """Images attend only to themselves (§5.3, §10.1): a batch gives each image's single-image result."""
    pv, grid = first_images(inputs, 3)
    enc = VisionEncoder(files["f32"], weight_cache=True)
    batch = enc.encode(pv, grid)
    start = 0
    for (h, w), got in zip(grid, batch):
        one = enc.encode(pv[start:start + h * w], np.array([[h, w]]))[0]
        start += h * w
        np.testing.assert_allclose(got, one, rtol=0, atol=1e-5 * np.abs(one).max())


# ---------------------------------------------------------------------------------------------------------------
# attention blocking

def test_blocked_attention_unit(files):
    """Query blocks (including a short last block) vs a float64 softmax written here, two images."""
    enc = VisionEncoder(files["f32"], max_score_bytes=4 * 300 * 70)  # 70 query rows per block of a 300-patch image
    rng = np.random.default_rng(3)
    grids = [(10, 30), (6, 8)]
    n, heads, d = 348, 2, 64
    assert 300 % 70 and 4 * 48 * 48 * heads <= 4 * 300 * 70  # 5 blocks, the last one short; the small image whole
    q, k, v = (rng.standard_normal((n, heads, d)).astype(np.float32) * s for s in (2.0, 2.0, 1.0))
    got = blocked_attention(enc, q, k, v, grids)
    want, start = [], 0
    for gh, gw in grids:
        m = gh * gw
        qi, ki, vi = (t[start:start + m].astype(np.float64).transpose(1, 0, 2) for t in (q, k, v))
        s = qi @ ki.transpose(0, 2, 1) / math.sqrt(d)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        want.append((p @ vi).transpose(1, 0, 2).reshape(m, heads * d))
        start += m
    np.testing.assert_allclose(got, np.concatenate(want), rtol=0, atol=2e-5)


def test_blocked_encode_small_budget_matches_reference(files, inputs, ref_out):
    pv, grid = inputs
    n_max = max(int(h) * int(w) for h, w in grid)  # 400 patches
    enc = VisionEncoder(files["f32"], max_score_bytes=4 * n_max * 150)  # 150 query rows: 3 blocks for 400
    cos = token_cos(np.concatenate(enc.encode(pv, grid)), np.concatenate(ref_out))
    assert cos.min() >= MIN_COS["f32"], cos.min()


def test_default_budget_needs_blocks_and_equals_unblocked(files):
    """66x64 = 4224 patches: one head's score matrix is 71.4 MB > the default budget, so several query blocks
    (the last one short: 4224 is not a multiple of the block rows)."""
    gh, gw = 66, 64
    rows = vision.query_block_rows(gh * gw, vision.DEFAULT_SCORE_BYTES)
    assert 1 < rows < gh * gw and (gh * gw) % rows
    pv = np.random.default_rng(5).uniform(-1, 1, (gh * gw, 3, 14, 14)).astype(np.float32)
    blocked = VisionEncoder(files["f32"]).encode(pv, np.array([[gh, gw]]))[0]
    whole = VisionEncoder(files["f32"], max_score_bytes=1 << 33).encode(pv, np.array([[gh, gw]]))[0]
    np.testing.assert_allclose(blocked, whole, rtol=0, atol=1e-5 * np.abs(whole).max())


# ---------------------------------------------------------------------------------------------------------------
# pieces against independent libraries

@pytest.mark.parametrize("h,w", [(16, 16), (32, 32), (16, 22), (6, 8), (2, 40)])
def test_pos_emb_bicubic_matches_torch(h, w):
    table = np.random.default_rng(h * 100 + w).standard_normal((16, 16, 8)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(table).permute(2, 0, 1)[None].double(), size=(h, w), mode="bicubic",
                         align_corners=False)[0].permute(1, 2, 0).reshape(h * w, 8).numpy()
    np.testing.assert_allclose(resample_pos_emb(table, h, w), want, rtol=0, atol=1e-6)


def test_erf_and_gelu():
    x = np.linspace(-9, 9, 180001)
    assert np.abs(erf(x) - np.array([math.erf(v) for v in x])).max() <= 1.5e-7
    a = np.random.default_rng(0).normal(0, 3, (64, 700)).astype(np.float32)
    want = F.gelu(torch.from_numpy(a).double(), approximate="none").numpy()
    got = gelu_erf(a.copy())
    assert np.abs(got - want).max() <= 2e-7 * np.abs(a).max() + 1e-6


# ---------------------------------------------------------------------------------------------------------------
# API details

def test_progress_and_bad_inputs(files, inputs):
    enc = VisionEncoder(files["f16"])
    seen = []
    pv = inputs[0][:256]
    enc.encode(pv, np.array([[16, 16]]), progress=lambda *a: seen.append(a))
    assert seen == [(1, 3, "layer"), (2, 3, "layer"), (3, 3, "layer")]  # vision.Progress: done, total, unit
    for bad_pv, bad_grid in ((pv, np.array([[16, 14]])),            # patch count mismatch
                             (pv[:60], np.array([[5, 12]])),          # odd side: no 2x2 merge
                             (pv.reshape(256, 3, 196), np.array([[16, 16]]))):  # not [n, 3, 14, 14]
        with pytest.raises(UsageError) as e:
            enc.encode(bad_pv, bad_grid)
        assert "\n" not in str(e.value)
    assert enc.encode(pv[:0], np.zeros((0, 2), np.int64)) == []


@pytest.mark.parametrize("side,ok", [(511, True), (512, True), (513, False)])
def test_model_rule_takes_grid_sides_up_to_the_rope_table(side, ok):
    """The vision model's RoPE table is 512x512 (docs/model.md §5.4): a direct caller may use sides 1..512, one more
    than the HF processor lets through (its "Exceed pos emb" rule, test_image.py). A 1x1 merge reaches odd sides."""
    p = 14
    pv = np.zeros((side, 3, p, p), np.float32)
    for grid in ([[side, 1]], [[1, side]]):
        if ok:
            assert check_patches(pv, np.array(grid), p, 1)[1] == [tuple(grid[0])]
        else:
            with pytest.raises(UsageError, match="between 1 and 512"):
                check_patches(pv, np.array(grid), p, 1)


def test_encoder_takes_a_512_patch_side(files):
    enc = VisionEncoder(files["f32"], threads=1)
    pv = np.random.default_rng(7).uniform(-1, 1, (512 * 2, 3, 14, 14)).astype(np.float32)
    out = enc.encode(pv, np.array([[2, 512]]))
    assert [o.shape for o in out] == [(256, enc.hparams.projection_dim)] and np.isfinite(out[0]).all()
    with pytest.raises(UsageError, match="between 2 and 512"):
        enc.encode(np.zeros((514 * 2, 3, 14, 14), np.float32), np.array([[514, 2]]))
