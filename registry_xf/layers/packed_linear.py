"""Linear layers whose weights are also kept in oneDNN's blocked layout for CPU inference.

PyTorch's CPU matrix multiply repacks the weight matrix on every call; for the small
batches of decoding that repacking costs more than the arithmetic, and it slows large
batches too. Packing once after loading removes it. The original weight stays the
parameter (for saving and training); the packed copy is used only for inference on the
CPU (no autograd), and is rebuilt if the weight changes.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
# Packing keeps a second copy of each weight: automatic packing stops at this size.
AUTO_PACK_LIMIT_BYTES = 1 << 30


def _packing_available() -> bool:
    return bool(
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` that multiplies with a prepacked copy of its weight when it can."""

    _packed: torch.Tensor | None = None
    _packed_from: tuple[int, int] | None = None
    _unpackable = False  # this oneDNN build refused: stay with the plain path

    def repack(self) -> None:
        weight = self.weight.detach()
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, 8)
        self._packed_from = (weight.data_ptr(), weight._version)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (
            not torch.is_grad_enabled()
            and not self._unpackable
            and x.device.type == weight.device.type == "cpu"
            and x.dtype == weight.dtype
            and weight.dtype in PACKABLE_DTYPES
        ):
            if self._packed is None or self._packed_from != (weight.data_ptr(), weight._version):
                try:  # first use, or the weight was replaced or changed in place
                    self.repack()
                except RuntimeError as e:
                    self._unpackable = True
                    logger.info("weight packing unavailable (%s); using plain linear layers", e)
                    return F.linear(x, weight, self.bias)
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, weight, self.bias)

    def __getstate__(self) -> dict:
        # The packed copy is derived data (and not picklable): rebuilt on first use.
        return {**self.__dict__, "_packed": None, "_packed_from": None}


def pack_linear_weights(model: nn.Module) -> int:
    """Make every CPU ``nn.Linear`` of ``model`` a ``PackedLinear``; return how many.

    Each packs its weight on its first inference call, so loading stays fast and a model
    never used for inference never pays for it. A no-op (0) where oneDNN is unavailable
    or weights are not float32/bfloat16 on CPU.
    """
    if not _packing_available():
        return 0
    packed = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            weight = module.weight
            if weight.device.type == "cpu" and weight.dtype in PACKABLE_DTYPES:
                module.__class__ = PackedLinear
                packed += 1
    return packed


def should_pack(model: nn.Module) -> bool:
    """Automatic choice: pack CPU float32/bfloat16 models up to ``AUTO_PACK_LIMIT_BYTES``."""
    params = list(model.parameters())
    if not params or not _packing_available():
        return False
    if any(p.device.type != "cpu" or p.dtype not in PACKABLE_DTYPES for p in params):
        return False
    return sum(p.numel() * p.element_size() for p in params) <= AUTO_PACK_LIMIT_BYTES
