"""Linear layers whose weights are also kept in oneDNN's blocked layout for CPU inference.

PyTorch's CPU matrix multiply repacks the weight matrix on every call; for the small
batches of decoding that repacking costs more than the arithmetic, and it slows large
batches too. Packing once removes it. The original weight stays the parameter (for
saving and training); the packed copy is used only for inference on the CPU (no
autograd), is rebuilt if the weight changes, and is freed with the weight. A single row
(batch-1 decoding) is multiplied by oneDNN with the plain weight: its matrix-vector path
reads that layout faster than the blocked one.

Under ``torch.compile`` the packed multiply is the custom operator
``registry_xf::packed_linear``, which the compiler calls as an opaque kernel: the
compiled graph fuses everything around the linear layers and keeps their packed weights.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

logger = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
# Packing keeps a second copy of each weight: automatic packing stops at this size.
AUTO_PACK_LIMIT_BYTES = 1 << 30

# weight -> (the weight's (data pointer, version) when packed, packed copy). Keyed by the
# tensor's identity and held weakly: a copy lives as long as its weight, and is rebuilt
# when the weight is replaced or changed in place.
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()
_unavailable_reason: str | None = None  # set when this oneDNN build refused to pack


def _packing_available() -> bool:
    return bool(
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def packed_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The packed copy of ``weight`` (made on first use), or None where packing failed."""
    global _unavailable_reason
    if _unavailable_reason is not None:
        return None
    stamp = (weight.data_ptr(), weight._version)
    entry = _PACKED.get(weight)
    if entry is None or entry[0] != stamp:
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 8)
        except RuntimeError as e:
            _unavailable_reason = str(e)
            logger.info("weight packing unavailable (%s); using plain linear layers", e)
            return None
        entry = _PACKED[weight] = (stamp, packed)
    return entry[1]


def _packed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with ``weight``'s packed copy (CPU, no autograd).

    A single row (a decoding step of one sequence) goes to oneDNN with the plain weight
    instead: for a matrix-vector product it reads that layout about a tenth faster than
    the blocked one, which suits several rows."""
    if not (x.numel() == x.shape[-1] and weight.is_contiguous()):
        packed = packed_weight(weight)
        if packed is None:
            return F.linear(x, weight, bias)
        weight = packed
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _packed_linear_shape(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# Defined with the plain operator library, not ``torch.library.custom_op``, whose wrapper
# adds about 20 µs a call: a tenth of a small linear layer's time in a decoding step.
_LIBRARY = torch.library.Library("registry_xf", "DEF")
_LIBRARY.define("packed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIBRARY.impl("packed_linear", _packed_linear, "CPU")
torch.library.register_fake("registry_xf::packed_linear", _packed_linear_shape, lib=_LIBRARY)


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` that multiplies with a prepacked copy of its weight when it can."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (
            torch.is_grad_enabled()
            or _unavailable_reason is not None
            or x.device.type != "cpu"
            or weight.device.type != "cpu"
            or x.dtype != weight.dtype
            or weight.dtype not in PACKABLE_DTYPES
        ):
            return F.linear(x, weight, self.bias)
        if torch.compiler.is_compiling():  # the operator: opaque to the compiler
            return torch.ops.registry_xf.packed_linear(x, weight, self.bias)
        return _packed_linear(x, weight, self.bias)  # eagerly, without the dispatcher


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
