"""Sharding plans: which parameters of a model each rank holds, and which part.

A plan is a registered component, named in a config's ``[parallel]`` section::

    [parallel]
    @sharding = "registry_xf.TensorParallelPlan.v1"
    vocab = "shard"

A config without one gets ``registry_xf.TensorParallelPlan.v1`` with its defaults,
which shards the generic Encoder, Decoder and CausalLM assemblies (Megatron's scheme):

- attention: each rank has ``n_heads / ranks`` query heads and their key/value heads
  (the query, key and value rows of the same heads: column-wise), and the matching
  columns of the output projection (row-wise, summed over the ranks). With fewer
  key/value heads than ranks, each rank keeps the one its query heads share;
- feed-forward: ``intermediate_width / ranks`` columns of up (and gate), the matching
  rows of down (row-wise, summed);
- token embeddings and the output projection: by vocabulary (``vocab = "shard"``; a
  vocabulary the ranks do not divide is replicated), or replicated;
- everything else (norms, positions, task heads) replicated.

A custom component declares how it shards with a class attribute
``tensor_parallel_styles`` mapping its ``nn.Linear`` children to ``"column"`` or
``"row"``, and a method ``shard_for_tensor_parallel(rank, size)`` that updates its own
sizes (head counts, widths) to the part it keeps.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from ..assemblies.decoder import CausalLM, Decoder
from ..assemblies.encoder import Encoder
from ..errors import TensorParallelError
from ..layers.attention import SelfAttention
from ..layers.cross_attention import CrossAttention
from ..layers.embeddings import TransformerEmbeddings
from ..layers.feedforward import FeedForward
from ..registry import registry
from .ranks import Ranks
from .sharded_layers import VocabShardedEmbedding, all_gather_last_dim, all_reduce_output
from .shards import Shard, ShardedLayout, block, runs_of

logger = logging.getLogger(__name__)

VocabSharding = Literal["shard", "replicate"]
Style = Literal["column", "row"]


class TensorParallelPlan:
    """Shards attention heads, feed-forward columns and (``vocab="shard"``) the
    vocabulary over the ranks; see the module's documentation."""

    def __init__(self, vocab: VocabSharding = "shard"):
        self.vocab = vocab

    def shard(self, model: nn.Module, ranks: Ranks) -> ShardedLayout:
        """Make ``model`` (built on meta) this rank's part of it, in place, and say what
        the loader reads for each of its parameters. Sizes the ranks do not divide are
        one ``TensorParallelError`` listing every module, the same on every rank."""
        problems = self.problems(model, ranks.size)
        if problems:
            raise TensorParallelError(
                f"this model cannot be sharded over {ranks.size} ranks:\n"
                + "\n".join(f"  {p}" for p in problems)
            )
        work = _Sharding(ranks)
        for prefix, module in model.named_modules():
            if isinstance(module, SelfAttention):
                work.attention(prefix, module)
            elif isinstance(module, FeedForward):
                work.feed_forward(prefix, module)
            elif isinstance(module, TransformerEmbeddings) and self._vocab_sharded(module, ranks):
                work.embedding(module.word_embeddings)
            elif isinstance(module, CausalLM):
                embeddings = module.decoder.embeddings
                if isinstance(embeddings, TransformerEmbeddings) and self._vocab_sharded(
                    embeddings, ranks
                ):
                    work.output_projection(prefix, module.lm_head)
            elif getattr(type(module), "tensor_parallel_styles", None):
                work.declared(prefix, module)
        return work.layout

    def _vocab_sharded(self, embeddings: TransformerEmbeddings, ranks: Ranks) -> bool:
        vocab = embeddings.word_embeddings.num_embeddings
        if self.vocab == "replicate":
            return False
        if vocab % ranks.size:
            logger.info(
                "the vocabulary of %d is not divisible by %d ranks: embeddings replicated",
                vocab,
                ranks.size,
            )
            return False
        return True

    def problems(self, model: nn.Module, size: int) -> list[str]:
        """What keeps ``model`` from being sharded over ``size`` ranks, per module."""
        problems = []
        for prefix, module in model.named_modules():
            where = prefix or "model"
            if isinstance(module, CrossAttention):  # before SelfAttention, its base
                problems.append(f"{where}: cross-attention (encoder-decoder models) is not sharded")
            elif isinstance(module, SelfAttention):
                problems += [f"{where}: {p}" for p in _attention_problems(module, size)]
            elif isinstance(module, FeedForward):
                width = module.split[0]
                if width % size:
                    problems.append(
                        f"{where}: intermediate width {width} is not divisible by {size} ranks"
                    )
            elif isinstance(module, (Encoder, Decoder)) and module.attention_bias is not None:
                problems.append(
                    f"{where}: a shared attention bias (T5's relative positions) is not sharded"
                )
            elif getattr(type(module), "tensor_parallel_styles", None):
                problems += [f"{where}.{p}" for p in _declared_problems(module, size)]
        return problems


