"""The mmproj GGUF (convert/mmproj.py): metadata, names, exact values, types, and llama.cpp's clip encoder on it.

Independent sides:
- expected keys, names and shapes are transcribed here from docs/model.md §3.1/§3.2/§11 and from the source of
  llama.cpp's ``conversion/kimivl.py`` + ``MmprojModel.set_gguf_parameters`` and ``tools/mtmd/clip.cpp``;
- the HF tensors are read with the ``safetensors`` package (not our reader), the file with ``gguf.GGUFReader``,
  and the Q/K permutation is undone by an inverse written here from the §5.4 wording;
- image embeddings: llama.cpp's own clip graph (``clip_init`` + ``clip_image_encode`` from the installed
  ``libmtmd``, called through ctypes with exactly the reference's preprocessed pixels) against the fp32 torch
  reference (``ReferenceModel.image_embeds``). A 224x224 image on the tiny 16x16 pos-emb grid makes both sides skip
  the pos-emb resize (HF bicubic vs llama.cpp bilinear, §10.2b), so the remaining differences are llama.cpp's
  fp16-table tanh GELU and its tanh projector GELU (§10.2e).
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from kimivl_edge.checkpoint import Checkpoint
from kimivl_edge.convert.gguf_out import write_gguf
from kimivl_edge.convert.mmproj import ggml_split_order, mmproj_plan
from kimivl_edge.synth import PRESET_DIMS, synth

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

torch.set_num_threads(1)

COS_F32 = 0.9999
FT = gguf.LlamaFileType
GT = gguf.GGMLQuantizationType


# ---------------------------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def ckpt_dir(tiny_checkpoint) -> Path:
    """tiny preset: hidden 128, 2 heads of 64, 3 layers, intermediate 256, pos-emb 16x16, text hidden 256."""
    return tiny_checkpoint("instruct", seed=3)


@pytest.fixture(scope="module")
def ckpt_dir_4304(tmp_path_factory) -> Path:
    """tiny with the real vision intermediate size 4304 (134.5 x 32): ffn_down cannot take a 32-block type."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESET_DIMS["tiny"]["vision"], "intermediate_size", 4304)
        return synth(tmp_path_factory.mktemp("mmproj") / "tiny4304", "tiny", "instruct", seed=4)


@pytest.fixture(scope="module")
def f32_file(ckpt_dir, tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("out") / "mmproj-f32.gguf", mmproj_plan(Checkpoint(ckpt_dir), "f32")).path


def hf_tensors(ckpt_dir: Path) -> dict[str, np.ndarray]:
    """All vision/projector tensors of the checkpoint as float32, read with the safetensors package."""
    out = {}
    for shard in sorted(ckpt_dir.glob("*.safetensors")):
        for name, t in safetensors_torch.load_file(str(shard)).items():
            if not name.startswith("language_model."):
                out[name] = t.float().numpy()
    return out


def read_fields(path: Path) -> dict[str, tuple[object, list]]:
    r = gguf.GGUFReader(path)
    return {k: (f.contents(), f.types) for k, f in r.fields.items() if not k.startswith("GGUF.")}


# ---------------------------------------------------------------------------------------------------------------
# expectations transcribed from docs/model.md and llama.cpp's source

