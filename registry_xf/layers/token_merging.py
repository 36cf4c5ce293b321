"""Token Merging (Bolya et al., 2023) for encoders: fewer tokens in the later layers.

After each chosen layer, up to ``r`` tokens of every sequence are merged into their most
similar neighbours by bipartite soft matching: the tokens are split alternately into sets
A and B, each A token finds the B token whose state is closest in cosine, and the ``r``
closest pairs are merged by an average weighted by how many original tokens each holds.
The following layers attend with proportional attention (the log of a key's size added to
its logits), so a merged token weighs as much as the tokens it stands for.

The first and last real token of each sequence (``[CLS]``/``[SEP]``, ``<s>``/``</s>``), every
token with the same id as either (a pair's middle separator), and padding are never merged.
Merging keeps the tokens in their order and records where each original token went, so the
encoder's outputs are unmerged: every token gets its group's state, in the original order.

Merging reorders nothing but shortens the sequence, which a causal decoder cannot allow
(a merged token would mix earlier and later positions): decoders refuse it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError, ConfigProblem
from ..registry import registry
from ..types import Fraction, PositionCount
from .attention_mask import AttentionMask


@dataclass
class MergeState:
    """Where one forward pass's tokens stand after the merges so far.

    ``source`` (batch, original length) is each original token's index in the current
    sequence; the rest are (batch, current length): ``sizes`` (original tokens per current
    token, 0 for columns that only pad a row that merged more than another), ``real`` (a
    token to attend to), ``protected`` (never merged: special tokens and padding) and
    ``positions`` (the original position of the token that received the merges).
    ``shared_bias`` is the unmerged pass's bias (T5's relative positions), if any, and
    ``shared_relative`` its relative rows (DeBERTa's), which merged tokens read at their
    ``positions``.
    """

    source: torch.Tensor
    sizes: torch.Tensor
    real: torch.Tensor
    protected: torch.Tensor
    positions: torch.Tensor
    shared_bias: torch.Tensor | None = None
    shared_relative: Any = None
    merged: bool = False


class TokenMerging:
    """Merge ``r`` tokens per sequence (or ``fraction`` of its real tokens) after each layer
    in ``layers`` (0-based; None: from the first third on, but the last), never below ``min_length``
    real tokens; a sequence shorter than that is left whole.

    A plain object, not a module: it holds no weights and sits beside a stack's layers.
    """

    def __init__(
        self,
        r: int = 0,
        fraction: float | None = None,
        layers: Sequence[int] | None = None,
        min_length: int = 0,
    ):
        self.r = r
        self.fraction = fraction
        self.layers = None if layers is None else tuple(sorted(set(layers)))
        self.min_length = min_length

    @property
    def enabled(self) -> bool:
        return bool(self.r) or bool(self.fraction)

    def merges_after(self, layer: int, n_layers: int) -> bool:
        """Whether the output of layer ``layer`` (0-based) of ``n_layers`` is merged; by
        default every layer from the first third on but the last (2, 3, 4 of 6)."""
        if self.layers is None:
            return n_layers // 3 <= layer < n_layers - 1
        return layer in self.layers

    def start(
        self, input_ids: torch.Tensor, mask: AttentionMask, positions: torch.Tensor | None
    ) -> MergeState:
        """The state before any merge: every token its own group."""
        b, n = input_ids.shape
        device = input_ids.device
        real = (
            torch.ones(b, n, dtype=torch.bool, device=device)
            if mask.key_mask is None
            else mask.key_mask.to(device=device, dtype=torch.bool)
        )
        if positions is None:
            positions = torch.arange(n, device=device)[None, :]
        return MergeState(
            source=torch.arange(n, device=device).expand(b, n),
            sizes=torch.ones(b, n, device=device),
            real=real,
            protected=~real | special_tokens(input_ids, real),
            positions=positions.to(device).expand(b, n),
            shared_bias=mask.bias,
            shared_relative=mask.relative,
        )

    def tokens_to_merge(self, state: MergeState) -> torch.Tensor:
        """(batch,) how many tokens each sequence should lose at the next merge."""
        return self._to_merge(state.real.sum(1))

    def merges_any(self, key_mask: torch.Tensor | None, seq: int) -> bool:
        """Whether a batch (its key mask, or ``seq`` tokens each without one) loses any
        token: a batch that does not (every text under ``min_length``) is better run as
        if merging were off, since merging keeps the batch padded. After a merge of none
        the next asks the same, so the first decides."""
        n_real = torch.tensor([seq]) if key_mask is None else key_mask.sum(1)
        return bool((self._to_merge(n_real) > 0).any())

    def _to_merge(self, n_real: torch.Tensor) -> torch.Tensor:
        wanted = (
            torch.floor(n_real * self.fraction).long()
            if self.fraction
            else torch.full_like(n_real, self.r)
        )
        room = (n_real - self.min_length).clamp(min=0)
        return torch.where(n_real >= self.min_length, torch.minimum(wanted, room), 0)

    def merge(
        self,
        x: torch.Tensor,
        state: MergeState,
        mask: AttentionMask,
        metric: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MergeState, AttentionMask]:
        """Merge ``x`` (batch, seq, width) once, matching tokens by ``metric`` (default: the
        states themselves); the new states, state and attention mask."""
        counts = self.tokens_to_merge(state)
        if x.shape[1] < 2 or not bool(counts.any()):
            return x, state, mask
        x, state = bipartite_merge(x, state, counts, metric)
        return x, state, merged_mask(state, mask)

    def unmerge(self, x: torch.Tensor, state: MergeState) -> torch.Tensor:
        """(batch, original length, width): every original token gets its group's state."""
        if not state.merged:
            return x
        return x.gather(1, state.source[..., None].expand(-1, -1, x.shape[-1]))

    def __repr__(self) -> str:
        amount = f"fraction={self.fraction}" if self.fraction else f"r={self.r}"
        return f"TokenMerging({amount}, layers={self.layers}, min_length={self.min_length})"


def special_tokens(input_ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(batch, seq) True for each row's first and last real token and every token with the
    same id as either (a pair's middle [SEP], RoBERTa's doubled </s>)."""
    n = input_ids.shape[1]
    has_real = real.any(1, keepdim=True)
    first = real.to(torch.int8).argmax(1, keepdim=True)
    last = n - 1 - real.flip(1).to(torch.int8).argmax(1, keepdim=True)
    ends = torch.cat([input_ids.gather(1, first), input_ids.gather(1, last)], 1)
    same = (input_ids[..., None] == ends[:, None, :]).any(-1)
    return same & real & has_real


def bipartite_merge(
    x: torch.Tensor, state: MergeState, counts: torch.Tensor, metric: torch.Tensor | None = None
) -> tuple[torch.Tensor, MergeState]:
    """Merge ``counts[i]`` tokens of row ``i`` by bipartite soft matching (at most the
    number of A tokens that have an unprotected B partner), keeping the order of the rest.

    Rows that merge fewer than the most are padded at the end with empty columns (size 0,
    not real, zero states), so the batch stays one tensor. The states move as whole rows
    of the flattened batch (``index_select``/``index_add_``: contiguous copies), and only
    the merged tokens are added to their partners.
    """
    b, n, width = x.shape
    device = x.device
    partner, merged_a, counts = _matches(x if metric is None else metric, state, counts)

    keep = torch.ones(b, n, dtype=torch.bool, device=device)
    keep[:, 0::2] = ~merged_a
    new_width = n - int(counts.min())
    # the kept tokens in order (a stable sort puts them first), and where each one lands
    kept = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :new_width]
    compact_index = keep.cumsum(1) - 1
    filled = torch.arange(new_width, device=device)[None, :] < (n - counts)[:, None]

    # sizes: each kept token's own plus those merged into it (a B token's partners)
    sizes = state.sizes
    a_sizes = sizes[:, 0::2] * merged_a
    totals = sizes.clone()
    totals[:, 1::2] = sizes[:, 1::2].scatter_add(1, partner, a_sizes)
    new_sizes = torch.where(filled, totals.gather(1, kept), 0.0)
    divisor = new_sizes.clamp(min=1e-6)

    # states: the kept rows scaled by their share of their group, then the merged rows
    # added to their partners with theirs (a share of 0 empties the padding columns)
    rows = (kept + n * torch.arange(b, device=device)[:, None]).view(-1)
    flat = x.reshape(b * n, width)
    new_x = flat.index_select(0, rows).view(b, new_width, width)
    own_share = torch.where(filled, sizes.gather(1, kept) / divisor, 0.0)
    new_x.mul_(own_share.to(x.dtype)[..., None])
    merging_row, merging_a = merged_a.nonzero(as_tuple=True)
    if merging_row.numel():
        into = compact_index[merging_row, 2 * partner[merging_row, merging_a] + 1]
        share = a_sizes[merging_row, merging_a] / divisor[merging_row, into]
        added = flat.index_select(0, merging_row * n + 2 * merging_a)
        new_x.view(-1, width).index_add_(
            0, merging_row * new_width + into, added * share.to(x.dtype)[:, None]
        )

    # each original token's new index: through its destination (itself, or its partner)
    destination = torch.arange(n, device=device).expand(b, n).clone()
    destination[:, 0::2] = torch.where(merged_a, 2 * partner + 1, destination[:, 0::2])
    source = compact_index.gather(1, destination.gather(1, state.source))
    return new_x, MergeState(
        source=source,
        sizes=new_sizes,
        real=state.real.gather(1, kept) & filled,
        protected=state.protected.gather(1, kept) | ~filled,
        positions=torch.where(filled, state.positions.gather(1, kept), 0),
        shared_bias=state.shared_bias,
        shared_relative=state.shared_relative,
        merged=True,
    )


def _matches(
    metric: torch.Tensor, state: MergeState, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bipartite soft matching: A (even positions) against B (odd ones). Each A token's
    closest B token by cosine (``partner``, (batch, A)), which A tokens merge (the
    ``counts`` closest pairs of each row, (batch, A)), and the counts possible.

    The cosine divides the (batch, A, B) dot products by the norms, rather than
    normalising every state first: the same ranking for less work."""
    norms = torch.linalg.vector_norm(metric, dim=-1).clamp_(min=1e-12)  # (batch, seq)
    scores = torch.bmm(metric[:, 0::2], metric[:, 1::2].transpose(1, 2))  # (batch, A, B)
    scores.div_(norms[:, None, 1::2]).masked_fill_(state.protected[:, None, 1::2], -math.inf)
    best, partner = scores.max(-1)  # each A token's closest B token
    best = best.div_(norms[:, 0::2]).masked_fill_(state.protected[:, 0::2], -math.inf)
    available = torch.isfinite(best)
    counts = torch.minimum(counts, available.sum(1))
    order = best.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=metric.device).expand_as(order)
    )
    return partner, (rank < counts[:, None]) & available, counts


