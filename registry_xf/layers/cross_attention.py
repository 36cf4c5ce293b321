"""Cross-attention: a decoder's queries attend to the encoder's states.

The encoder's keys and values do not change while a sequence is decoded, so each layer
computes them once per prompt and keeps them in the ``EncoderMemory`` that carries the
encoder's states and mask through the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InputError
from ..registry import registry
from ..types import HeadCount, HeadWidth, PositiveFloat, Probability, Width
from .attention import Backend, SelfAttention
from .attention_mask import AttentionMask


@dataclass
class EncoderMemory:
    """The encoder's output as the decoder's layers read it.

    ``states`` is (batch, source length, width); ``mask`` the source's padding mask. Keys
    and values are computed by each cross-attention layer at its first use and kept.
    """

    states: torch.Tensor
    mask: AttentionMask
    _keys_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False
    )

    @classmethod
    def of(cls, states: torch.Tensor, attention_mask: torch.Tensor | None) -> EncoderMemory:
        """Memory for encoder ``states`` and its ``attention_mask`` (1 = real token)."""
        if attention_mask is not None and attention_mask.shape != states.shape[:2]:
            raise InputError(
                f"encoder attention_mask must be (batch, source length) = "
                f"{tuple(states.shape[:2])}; found {tuple(attention_mask.shape)}"
            )
        key_mask = attention_mask.bool() if attention_mask is not None else None
        return cls(states, AttentionMask(key_mask))

    def keys_values(self, attention: CrossAttention) -> tuple[torch.Tensor, torch.Tensor]:
        """``attention``'s keys and values of the encoder states, computed once."""
        key = id(attention)
        if key not in self._keys_values:
            self._keys_values[key] = attention.project_memory(self.states)
        return self._keys_values[key]


class CrossAttention(SelfAttention):
    """Attention from the decoder's states (queries) to the encoder's (keys, values).

    Separate query, key, value and output projections; the attention itself (kernels,
    masks, scaling, ``cpu_kernel``) is self-attention's.
    """

    def __init__(
        self,
        width: int,
        n_heads: int,
        *,
        head_width: int | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        backend: Backend = "sdpa",
        dropout: float = 0.0,
        scale: float | None = None,
        cpu_kernel: bool = True,
    ):
        super().__init__(
            width,
            n_heads,
            head_width=head_width,
            qkv="separate",
            qkv_bias=qkv_bias,
            out_bias=out_bias,
            backend=backend,
            dropout=dropout,
            scale=scale,
            cpu_kernel=cpu_kernel,
        )

    def project_memory(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (batch, heads, source length, head_width) of encoder states."""
        b, s, _ = states.shape
        k = self.k_proj(states).view(b, s, self.n_kv_heads, self.head_width).transpose(1, 2)
        v = self.v_proj(states).view(b, s, self.n_kv_heads, self.head_width).transpose(1, 2)
        return k, v

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, memory: EncoderMemory
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_width).transpose(1, 2)
        k, v = memory.keys_values(self)
        out = self.attend(q, k, v, memory.mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


@registry.layers.register("registry_xf.CrossAttention.v1")
def cross_attention(
    width: Width,
    n_heads: HeadCount,
    head_width: HeadWidth | None = None,
    qkv_bias: bool = True,
    out_bias: bool = True,
    backend: Backend = "sdpa",
    dropout: Probability = 0.0,
    scale: PositiveFloat | None = None,
    cpu_kernel: bool = True,
) -> nn.Module:
    """Cross-attention to an encoder's states (a decoder layer's ``cross_attention``);
    ``cpu_kernel = false`` turns registry_xf's CPU attention kernel off for this layer."""
    return CrossAttention(
        width,
        n_heads,
        head_width=head_width,
        qkv_bias=qkv_bias,
        out_bias=out_bias,
        backend=backend,
        dropout=dropout,
        scale=scale,
        cpu_kernel=cpu_kernel,
    )
