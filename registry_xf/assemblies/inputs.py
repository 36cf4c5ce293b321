"""Checks of a forward pass's tensors, made once at an assembly's entry.

They read only what a tensor carries beside its data (type, dtype, shape), so they cost
a few attribute reads per call and trace under ``torch.compile`` without reading values
back: there a dtype is a guard the compiler keeps anyway, and a shape test is settled
while tracing. Values (ids within the vocabulary, positions within the table) are checked
by the embeddings, eagerly.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError

# what ``nn.Embedding`` takes as indices
ID_DTYPES = (torch.int64, torch.int32)


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _shape(value: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(n) for n in value.shape)


def check_input_ids(input_ids: Any, device: torch.device | None) -> None:
    """``input_ids``: an int64 (or int32) tensor (batch, seq) of at least one token, on the
    model's ``device`` (None: the caller checks the device)."""
    if not isinstance(input_ids, torch.Tensor):
        raise InputError(
            f"input_ids must be a torch tensor of token ids (batch, seq); found {_kind(input_ids)}"
        )
    if input_ids.dtype not in ID_DTYPES:
        raise InputError(
            f"input_ids must hold integer token ids (torch.int64 or torch.int32); found dtype "
            f"{input_ids.dtype} (convert with input_ids.long() if the values are ids)"
        )
    if input_ids.dim() != 2:
        raise InputError(
            f"input_ids must be (batch, seq); found shape {_shape(input_ids)} "
            "(a single sequence is input_ids[None])"
        )
    if input_ids.shape[0] == 0:
        raise InputError(
            f"input_ids is an empty batch (shape {_shape(input_ids)}): give at least one sequence"
        )
    if input_ids.shape[1] == 0:
        raise InputError(
            f"input_ids has sequences of no tokens (shape {_shape(input_ids)}): give at least "
            "one token per sequence"
        )
    if device is not None:
        check_ids_device(input_ids, device)


def check_ids_device(input_ids: torch.Tensor, device: torch.device) -> None:
    if input_ids.device != device:
        raise InputError(
            f"input_ids is on {input_ids.device} and the model on {device}: move the inputs "
            f"with .to({str(device)!r})"
        )


def check_attention_mask(
    mask: Any, expected: tuple[Any, Any], what: str, device: torch.device
) -> None:
    """``attention_mask``: bool or integer (nonzero = real token) of shape ``expected``.

    Floating masks are refused: HF's additive masks (0 = attend, -inf = masked) would read
    the other way round.
    """
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"attention_mask must be a torch tensor {what}; found {_kind(mask)}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise InputError(
            f"attention_mask must be bool or integer (1 = real token, 0 = padding); found dtype "
            f"{mask.dtype} (an HF-style 0/1 float mask converts with mask.long())"
        )
    if mask.dim() != 2 or mask.shape[0] != expected[0] or mask.shape[1] != expected[1]:
        raise InputError(
            f"attention_mask shape {_shape(mask)} is not {what} = {tuple(int(n) for n in expected)}"
        )
    if mask.device != device:
        raise InputError(
            f"attention_mask is on {mask.device} and input_ids on {device}: put both on the "
            "model's device"
        )


def check_ids_like(name: str, value: Any, input_ids: torch.Tensor, *, batch_of_one: bool) -> None:
    """``token_type_ids`` or ``positions``: integer ids of ``input_ids``' shape (or, with
    ``batch_of_one``, one row shared by the whole batch)."""
    # Sizes stay symbolic under torch.compile and export (int() would fix them); the
    # message that names them is made only for an error.
    batch, seq = input_ids.shape[0], input_ids.shape[1]

    def allowed() -> str:
        return f"({batch}, {seq})" + (f" or (1, {seq})" if batch_of_one else "")

    if not isinstance(value, torch.Tensor):
        raise InputError(f"{name} must be a torch tensor {allowed()}; found {_kind(value)}")
    if value.dtype not in ID_DTYPES:
        raise InputError(f"{name} must be torch.int64 or torch.int32; found dtype {value.dtype}")
    rows_ok = value.dim() == 2 and (
        value.shape[0] == batch or (batch_of_one and value.shape[0] == 1)
    )
    if not rows_ok or value.shape[1] != seq:
        raise InputError(f"{name} must have shape {allowed()}, as input_ids; found {_shape(value)}")
    if value.device != input_ids.device:
        raise InputError(
            f"{name} is on {value.device} and input_ids on {input_ids.device}: put both on "
            "the model's device"
        )
