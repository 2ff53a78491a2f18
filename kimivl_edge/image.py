"""Kimi-VL image preprocessing, exactly as the HF ``KimiVLImageProcessor`` (docs/model.md §4), numpy + Pillow only.

Pipeline per image (§4): load (EXIF orientation applied, as transformers' ``load_image`` does; optional) -> Pillow
BICUBIC downscale only when the patch count
exceeds the budget -> zero-pad right/bottom to multiples of 28 in the image's own mode -> "Exceed pos emb" check ->
``convert("RGB")`` -> /255 -> (x - mean)/std -> 14x14 patches in (channel, row, col) order, row-major over the grid.
Padding before ``convert("RGB")`` means RGBA alpha is dropped (not composited) and "P" images pad with palette
index 0 (§10 item 6). No port's crop-or-resize variant is followed (§10 item 5).
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import ROPE_MAX_GRID
from .errors import CheckpointError, ImageError, UsageError, one_line, read_json_object

PREPROCESSOR_FILE = "preprocessor_config.json"

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image]
_SINGLE_SOURCE_TYPES = (str, Path, bytes, bytearray, memoryview, Image.Image)
_REQUIRED_KEYS = ("patch_size", "merge_kernel_size", "in_token_limit", "image_mean", "image_std", "pad_input")


# ----------------------------------------------------------------------------------------------------------------
# Configuration (§2 preprocessor_config.json, §13 item 1)


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The fields of ``preprocessor_config.json`` that the pixel pipeline uses (§2). All six come from the file."""

    patch_size: int
    merge_kernel_size: tuple[int, int]
    in_token_limit: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    pad_input: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "merge_kernel_size", tuple(int(k) for k in self.merge_kernel_size))
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))
        if not self.pad_input:
            # pad_input=false would centre-crop to multiples of 14 (§4 step 3); no released checkpoint uses it.
            raise CheckpointError("pad_input=false is not supported (Kimi-VL checkpoints use true)")

    @property
    def pad_multiple(self) -> tuple[int, int]:
        """(height, width) multiples the padded image must reach: merge kernel x patch size = 28 (§4 step 3)."""
        return self.merge_kernel_size[0] * self.patch_size, self.merge_kernel_size[1] * self.patch_size

    @classmethod
    def from_dict(cls, d: dict, source: str = PREPROCESSOR_FILE) -> "ImageProcessorConfig":
        """Build from the parsed JSON; ``source`` names the file in error messages."""
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: not a JSON object")
        for key in _REQUIRED_KEYS:
            if key not in d:
                raise CheckpointError(f"{source}: missing key {key!r}")
        if d["pad_input"] is not True:
            if d["pad_input"] is False:
                raise CheckpointError(f"{source}: pad_input=false is not supported (Kimi-VL checkpoints use true)")
            raise CheckpointError(f"{source}: pad_input must be true or false, got {d['pad_input']!r}")
        return cls(
            patch_size=_positive_int(d, "patch_size", source),
            merge_kernel_size=_int_pair(d, "merge_kernel_size", source),
            in_token_limit=_positive_int(d, "in_token_limit", source),
            image_mean=_triple(d, "image_mean", source, positive=False),
            image_std=_triple(d, "image_std", source, positive=True),
            pad_input=True,
        )

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path) -> "ImageProcessorConfig":
        """Read ``<ckpt_dir>/preprocessor_config.json``."""
        path = Path(ckpt_dir) / PREPROCESSOR_FILE
        if not path.is_file():
            raise CheckpointError(f"{ckpt_dir}: no {PREPROCESSOR_FILE}")
        return cls.from_dict(read_json_object(path), source=str(path))


def _positive_int(d: dict, key: str, source: str) -> int:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise CheckpointError(f"{source}: {key} must be a positive integer, got {v!r}")
    return v


