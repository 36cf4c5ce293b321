"""DeBERTa's disentangled attention: content and relative position attend to each other.

Scores are ``(q·k + q·P_k[r] + k·P_q[-r]) / sqrt(head_width * n_terms)``: content to
content, content to position (c2p) and position to content (p2c), where ``r`` is the
log-bucketed distance of query and key and ``P`` the projected rows of a table of relative
embeddings. The table is one for the whole stack: ``RelativeEmbeddings`` (the encoder's
``relative_positions``) normalises it and works out the bucket of every (query, key) pair
once per forward pass; each layer's ``DisentangledSelfAttention`` projects it with its own
weights (its key and query projections, when ``share_att_key``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ConfigProblem, InputError
from ..registry import registry
from ..types import Eps, HeadCount, PositionCount, Probability, Width
from .attention import Backend, SelfAttention
from .attention_mask import AttentionMask

_INDEX_CACHE = 8  # sequence lengths whose bucket index a table keeps


@dataclass(frozen=True)
class RelativeRows:
    """What every layer of one pass shares: the table rows that some (query, key) pair
    uses (normalised), and for each pair the row it uses, (queries, keys), or (batch,
    queries, keys) once tokens are merged (``at``).

    ``shifted``: the row of (i, j) is ``i - j + n - 1`` for every pair (no distance is
    bucketed or clipped), so attention reads the terms as strided views, without a gather.
    """

    rows: torch.Tensor
    index: torch.Tensor
    shifted: bool = False

    def at(self, positions: torch.Tensor) -> RelativeRows:
        """The rows of tokens at ``positions`` (batch, seq), indices into this pass's
        sequence: after Token Merging each token keeps the original position of the token
        that received the merges, and its distances (and buckets) are those of the
        original sequence."""
        index = self.index[positions[:, :, None], positions[:, None, :]]
        return RelativeRows(self.rows, index, shifted=False)


def log_buckets(relative: torch.Tensor, n_buckets: int, max_distance: int) -> torch.Tensor:
    """DeBERTa's bucket of each signed distance: exact below ``n_buckets // 2``, then
    logarithmically wider up to ``max_distance`` (float32 arithmetic, as the reference)."""
    mid = n_buckets // 2
    sign = torch.sign(relative)
    near = (relative < mid) & (relative > -mid)
    distance = torch.where(near, torch.full_like(relative, mid - 1), relative.abs())
    base = torch.log(torch.tensor((max_distance - 1) / mid))
    far = torch.ceil(torch.log(distance / mid) / base * (mid - 1)) + mid
    return torch.where(distance <= mid, relative.to(far.dtype), far * sign).long()


class RelativeEmbeddings(nn.Module):
    """The table of relative position embeddings (``2 * span`` rows), optionally normed
    (a LayerNorm of its own, ``norm_rel_ebd`` in HF's config).

    ``span`` is ``n_buckets`` with log buckets, else ``max_distance``; distances beyond
    it share the table's first or last row.
    """

    def __init__(
        self,
        width: int,
        max_distance: int,
        n_buckets: int | None = None,
        norm: bool = False,
        eps: float = 1e-7,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.max_distance = max_distance
        self.n_buckets = n_buckets
        self.span = n_buckets or max_distance
        self.weight = nn.Parameter(torch.empty(2 * self.span, width))
        self.norm = nn.LayerNorm(width, eps=eps) if norm else None
        self.dropout = nn.Dropout(dropout)
        self._indices: dict[tuple[int, int, torch.device], tuple[int, int, torch.Tensor, bool]] = {}

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)

    def table_index(self, n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
        """The table row of every (query, key) pair, (queries, keys)."""
        relative = (
            torch.arange(n_queries, device=device)[:, None]
            - torch.arange(n_keys, device=device)[None, :]
        )
        if self.n_buckets:
            relative = log_buckets(relative, self.n_buckets, self.max_distance)
        return (relative + self.span).clamp(0, 2 * self.span - 1)

    def _used(self, n_queries: int, n_keys: int, device: torch.device):  # type: ignore[no-untyped-def]
        """(first row, end row, index from the first row): short sequences use a band of
        the table only, and projecting just that band saves most of the work."""
        key = (n_queries, n_keys, device)
        if key not in self._indices:
            index = self.table_index(n_queries, n_keys, device)
            low, high = int(index.min()), int(index.max()) + 1
            index = (index - low).contiguous()
            n = n_keys
            shifted = n_queries == n and high - low == 2 * n - 1
            if shifted:
                steps = torch.arange(n, device=device)
                shifted = torch.equal(index, steps[:, None] - steps[None, :] + n - 1)
            if len(self._indices) >= _INDEX_CACHE:
                self._indices.pop(next(iter(self._indices)))
            self._indices[key] = (low, high, index, shifted)
        return self._indices[key]

    def forward(self, n_queries: int, n_keys: int) -> RelativeRows:
        low, high, index, shifted = self._used(n_queries, n_keys, self.weight.device)
        rows = self.weight[low:high]
        if self.norm is not None:
            rows = self.norm(rows)  # a row-wise norm: the band of the normed table
        return RelativeRows(self.dropout(rows), index, shifted)


class DisentangledSelfAttention(SelfAttention):
    """Self-attention with DeBERTa's content-to-position and position-to-content terms.

    ``terms`` lists "c2p" and/or "p2c". With ``share_att_key`` the relative rows are
    projected by the layer's own key (c2p) and query (p2c) projections; otherwise by
    ``pos_key_proj`` and ``pos_query_proj`` of their own. The relative rows come from the
    encoder's ``RelativeEmbeddings`` through the attention mask (``mask.relative``).
    """

    selects_queries = False  # its forward computes every query (no query_index)
    adds_residual = False  # nor adds the layer's residual inside its projection

    def __init__(
        self,
        width: int,
        n_heads: int,
        *,
        terms: tuple[str, ...] = ("c2p", "p2c"),
        share_att_key: bool = True,
        qkv: Literal["fused", "separate"] = "fused",
        backend: Backend = "sdpa",
        dropout: float = 0.0,
    ):
        if width % n_heads:
            raise ValueError(f"width {width} is not divisible by n_heads {n_heads}")
        head_width = width // n_heads
        scale = 1.0 / math.sqrt(head_width * (1 + len(terms)))
        super().__init__(width, n_heads, qkv=qkv, backend=backend, dropout=dropout, scale=scale)
        self.c2p, self.p2c = "c2p" in terms, "p2c" in terms
        self.share_att_key = share_att_key
        if not share_att_key:
            if self.c2p:
                self.pos_key_proj = nn.Linear(width, width)
            if self.p2c:
                self.pos_query_proj = nn.Linear(width, width)

    def _positions_projected(
        self, rows: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Position keys (c2p) and queries (p2c), each (heads, rows, head_width)."""
        if self.share_att_key and self.fused:
            pos_q, pos_k, _ = self.qkv_proj(rows).split(self.split, dim=-1)
        elif self.share_att_key:
            pos_q = self.q_proj(rows) if self.p2c else None
            pos_k = self.k_proj(rows) if self.c2p else None
        else:
            pos_q = self.pos_query_proj(rows) if self.p2c else None
            pos_k = self.pos_key_proj(rows) if self.c2p else None
        n = rows.shape[0]

        def heads(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            # scaled here, on a few rows, rather than on every score
            return t.view(n, self.n_heads, self.head_width).transpose(0, 1) * self.scale

        return (heads(pos_q) if self.p2c else None), (heads(pos_k) if self.c2p else None)

    def position_scores(
        self, q: torch.Tensor, k: torch.Tensor, relative: RelativeRows
    ) -> torch.Tensor | None:
        """The c2p and p2c terms, scaled, (batch, heads, queries, keys), a new tensor."""
        pos_q, pos_k = self._positions_projected(relative.rows)
        terms = []
        if pos_k is not None:  # content to position: query i with the row of (i, j)
            terms.append(self._by_pair(q, pos_k, relative, keys_first=False))
        if pos_q is not None:  # position to content: key j with the row of (i, j)
            terms.append(self._by_pair(k, pos_q, relative, keys_first=True))
        if not terms:
            return None
        return terms[0] + terms[1] if len(terms) == 2 else terms[0].contiguous()

    @staticmethod
    def _by_pair(
        x: torch.Tensor, pos: torch.Tensor, relative: RelativeRows, keys_first: bool
    ) -> torch.Tensor:
        """``x`` (batch, heads, seq, head_width) times each pair's row of ``pos`` (heads,
        rows, head_width): ``out[i, j] = x[i] · pos[row(i, j)]``, or with ``keys_first``
        ``x[j] · pos[row(i, j)]``; (batch, heads, queries, keys), possibly a view."""
        b, h, n, d = x.shape
        if relative.shifted and not keys_first:
            pos = pos.flip(1)  # the view below then runs forward along the keys
        # (heads, batch * seq, rows): the projection's output read as it lies, no copy
        full = torch.matmul(x.transpose(0, 1).reshape(h, b * n, d), pos.transpose(-1, -2))
        r = full.shape[-1]
        if relative.shifted:
            # row(i, j) = i - j + n - 1: a product's position in ``full`` is linear in
            # i and j, so the pairs are a strided view of it
            strides = (1, r - 1) if keys_first else (r - 1, 1)
            return full.as_strided(
                (b, h, n, n), (n * r, b * n * r, *strides), full.storage_offset() + n - 1
            )
        by_row = full.view(h, b, n, r).transpose(0, 1)
        index = relative.index.transpose(-1, -2) if keys_first else relative.index
        if index.dim() == 3:  # one index per sequence (merged tokens)
            index = index[:, None]
        out = by_row.gather(-1, index.expand(b, h, n, index.shape[-1]))
        return out.transpose(-1, -2) if keys_first else out

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        mask: AttentionMask,
        positions: torch.Tensor | None = None,
        cache: object = None,
    ) -> torch.Tensor:
        relative = mask.relative
        if not isinstance(relative, RelativeRows):
            raise InputError(
                "DisentangledSelfAttention needs the encoder's relative_positions "
                "(registry_xf.RelativeEmbeddings.v1); the config gives the encoder none"
            )
        if cache is not None:
            raise InputError("DisentangledSelfAttention is an encoder's: it keeps no cache")
        q, k, v = self.project(x)
        bias = self.position_scores(q, k, relative)  # a new tensor: may be changed in place
        if mask.bias is not None:  # Token Merging's proportional attention
            shared = mask.bias.to(q.dtype)
            bias = shared.clone() if bias is None else bias.add_(shared)
        n_q, n_k = q.shape[2], k.shape[2]
        allowed, dead, _ = mask.for_attention(n_q, n_k, q.device)
        if bias is not None and allowed is not None:
            bias = bias.masked_fill_(~allowed, float("-inf"))
        elif bias is None:
            bias = allowed
        dropout = self.dropout_p if self.training else 0.0
        if self.backend == "sdpa":
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=dropout, scale=self.scale
            )
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
            if bias is not None and bias.dtype == torch.bool:
                scores = scores.masked_fill(~bias, float("-inf"))
            elif bias is not None:
                scores = scores + bias
            probs = F.dropout(torch.softmax(scores, dim=-1), dropout, training=dropout > 0)
            out = torch.matmul(probs, v)
        if dead is not None:
            out = out.masked_fill(dead, 0.0)
        b, _, s, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