def merged_mask(state: MergeState, before: AttentionMask) -> AttentionMask:
    """The attention mask for the merged tokens: their key mask, and proportional attention
    (log of each key's size added to its logits) beside any shared bias (T5's relative
    positions, looked up at the tokens' original positions), and DeBERTa's relative rows
    at the same positions."""
    log_sizes = state.sizes.clamp(min=1).log()[:, None, None, :]
    bias = log_sizes
    if state.shared_bias is not None:
        bias = bias + _gathered_bias(state.shared_bias, state.positions)
    relative = state.shared_relative
    if relative is not None:
        relative = relative.at(state.positions)
    return AttentionMask(state.real, causal=before.causal, bias=bias, relative=relative)


def _gathered_bias(bias: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(batch, heads, seq, seq) of a (1 or batch, heads, n, n) bias at ``positions``."""
    b, s = positions.shape
    full = bias.expand(b, -1, -1, -1)
    heads, n = full.shape[1], full.shape[-1]
    rows = full.gather(2, positions[:, None, :, None].expand(b, heads, s, n))
    return rows.gather(3, positions[:, None, None, :].expand(b, heads, s, s))


DEFAULT_FRACTION = 0.2
"""Share of a sequence's real tokens merged after each layer when neither ``r`` nor
``fraction`` is given; chosen from bench/bench_token_merging.py (docs/token-merging.md)."""
DEFAULT_MIN_LENGTH = 32
"""Real tokens below which a sequence is not merged (short texts lose the most)."""


@registry.layers.register("registry_xf.TokenMerging.v1")
def token_merging(
    r: int | None = None,
    fraction: Fraction | None = None,
    layers: list[int] | None = None,
    min_length: PositionCount = DEFAULT_MIN_LENGTH,
) -> TokenMerging:
    """Token Merging for an encoder's layer stack (its ``token_merging`` setting): merge ``r``
    tokens per sequence, or ``fraction`` of its real tokens (default 0.2), after each layer
    in ``layers`` (0-based; default from the first third on, but the last); sequences stay at least
    ``min_length`` real tokens long, and shorter ones are not merged. ``r = 0`` turns it off."""
    problems = []
    if r is not None and r < 0:
        problems.append(ConfigProblem("r", "expected 0 or more tokens per layer", r, True))
    if r is not None and fraction is not None:
        problems.append(
            ConfigProblem("fraction", f"give r ({r}) or fraction, not both", fraction, True)
        )
    if layers is not None and any(i < 0 for i in layers):
        problems.append(ConfigProblem("layers", "expected 0-based layer indices", layers, True))
    if problems:
        raise ConfigError(problems)
    if r is None and fraction is None:
        fraction = DEFAULT_FRACTION
    return TokenMerging(r=r or 0, fraction=fraction, layers=layers, min_length=min_length)


def check_layers(merging: TokenMerging | None, n_layers: int) -> None:
    """Refuse merging layers the stack does not have (ConfigError at ``token_merging``)."""
    if merging is None or merging.layers is None:
        return
    outside = [i for i in merging.layers if i >= n_layers]
    if outside:
        raise ConfigError(
            [
                ConfigProblem(
                    "token_merging.layers",
                    f"the stack has {n_layers} layers (0 to {n_layers - 1})",
                    outside,
                    True,
                )
            ]
        )