def _declared_problems(module: nn.Module, size: int) -> list[str]:
    """A custom component's declared styles: each names an ``nn.Linear`` child whose
    split width the ranks divide."""
    problems = []
    for name, style in type(module).tensor_parallel_styles.items():  # type: ignore[attr-defined]
        linear = getattr(module, name, None)
        if not isinstance(linear, nn.Linear):
            problems.append(f"{name}: declared {style!r} but is not an nn.Linear")
        elif style not in ("column", "row"):
            problems.append(f"{name}: unknown style {style!r} (column or row)")
        else:
            width = linear.out_features if style == "column" else linear.in_features
            if width % size:
                problems.append(f"{name}: width {width} is not divisible by {size} ranks")
    return problems


def _attention_problems(module: SelfAttention, size: int) -> list[str]:
    problems = []
    if module.alibi is not None:
        problems.append("ALiBi positions (per-head slopes) are not sharded")
    if module.n_heads % size:
        problems.append(f"n_heads {module.n_heads} is not divisible by {size} ranks")
    elif module.n_kv_heads % size and size % module.n_kv_heads:
        problems.append(
            f"n_kv_heads {module.n_kv_heads} neither divides into {size} ranks nor divides "
            f"{size} (to be replicated, one key/value head per rank)"
        )
    return problems