def _int_pair(d: dict, key: str, source: str) -> tuple[int, int]:
    v = d[key]
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or any(isinstance(k, bool) or not isinstance(k, int) or k <= 0 for k in v)):
        raise CheckpointError(f"{source}: {key} must be two positive integers, got {v!r}")
    return int(v[0]), int(v[1])


def _triple(d: dict, key: str, source: str, positive: bool) -> tuple[float, float, float]:
    """A per-channel value; a single number applies to all three channels (as a broadcast normalize does)."""
    v = d[key]
    vals = [v] * 3 if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    ok = (isinstance(vals, (list, tuple)) and len(vals) == 3
          # abs(x) < 1e30, not math.isfinite(x): that raises OverflowError on a 400-digit JSON integer; NaN fails both
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) < 1e30 for x in vals))
    if not ok or (positive and any(x <= 0 for x in vals)):
        kind = "three positive numbers" if positive else "three numbers"
        raise CheckpointError(f"{source}: {key} must be {kind}, got {repr(v)[:60]}")
    return float(vals[0]), float(vals[1]), float(vals[2])


# ----------------------------------------------------------------------------------------------------------------
# Loading (§4 step 1)


# Largest image decoded (2^27 px = 134 217 728, e.g. 16384 x 8192; a 108 MP phone photo fits): larger files are
# refused with an ImageError before any pixel is allocated. This is the one limit: Pillow's own decompression-bomb
# warning (from 89 478 485 px) is not raised for files we read, its error (from 178 956 970 px) is past ours.
MAX_PIXELS = 1 << 27
_EXIF_ORIENTATION = 0x0112


def load_image(src: ImageSource, exif_transpose: bool = True) -> Image.Image:
    """A PIL image from a file path, encoded bytes, a ``data:`` URI or a PIL image. With ``exif_transpose`` (the
    default, as transformers' ``load_image``) an EXIF orientation tag is applied, so a phone photo is seen upright,
    as its owner sees it; False gives the pixels as stored (what the HF processor sees when handed
    ``Image.open(path)``). Unreadable input raises ImageError."""
    img = _load(src)
    if exif_transpose and img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        try:
            img = ImageOps.exif_transpose(img)
        except Exception as e:  # a malformed EXIF block
            raise ImageError(f"image EXIF orientation could not be applied ({one_line(e)})") from None
    return img


def _load(src: ImageSource) -> Image.Image:
    if isinstance(src, Image.Image):
        try:
            src.load()
        except Exception as e:  # a lazily opened, broken file
            raise ImageError(f"image could not be decoded ({one_line(e)})") from None
        return src
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _decode(bytes(src), "image bytes")
    if isinstance(src, str) and src.startswith("data:"):
        return _decode(_data_uri_bytes(src), "data URI")
    if isinstance(src, (str, Path)):
        path = Path(src).expanduser()
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageError(f"{src}: image file not found") from None
        except OSError as e:
            raise ImageError(f"{src}: cannot read image file ({one_line(e)})") from None
        return _decode(data, str(src))
    raise ImageError(f"cannot load an image from a {type(src).__name__} "
                     "(expected a path, bytes, data URI or PIL image)")


def _decode(data: bytes, what: str) -> Image.Image:
    """Decode fully now, so that corrupt data fails here rather than halfway through preprocessing."""
    try:
        with warnings.catch_warnings():  # MAX_PIXELS is the limit (checked next), not Pillow's warning threshold
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > MAX_PIXELS:  # refuse before allocating: a few KB of PNG can claim gigapixels
            raise ImageError(f"{what}: {w}x{h} = {w * h} pixels exceeds the limit of {MAX_PIXELS} "
                             "(possible decompression bomb)")
        if w == 0 or h == 0:
            raise ImageError(f"{what}: image has zero size")
        img.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{what}: not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{what}: {one_line(e)}") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... for corrupt data
        raise ImageError(f"{what}: image could not be decoded ({one_line(e)})") from None
    return img


