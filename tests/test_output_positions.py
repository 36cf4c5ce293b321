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


# Every encoder path that moves tokens (unpadded layers, merged tokens) or whose attention
# computes every query (DeBERTa's) still gives the selected positions of the full output.
def _first_positions_equal_full(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> None:
    with torch.inference_mode():
        full = model(ids, mask).last_hidden_state
        some = model(ids, mask, output_positions=[0, 2]).last_hidden_state
    assert some.shape == (ids.shape[0], 2, full.shape[-1])
    torch.testing.assert_close(some, full[:, [0, 2]], atol=1e-5, rtol=1e-5)


def test_deberta_encoder_and_classifier_select_positions(tmp_path: Path) -> None:
    from test_deberta import write_checkpoint as write_deberta

    path = write_deberta(tmp_path / "deberta", "v3")
    ids, mask = random_batch(5, seq=12)
    _first_positions_equal_full(rx.load(path), ids, mask)
    classifier = write_deberta(tmp_path / "deberta-cls", "v3", task="sequence_classification")
    model = rx.load(classifier)
    with torch.inference_mode():
        full = model(ids, mask).logits
        first = model(ids, mask, head_positions_only=True).logits
    torch.testing.assert_close(first, full, atol=1e-5, rtol=1e-5)


def test_unpadded_modernbert_selects_positions(tmp_path: Path) -> None:
    from test_modernbert import batch as modernbert_batch
    from test_modernbert import write_checkpoint as write_modernbert

    model = rx.load(write_modernbert(tmp_path / "modernbert"))
    assert model.unpad
    _first_positions_equal_full(model, *modernbert_batch(3))


def test_merged_tokens_select_positions() -> None:
    from test_token_merging import tiny_bert

    from registry_xf.layers.token_merging import token_merging

    model = tiny_bert()
    model.layers.token_merging = token_merging(fraction=0.3, min_length=4)
    ids, mask = random_batch(7, seq=20)
    _first_positions_equal_full(model, ids, mask)
