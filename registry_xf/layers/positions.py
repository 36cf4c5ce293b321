"""Position information: learned or sinusoidal embeddings, rotary embeddings, ALiBi."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from ..errors import ConfigError, ConfigProblem
from ..registry import registry
from ..types import Fraction, HeadCount, HeadWidth, PositionCount, PositionIndex, RopeBase, Width
from .attention_mask import query_slots
from .rope_scaling import RopeScaling, check_scaling, scaled_inv_freq

SinusoidalLayout = Literal["interleaved", "halves"]


def padding_offset_positions(input_ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """RoBERTa's positions: real tokens count from ``padding_idx + 1``, padding stays put."""
    real = (input_ids != padding_idx).int()
    return (torch.cumsum(real, dim=1) * real + padding_idx).long()


class LearnedPositions(nn.Module):
    """A learned embedding per position (BERT). With ``padding_idx``, positions are counted
    from ``padding_idx + 1`` over non-padding tokens, as RoBERTa does. ``offset`` rows come
    before the first position's (BART's table starts at row 2)."""

    def __init__(
        self, max_positions: int, width: int, padding_idx: int | None = None, offset: int = 0
    ):
        super().__init__()
        self.max_positions = max_positions
        self.padding_idx = padding_idx
        self.offset = offset
        self.weight = nn.Parameter(torch.empty(max_positions + offset, width))

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)

    def positions_for(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.padding_idx is not None:
            return padding_offset_positions(input_ids, self.padding_idx)
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]

    @property
    def usable_positions(self) -> int:
        return self.max_positions - (self.padding_idx + 1 if self.padding_idx is not None else 0)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        if positions is None:
            positions = self.positions_for(input_ids)
        if self.offset:
            positions = positions + self.offset
        return nn.functional.embedding(positions, self.weight)