class _Sharding:
    """One rank's pass over a model: parameters resized on meta, their shards recorded."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.layout = ShardedLayout()
        self._resized: dict[int, nn.Parameter] = {}  # tied parameters stay tied

    def _resize(self, module: nn.Module, attr: str, shard: Shard) -> None:
        old = module._parameters[attr]
        assert old is not None
        new = self._resized.get(id(old))
        if new is None:
            new = nn.Parameter(
                torch.empty(shard.shape, dtype=old.dtype, device="meta"),
                requires_grad=old.requires_grad,
            )
            self._resized[id(old)] = new
            self.layout.shards[(module, attr)] = shard
        module._parameters[attr] = new

    def _part(self, n: int) -> tuple[int, int]:
        """This rank's equal part of ``n`` entries."""
        each = n // self.ranks.size
        return self.ranks.rank * each, (self.ranks.rank + 1) * each

    def column(
        self,
        linear: nn.Linear,
        runs: tuple[tuple[int, int], ...],
        split: tuple[int, ...] | None = None,
    ) -> None:
        """Keep the output rows ``runs`` of ``linear`` (and of its bias); ``split``: the
        parts of a fused projection."""
        full = tuple(linear.weight.shape)
        shard = Shard(0, runs, full, split)
        self._resize(linear, "weight", shard)
        if linear.bias is not None:
            self._resize(linear, "bias", Shard(0, runs, (full[0],), split))
        linear.out_features = shard.size

    def row(self, prefix: str, linear: nn.Linear, runs: tuple[tuple[int, int], ...]) -> None:
        """Keep the input columns ``runs`` of ``linear``; the ranks' outputs are summed,
        and rank 0 alone adds the bias."""
        shard = Shard(1, runs, tuple(linear.weight.shape))
        self._resize(linear, "weight", shard)
        if linear.bias is not None and self.ranks.rank != 0:
            linear.bias = None
            self.layout.dropped.append(f"{prefix}.bias")
        linear.in_features = shard.size
        linear.register_forward_hook(all_reduce_output(self.ranks.group))

    def attention(self, prefix: str, module: SelfAttention) -> None:
        size, width = self.ranks.size, module.head_width
        n_heads, n_kv = module.n_heads, module.n_kv_heads
        q0, q1 = self._part(n_heads)
        if n_kv % size == 0:
            k0, k1 = self._part(n_kv)
        else:  # fewer key/value heads than ranks: the one this rank's query heads share
            k0 = q0 // (n_heads // n_kv)
            k1 = k0 + 1
        q_rows = (q0 * width, q1 * width)
        kv_rows = (k0 * width, k1 * width)
        if module.fused:
            q_width, kv_width, _ = module.split
            rows = [
                q_rows,
                *(tuple(r + start for r in kv_rows) for start in (q_width, q_width + kv_width)),
            ]
            runs = runs_of(i for start, stop in rows for i in range(start, stop))
            self.column(module.qkv_proj, runs, module.split)
        else:
            self.column(module.q_proj, block(*q_rows))
            self.column(module.k_proj, block(*kv_rows))
            self.column(module.v_proj, block(*kv_rows))
        self.row(f"{prefix}.o_proj", module.o_proj, block(*q_rows))
        module.n_heads, module.n_kv_heads = q1 - q0, k1 - k0
        module.split = ((q1 - q0) * width, (k1 - k0) * width, (k1 - k0) * width)

    def feed_forward(self, prefix: str, module: FeedForward) -> None:
        width = module.split[0]
        start, stop = self._part(width)
        if module.fused:
            runs = ((start, stop), (width + start, width + stop))
            self.column(module.gate_up_proj, runs, module.split)
        else:
            self.column(module.up_proj, block(start, stop))
            if module.gated:
                self.column(module.gate_proj, block(start, stop))
        self.row(f"{prefix}.down_proj", module.down_proj, block(start, stop))
        module.split = (stop - start, stop - start)

    def embedding(self, embedding: nn.Embedding) -> None:
        start, stop = self._part(embedding.num_embeddings)
        self._resize(
            embedding, "weight", Shard(0, block(start, stop), tuple(embedding.weight.shape))
        )
        VocabShardedEmbedding.convert(embedding, start, stop, self.ranks.group)

    def output_projection(self, prefix: str, linear: nn.Linear) -> None:
        vocab = linear.out_features
        self.column(linear, block(*self._part(vocab)))
        linear.out_features = vocab  # what it gives, gathered: the whole vocabulary
        linear.register_forward_hook(all_gather_last_dim(self.ranks.group, self.ranks.size))

    def declared(self, prefix: str, module: nn.Module) -> None:
        styles: Mapping[str, Style] = type(module).tensor_parallel_styles  # type: ignore[attr-defined]
        for name, style in styles.items():
            linear = getattr(module, name)
            if style == "column":
                self.column(linear, block(*self._part(linear.out_features)))
            else:
                self.row(f"{prefix}.{name}", linear, block(*self._part(linear.in_features)))
        hook = getattr(module, "shard_for_tensor_parallel", None)
        if callable(hook):
            hook(self.ranks.rank, self.ranks.size)


def default_plan() -> TensorParallelPlan:
    return TensorParallelPlan()


def plan_of(resolved: Mapping[str, Any]) -> TensorParallelPlan:
    """The plan a resolved config names in ``[parallel]``, else the default."""
    plan = resolved.get("parallel")
    if plan is None:
        return default_plan()
    if not callable(getattr(plan, "shard", None)):
        raise TensorParallelError(
            f"[parallel] must build a sharding plan (a registered @sharding component such as "
            f"registry_xf.TensorParallelPlan.v1); it built {type(plan).__name__}"
        )
    return plan


@registry.sharding.register("registry_xf.TensorParallelPlan.v1")
def tensor_parallel_plan(vocab: VocabSharding = "shard") -> TensorParallelPlan:
    """Megatron-style tensor parallelism for the generic assemblies: attention heads and
    feed-forward columns split over the ranks; ``vocab`` shards the token embeddings and
    output projection by vocabulary ("shard") or replicates them ("replicate")."""
    return TensorParallelPlan(vocab)
