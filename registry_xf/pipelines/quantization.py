"""Embeddings in fewer bits (int8, uint8, packed binary) and Hamming similarity of packed ones.

The arithmetic is sentence-transformers' ``quantize_embeddings``, step for step, so that the same
calibration gives the same bytes: scalar (int8/uint8) quantisation cuts each dimension's range
(min to max over the calibration embeddings) into 256 buckets; binary keeps the sign bit and
packs 8 dimensions into a byte (``binary`` as int8, offset by -128; ``ubinary`` as uint8).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..errors import InputError, did_you_mean

Precision = Literal["float32", "int8", "uint8", "binary", "ubinary"]
PRECISIONS: tuple[str, ...] = ("float32", "int8", "uint8", "binary", "ubinary")

# Rows of the first operand handled at once by hamming_distance: bounds its scratch memory.
_HAMMING_BLOCK_BYTES = 1 << 26


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(
            f"precision={precision!r} is not known: expected one of {', '.join(PRECISIONS)}."
            + did_you_mean(str(precision), PRECISIONS)
        )
    return precision


def quantization_ranges(calibration_embeddings: np.ndarray) -> np.ndarray:
    """Per-dimension (min, max) of float embeddings: shape (2, width)."""
    data = np.asarray(calibration_embeddings)
    if data.ndim != 2 or data.shape[0] < 2:
        raise InputError(
            f"calibration_embeddings: expected a (n >= 2, width) array, found shape {data.shape}"
        )
    return np.vstack((data.min(axis=0), data.max(axis=0)))


def quantize_embeddings(
    embeddings: np.ndarray,
    precision: str,
    *,
    ranges: np.ndarray | None = None,
    calibration_embeddings: np.ndarray | None = None,
) -> np.ndarray:
    """``embeddings`` (n, width) float in ``precision``; int8/uint8 ranges come from ``ranges``,
    else ``calibration_embeddings``, else the embeddings themselves (n >= 2)."""
    check_precision(precision)
    embeddings = np.asarray(embeddings)
    if embeddings.dtype.kind != "f" or embeddings.ndim != 2:
        raise InputError(
            f"embeddings: expected a 2-d float array, found {embeddings.dtype} of shape "
            f"{embeddings.shape}"
        )
    width = embeddings.shape[1]
    if precision == "float32":
        return embeddings.astype(np.float32)
    if precision in ("binary", "ubinary"):
        packed = np.packbits(embeddings > 0, axis=-1)
        return packed if precision == "ubinary" else (packed - 128).astype(np.int8)
    if ranges is None and calibration_embeddings is None and embeddings.shape[0] < 2:
        raise InputError(
            f"precision={precision!r} for {embeddings.shape[0]} embedding(s): give ranges or "
            "calibration_embeddings (a range cannot be had from fewer than two embeddings)"
        )
    if ranges is None:
        source = embeddings if calibration_embeddings is None else calibration_embeddings
        ranges = quantization_ranges(source)
    ranges = np.asarray(ranges)
    if ranges.shape != (2, width):
        raise InputError(f"ranges: expected shape (2, {width}), found {ranges.shape}")
    ranges = ranges.astype(np.float32, copy=False)
    starts = ranges[0]
    steps = (ranges[1] - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    buckets = np.clip(np.floor((embeddings - starts) / steps), 0, 255)
    return buckets.astype(np.uint8) if precision == "uint8" else (buckets - 128).astype(np.int8)


def _as_bits(packed: np.ndarray, name: str) -> np.ndarray:
    packed = np.asarray(packed)
    if packed.ndim == 1:
        packed = packed[None]
    if packed.ndim != 2 or packed.dtype not in (np.int8, np.uint8):
        raise InputError(
            f"{name}: expected packed binary embeddings (int8 'binary' or uint8 'ubinary', "
            f"n x bytes), found {packed.dtype} of shape {packed.shape}"
        )
    if packed.dtype == np.int8:  # 'binary' stores packbits - 128
        return (packed.view(np.uint8) ^ np.uint8(0x80)).astype(np.uint8)
    return packed


def hamming_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Differing bits of every pair of packed binary embeddings: (len(a), len(b)) int64.

    Either precision (``binary`` or ``ubinary``) on each side; the bits compared are the same.
    """
    bits_a, bits_b = _as_bits(a, "a"), _as_bits(b, "b")
    if bits_a.shape[1] != bits_b.shape[1]:
        raise InputError(
            f"a and b: packed widths differ ({bits_a.shape[1]} and {bits_b.shape[1]} bytes)"
        )
    out = np.empty((bits_a.shape[0], bits_b.shape[0]), dtype=np.int64)
    rows = max(1, _HAMMING_BLOCK_BYTES // max(1, bits_b.size))
    for start in range(0, bits_a.shape[0], rows):
        block = bits_a[start : start + rows, None, :] ^ bits_b[None, :, :]
        out[start : start + rows] = np.bitwise_count(block).sum(-1, dtype=np.int64)
    return out


def hamming_similarity(a: np.ndarray, b: np.ndarray, *, width: int | None = None) -> np.ndarray:
    """The share of equal bits (1 - distance / width) of every pair of packed binary
    embeddings; ``width`` is the embeddings' width before packing (default: 8 per byte)."""
    distance = hamming_distance(a, b)
    n_bits = width if width is not None else 8 * np.asarray(a).shape[-1]
    if not 0 < n_bits <= 8 * np.asarray(a).shape[-1]:
        raise InputError(f"width={width}: expected 1 to {8 * np.asarray(a).shape[-1]}")
    return (1.0 - distance / n_bits).astype(np.float32)