@registry.layers.register("registry_xf.RelativeEmbeddings.v1")
def relative_embeddings(
    width: Width,
    max_distance: PositionCount,
    n_buckets: PositionCount | None = None,
    norm: bool = False,
    eps: Eps = 1e-7,
    dropout: Probability = 0.0,
) -> nn.Module:
    """DeBERTa's shared table of relative position embeddings, for the encoder's
    ``relative_positions``; ``n_buckets`` gives log buckets up to ``max_distance``; ``norm``
    puts a LayerNorm (``eps``) on the table."""
    if n_buckets is not None and (n_buckets < 4 or max_distance <= n_buckets // 2 + 1):
        # mid = n_buckets // 2 exact buckets; the logarithm's base is (max_distance - 1) / mid
        problem = (
            ConfigProblem("n_buckets", "at least 4 buckets are needed", n_buckets, True)
            if n_buckets < 4
            else ConfigProblem(
                "max_distance",
                f"must exceed half the buckets plus one ({n_buckets // 2 + 1})",
                max_distance,
                True,
            )
        )
        raise ConfigError([problem])
    return RelativeEmbeddings(width, max_distance, n_buckets, norm, eps, dropout)


@registry.layers.register("registry_xf.DisentangledSelfAttention.v1")
def disentangled_self_attention(
    width: Width,
    n_heads: HeadCount,
    terms: list[str] = ["c2p", "p2c"],  # noqa: B006 (never mutated)
    share_att_key: bool = True,
    qkv: Literal["fused", "separate"] = "fused",
    backend: Backend = "sdpa",
    dropout: Probability = 0.0,
) -> nn.Module:
    """DeBERTa-v2/v3 attention: content-to-content plus the relative ``terms`` ("c2p",
    "p2c"); ``share_att_key`` projects positions with the layer's own key and query."""
    problems = []
    unknown = [t for t in terms if t not in ("c2p", "p2c")]
    if unknown or len(set(terms)) != len(terms):
        problems.append(
            ConfigProblem("terms", 'expected distinct "c2p" and "p2c"', list(terms), True)
        )
    if width % n_heads:
        problems.append(
            ConfigProblem("n_heads", f"does not divide the width {width}", n_heads, True)
        )
    if problems:
        raise ConfigError(problems)
    return DisentangledSelfAttention(
        width,
        n_heads,
        terms=tuple(terms),
        share_att_key=share_att_key,
        qkv=qkv,
        backend=backend,
        dropout=dropout,
    )
