"""Int8 linear layers: close to float32 for any shape; embeddings within cosine 0.99."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import minilm_dir, requires_minilm
from hypothesis import given, settings
from hypothesis import strategies as st

import registry_xf as rx
from registry_xf.layers.int8_linear import Int8Linear, int8_unavailable

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
