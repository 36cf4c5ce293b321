"""Rotary frequency scaling for contexts longer than the pretraining length.

Each scheme maps the base inverse frequencies to scaled ones (and, for YaRN, a factor on
cos/sin). A scheme that is not listed here is refused: a silent fallback would give a
model that runs and answers wrongly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import torch
from pydantic import AfterValidator

from ..types import MAX_POSITIONS

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
    problems = [value_problem(key, spec[key]) for key in _VALUE_RULES if spec.get(key) is not None]
    low, high = spec.get("low_freq_factor"), spec.get("high_freq_factor")
    if kind == "llama3" and not any(problems) and high <= low:
        problems.append(f"high_freq_factor {high} must be above low_freq_factor {low}")
    found = [p for p in problems if p]
    if found:
        raise ValueError(f"rope scaling {kind!r}: " + "; ".join(found))
    return spec


def _finite_above(bound: float, *, inclusive: bool = False) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if not _is_number(value) or abs(value) > 1e300 or not math.isfinite(value):
            return False
        return value >= bound if inclusive else value > bound

    return check


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What each numeric setting must be: NaN, infinities and signs that make no sense would
# turn the rotary tables (and every output) into NaN or divide by zero.
_VALUE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "factor": (_finite_above(0), "a finite number above 0"),
    "low_freq_factor": (_finite_above(0), "a finite number above 0"),
    "high_freq_factor": (_finite_above(0), "a finite number above 0"),
    "attention_factor": (_finite_above(0), "a finite number above 0"),
    "beta_fast": (_finite_above(0), "a finite number above 0"),
    "beta_slow": (_finite_above(0), "a finite number above 0"),
    "mscale": (_finite_above(0, inclusive=True), "a finite number of at least 0"),
    "mscale_all_dim": (_finite_above(0, inclusive=True), "a finite number of at least 0"),
    "original_max_positions": (
        lambda v: _is_number(v) and float(v).is_integer() and 1 <= v <= MAX_POSITIONS,
        f"a whole number from 1 to {MAX_POSITIONS}",
    ),
    "truncate": (lambda v: isinstance(v, bool), "true or false"),
}


def value_problem(key: str, value: Any) -> str:
    """What is wrong with ``value`` for the scaling setting ``key`` ("" when nothing is, or
    when the key is not a numeric setting)."""
    if key not in _VALUE_RULES:
        return ""
    check, expected = _VALUE_RULES[key]
    return "" if check(value) else f"{key} must be {expected} (found {value!r})"


def _checked(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, Mapping):
        raise ValueError('expected a section such as {type = "linear", factor = 2.0}')
    return check_scaling(value)


RopeScaling = Annotated[dict[str, Any], AfterValidator(_checked)]
"""A rope scaling section, checked: a supported type, its settings present and in range."""


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
