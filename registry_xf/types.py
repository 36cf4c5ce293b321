"""Annotated types that convert config values (strings, lists) into the objects we need."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, BeforeValidator, Field, PlainSerializer, ValidationInfo

from .errors import InputError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}
DTYPE_NAMES = ("float32", "float16", "bfloat16")


def to_dtype(value: Any) -> torch.dtype:
    """``"bfloat16"`` / ``"torch.bfloat16"`` / ``torch.bfloat16`` → ``torch.bfloat16``."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        key = value.lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise InputError(
        f"dtype {value!r} is not supported; expected one of {', '.join(DTYPE_NAMES)} (or 'auto' "
        "where the stored dtype may be kept)"
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_device(value: Any) -> torch.device:
    if isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            return torch.device(value)
        except RuntimeError as e:
            message = f"device {value!r}: expected one such as 'cpu' or 'cuda:0' ({e})"
            raise InputError(message) from None
    raise InputError(f"device {value!r}: expected one such as 'cpu' or 'cuda:0'")


# The key of pydantic's validation context under which the resolver passes the directory
# that relative paths in a config are read from (the config file's, or the model's).
BASE_DIR = "registry_xf_base_dir"


def _to_path(value: Any, info: ValidationInfo) -> Path:
    """A config path: relative ones are relative to the config's directory (given by the
    resolver), not to the working directory; without one, to the working directory."""
    if not isinstance(value, (str, Path)):
        raise ValueError("expected a file or directory path")
    path = Path(value).expanduser()
    base = (info.context or {}).get(BASE_DIR) if isinstance(info.context, dict) else None
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return path


DType = Annotated[torch.dtype, BeforeValidator(to_dtype), PlainSerializer(dtype_name)]
Device = Annotated[torch.device, BeforeValidator(to_device), PlainSerializer(str)]
PathLike = Annotated[Path, BeforeValidator(_to_path), PlainSerializer(str)]

# Bare annotations that registered functions may use instead, converted the same way.
CONVERTING = ((torch.dtype, DType), (torch.device, Device), (Path, PathLike))


# --- Sizes and settings that configs give components ----------------------------------
#
# Every size is bounded before anything is built: a size no real model has is a typo or a
# hostile file, and building it would allocate until memory runs out (or, on the meta
# device, loop for hours). The bounds sit far above the largest released models (2025:
# at most 128 layers, widths up to 53,248, vocabularies up to 262,144, contexts up to
# 10,485,760 positions, 128 heads of up to 256 dimensions).

MAX_LAYERS = 1024
"""Layers in a stack (the deepest released models have 126; research models reach 1,000).
Building a stack on the meta device costs a few milliseconds per layer."""
MAX_WIDTH = 2**18
"""Any hidden, intermediate or embedding width: 262,144 (five times the widest released)."""
MAX_HEADS = 4096
"""Attention heads per layer (released models have at most 128)."""
MAX_HEAD_WIDTH = 4096
"""Width of one attention head (released models use 64 to 256)."""
MAX_VOCAB = 2**22
"""Entries of a vocabulary or token-type table: 4,194,304 (16 times the largest released)."""
MAX_POSITIONS = 2**24
"""Positions: 16,777,216 (the longest released context has 10,485,760)."""
MAX_PARAMETERS = 2**41
"""Parameters of a whole model: about 2.2 trillion (the largest released have ~1 trillion).
Checked on the meta device, where counting them allocates nothing."""
MIN_EPS = 1e-30
"""Smallest norm epsilon: smaller ones flush to zero in float32 sums and give NaN for
constant inputs (released models use 1e-12 to 1e-5)."""


def _sized(low: int, high: int) -> Any:
    return Field(ge=low, le=high)


PositiveInt = Annotated[int, Field(ge=1)]
"""A count of at least one."""
LayerCount = Annotated[int, _sized(1, MAX_LAYERS)]
Width = Annotated[int, _sized(1, MAX_WIDTH)]
HeadCount = Annotated[int, _sized(1, MAX_HEADS)]
HeadWidth = Annotated[int, _sized(1, MAX_HEAD_WIDTH)]
VocabSize = Annotated[int, _sized(1, MAX_VOCAB)]
TypeVocabSize = Annotated[int, _sized(0, MAX_VOCAB)]
"""Token types: 0 means the model has none."""
PositionCount = Annotated[int, _sized(1, MAX_POSITIONS)]
PositionIndex = Annotated[int, _sized(0, MAX_POSITIONS - 1)]

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
"""Any real number: NaN and infinities are refused (they turn every output into NaN)."""
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
"""A finite number above zero (a scale, a factor)."""
Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
"""A probability such as a dropout rate: from 0 to 1."""
Fraction = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
"""A share of something that must not be empty: above 0, at most 1."""


def _not_flushed(eps: float) -> float:
    if eps < MIN_EPS:
        raise ValueError(f"{eps:g} is below {MIN_EPS:g}: float32 sums flush it to zero")
    return eps


Eps = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False), AfterValidator(_not_flushed)]
"""A norm's epsilon: from ``MIN_EPS`` to 1."""
RopeBase = Annotated[float, Field(gt=1, allow_inf_nan=False)]
"""Rotary base (theta): finite and above 1 (1 or less gives no or NaN frequencies)."""
