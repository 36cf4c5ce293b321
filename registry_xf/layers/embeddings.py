"""Token embeddings with optional token types, positions, norm and projection."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, ConfigProblem, InputError
from ..registry import registry
from ..types import PositiveFloat, Probability, TypeVocabSize, VocabSize, Width
from .tracing import values_readable


class TransformerEmbeddings(nn.Module):
    """``norm(tokens + types + positions) * scale``, then an optional projection.

    The projection serves models whose embedding width is smaller than the hidden width
    (ALBERT, ELECTRA).
    """

    def __init__(
        self,
        vocab_size: int,
        width: int,
        *,
        type_vocab_size: int = 0,
        positions: nn.Module | None = None,
        norm: nn.Module | None = None,
        projection_width: int | None = None,
        scale: float | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.word_embeddings = nn.Embedding(vocab_size, width)
        self.token_type_embeddings = (
            nn.Embedding(type_vocab_size, width) if type_vocab_size else None
        )
        self.positions = positions
        self.norm = norm
        self.scale = scale
        self.dropout = nn.Dropout(dropout)
        self.projection = nn.Linear(width, projection_width) if projection_width else None

    @property
    def output_width(self) -> int:
        if self.projection is not None:
            return self.projection.out_features
        return self.word_embeddings.embedding_dim

    @property
    def max_positions(self) -> int | None:
        return getattr(self.positions, "usable_positions", None)

    def check(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> None:
        """Refuse ids the tables do not have, with a clear error instead of an index crash.

        Skipped inside ``torch.compile`` and while a CUDA graph records: reading values
        back would break the graph (the same call run eagerly is checked).
        """
        if not values_readable():
            return
        if positions is not None and positions.numel():
            table = getattr(self.positions, "max_positions", None)
            low, high = (int(x) for x in torch.aminmax(positions))
            if low < 0 or (table is not None and high >= table):
                bad = low if low < 0 else high
                raise InputError(
                    f"position {bad} is out of range: the model has positions 0 to "
                    f"{table - 1 if table is not None else 'any'}"
                )
        if input_ids.numel():
            low, high = (int(x) for x in torch.aminmax(input_ids))
            if low < 0 or high >= self.vocab_size:
                bad = high if high >= self.vocab_size else low
                raise InputError(
                    f"token id {bad} is out of range: the vocabulary has {self.vocab_size} "
                    f"ids (0 to {self.vocab_size - 1})"
                )
        if token_type_ids is not None and token_type_ids.numel():
            n_types = self.token_type_embeddings.num_embeddings if self.token_type_embeddings else 0
            low, high = (int(x) for x in torch.aminmax(token_type_ids))
            if low < 0 or (high and high >= n_types):
                bad = low if low < 0 else high
                raise InputError(
                    f"token type id {bad} is out of range: the model has {n_types} token types"
                )

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.word_embeddings(input_ids)
        if self.scale is not None:
            h = h * torch.tensor(self.scale, dtype=h.dtype)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                h = h + self.token_type_embeddings.weight[0]
            else:
                h = h + self.token_type_embeddings(token_type_ids)
        if self.positions is not None:
            # fixed tables (sinusoidal) are float32: add them in the model's dtype
            h = h + self.positions(input_ids, positions).to(h.dtype)
        if self.norm is not None:
            h = self.norm(h)
        h = self.dropout(h)
        if self.projection is not None:
            h = self.projection(h)
        return h


@registry.layers.register("registry_xf.TransformerEmbeddings.v1")
def transformer_embeddings(
    vocab_size: VocabSize,
    width: Width,
    type_vocab_size: TypeVocabSize = 0,
    positions: nn.Module | None = None,
    norm: nn.Module | None = None,
    projection_width: Width | None = None,
    scale: PositiveFloat | None = None,
    dropout: Probability = 0.0,
) -> nn.Module:
    """Token embeddings (+ token types, + absolute positions), normed, optionally projected."""
    problems = [
        ConfigProblem(name, f"differs from the embedding width {width}", found, True)
        for name, found in (("positions.width", _width(positions)), ("norm.width", _width(norm)))
        if found is not None and found != width
    ]
    if problems:
        raise ConfigError(problems)
    return TransformerEmbeddings(
        vocab_size,
        width,
        type_vocab_size=type_vocab_size,
        positions=positions,
        norm=norm,
        projection_width=projection_width,
        scale=scale,
        dropout=dropout,
    )


def _width(module: nn.Module | None) -> int | None:
    """The width a positions table or a norm works on (None: unknown or absent)."""
    if module is None:
        return None
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1])
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() in (1, 2):
        return int(weight.shape[-1])  # a norm's (width,), learned positions' (n, width)
    width = getattr(module, "width", None)
    return width if isinstance(width, int) else None
