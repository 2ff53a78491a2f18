"""Kimi-VL image preprocessing (docs/model.md §4, §10 items 5-6).

Oracles: the §4 worked token-count table (hard-coded below), pixel expectations built here with plain loops and
float64 arithmetic, Pillow's own resize for the budget downscale, and the doc's float32 formula for bit-exactness.
"""
from __future__ import annotations

import base64
import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from kimivl_edge.errors import CheckpointError, ImageError, UsageError
from kimivl_edge.image import (
    ImageProcessorConfig,
    grid_hw,
    image_token_counts,
    load_image,
    num_image_tokens,
    preprocess,
    target_size,
)

HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def make_cfg(limit: int = 4096, norm=HALF) -> ImageProcessorConfig:
    return ImageProcessorConfig(patch_size=14, merge_kernel_size=(2, 2), in_token_limit=limit,
                                image_mean=norm[0], image_std=norm[1], pad_input=True)


def random_rgb(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def pad_to(rgb: np.ndarray, W: int, H: int, fill=(0, 0, 0)) -> np.ndarray:
    out = np.empty((H, W, 3), dtype=np.uint8)
    out[:] = np.asarray(fill, dtype=np.uint8)
    out[: rgb.shape[0], : rgb.shape[1]] = rgb
    return out


def expected_patches(rgb: np.ndarray, norm) -> np.ndarray:
    """Hand-built §4 steps 5-6: float64 (x/255 - mean)/std, patch (r, c) row-major, (channel, row, col) inside."""
    mean, std = norm
    H, W, _ = rgb.shape
    gh, gw = H // 14, W // 14
    out = np.empty((gh * gw, 3, 14, 14), dtype=np.float64)
    k = 0
    for r in range(gh):
        for c in range(gw):
            for ch in range(3):
                for i in range(14):
                    for j in range(14):
                        out[k, ch, i, j] = (rgb[14 * r + i, 14 * c + j, ch] / 255.0 - mean[ch]) / std[ch]
            k += 1
    return out


# ----------------------------------------------------------------------------------------------------------------
# §4 worked table: (W, H, L, resized or None, padded (W, H), (gh, gw), tokens)

TABLE = [
    (1, 1, "any", None, (28, 28), (2, 2), 1),
    (13, 27, "any", None, (28, 28), (2, 2), 1),
    (224, 224, "any", None, (224, 224), (16, 16), 64),
    (640, 480, "any", None, (644, 504), (36, 46), 414),
    (896, 896, 4096, None, (896, 896), (64, 64), 1024),
    (1024, 768, 4096, None, (1036, 784), (56, 74), 1036),
    (1024, 1024, 4096, (897, 897), (924, 924), (66, 66), 1089),
    (1280, 720, 4096, (1202, 676), (1204, 700), (50, 86), 1075),
    (1920, 1080, 4096, (1196, 672), (1204, 672), (48, 86), 1032),
    (1920, 1080, 16384, None, (1932, 1092), (78, 138), 2691),
    (1792, 1792, 16384, None, (1792, 1792), (128, 128), 4096),
    (3840, 2160, 16384, (2392, 1345), (2408, 1372), (98, 172), 4214),
]


def _table_cases():
    for w, h, lim, resized, padded, grid, tokens in TABLE:
        for L in ((4096, 16384) if lim == "any" else (lim,)):
            yield pytest.param(w, h, L, resized, padded, grid, tokens, id=f"{w}x{h}-L{L}")


@pytest.mark.parametrize("w,h,L,resized,padded,grid,tokens", list(_table_cases()))
def test_worked_table(w, h, L, resized, padded, grid, tokens):
    cfg = make_cfg(L)
    assert target_size(w, h, cfg) == (resized or (w, h))
    img = Image.new("RGB", (w, h))
    pv, grids = preprocess([img], cfg)
    gh, gw = grid
    assert grids.dtype == np.int64 and grids.tolist() == [[gh, gw]]
    assert (gw * 14, gh * 14) == padded
    assert pv.shape == (gh * gw, 3, 14, 14) and pv.dtype == np.float32
    assert num_image_tokens(grids[0]) == tokens
    assert image_token_counts(grids) == [tokens]


def test_worked_table_exceed_pos_emb():
    cfg = make_cfg(4096)
    assert target_size(64, 12000, cfg) == (64, 12000)  # 4 * 857 = 3428 patches: within budget, no resize
    with pytest.raises(ImageError, match="Exceed pos emb"):
        preprocess([Image.new("RGB", (64, 12000))], cfg)


def test_exceed_boundary_is_512_patches_after_padding():
    cfg = make_cfg(4096)
    _, grids = preprocess([Image.new("RGB", (7140, 1))], cfg)  # pads to 7140 = 510 patches
    assert grids.tolist() == [[2, 510]]
    with pytest.raises(ImageError, match="Exceed pos emb"):  # pads to 7168 = 512 patches
        preprocess([Image.new("RGB", (7141, 1))], cfg)
    with pytest.raises(ImageError, match="Exceed pos emb"):
        preprocess([Image.new("RGB", (1, 7141))], cfg)


@pytest.mark.parametrize("side,ok", [(511, True), (512, False), (513, False)])
def test_processor_rule_refuses_grid_sides_from_512(side, ok):
    """HF processor (§4 step 4): "Exceed pos emb" when W/14 >= 512 or H/14 >= 512, one below what the vision model
    takes (test_vision.py). With a 1x1 merge kernel the padding is to multiples of 14, so every side is reachable."""
    cfg = ImageProcessorConfig(patch_size=14, merge_kernel_size=(1, 1), in_token_limit=4096,
                               image_mean=HALF[0], image_std=HALF[1], pad_input=True)
    for w, h in ((14 * side, 14), (14, 14 * side), (14 * side - 13, 1)):
        if ok:
            assert grid_hw(w, h, cfg) == (-(-h // 14), -(-w // 14))
        else:
            with pytest.raises(ImageError, match="Exceed pos emb"):
                grid_hw(w, h, cfg)


# ----------------------------------------------------------------------------------------------------------------
# Pixels


@pytest.mark.parametrize("norm", [HALF, CLIP], ids=["half", "clip"])
def test_pixels_padding_and_normalization(norm):
    rgb = random_rgb(30, 20, seed=1)  # pads right to 56, bottom to 28
    pv, grids = preprocess([Image.fromarray(rgb, "RGB")], make_cfg(norm=norm))
    assert grids.tolist() == [[2, 4]]
    np.testing.assert_allclose(pv, expected_patches(pad_to(rgb, 56, 28), norm), rtol=0, atol=1e-6)
    # padding value (0 - mean)/std: patch (1, 3) lies wholly in the padding (rows 14.., columns 42..)
    pad_val = [(0.0 - m) / s for m, s in zip(*norm)]
    for ch in range(3):
        np.testing.assert_allclose(pv[1 * 4 + 3, ch], pad_val[ch], atol=1e-6)
    if norm is HALF:
        assert np.all(pv[7] == -1.0)


def test_mean_std_come_from_config():
    rgb = random_rgb(28, 28, seed=2)
    a, _ = preprocess([Image.fromarray(rgb)], make_cfg(norm=HALF))
    b, _ = preprocess([Image.fromarray(rgb)], make_cfg(norm=CLIP))
    assert not np.allclose(a, b)
    # same pixels: x01 = a*0.5 + 0.5 = b*std + mean
    std = np.array(CLIP[1]).reshape(1, 3, 1, 1)
    mean = np.array(CLIP[0]).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(a * 0.5 + 0.5, b * std + mean, atol=1e-6)


def test_float32_values_bit_exact():
    """§4 step 5 in float32 as torchvision does it: float(x) / 255, then - mean, then / std."""
    rgb = random_rgb(28, 28, seed=3)
    pv, _ = preprocess([Image.fromarray(rgb)], make_cfg(norm=CLIP))
    x = rgb.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(CLIP[0], np.float32)) / np.asarray(CLIP[1], np.float32)  # [H, W, 3]
    expected = x.reshape(2, 14, 2, 14, 3).transpose(0, 2, 4, 1, 3).reshape(4, 3, 14, 14)
    assert np.array_equal(pv, expected)


def test_patch_order_row_major_channel_row_col():
    """Pixel colour encodes its position: R = column, G = row, B = 7."""
    W, H = 56, 28  # gw = 4, gh = 2: row-major vs column-major order differ
    yy, xx = np.mgrid[0:H, 0:W]
    rgb = np.stack([xx, yy, np.full_like(xx, 7)], axis=-1).astype(np.uint8)
    pv, grids = preprocess([Image.fromarray(rgb)], make_cfg(norm=HALF))
    assert grids.tolist() == [[2, 4]]
    norm = lambda v: (v / 255.0 - 0.5) / 0.5  # noqa: E731
    for r in range(2):
        for c in range(4):
            k = r * 4 + c
            for i in (0, 5, 13):
                for j in (0, 9, 13):
                    assert pv[k, 0, i, j] == pytest.approx(norm(14 * c + j), abs=1e-6)
                    assert pv[k, 1, i, j] == pytest.approx(norm(14 * r + i), abs=1e-6)
                    assert pv[k, 2, i, j] == pytest.approx(norm(7), abs=1e-6)


def test_rgba_alpha_dropped_not_composited():
    rng = np.random.default_rng(4)
    rgba = rng.integers(0, 256, size=(10, 20, 4), dtype=np.uint8)
    rgba[..., 3] = rng.integers(0, 5, size=(10, 20))  # nearly transparent: compositing would change colours
    pv, grids = preprocess([Image.fromarray(rgba, "RGBA")], make_cfg())
    assert grids.tolist() == [[2, 2]]
    np.testing.assert_allclose(pv, expected_patches(pad_to(rgba[..., :3], 28, 28), HALF), atol=1e-6)


def test_palette_image_pads_with_index_0_colour():
    img = Image.new("P", (15, 15), 1)
    img.putpalette([10, 20, 30, 250, 0, 0] + [0] * (256 * 3 - 6))
    pv, grids = preprocess([img], make_cfg())
    assert grids.tolist() == [[2, 2]]
    content = np.empty((15, 15, 3), np.uint8)
    content[:] = (250, 0, 0)
    np.testing.assert_allclose(pv, expected_patches(pad_to(content, 28, 28, fill=(10, 20, 30)), HALF), atol=1e-6)


def test_grayscale_replicated_to_rgb():
    g = np.random.default_rng(5).integers(0, 256, size=(28, 28), dtype=np.uint8)
    pv, _ = preprocess([Image.fromarray(g, "L")], make_cfg())
    np.testing.assert_allclose(pv, expected_patches(np.repeat(g[..., None], 3, axis=-1), HALF), atol=1e-6)


def test_over_budget_resize_equals_pillow_bicubic():
    rgb = random_rgb(100, 100, seed=6)
    img = Image.fromarray(rgb)
    # 7 x 7 = 49 patches > L = 16: s = sqrt(16/49) = 4/7, 100 * 4/7 = 57.14 -> 57
    assert int(100 * math.sqrt(16 / 49)) == 57
    resized = np.asarray(img.resize((57, 57), Image.Resampling.BICUBIC))
    expected = expected_patches(pad_to(resized, 84, 84), HALF)
    pv, grids = preprocess([img], make_cfg(limit=16))
    assert grids.tolist() == [[6, 6]]
    np.testing.assert_allclose(pv, expected, atol=1e-6)
    # the user cap max_patches acts as L the same way when below in_token_limit ...
    pv2, grids2 = preprocess([img], make_cfg(limit=4096), max_patches=16)
    assert grids2.tolist() == [[6, 6]] and np.array_equal(pv, pv2)
    # ... and has no effect above it
    pv3, grids3 = preprocess([img], make_cfg(limit=16), max_patches=10_000)
    assert grids3.tolist() == [[6, 6]] and np.array_equal(pv, pv3)


def test_over_budget_palette_image_uses_nearest():
    idx = np.random.default_rng(7).integers(0, 4, size=(60, 90), dtype=np.uint8)
    img = Image.fromarray(idx, "P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [9] * (252 * 3))
    # 6 x 4 = 24 patches > 8: s = sqrt(1/3); 90 s = 51.96 -> 51, 60 s = 34.64 -> 34
    assert target_size(90, 60, make_cfg(limit=8)) == (51, 34)
    resized = np.asarray(img.resize((51, 34), Image.Resampling.NEAREST).convert("RGB"))
    pv, grids = preprocess([img], make_cfg(limit=8))
    assert grids.tolist() == [[4, 4]]  # padded to 56 x 56
    np.testing.assert_allclose(pv, expected_patches(pad_to(resized, 56, 56), HALF), atol=1e-6)


def test_in_budget_image_is_never_resized():
    rgb = random_rgb(70, 42, seed=8)  # 5 x 3 = 15 patches == L: not over budget
    pv, grids = preprocess([Image.fromarray(rgb)], make_cfg(limit=15))
    assert grids.tolist() == [[4, 6]]  # padded to 84 x 56
    np.testing.assert_allclose(pv, expected_patches(pad_to(rgb, 84, 56), HALF), atol=1e-6)


def test_max_patches_must_be_positive():
    with pytest.raises(UsageError):
        target_size(100, 100, make_cfg(), max_patches=0)
    with pytest.raises(UsageError):
        preprocess([Image.new("RGB", (28, 28))], make_cfg(), max_patches=-3)


def test_multiple_images_concatenate_in_order():
    a, b = random_rgb(30, 20, seed=9), random_rgb(60, 50, seed=10)
    pv, grids = preprocess([Image.fromarray(a), Image.fromarray(b)], make_cfg())
    assert grids.tolist() == [[2, 4], [4, 6]]
    assert image_token_counts(grids) == [2, 6]
    expected = np.concatenate([expected_patches(pad_to(a, 56, 28), HALF), expected_patches(pad_to(b, 84, 56), HALF)])
    np.testing.assert_allclose(pv, expected, atol=1e-6)


def test_empty_list():
    pv, grids = preprocess([], make_cfg())
    assert pv.shape == (0, 3, 14, 14) and grids.shape == (0, 2) and grids.dtype == np.int64


# ----------------------------------------------------------------------------------------------------------------
# Loading


@pytest.fixture
def png_file(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(random_rgb(33, 19, seed=11)).save(path)
    return path


def test_load_image_sources_agree(png_file):
    data = png_file.read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    sources = [str(png_file), png_file, data, bytearray(data), Image.open(png_file), uri]
    results = [preprocess([s], make_cfg()) for s in sources]
    for pv, grids in results[1:]:
        assert np.array_equal(pv, results[0][0]) and np.array_equal(grids, results[0][1])
    np.testing.assert_allclose(results[0][0], expected_patches(pad_to(random_rgb(33, 19, seed=11), 56, 28), HALF),
                               atol=1e-6)
    assert load_image(str(png_file)).size == (33, 19)


def test_single_source_is_one_image(png_file):
    pv1, g1 = preprocess(str(png_file), make_cfg())
    pv2, g2 = preprocess([str(png_file)], make_cfg())
    assert np.array_equal(pv1, pv2) and g1.tolist() == g2.tolist() == [[2, 4]]


@pytest.mark.parametrize("src", [
    "/nonexistent/dir/no_such_image.png",
    b"this is not an image",
    b"",
    "data:image/png;base64,!!!not-base64!!!",
    "data:image/png;base64," + base64.b64encode(b"garbage").decode(),
    "data:image/png;base64",
    12345,
], ids=["missing", "garbage", "empty", "bad-b64", "b64-garbage", "no-comma", "int"])
def test_load_image_errors(src):
    with pytest.raises(ImageError) as e:
        load_image(src)
    assert "\n" not in str(e.value)


def test_truncated_png_raises(png_file):
    with pytest.raises(ImageError):
        load_image(png_file.read_bytes()[:60])


def test_exif_transpose_is_optional():
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 (applied by default, as transformers' load_image; see
    buf = io.BytesIO()  # tests/test_runtime_safety.py for the pixels)
    Image.fromarray(random_rgb(40, 20, seed=12)).save(buf, "JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (20, 40)
    assert preprocess([buf.getvalue()], make_cfg())[1].tolist() == [[4, 2]]
    assert load_image(buf.getvalue(), exif_transpose=False).size == (40, 20)
    assert preprocess([buf.getvalue()], make_cfg(), exif_transpose=False)[1].tolist() == [[2, 4]]


# ----------------------------------------------------------------------------------------------------------------
# preprocessor_config.json

INSTRUCT_FILE = {
    "image_processor_type": "KimiVLImageProcessor", "auto_map": {}, "patch_size": 14,
    "merge_kernel_size": [2, 2], "pad_input": True, "in_token_limit": 4096, "num_pooled_tokens": 1024,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
}


def write_cfg(tmp_path, d) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(d))


def test_from_checkpoint_reads_file(tmp_path):
    write_cfg(tmp_path, dict(INSTRUCT_FILE, in_token_limit=16384, image_mean=list(CLIP[0]), image_std=list(CLIP[1])))
    cfg = ImageProcessorConfig.from_checkpoint(tmp_path)
    assert cfg.patch_size == 14 and cfg.merge_kernel_size == (2, 2) and cfg.pad_input is True
    assert cfg.in_token_limit == 16384
    assert cfg.image_mean == CLIP[0] and cfg.image_std == CLIP[1]
    assert cfg == make_cfg(16384, CLIP)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="preprocessor_config.json") as e:
        ImageProcessorConfig.from_checkpoint(tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key", ["patch_size", "merge_kernel_size", "in_token_limit", "image_mean", "image_std",
                                 "pad_input"])
def test_missing_key(tmp_path, key):
    write_cfg(tmp_path, {k: v for k, v in INSTRUCT_FILE.items() if k != key})
    with pytest.raises(CheckpointError) as e:
        ImageProcessorConfig.from_checkpoint(tmp_path)
    msg = str(e.value)
    assert "preprocessor_config.json" in msg and key in msg and "\n" not in msg


def test_pad_input_false_rejected(tmp_path):
    write_cfg(tmp_path, dict(INSTRUCT_FILE, pad_input=False))
    with pytest.raises(CheckpointError, match="pad_input=false is not supported"):
        ImageProcessorConfig.from_checkpoint(tmp_path)


@pytest.mark.parametrize("bad", [{"image_std": [0.5, 0.0, 0.5]}, {"image_mean": [0.5, 0.5]},
                                 {"in_token_limit": "4096"}, {"merge_kernel_size": [2]}, {"patch_size": 0}])
def test_malformed_values(tmp_path, bad):
    write_cfg(tmp_path, dict(INSTRUCT_FILE, **bad))
    with pytest.raises(CheckpointError, match=next(iter(bad))):
        ImageProcessorConfig.from_checkpoint(tmp_path)


def test_invalid_json(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        ImageProcessorConfig.from_checkpoint(tmp_path)


def test_runtime_module_does_not_import_torch():
    code = "import sys, kimivl_edge.image; print('torch' in sys.modules or 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