class SinusoidalPositions(nn.Module):
    """Fixed sine/cosine position embeddings (computed on the target device, never stored).

    ``layout="interleaved"`` alternates sines and cosines; ``"halves"`` puts the sines in
    the first half of the vector and the cosines in the second (Marian's layout).
    """

    def __init__(self, max_positions: int, width: int, layout: SinusoidalLayout = "interleaved"):
        super().__init__()
        self.max_positions = max_positions
        self.usable_positions = max_positions
        self.width = width
        self.layout = layout
        self.register_buffer("table", torch.empty(max_positions, width), persistent=False)
        if self.table.device.type != "meta":
            self.init_buffers(self.table.device)

    def init_buffers(self, device: torch.device) -> None:
        pos = torch.arange(self.max_positions, dtype=torch.float32, device=device)[:, None]
        div = torch.exp(
            torch.arange(0, self.width, 2, dtype=torch.float32, device=device)
            * (-math.log(10000.0) / self.width)
        )
        table = torch.zeros(self.max_positions, self.width, device=device)
        if self.layout == "halves":
            sines = (self.width + 1) // 2
            table[:, :sines] = torch.sin(pos * div)
            table[:, sines:] = torch.cos(pos * div)[:, : self.width // 2]
        else:
            table[:, 0::2] = torch.sin(pos * div)
            table[:, 1::2] = torch.cos(pos * div)[:, : self.width // 2]
        self.table = table

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        return self.table[positions]


class RotaryEmbeddings(nn.Module):
    """Rotary position embeddings on the first ``fraction`` of each head's width.

    The frequency table is a non-persistent buffer, computed in float32 on the target
    device. ``scaling`` stretches it for long contexts (see ``rope_scaling``).
    """

    def __init__(
        self,
        head_width: int,
        fraction: float = 1.0,
        base: float = 10000.0,
        scaling: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        rotary_width = int(head_width * fraction)
        if rotary_width % 2:
            raise ValueError(f"rotary width {rotary_width} (head_width × fraction) must be even")
        self.head_width = head_width
        self.rotary_width = rotary_width
        self.base = base
        self.scaling = check_scaling(scaling)
        self.attention_factor = 1.0
        self.register_buffer("inv_freq", torch.empty(rotary_width // 2), persistent=False)
        if self.inv_freq.device.type != "meta":
            self.init_buffers(self.inv_freq.device)

    def _base_inv_freq(self, device: torch.device) -> torch.Tensor:
        steps = torch.arange(0, self.rotary_width, 2, dtype=torch.float32, device=device)
        return 1.0 / (self.base ** (steps / self.rotary_width))

    def init_buffers(self, device: torch.device) -> None:
        inv_freq = self._base_inv_freq(device)
        if self.scaling is not None and self.scaling["type"] != "dynamic":
            inv_freq, self.attention_factor = scaled_inv_freq(
                inv_freq, self.base, self.rotary_width, self.scaling, None
            )
        self.inv_freq = inv_freq

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape (batch, 1, seq, rotary_width) for ``positions`` (batch, seq)."""
        inv_freq = self.inv_freq
        if self.scaling is not None and self.scaling["type"] == "dynamic":
            seq_len = int(positions.max()) + 1
            inv_freq, _ = scaled_inv_freq(
                inv_freq, self.base, self.rotary_width, self.scaling, seq_len
            )
        freqs = positions[..., None].float() * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos, sin = angles.cos(), angles.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)

    @property
    def signature(self) -> tuple:
        """What the tables depend on: equal signatures give equal cos/sin."""
        scaling = tuple(sorted(self.scaling.items())) if self.scaling else None
        return (self.rotary_width, self.base, scaling)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (batch, heads, seq, head_width) by precomputed ``cos_sin``."""
        return _rotate(x, cos, sin, self.rotary_width)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate queries and keys (batch, heads, seq, head_width) by their positions."""
        cos, sin = self.cos_sin(positions, q.dtype)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, width: int) -> torch.Tensor:
    rot, rest = x[..., :width], x[..., width:]
    half = width // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * sin
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """The per-head slopes of ALiBi (geometric, with interleaved extras when not a power of 2)."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest < n_heads:
        extra = 2.0 ** (-4.0 / closest)
        slopes += [extra ** (2 * i + 1) for i in range(n_heads - closest)]
    return torch.tensor(slopes, dtype=torch.float32)


class ALiBi(nn.Module):
    """Attention with linear biases: each head penalises distance with its own slope."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.register_buffer("slopes", torch.empty(n_heads), persistent=False)
        if self.slopes.device.type != "meta":
            self.init_buffers(self.slopes.device)

    def init_buffers(self, device: torch.device) -> None:
        self.slopes = alibi_slopes(self.n_heads).to(device)

    def forward(
        self, n_queries: int, n_keys: int, query_positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The additive bias (1, heads, queries, keys) in float32; the queries are the last
        keys, or sit at ``query_positions`` among them."""
        device = self.slopes.device
        q_pos = query_slots(n_queries, n_keys, device, query_positions)
        k_pos = torch.arange(n_keys, device=device)[None, :]
        distance = (q_pos - k_pos).abs().float()
        return (-self.slopes[:, None, None] * distance)[None]


@registry.layers.register("registry_xf.LearnedPositions.v1")
def learned_positions(
    max_positions: PositionCount,
    width: Width,
    padding_idx: PositionIndex | None = None,
    offset: PositionIndex = 0,
) -> nn.Module:
    """Learned absolute positions; ``padding_idx`` gives RoBERTa's padding-offset positions;
    ``offset`` rows precede the first position's (BART: 2)."""
    if padding_idx is not None and padding_idx >= max_positions - 1:
        # positions count from padding_idx + 1: none would be left for the tokens
        raise ConfigError(
            [
                ConfigProblem(
                    "padding_idx",
                    f"leaves no usable position below max_positions {max_positions}",
                    padding_idx,
                    True,
                )
            ]
        )
    return LearnedPositions(max_positions, width, padding_idx, offset)


@registry.layers.register("registry_xf.SinusoidalPositions.v1")
def sinusoidal_positions(
    max_positions: PositionCount, width: Width, layout: SinusoidalLayout = "interleaved"
) -> nn.Module:
    """Fixed sinusoidal positions (Transformer, 2017); ``layout="halves"``: sines, then
    cosines (Marian)."""
    return SinusoidalPositions(max_positions, width, layout)


@registry.layers.register("registry_xf.RotaryEmbeddings.v1")
def rotary_embeddings(
    head_width: HeadWidth,
    fraction: Fraction = 1.0,
    base: RopeBase = 10000.0,
    scaling: RopeScaling | None = None,
) -> nn.Module:
    """Rotary embeddings over ``fraction`` of each head (GPT-NeoX uses 0.25), base ``theta``.

    ``scaling``: None, or ``{"type": "linear" | "dynamic" | "llama3" | "yarn", "factor": ...}``
    with the scheme's settings (``original_max_positions``, ``low_freq_factor``, ...).
    """
    rotary_width = int(head_width * fraction)
    needed = 4 if scaling is not None and scaling.get("type") == "dynamic" else 2
    if rotary_width < needed:
        # dynamic scaling divides by (rotary width - 2)
        raise ConfigError(
            [
                ConfigProblem(
                    "fraction",
                    f"rotates {rotary_width} of the head's {head_width} dimensions; at least "
                    f"{needed} are needed" + (" with dynamic scaling" if needed == 4 else ""),
                    fraction,
                    True,
                )
            ]
        )
    return RotaryEmbeddings(head_width, fraction, base, scaling)


@registry.layers.register("registry_xf.ALiBi.v1")
def alibi(n_heads: HeadCount) -> nn.Module:
    """ALiBi attention biases (one slope per head)."""
    return ALiBi(n_heads)