def _data_uri_bytes(uri: str) -> bytes:
    """The payload of ``data:[<media type>][;base64],<data>`` (RFC 2397)."""
    header, sep, payload = uri.partition(",")
    if not sep:
        raise ImageError("malformed data URI (no ',' before the data)")
    if header.lower().endswith(";base64"):
        try:
            return base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("data URI: invalid base64 payload") from None
    return urllib.parse.unquote_to_bytes(payload)


# ----------------------------------------------------------------------------------------------------------------
# Geometry (§4 steps 2-4): pure arithmetic, usable to count tokens without touching pixels


def effective_token_limit(cfg: ImageProcessorConfig, max_patches: int | None = None) -> int:
    """L of §4: ``in_token_limit``, lowered to the optional user cap ``max_patches`` when that is smaller."""
    if max_patches is None:
        return cfg.in_token_limit
    if isinstance(max_patches, bool) or not isinstance(max_patches, int) or max_patches < 1:
        raise UsageError(f"max_patches must be a positive integer, got {max_patches!r}")
    return min(cfg.in_token_limit, max_patches)


def target_size(w: int, h: int, cfg: ImageProcessorConfig, max_patches: int | None = None) -> tuple[int, int]:
    """Size after the budget resize of §4 step 2: with P = floor(w/p)*floor(h/p), only if P > L,
    s = sqrt(L/P) and the size becomes (floor(w*s), floor(h*s)); otherwise unchanged (no upscaling).

    A side that would round to 0 (only reachable with a tiny ``max_patches`` on a needle-thin image, where HF
    itself would crash) is kept at 1 pixel."""
    limit = effective_token_limit(cfg, max_patches)
    p = cfg.patch_size
    n = (w // p) * (h // p)
    if n <= limit:
        return w, h
    s = math.sqrt(limit / n)
    return max(1, int(w * s)), max(1, int(h * s))


def padded_size(w: int, h: int, cfg: ImageProcessorConfig) -> tuple[int, int]:
    """(W, H) after zero-padding right/bottom to multiples of merge kernel x patch size (§4 step 3)."""
    mh, mw = cfg.pad_multiple
    return -(-w // mw) * mw, -(-h // mh) * mh


def grid_hw(w: int, h: int, cfg: ImageProcessorConfig, max_patches: int | None = None) -> tuple[int, int]:
    """(gh, gw) patch grid of a w x h image after resize and padding; raises ImageError as the HF processor does when
    a side reaches the RoPE table's (§4 step 4: W/14 >= 512 or H/14 >= 512; one less than the vision model itself
    takes, ``vision.check_patches``)."""
    w2, h2 = target_size(w, h, cfg, max_patches)
    W, H = padded_size(w2, h2, cfg)
    gh, gw = H // cfg.patch_size, W // cfg.patch_size
    if gw >= ROPE_MAX_GRID or gh >= ROPE_MAX_GRID:
        raise ImageError(
            f"image {w}x{h} needs a {gh}x{gw} patch grid (padded {W}x{H}): Exceed pos emb "
            f"(at most {ROPE_MAX_GRID - 1} patches per side; resize the image)")
    return gh, gw


def num_image_tokens(grid: Sequence[int], merge_kernel_size: Sequence[int] = (2, 2)) -> int:
    """LLM tokens of one image = gh*gw/4 (§4): one per merged 2x2 patch block."""
    gh, gw = int(grid[0]), int(grid[1])
    mh, mw = int(merge_kernel_size[0]), int(merge_kernel_size[1])
    if gh % mh or gw % mw:
        raise UsageError(f"patch grid {gh}x{gw} is not a multiple of the merge kernel {mh}x{mw}")
    return (gh // mh) * (gw // mw)


def image_token_counts(grid_hws: Any, merge_kernel_size: Sequence[int] = (2, 2)) -> list[int]:
    """``num_image_tokens`` for each row of an [N, 2] grid array (§4 text expansion)."""
    return [num_image_tokens((int(g[0]), int(g[1])), merge_kernel_size) for g in np.asarray(grid_hws).reshape(-1, 2)]


# ----------------------------------------------------------------------------------------------------------------
# Pixels (§4 steps 2-6)


def preprocess(images: Sequence[ImageSource] | ImageSource, cfg: ImageProcessorConfig,
               max_patches: int | None = None, exif_transpose: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """HF ``KimiVLImageProcessor`` outputs (§4): ``pixel_values`` float32 [sum gh*gw, 3, p, p] (each image's patches
    row-major, images concatenated in order) and ``grid_hws`` int64 [N, 2] of (gh, gw). A single source is treated
    as a one-image list; sources are loaded by ``load_image`` (``exif_transpose`` as there)."""
    if isinstance(images, _SINGLE_SOURCE_TYPES):
        images = [images]
    p = cfg.patch_size
    lut = _normalization_table(cfg)
    patches, grids = [], []
    for src in images:
        x, g = _preprocess_one(load_image(src, exif_transpose), cfg, lut, max_patches)
        patches.append(x)
        grids.append(g)
    pixel_values = np.concatenate(patches) if patches else np.zeros((0, 3, p, p), np.float32)
    return pixel_values, np.asarray(grids, dtype=np.int64).reshape(-1, 2)


def _preprocess_one(img: Image.Image, cfg: ImageProcessorConfig, lut: np.ndarray,
                    max_patches: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    w, h = img.size
    gh, gw = grid_hw(w, h, cfg, max_patches)  # raises "Exceed pos emb" before any pixel work
    size = target_size(w, h, cfg, max_patches)
    if size != (w, h):
        # Pillow's BICUBIC is antialiased (a = -0.5); Pillow itself uses NEAREST for "P" and "1" (§4 step 2).
        resample = Image.Resampling.NEAREST if img.mode in ("P", "1") else Image.Resampling.BICUBIC
        img = img.resize(size, resample)
    W, H = gw * cfg.patch_size, gh * cfg.patch_size
    if img.size != (W, H):
        # Cropping past the edges extends with zero pixels in the image's own mode, keeping the palette:
        # "P" pads with index 0, RGBA with (0, 0, 0, 0) whose alpha convert("RGB") then drops (§10 item 6).
        img = img.crop((0, 0, W, H))
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return _patchify(rgb, lut, cfg.patch_size), (gh, gw)


def _normalization_table(cfg: ImageProcessorConfig) -> np.ndarray:
    """[3, 256] float32: (v/255 - mean_c)/std_c for every uint8 v, with the same float32 operations as
    torchvision's to_tensor + normalize (§4 step 5), so a table lookup equals computing per pixel."""
    v = np.arange(256, dtype=np.float32) / np.float32(255.0)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None]
    std = np.asarray(cfg.image_std, dtype=np.float32)[:, None]
    return (v[None, :] - mean) / std


_CHANNEL_INDEX = np.arange(3).reshape(1, 1, 3, 1, 1)


def _patchify(rgb: np.ndarray, lut: np.ndarray, p: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [gh*gw, 3, p, p] float32; patch (r, c) holds rows p*r.., columns p*c.. in (channel, row,
    column) order, patches row-major (§4 step 6)."""
    H, W, _ = rgb.shape
    gh, gw = H // p, W // p
    blocks = rgb.reshape(gh, p, gw, p, 3).transpose(0, 2, 4, 1, 3)  # [gh, gw, 3, p, p] view
    return lut[_CHANNEL_INDEX, blocks].reshape(gh * gw, 3, p, p)


__all__ = [
    "ImageProcessorConfig", "ImageSource", "PREPROCESSOR_FILE", "effective_token_limit",
    "grid_hw", "image_token_counts", "load_image", "num_image_tokens", "padded_size", "preprocess",
    "target_size",
]
