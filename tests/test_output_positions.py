"""Computing selected positions only in the last layer gives those positions' states
exactly: every residual placement and position scheme, and the task pipelines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import random_batch
from test_heads import pad_id, write_task_checkpoint
from torch import nn

import registry_xf as rx
from registry_xf.errors import InputError
from registry_xf.layers.attention import SelfAttention
from registry_xf.layers.attention_mask import AttentionMask
from registry_xf.layers.feedforward import FeedForward
from registry_xf.layers.packed_linear import pack_linear_weights
from registry_xf.layers.positions import ALiBi, RotaryEmbeddings
from registry_xf.layers.transformer_layer import TransformerLayer

WIDTH, HEADS = 32, 4


def layer(residual: str, positions: str, backend: str, window: int | None) -> TransformerLayer:
    rotary = RotaryEmbeddings(WIDTH // HEADS) if positions == "rotary" else None
    alibi = ALiBi(HEADS) if positions == "alibi" else None
    attention = SelfAttention(
        WIDTH, HEADS, n_kv_heads=2, backend=backend, rotary=rotary, alibi=alibi, window=window
    )
    norms = {"attention_norm": nn.LayerNorm(WIDTH), "feed_forward_norm": nn.LayerNorm(WIDTH)}
    if residual == "parallel":
        norms.pop("feed_forward_norm")
    ff = FeedForward(WIDTH, 48, nn.GELU())
    return TransformerLayer(attention, ff, residual=residual, **norms).eval()  # type: ignore[arg-type]


@pytest.mark.parametrize("residual", ["post", "pre", "parallel"])
@pytest.mark.parametrize(
    ("positions", "backend", "window", "bias"),
    [
        ("none", "sdpa", None, False),
        ("rotary", "sdpa", 5, False),
        ("alibi", "eager", None, False),
        ("none", "sdpa", None, True),
    ],
)
def test_a_layer_computes_the_selected_positions_exactly(
    residual: str, positions: str, backend: str, window: int | None, bias: bool
) -> None:
    torch.manual_seed(0)
    chosen = layer(residual, positions, backend, window)
    _, key_mask = random_batch(3, batch=3, seq=9)
    x = torch.randn(3, 9, WIDTH)
    index = torch.tensor([0, 4, 8])
    relative = torch.randn(1, HEADS, 9, 9) if bias else None
    with torch.inference_mode():
        full = chosen(x, AttentionMask(key_mask.bool(), bias=relative))
        some = chosen(x, AttentionMask(key_mask.bool(), bias=relative), query_index=index)
    torch.testing.assert_close(some, full[:, index], atol=1e-6, rtol=0)
    # packed weights: activation and residual sums inside the multiplies, the same numbers
    assert pack_linear_weights(chosen) == 4  # qkv, o, up, down
    with torch.inference_mode():
        packed = chosen(x, AttentionMask(key_mask.bool(), bias=relative))
        packed_some = chosen(x, AttentionMask(key_mask.bool(), bias=relative), query_index=index)
    torch.testing.assert_close(packed, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed_some, full[:, index], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("positions")
    families = ("bert", "albert", "distilbert")
    task = "sequence_classification"
    return {f: write_task_checkpoint(root / f, f, task, seed=3) for f in families}


@pytest.mark.parametrize("family", ["bert", "albert", "distilbert"])
def test_a_classifier_head_reads_the_same_logits_from_the_first_position(
    classifiers: dict[str, Path], family: str
) -> None:
    model = rx.load(classifiers[family])
    ids, mask = random_batch(5, pad_id=pad_id(family))
    with torch.inference_mode():
        full = model(ids, mask)
        first = model(ids, mask, head_positions_only=True)
    assert first.last_hidden_state.shape[1] == 1
    torch.testing.assert_close(first.logits, full.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        first.last_hidden_state[:, 0], full.last_hidden_state[:, 0], atol=1e-6, rtol=0
    )


def test_cls_pooling_embeds_alike_with_the_first_position_only(
    classifiers: dict[str, Path],
) -> None:
    texts = ["a short one", "a text that is somewhat longer than the first", "x"]
    cls = rx.Embedder(classifiers["bert"], pooler=rx.Pooler("cls"))
    encoder = cls.model
    expected = []
    with torch.inference_mode():
        for encoding in cls.tokenizer.encode(texts):
            ids = torch.tensor([encoding.ids])
            expected.append(encoder(ids).last_hidden_state[0, 0])
    torch.testing.assert_close(
        torch.from_numpy(cls.embed(texts)), torch.stack(expected), atol=1e-5, rtol=0
    )


def test_output_positions_are_checked(classifiers: dict[str, Path]) -> None:
    encoder = rx.load(classifiers["bert"], head=False)
    ids, mask = random_batch(5)
    for bad in ([], [12], [-1], [True]):
        with pytest.raises(InputError, match="output_positions"):
            encoder(ids, mask, output_positions=bad)
