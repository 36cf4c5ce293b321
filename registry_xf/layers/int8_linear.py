"""Linear layers that multiply in int8 on the CPU: weights quantised once per output row,
activations per row (token), over the row's own range, at each call.

An int8 matrix product reads a quarter of float32's bytes and, on CPUs with VNNI or AMX,
does four to sixteen times the multiply-adds per instruction. Scaling each token's row of
activations by its own maximum (not one scale for the whole batch, as ONNX Runtime's and
torch's dynamic quantisation do) keeps a rare large activation from crushing the others:
embeddings stay within a cosine of about 0.999 of float32's, where per-tensor schemes lose
several hundredths on small models.

``quantize_int8(model)`` swaps every ``nn.Linear`` (packed or not) for an ``Int8Linear``;
inference only (no autograd through the int8 weights).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from ..errors import RegistryXFError

logger = logging.getLogger(__name__)

_LIMIT = 127.0  # symmetric int8: -127..127, so that negation never overflows


@functools.cache
def int8_unavailable() -> str | None:
    """Why this torch cannot multiply int8 matrices on the CPU (None when it can)."""
    if not hasattr(torch, "_int_mm"):
        return "this torch has no int8 matrix multiply (torch._int_mm)"
    try:
        a = torch.ones(2, 8, dtype=torch.int8)
        torch._int_mm(a, a.t().contiguous())
    except RuntimeError as e:
        return f"this torch cannot multiply int8 matrices on the CPU ({e})"
    return None


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of each row of ``x`` (2-D float) and the float32 scale of each row."""
    peak = torch.linalg.vector_norm(x, ord=float("inf"), dim=1, keepdim=True).float()
    scale = peak.clamp_(min=1e-12).div_(_LIMIT)
    return (x / scale).round_().to(torch.int8), scale


def _quantize_rows_shifted(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Int8 of each row of ``x`` over its own range [min, max] (with 0 inside it): the
    int8 values, the float32 scale and the shift (an integer, as float32) of each row.
    Activations after GELU or a norm are lopsided: a range that fits them is up to twice
    as fine as a symmetric one."""
    low, high = torch.aminmax(x, dim=1, keepdim=True)
    low, high = low.float().clamp_(max=0.0), high.float().clamp_(min=0.0)
    scale = (high - low).clamp_(min=1e-12).div_(2 * _LIMIT)
    shift = (low / scale).round_().add_(_LIMIT)  # low lands on -127
    q = (x / scale).round_().sub_(shift).clamp_(-_LIMIT, _LIMIT).to(torch.int8)
    return q, scale, shift


class Int8Linear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored as int8 rows and their float32 scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = weight.dtype
        qweight, scale = _quantize_rows(weight.float())
        # (in, out) with the columns contiguous: the layout oneDNN reads fastest
        self.register_buffer("qweight", qweight.t(), persistent=False)
        self.register_buffer("weight_scale", scale.reshape(1, -1), persistent=False)
        # x = scale * (q + shift), so x @ W = scale * (q @ W + shift * column sums of W)
        self.register_buffer("column_sums", qweight.float().sum(1).reshape(1, -1), persistent=False)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 0:
            return x.new_zeros((*shape[:-1], self.out_features))
        qx, x_scale, shift = _quantize_rows_shifted(rows)
        y = torch._int_mm(qx, self.qweight).float()
        y.addmm_(shift, self.column_sums).mul_(x_scale).mul_(self.weight_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module) -> int:
    """Replace every linear layer of ``model`` (on the CPU) by an ``Int8Linear``; return
    how many. Weights are quantised now; the float weights are released."""
    unavailable = int8_unavailable()
    if unavailable is not None:
        raise RegistryXFError(f"int8 quantisation: {unavailable}")
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    for parent, name, child in targets:
        if child.weight.device.type != "cpu":
            raise RegistryXFError(
                f"int8 quantisation runs on the CPU; layer {name} is on {child.weight.device}"
            )
        if child.weight.shape[0] < 2 or child.weight.shape[1] < 8:  # too small to gain
            continue
        setattr(parent, name, Int8Linear(child))
    count = sum(isinstance(m, Int8Linear) for m in model.modules())
    logger.info("int8: %d linear layers quantised", count)
    return count