def expected_tensors(cfg: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF name -> (HF source, ggml ne): docs/model.md §3.1/§3.2 and the §11 table; ne = numpy shape reversed."""
    v, t = cfg["vision_config"], cfg["text_config"]
    D, F, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    M = 4 * D
    tw, mp = "vision_tower.", "multi_modal_projector."
    e = {
        "v.patch_embd.weight": (tw + "patch_embed.proj.weight", (p, p, 3, D)),
        "v.patch_embd.bias": (tw + "patch_embed.proj.bias", (D,)),
        "v.position_embd.weight": (tw + "patch_embed.pos_emb.weight",
                                   (D, v["init_pos_emb_height"] * v["init_pos_emb_width"])),
        "v.post_ln.weight": (tw + "encoder.final_layernorm.weight", (D,)),
        "v.post_ln.bias": (tw + "encoder.final_layernorm.bias", (D,)),
        "mm.input_norm.weight": (mp + "pre_norm.weight", (D,)),
        "mm.input_norm.bias": (mp + "pre_norm.bias", (D,)),
        "mm.1.weight": (mp + "linear_1.weight", (M, M)),
        "mm.1.bias": (mp + "linear_1.bias", (M,)),
        "mm.2.weight": (mp + "linear_2.weight", (M, t["hidden_size"])),
        "mm.2.bias": (mp + "linear_2.bias", (t["hidden_size"],)),
    }
    for i in range(v["num_hidden_layers"]):
        b, g = f"{tw}encoder.blocks.{i}.", f"v.blk.{i}."
        e |= {
            g + "ln1.weight": (b + "norm0.weight", (D,)), g + "ln1.bias": (b + "norm0.bias", (D,)),
            g + "ln2.weight": (b + "norm1.weight", (D,)), g + "ln2.bias": (b + "norm1.bias", (D,)),
            g + "attn_out.weight": (b + "wo.weight", (D, D)), g + "attn_out.bias": (b + "wo.bias", (D,)),
            g + "ffn_up.weight": (b + "mlp.fc0.weight", (D, F)), g + "ffn_up.bias": (b + "mlp.fc0.bias", (F,)),
            g + "ffn_down.weight": (b + "mlp.fc1.weight", (F, D)), g + "ffn_down.bias": (b + "mlp.fc1.bias", (D,)),
        }
        for x in "qkv":
            e[g + f"attn_{x}.weight"] = (b + "wqkv.weight", (D, D))
            e[g + f"attn_{x}.bias"] = (b + "wqkv.bias", (D,))
    return e


def expected_metadata(ckpt_dir: Path, file_type: int) -> dict[str, object]:
    """llama.cpp's converter keys for Kimi-VL (docs/model.md §11; image_size = init_pos_emb_height * patch) + ours."""
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    pre = json.loads((ckpt_dir / "preprocessor_config.json").read_text())
    v = cfg["vision_config"]
    return {
        "general.architecture": "clip",
        "general.type": "mmproj",
        "general.file_type": file_type,
        "general.quantization_version": 2,
        "clip.has_vision_encoder": True,
        "clip.projector_type": "kimivl",
        "clip.use_gelu": True,
        "clip.vision.projection_dim": cfg["text_config"]["hidden_size"],
        "clip.vision.image_size": v["init_pos_emb_height"] * v["patch_size"],
        "clip.vision.patch_size": v["patch_size"],
        "clip.vision.embedding_length": v["hidden_size"],
        "clip.vision.feed_forward_length": v["intermediate_size"],
        "clip.vision.block_count": v["num_hidden_layers"],
        "clip.vision.attention.head_count": v["num_attention_heads"],
        "clip.vision.attention.layer_norm_epsilon": 1e-5,
        "clip.vision.image_mean": pre["image_mean"],
        "clip.vision.image_std": pre["image_std"],
        "clip.vision.projector.scale_factor": 2,
        "kimivl_edge.vision.rope_layout": "ggml_split",
        "kimivl_edge.vision.in_token_limit": pre["in_token_limit"],
        "kimivl_edge.vision.pad_input": pre["pad_input"],
        "kimivl_edge.vision.pos_emb_height": v["init_pos_emb_height"],
        "kimivl_edge.vision.pos_emb_width": v["init_pos_emb_width"],
        "kimivl_edge.projector.gelu": "erf",
    }


def unpermute_qk(g: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of §5.4's ggml split: in each head, new row j < d/2 came from old row 4(j//2) + j%2, and new row
    d/2 + j from old row 4(j//2) + 2 + j%2."""
    d = g.shape[0] // n_heads
    half = d // 2
    out = np.empty_like(g)
    for h in range(n_heads):
        for j in range(d):
            jj = j % half
            old = 4 * (jj // 2) + (2 if j >= half else 0) + jj % 2
            out[h * d + old] = g[h * d + j]
    return out


def source_view(gname: str, g: np.ndarray, src: np.ndarray, cfg: dict, permuted: bool) -> tuple[np.ndarray, np.ndarray]:
    """(file tensor with the documented transform undone, matching part of the HF tensor)."""
    v = cfg["vision_config"]
    D, heads = v["hidden_size"], v["num_attention_heads"]
    if gname == "v.position_embd.weight":
        return g.reshape(src.shape), src
    for part, x in enumerate("qkv"):
        if f".attn_{x}." in gname:
            src = src[part * D:(part + 1) * D]
            if permuted and x in "qk":
                return unpermute_qk(g, heads), src
            return g, src
    return g, src


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp's clip encoder through ctypes: the binding of the ggml vision backend (kimivl_edge/vision_ggml.py,
# struct layouts from tools/mtmd/clip.h, clip-impl.h of the vendored llama.cpp)

def _clip_lib():
    pytest.importorskip("llama_cpp.mtmd_cpp")
    from kimivl_edge.vision_ggml import clip_library

    return clip_library()


def clip_encode(mmproj: Path, hwc: np.ndarray, expect_tokens: int, expect_embd: int) -> np.ndarray:
    """Load ``mmproj`` with clip_init (CPU, flash attention off, no warmup) and encode one normalized image
    [H, W, 3] float32; returns [tokens, n_embd]. The token/embd counts double as a check of the struct layout."""
    from kimivl_edge.vision_ggml import ClipImageF32

    lib = _clip_lib()
    ctx = lib.init(mmproj, flash_attn=False)
    assert ctx, f"llama.cpp's clip_init could not load {mmproj}"
    try:
        img = np.ascontiguousarray(hwc, dtype=np.float32)
        im = ClipImageF32.over(img)
        n, e = lib.n_output_tokens(ctx, im), lib.n_mmproj_embd(ctx)
        assert (n, e) == (expect_tokens, expect_embd)
        out = np.zeros((n, e), np.float32)
        assert lib.image_encode(ctx, 2, im, out)
        return out
    finally:
        lib.free(ctx)


@pytest.fixture(scope="module")
def image_224():
    """A random 224x224 RGB image preprocessed by the HF-faithful pipeline: (pixel_values, grid, HWC floats)."""
    from PIL import Image

    from kimivl_edge.image import ImageProcessorConfig, preprocess

    img = Image.fromarray(np.random.default_rng(11).integers(0, 256, (224, 224, 3), dtype=np.uint8))

    def prep(ckpt_dir: Path):
        pv, grid = preprocess([img], ImageProcessorConfig.from_checkpoint(ckpt_dir))
        assert [list(g) for g in grid] == [[16, 16]]
        # patch (r, c) = rows 14r.., columns 14c.., values in (channel, row, column) order (docs/model.md §4.6)
        hwc = pv.reshape(16, 16, 3, 14, 14).transpose(0, 3, 1, 4, 2).reshape(224, 224, 3)
        return pv, grid, hwc
    return prep


def reference_embeds(ckpt_dir: Path, pv, grid) -> np.ndarray:
    from kimivl_edge.reference.model import ReferenceModel

    return ReferenceModel(ckpt_dir).image_embeds(pv, grid).numpy()


def token_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ---------------------------------------------------------------------------------------------------------------
# tests: file contents

def test_ggml_split_order_matches_doc():
    """§5.4: old rows (4i, 4i+1) for i = 0..d/4-1, then (4i+2, 4i+3)."""
    assert ggml_split_order(8).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert ggml_split_order(12).tolist() == [0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11]
    with pytest.raises(ValueError):
        ggml_split_order(6)


def test_metadata(ckpt_dir, f32_file):
    fields = read_fields(f32_file)
    want = expected_metadata(ckpt_dir, int(FT.ALL_F32))
    assert set(fields) == set(want)
    for k, v in want.items():
        got = fields[k][0]
        if isinstance(v, float):
            assert got == pytest.approx(v, rel=1e-7), k
        elif isinstance(v, list):
            assert got == pytest.approx(v), k
        else:
            assert got == v and type(got) is type(v), k
    vt = gguf.GGUFValueType
    assert fields["clip.vision.image_size"][1] == [vt.UINT32]
    assert fields["clip.vision.projector.scale_factor"][1] == [vt.UINT32]
    assert fields["clip.vision.attention.layer_norm_epsilon"][1] == [vt.FLOAT32]
    assert fields["clip.vision.image_mean"][1] == [vt.ARRAY, vt.FLOAT32]
    assert fields["clip.use_gelu"][1] == [vt.BOOL]


def test_f32_tensors_equal_source_exactly(ckpt_dir, f32_file):
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    want = expected_tensors(cfg)
    src = hf_tensors(ckpt_dir)
    r = gguf.GGUFReader(f32_file)
    assert sorted(t.name for t in r.tensors) == sorted(want)
    for t in r.tensors:
        hf_name, ne = want[t.name]
        assert tuple(int(x) for x in t.shape) == ne, t.name
        assert t.tensor_type == GT.F32, t.name
        g = np.asarray(t.data).reshape(tuple(reversed(ne)))
        got, expect = source_view(t.name, g, src[hf_name], cfg, permuted=True)
        np.testing.assert_array_equal(got, expect, err_msg=t.name)
    # the permutation really moved the Q/K rows (a no-op would also pass the check above if d/4 were 1)
    q = next(t for t in r.tensors if t.name == "v.blk.0.attn_k.bias")
    assert not np.array_equal(np.asarray(q.data), src["vision_tower.encoder.blocks.0.wqkv.bias"][128:256])


def test_hf_layout_and_extra_kv(ckpt_dir, tmp_path):
    """rope_layout="hf_interleaved": plain wqkv split and no rope_layout key (llama.cpp's converter); extra_kv
    keys are written, right after general.type."""
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    extra = {"general.name": ("Kimi-VL-A3B-Instruct", None), "clip.vision.image_size": (896, None)}
    path = write_gguf(tmp_path / "hf.gguf", mmproj_plan(Checkpoint(ckpt_dir), "f32", extra,
                                                        rope_layout="hf_interleaved")).path
    fields = read_fields(path)
    assert "kimivl_edge.vision.rope_layout" not in fields
    assert fields["general.name"][0] == "Kimi-VL-A3B-Instruct"
    assert fields["clip.vision.image_size"][0] == 896
    assert list(fields)[:3] == ["general.architecture", "general.type", "general.name"]
    src = hf_tensors(ckpt_dir)
    for t in gguf.GGUFReader(path).tensors:
        if ".attn_" in t.name and ".attn_out" not in t.name:
            hf_name, ne = expected_tensors(cfg)[t.name]
            g = np.asarray(t.data).reshape(tuple(reversed(ne)))
            got, expect = source_view(t.name, g, src[hf_name], cfg, permuted=False)
            np.testing.assert_array_equal(got, expect, err_msg=t.name)


def test_f32_plan_reads_lazily(ckpt_dir):
    """Planning reads no tensor, for any type (a range fallback is the writer's to find); each tensor's blocks()
    read its own sources only."""
    ck = Checkpoint(ckpt_dir)
    calls: list[str] = []
    real = ck.float32
    ck.float32 = lambda name: (calls.append(name), real(name))[1]
    for mtype in ("f32", "f16", "q8_0"):
        plan = mmproj_plan(ck, mtype)
        assert calls == [], mtype
    t = next(p for p in plan.tensors if p.name == "v.blk.1.attn_v.weight")
    data = np.concatenate([b() for b in t.blocks()])
    assert data.dtype == np.float32 and data.shape == t.shape
    assert calls == ["vision_tower.encoder.blocks.1.wqkv.weight"]


def test_bad_arguments(ckpt_dir):
    ck = Checkpoint(ckpt_dir)
    with pytest.raises(ValueError):
        mmproj_plan(ck, "q4_k_m")
    with pytest.raises(ValueError):
        mmproj_plan(ck, "f32", rope_layout="rotate_half")


# ---------------------------------------------------------------------------------------------------------------
# tests: types

def expected_type(name: str, ne: tuple[int, ...], mtype: str) -> GT:
    """docs/model.md §11: 1-D/norms F32, v.position_embd F32, v.patch_embd F16 (F32 in an f32 file), others the
    requested type if ne0 is a multiple of its block (32 for Q8_0/Q4_0), else F16."""
    want = GT[mtype.upper()]
    if len(ne) == 1 or "position_embd" in name:
        return GT.F32
    if "patch_embd" in name:
        return GT.F32 if want == GT.F32 else GT.F16
    if want in (GT.Q8_0, GT.Q4_0) and ne[0] % 32:
        return GT.F16
    return want


@pytest.mark.parametrize("mtype, file_type, min_cos", [("f16", FT.MOSTLY_F16, 0.9999),
                                                        ("q8_0", FT.MOSTLY_Q8_0, 0.999),
                                                        ("q4_0", FT.MOSTLY_Q4_0, 0.9)])
def test_quantized_types_and_llama_loads(ckpt_dir_4304, image_224, tmp_path, mtype, file_type, min_cos):
    cfg = json.loads((ckpt_dir_4304 / "config.json").read_text())
    plan = mmproj_plan(Checkpoint(ckpt_dir_4304), mtype)
    path = write_gguf(tmp_path / f"mmproj-{mtype}.gguf", plan).path
    r = gguf.GGUFReader(path)
    assert read_fields(path)["general.file_type"][0] == int(file_type)
    types = {t.name: t.tensor_type for t in r.tensors}
    want = {n: expected_type(n, ne, mtype) for n, (_, ne) in expected_tensors(cfg).items()}
    assert types == want
    assert types["v.blk.0.ffn_down.weight"] == GT.F16  # ne0 = 4304
    if mtype != "f16":
        assert types["v.blk.0.ffn_up.weight"] == GT[mtype.upper()]
        assert "fallback" in next(p.reason for p in plan.tensors if p.name == "v.blk.2.ffn_down.weight")

    pv, grid, hwc = image_224(ckpt_dir_4304)
    ours = clip_encode(path, hwc, 64, cfg["text_config"]["hidden_size"])
    cos = token_cosines(ours, reference_embeds(ckpt_dir_4304, pv, grid))
    print(f"\n{mtype} mmproj (intermediate 4304) vs fp32 reference: per-token cosine min {cos.min():.7f} "
          f"mean {cos.mean():.7f}")
    assert np.isfinite(ours).all() and cos.min() >= min_cos


def test_range_safety(ckpt_dir, tmp_path):
    """A tensor with a value past the F16 range (or a Q8_0 block scale past it) is written F32 with the reason: found
    while writing, as for the text file (the plan keeps the policy's type)."""
    ck = Checkpoint(ckpt_dir)
    real = ck.float32
    big = {"multi_modal_projector.linear_1.weight": 1.0e5, "multi_modal_projector.linear_2.weight": 1.0e7}

    def patched(name):
        a = real(name)
        if name in big:
            a[0, 0] = big[name]
        return a
    ck.float32 = patched
    by = {}
    for mt in ("f16", "q8_0", "q4_0"):
        plan = mmproj_plan(ck, mt)
        assert {p.name: p.qtype.value for p in plan.tensors}["mm.1.weight"] == mt.upper()
        report = write_gguf(tmp_path / f"range-{mt}.gguf", plan)
        by[mt] = {t.name: t for t in report.tensors}
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(report.path).tensors}
        assert types == {n: t.qtype.value for n, t in by[mt].items()}
    # 1e5 > 65504 overflows F16; as Q8_0 / Q4_0 its block scale is 1e5/127 or 1e5/8, which fits.
    f16_mm1 = by["f16"]["mm.1.weight"]
    assert f16_mm1.qtype.value == "F32" and f16_mm1.range_fallback.startswith("range:")
    assert by["q8_0"]["mm.1.weight"].qtype.value == "Q8_0" and not by["q8_0"]["mm.1.weight"].range_fallback
    assert by["q4_0"]["mm.1.weight"].qtype.value == "Q4_0"
    # 1e7: the Q8_0 scale 1e7/127 = 78740 overflows F16 too
    for mt in ("f16", "q8_0", "q4_0"):
        assert by[mt]["mm.2.weight"].qtype.value == "F32" and "overflow" in by[mt]["mm.2.weight"].range_fallback
    assert by["f16"]["mm.2.bias"].qtype.value == "F32"
    path = tmp_path / "range-f16.gguf"
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == "mm.1.weight")
    assert t.tensor_type == GT.F32 and float(np.asarray(t.data).reshape(-1)[0]) == 1.0e5


# ---------------------------------------------------------------------------------------------------------------
# tests: llama.cpp's clip graph on our file vs the fp32 reference

def test_llama_clip_matches_reference_only_with_permutation(ckpt_dir, f32_file, image_224, tmp_path):
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    pv, grid, hwc = image_224(ckpt_dir)
    ref = reference_embeds(ckpt_dir, pv, grid)
    n_embd = cfg["text_config"]["hidden_size"]
    assert ref.shape == (64, n_embd)

    ours = clip_encode(f32_file, hwc, 64, n_embd)
    unperm_file = write_gguf(tmp_path / "mmproj-f32-hf.gguf",
                             mmproj_plan(Checkpoint(ckpt_dir), "f32", rope_layout="hf_interleaved")).path
    unperm = clip_encode(unperm_file, hwc, 64, n_embd)

    cos, cos_u = token_cosines(ours, ref), token_cosines(unperm, ref)
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    print(f"\nF32 ggml_split: per-token cosine min {cos.min():.7f} mean {cos.mean():.7f}, rel L2 {rel:.2e}; "
          f"llama.cpp layout (unpermuted): min {cos_u.min():.7f} mean {cos_u.mean():.7f}")
    assert cos.min() >= COS_F32
    assert cos_u.min() < COS_F32  # llama.cpp's own layout rotates 34 of 36 pairs by the wrong axis (§10.2a)
