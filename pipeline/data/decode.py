"""Decode image bytes to normalised float32 model input; bad rows are reported, never raised."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.config import PreprocessConfig

# 16-bit and 32-bit integer modes: Pillow cannot convert these to "L" without clipping to 255.
_WIDE_INT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})


class _Rejected(Exception):
    """An image that opens but must not be used; the message is the row's reason."""


@dataclass
class DecodeResult:
    """Decoded rows: `pixels` holds only the rows where `ok` is true, in input order."""

    pixels: np.ndarray  # float32 (n_ok, C, H, W)
    ok: np.ndarray  # bool (n,)
    errors: list[str | None]  # reason per input row, None when ok


def normalisation(pre: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, bias) so that x_uint8 * scale + bias == (x/255 - mean) / std."""
    c = pre.channels
    if len(pre.mean) not in (1, c) or len(pre.std) not in (1, c):
        raise ValueError(
            f"preprocess.mean/std must have 1 or {c} values for {c} channel(s), "
            f"got {len(pre.mean)} and {len(pre.std)}"
        )
    mean = np.broadcast_to(np.asarray(pre.mean, dtype=np.float64), (c,))
    std = np.broadcast_to(np.asarray(pre.std, dtype=np.float64), (c,))
    scale = (1.0 / (255.0 * std)).astype(np.float32).reshape(1, c, 1, 1)
    bias = (-mean / std).astype(np.float32).reshape(1, c, 1, 1)
    return scale, bias


def _as_list(images: Sequence[Any] | np.ndarray | pa.Array | pa.ChunkedArray) -> list[Any]:
    if isinstance(images, pa.ChunkedArray | pa.Array):
        return images.to_pylist()
    return list(images)


def _flatten_alpha(img: Image.Image) -> Image.Image:
    # Composite over black: the colour hidden under transparent pixels is arbitrary and must
    # not reach the embedding.
    rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
    rgb = (rgba[..., :3] * rgba[..., 3:4] + 127) // 255
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _to_channels(img: Image.Image, channels: int, size: int) -> np.ndarray:
    """Resize and convert one opened image to an (H, W) or (H, W, 3) array in 0..255."""
    if img.mode in _WIDE_INT_MODES or img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if img.mode == "F" and not np.isfinite(arr).all():
            # np.clip keeps NaN: it would reach the model (or a training batch) as pixels.
            raise _Rejected("image has NaN or infinite pixel values")
        # 16-bit data is rescaled (65535 -> 255), not clipped, so contrast survives.
        arr = np.clip(arr / 257.0 if img.mode != "F" else arr, 0.0, 255.0)
        img = Image.fromarray(arr, "F")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        out = np.asarray(img, dtype=np.float32)
        return np.repeat(out[..., None], 3, axis=2) if channels == 3 else out
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        img = _flatten_alpha(img)
    target = "L" if channels == 1 else "RGB"
    if img.mode != target:
        img = img.convert(target)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    # frombuffer(tobytes()) is ~20 us/image faster than np.asarray's array interface.
    flat = np.frombuffer(img.tobytes(), dtype=np.uint8)
    return flat.reshape(size, size) if channels == 1 else flat.reshape(size, size, 3)


def _decode_one(data: Any, pre: PreprocessConfig, max_pixels: int) -> np.ndarray | str:
    """The decoded array, or the reason the row is rejected."""
    if data is None or (isinstance(data, bytes | bytearray | memoryview) and len(data) == 0):
        return "empty image bytes"
    try:
        with Image.open(io.BytesIO(data)) as img:
            # Image.open reads only the header: reject big images before allocating pixels.
            w, h = img.size
            if w * h > max_pixels:
                return f"image too large: {w}x{h}"
            if img.format == "JPEG":
                # Let libjpeg decode at a reduced scale when the target is much smaller.
                img.draft("L" if pre.channels == 1 else "RGB", (pre.input_size, pre.input_size))
            return _to_channels(img, pre.channels, pre.input_size)
    except Image.DecompressionBombError as e:
        return f"image too large: {e}"
    except _Rejected as e:
        return str(e)
    except Image.UnidentifiedImageError:  # its message holds a memory address: no use in a log
        return "cannot decode image: not a recognised image format"
    except Exception as e:  # any decoder failure is a per-row rejection, not a crash
        return f"cannot decode image: {type(e).__name__}: {e}"


def _decode_into(
    images: Sequence[Any] | np.ndarray | pa.Array | pa.ChunkedArray,
    pre: PreprocessConfig,
    max_pixels: int,
) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Decode into a zero-filled (n, C, H, W) buffer; rejected rows stay zero."""
    scale, bias = normalisation(pre)
    items = _as_list(images)
    n, c, s = len(items), pre.channels, pre.input_size
    buf = np.zeros((n, c, s, s), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    errors: list[str | None] = [None] * n
    with warnings.catch_warnings():
        # Pillow warns about big images at open; `max_pixels` is the limit that decides here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        decoded = [_decode_one(data, pre, max_pixels) for data in items]
    for i, out in enumerate(decoded):
        if isinstance(out, str):
            errors[i] = out
            continue
        buf[i] = out if c == 1 else out.transpose(2, 0, 1)
        ok[i] = True
    if ok.all():
        buf *= scale
        buf += bias
    elif ok.any():
        buf[ok] = buf[ok] * scale + bias
    return buf, ok, errors


def decode_images(
    images: Sequence[Any] | np.ndarray | pa.Array | pa.ChunkedArray,
    pre: PreprocessConfig,
    max_pixels: int,
) -> DecodeResult:
    """Decode a batch of encoded images; `pixels` keeps the rows that decoded, in order."""
    buf, ok, errors = _decode_into(images, pre, max_pixels)
    return DecodeResult(pixels=buf if ok.all() else buf[ok], ok=ok, errors=errors)


def decode_batch(
    batch: dict[str, np.ndarray], pre: PreprocessConfig, max_pixels: int
) -> dict[str, np.ndarray]:
    """Ray Data stage: key/image(/label) columns -> key, flat pixels, error (, label).

    Every input row stays in the output so the writer can record rejected rows; their
    pixels are zero and `error` says why.
    """
    for column in ("key", "image"):
        if column not in batch:
            raise ValueError(f"decode_batch: batch has no {column!r} column (has {sorted(batch)})")
    buf, _, errors = _decode_into(batch["image"], pre, max_pixels)
    error = np.empty(len(errors), dtype=object)
    error[:] = [e or "" for e in errors]
    out = {"key": np.asarray(batch["key"]), "pixels": buf.reshape(len(buf), -1), "error": error}
    if "label" in batch:
        out["label"] = batch["label"]
    return out
