"""Rotary frequency scaling for contexts longer than the pretraining length.

Each scheme maps the base inverse frequencies to scaled ones (and, for YaRN, a factor on
cos/sin). A scheme that is not listed here is refused: a silent fallback would give a
model that runs and answers wrongly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

SUPPORTED = ("linear", "dynamic", "llama3", "yarn")


def check_scaling(scaling: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Validate a scaling spec (``{"type": "llama3", "factor": 8.0, ...}``); None = none."""
    if not scaling:
        return None
    spec = dict(scaling)
    kind = spec.get("type", spec.get("rope_type"))
    if kind in (None, "default"):
        return None
    if kind not in SUPPORTED:
        raise ValueError(
            f"rope scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED)}"
        )
    required = {
        "linear": ("factor",),
        "dynamic": ("factor", "original_max_positions"),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_positions"),
        "yarn": ("factor", "original_max_positions"),
    }[kind]
    missing = [k for k in required if spec.get(k) is None]
    if missing:
        raise ValueError(f"rope scaling {kind!r} needs {', '.join(missing)}")
    spec["type"] = kind
    spec.pop("rope_type", None)
    return spec


def scaled_inv_freq(
    inv_freq: torch.Tensor, base: float, width: int, spec: Mapping[str, Any], seq_len: int | None
) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, cos/sin factor) under ``spec`` for sequences of ``seq_len``."""
    kind, factor = spec["type"], float(spec["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "dynamic":
        original = int(spec["original_max_positions"])
        length = max(seq_len or original, original)
        new_base = base * ((factor * length / original) - (factor - 1)) ** (width / (width - 2))
        steps = torch.arange(0, width, 2, dtype=torch.float32, device=inv_freq.device)
        return 1.0 / (new_base ** (steps / width)), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, factor, spec), 1.0
    return _yarn(inv_freq, base, width, factor, spec)


def _llama3(inv_freq: torch.Tensor, factor: float, spec: Mapping[str, Any]) -> torch.Tensor:
    low, high = float(spec["low_freq_factor"]), float(spec["high_freq_factor"])
    context = float(spec["original_max_positions"])
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(medium, smoothed, scaled)


def _yarn(
    inv_freq: torch.Tensor, base: float, width: int, factor: float, spec: Mapping[str, Any]
) -> tuple[torch.Tensor, float]:
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = spec.get("attention_factor")
    if attention is None:
        m, m_all = spec.get("mscale"), spec.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    fast, slow = spec.get("beta_fast") or 32, spec.get("beta_slow") or 1
    original = float(spec["original_max_positions"])

    def correction_dim(rotations: float) -> float:
        return (width * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(fast), correction_dim(slow)
    if spec.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, width - 1)
    if low == high:
        high += 0.001
    ramp = (torch.arange(width // 2, dtype=torch.float32, device=inv_freq.device) - low) / (
        high - low
    )
    extrapolation = 1 - ramp.clamp(0, 1)
    mixed = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return mixed, float(attention)
