"""Int8 linear layers: close to float32 for any shape; embeddings within cosine 0.99."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import minilm_dir, random_batch, requires_minilm
from hypothesis import given, settings
from hypothesis import strategies as st

import registry_xf as rx
from registry_xf.layers.int8_linear import Int8Linear, int8_unavailable
from registry_xf.layers.packed_linear import linear_plus, linear_then_activation

pytestmark = pytest.mark.skipif(int8_unavailable() is not None, reason=str(int8_unavailable()))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 33),
    n_in=st.integers(16, 96),
    n_out=st.integers(16, 96),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_float_linear(rows: int, n_in: int, n_out: int, bias: bool, seed: int) -> None:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(n_in, n_out, bias=bias)
    x = torch.randn(2, rows, n_in) * torch.rand(1, rows, 1) * 10  # rows of unlike scales
    x[0, 0, 0] = 50.0  # an outlier: only its own row's scale pays for it
    with torch.inference_mode():
        expected, got = linear(x), Int8Linear(linear)(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
    assert cosine[0, 0] >= 0.98, cosine[0, 0]  # the outlier's row: coarser steps
    assert torch.cat([cosine[1], cosine[0, 1:]]).min() >= 0.999, cosine


def test_empty_batch_and_bfloat16() -> None:
    linear = torch.nn.Linear(16, 8).to(torch.bfloat16)
    layer = Int8Linear(linear)
    assert layer(torch.zeros(0, 16, dtype=torch.bfloat16)).shape == (0, 8)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.inference_mode():
        cosine = torch.nn.functional.cosine_similarity(layer(x).float(), linear(x).float())
    assert layer(x).dtype == torch.bfloat16 and cosine.min() >= 0.99


@pytest.mark.parametrize("rows", [0, 1, 2, 57])  # 3 * rows: unfused below 32
def test_fused_steps_match_the_plain_ones(rows: int) -> None:
    """The compiled quantise/dequantise loops compute what the plain torch steps do, for
    every batch size (one row, none), 3-D inputs, with the activation and residual sum
    fused after the multiply, or applied after it where no fused form exists."""
    torch.manual_seed(rows)
    linear = torch.nn.Linear(48, 40)
    fused, plain = Int8Linear(linear), Int8Linear(linear, fused=False)
    x, residual = torch.randn(3, rows, 48), torch.randn(3, rows, 40)
    # (fused: one compiled GELU loop and the plain one, to keep compiling short)
    activations = [torch.nn.GELU(), torch.nn.GELU("tanh"), torch.nn.ReLU(), torch.nn.Softplus()]
    with torch.inference_mode():
        for activation in activations:
            expected = activation(linear(x))
            fusable = activation is activations[0] or type(activation) is torch.nn.Softplus
            for layer in (fused, plain) if fusable else (plain,):
                got = linear_then_activation(layer, activation, x)
                assert got.shape == (3, rows, 40)
                torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)
        expected = linear(x) + residual
        for layer in (fused, plain):
            got = linear_plus(layer, x, residual)
            assert got.shape == (3, rows, 40)
            torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)
        torch.testing.assert_close(fused(x), plain(x), atol=1e-5, rtol=1e-5)


def test_fused_steps_compile_once_for_all_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamic shapes: new batch sizes and widths reuse the compiled loops."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("REGISTRY_XF_CPU_INT8", "0")  # the compiled loops, not the C++ kernel

    layers = [Int8Linear(torch.nn.Linear(n_in, n_out)) for n_in, n_out in [(32, 24), (24, 72)]]
    with torch.inference_mode():
        for layer in layers:
            layer(torch.randn(40, layer.in_features))  # compiled here if not yet
        before = counters["stats"]["unique_graphs"]
        for rows in (33, 19, 130):
            for layer in layers:
                layer(torch.randn(2, rows, layer.in_features))
    assert counters["stats"]["unique_graphs"] == before


def test_tiny_bert_int8_stays_close(checkpoints) -> None:  # type: ignore[no-untyped-def]
    exact, model = rx.load(checkpoints["bert"]), rx.load(checkpoints["bert"])
    rx.quantize_int8(model)
    ids, mask = random_batch(seed=1, batch=5, seq=14)
    with torch.inference_mode():
        expected = exact(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    cosine = torch.nn.functional.cosine_similarity(got[real], expected[real], dim=-1)
    assert cosine.min() >= 0.99, cosine


def test_quantize_int8_refuses_layers_off_the_cpu(checkpoints) -> None:  # type: ignore[no-untyped-def]
    model = rx.load(checkpoints["bert"]).to("meta")
    with pytest.raises(rx.RegistryXFError, match="runs on the CPU; layer .* is on meta"):
        rx.quantize_int8(model)


def test_quantize_int8_swaps_every_linear(checkpoints) -> None:  # type: ignore[no-untyped-def]
    model = rx.load(checkpoints["bert"])
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert rx.quantize_int8(model) == n_linear > 0
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())


def test_embedder_refuses_unknown_quantize() -> None:
    with pytest.raises(rx.InputError, match="quantize='int4'"):
        rx.Embedder(torch.nn.Linear(2, 2), quantize="int4")


@requires_minilm
def test_minilm_int8_embeddings_stay_close() -> None:
    texts = [
        "A man is eating food.",
        "hi",
        "The girl is carrying a baby while the man rides a horse along the beach.",
        "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
        "A long text that goes on and on. " * 30,
    ]
    reference = rx.Embedder(minilm_dir()).embed(texts)
    got = rx.Embedder(minilm_dir(), quantize="int8").embed(texts)
    cosine = (got * reference).sum(1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1)
    )
    assert cosine.min() >= 0.99, cosine
