"""Annotated types that convert config values (strings, lists) into the objects we need."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BeforeValidator, PlainSerializer, ValidationInfo

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
