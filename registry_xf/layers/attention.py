"""Multi-head self-attention: MHA, GQA and MQA; fused or separate projections."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ConfigProblem
from ..registry import registry
from ..types import HeadCount, HeadWidth, PositionCount, PositiveFloat, Probability, Width
from .attention_mask import AttentionMask
from .cpu_attention import HEAD_WIDTHS, cpu_attention, cpu_attention_packed, packed_ready
from .kv_cache import LayerCache
from .linear_rows import split_rows
from .packed_linear import linear_plus
from .positions import ALiBi, RotaryEmbeddings
from .unpadding import Unpadded

Backend = Literal["sdpa", "eager"]


class SelfAttention(nn.Module):
    """Self-attention with ``n_heads`` query heads sharing ``n_kv_heads`` key/value heads.

    ``qkv="fused"`` computes queries, keys and values with one matrix (rows in that
    order), which is faster; ``"separate"`` keeps three. ``backend="sdpa"`` uses PyTorch's
    fused kernels; ``"eager"`` spells the computation out, as a reference.
    ``cpu_kernel=False`` keeps registry_xf's CPU attention kernel (``cpu_attention``) out
    of this layer: torch's kernel always, as ``REGISTRY_XF_CPU_ATTENTION=0`` does for a
    whole process.

    ``query_index`` (positions) computes the output at those positions only, from keys and
    values of every position: a last layer whose head reads one token needs no more.
    ``residual`` is added to the output (inside the output projection where it can), and
    ``norm`` then normalises the sum (a post-norm layer's norm; the bfloat16 kernel applies
    a LayerNorm inside the projection too).
    """

    selects_queries = True  # forward takes query_index
    adds_residual = True  # forward takes residual and norm

    def __init__(
        self,
        width: int,
        n_heads: int,
        *,
        n_kv_heads: int | None = None,
        head_width: int | None = None,
        qkv: Literal["fused", "separate"] = "fused",
        qkv_bias: bool = True,
        out_bias: bool = True,
        backend: Backend = "sdpa",
        dropout: float = 0.0,
        scale: float | None = None,
        rotary: RotaryEmbeddings | None = None,
        alibi: ALiBi | None = None,
        window: int | None = None,
        cpu_kernel: bool = True,
    ):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if head_width is None:
            if width % n_heads:
                raise ValueError(f"width {width} is not divisible by n_heads {n_heads}")
            head_width = width // n_heads
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_width = n_heads, n_kv_heads, head_width
        self.backend = backend
        self.cpu_kernel = cpu_kernel
        self.dropout_p = dropout
        self.scale = scale if scale is not None else head_width**-0.5
        q_width, kv_width = n_heads * head_width, n_kv_heads * head_width
        self.split = (q_width, kv_width, kv_width)
        if qkv == "fused":
            self.qkv_proj = nn.Linear(width, q_width + 2 * kv_width, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(width, q_width, bias=qkv_bias)
            self.k_proj = nn.Linear(width, kv_width, bias=qkv_bias)
            self.v_proj = nn.Linear(width, kv_width, bias=qkv_bias)
        self.fused = qkv == "fused"
        self.o_proj = nn.Linear(q_width, width, bias=out_bias)
        self.rotary = rotary
        self.alibi = alibi
        self.window = window

    def separate_projections(self) -> None:
        """Switch a fused layout to separate ``q_proj``, ``k_proj`` and ``v_proj``, whose
        weights are row blocks (views) of the fused matrix: the same results, no copy.
        The loader does this where fusing would copy a big checkpoint's matrices."""
        if not self.fused:
            return
        q, k, v = split_rows(self.qkv_proj, self.split)
        del self.qkv_proj
        self.q_proj, self.k_proj, self.v_proj = q, k, v
        self.fused = False

    def project(
        self, x: torch.Tensor, unpadded: Unpadded | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values as (batch, heads, seq, head_width); from packed tokens
        ``x`` (1, tokens, width) with ``unpadded``, put back in the padded layout."""
        if self.fused:
            q, k, v = self._projected(x, unpadded).split(self.split, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            if unpadded is not None:
                q, k, v = unpadded.unpack(q), unpadded.unpack(k), unpadded.unpack(v)
        b, s, _ = q.shape
        q = q.view(b, s, self.n_heads, self.head_width).transpose(1, 2)
        k = k.view(b, s, self.n_kv_heads, self.head_width).transpose(1, 2)
        v = v.view(b, s, self.n_kv_heads, self.head_width).transpose(1, 2)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        mask: AttentionMask,
        positions: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        query_index: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        norm: nn.Module | None = None,
    ) -> torch.Tensor:
        out = None
        if mask.unpadded is not None and self._packs(x, mask, cache, query_index):
            out = self._attend_packed(x, mask.unpadded)
        if out is None:
            out = self._attend_padded(x, mask, positions, cache, query_index)
        if residual is not None:  # added inside the projection where its weight is packed
            return linear_plus(self.o_proj, out, residual, norm)
        out = self.o_proj(out)
        return out if norm is None else norm(out)

    def _attend_padded(
        self,
        x: torch.Tensor,
        mask: AttentionMask,
        positions: torch.Tensor | None,
        cache: LayerCache | None,
        query_index: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention's heads, merged (before the output projection), in ``x``'s layout."""
        if self.rotary is not None and self.fused:
            q, k, v = self._project_rotated(x, mask, positions)
        else:
            q, k, v = self.project(x, mask.unpadded)
            if self.rotary is not None:
                cos, sin = self._cos_sin(q.shape[2], q, mask, positions)
                q, k = self.rotary.rotate(q, cos, sin), self.rotary.rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)
        out = self.attend(q, k, v, mask, query_index)
        b, _, s, _ = out.shape
        out = out.transpose(1, 2).reshape(b, s, -1)
        if mask.unpadded is not None:
            out = mask.unpadded.pack(out)
        return out

    def _packs(
        self,
        x: torch.Tensor,
        mask: AttentionMask,
        cache: LayerCache | None,
        query_index: torch.Tensor | None,
    ) -> bool:
        """Whether attention of packed tokens may run on them as they are (the CPU kernel's
        packed entry): plain padding-masked attention, inference, a kernel for the dtype."""
        plain = (
            self.rotary is None
            and self.alibi is None
            and self.window is None
            and mask.bias is None
            and not mask.causal
            and cache is None
            and query_index is None
            and self.backend == "sdpa"
            and self.cpu_kernel
            and self.head_width in HEAD_WIDTHS
        )
        if not plain or (self.training and self.dropout_p) or torch.is_grad_enabled():
            return False
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        return packed_ready(x.device, dtype)

    def _attend_packed(self, x: torch.Tensor, unpadded: Unpadded) -> torch.Tensor | None:
        """Attention of packed tokens (1, tokens, width) read straight from the projection's
        rows, each sequence attending to its own: no padding copies. None if the kernel
        declines."""
        n, d = x.shape[1], self.head_width
        if self.fused:
            q, k, v = self.qkv_proj(x)[0].split(self.split, dim=-1)
        else:
            q, k, v = self.q_proj(x)[0], self.k_proj(x)[0], self.v_proj(x)[0]
        q = q.view(n, self.n_heads, d)
        k, v = k.view(n, self.n_kv_heads, d), v.view(n, self.n_kv_heads, d)
        out = cpu_attention_packed(q, k, v, unpadded.offsets, self.scale)
        return None if out is None else out.view(1, n, self.n_heads * d)

    def _projected(self, x: torch.Tensor, unpadded: Unpadded | None) -> torch.Tensor:
        """The fused projection (batch, seq, q + k + v widths), padded again if packed."""
        qkv = self.qkv_proj(x)
        return qkv if unpadded is None else unpadded.unpack(qkv)

    def _cos_sin(
        self,
        seq: int,
        x: torch.Tensor,
        mask: AttentionMask,
        positions: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables for ``seq`` positions in ``x``'s dtype: the same for every
        layer with the same rotary settings."""
        if positions is None:
            positions = torch.arange(seq, device=x.device)[None, :]
        rotary = self.rotary
        assert rotary is not None
        return mask.memo(
            ("rotary", rotary.signature, x.dtype), lambda: rotary.cos_sin(positions, x.dtype)
        )

    def _project_rotated(
        self, x: torch.Tensor, mask: AttentionMask, positions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused projection, with queries and keys rotated together: they sit side by side
        in the fused output, so one rotation covers both (half the kernel calls)."""
        qkv = self._projected(x, mask.unpadded)
        b, s, _ = qkv.shape
        q_width, kv_width, _ = self.split
        qk, v = qkv.split((q_width + kv_width, kv_width), dim=-1)
        qk = qk.view(b, s, self.n_heads + self.n_kv_heads, self.head_width).transpose(1, 2)
        cos, sin = self._cos_sin(s, qkv, mask, positions)
        qk = self.rotary.rotate(qk, cos, sin)  # type: ignore[union-attr]
        q, k = qk.split((self.n_heads, self.n_kv_heads), dim=1)
        v = v.view(b, s, self.n_kv_heads, self.head_width).transpose(1, 2)
        return q, k, v

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: AttentionMask,
        query_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        n_q, n_k = q.shape[2], k.shape[2]
        allowed, dead, is_causal = mask.for_attention(n_q, n_k, q.device, self.window)
        if is_causal and (
            self.alibi is not None
            or mask.bias is not None
            or self.backend == "eager"
            or query_index is not None
        ):
            allowed, is_causal = mask.bool_mask(n_q, n_k, q.device, self.window), False
        bias = None
        if self.alibi is not None:
            bias = self.alibi(n_q, n_k, mask.query_positions)
        if mask.bias is not None:
            bias = mask.bias if bias is None else bias + mask.bias
        if bias is not None:
            if allowed is not None:
                bias = bias.masked_fill(~allowed, float("-inf"))
            bias = bias.to(q.dtype)
        if query_index is not None:  # the selected queries' rows of everything per query
            q, allowed, dead, bias = (_rows(t, query_index) for t in (q, allowed, dead, bias))
        dropout = self.dropout_p if self.training else 0.0
        if n_q == 1 and bias is None and not dropout and torch.compiler.is_compiling():
            # One query (a decoding step): a few dot products, which the compiler fuses
            # into the kernels around them; the fused attention kernel would be a call
            # of its own in every layer.
            out = self._one_query(q, k, v, allowed)
        elif self.backend == "sdpa":
            # An encoder's padding-masked attention on an AVX-512 CPU: the compiled kernel
            # of cpu_attention, where it applies (else None, and torch's kernel runs)
            out = None
            if bias is None and not is_causal and not dropout and self.cpu_kernel:
                out = cpu_attention(q, k, v, allowed, self.scale)
            if out is None:
                out = F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=bias if bias is not None else allowed,
                    dropout_p=dropout,
                    is_causal=is_causal,
                    scale=self.scale,
                    enable_gqa=self.n_kv_heads != self.n_heads,
                )
        else:
            out = self._eager(q, k, v, allowed, bias, dropout)
        if dead is not None:
            out = out.masked_fill(dead, 0.0)
        return out

    def _one_query(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention of a single query per sequence, query heads grouped by key head.

        Written as products and sums, not matrix products: the compiler turns these into
        loops fused with their neighbours, where a matrix product stays a library call."""
        b, h, _, d = q.shape
        grouped = q.view(b, self.n_kv_heads, h // self.n_kv_heads, 1, d)
        scores = (grouped * k[:, :, None]).sum(-1) * self.scale  # (b, kv, group, keys)
        if allowed is not None:  # (batch or 1, 1, 1, keys): broadcasts over the groups
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = (probs[..., None] * v[:, :, None]).sum(-2)  # (b, kv, group, head_width)
        return out.reshape(b, h, 1, d)

    def _eager(self, q, k, v, allowed, bias, dropout):  # type: ignore[no-untyped-def]
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if bias is not None:
            scores = scores + bias
        elif allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        probs = F.dropout(probs, dropout, training=dropout > 0)
        return torch.matmul(probs, v)


def _rows(t: torch.Tensor | None, query_index: torch.Tensor) -> torch.Tensor | None:
    """The rows of ``query_index`` of a per-query tensor (queries on dim -2); one shared
    by every query (a padding mask) stays as it is."""
    return t if t is None or t.shape[-2] == 1 else t.index_select(-2, query_index)


@registry.layers.register("registry_xf.SelfAttention.v1")
def self_attention(
    width: Width,
    n_heads: HeadCount,
    n_kv_heads: HeadCount | None = None,
    head_width: HeadWidth | None = None,
    qkv: Literal["fused", "separate"] = "fused",
    qkv_bias: bool = True,
    out_bias: bool = True,
    backend: Backend = "sdpa",
    dropout: Probability = 0.0,
    scale: PositiveFloat | None = None,
    rotary: RotaryEmbeddings | None = None,
    alibi: ALiBi | None = None,
    window: PositionCount | None = None,
    cpu_kernel: bool = True,
) -> nn.Module:
    """Self-attention (MHA; GQA/MQA with ``n_kv_heads``), optional rotary or ALiBi positions.

    ``window`` limits each query to the ``window`` most recent keys (Mistral's sliding window).
    ``cpu_kernel = false`` turns registry_xf's CPU attention kernel off for this layer.
    """
    own_head_width = head_width or (width // n_heads if width % n_heads == 0 else None)
    problems = []
    if rotary is not None and own_head_width and rotary.head_width != own_head_width:
        problems.append(
            ConfigProblem(
                "rotary.head_width",
                f"differs from the attention's head width {own_head_width}",
                rotary.head_width,
                True,
            )
        )
    if alibi is not None and alibi.n_heads != n_heads:
        problems.append(
            ConfigProblem("alibi.n_heads", f"differs from n_heads {n_heads}", alibi.n_heads, True)
        )
    if problems:
        raise ConfigError(problems)
    return SelfAttention(
        width,
        n_heads,
        n_kv_heads=n_kv_heads,
        head_width=head_width,
        qkv=qkv,
        qkv_bias=qkv_bias,
        out_bias=out_bias,
        backend=backend,
        dropout=dropout,
        scale=scale,
        rotary=rotary,
        alibi=alibi,
        window=window,
        cpu_kernel=cpu_kernel,
    )
