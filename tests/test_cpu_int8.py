"""The C++ quantise/dequantise passes of int8 linear layers: the same int8 codes, scales and
shifts as ``quantize_rows_shifted``, dequantised products within float rounding of
``dequantize_products`` with every activation and a residual, for drawn shapes (odd widths,
one row, none); the torch loops wherever the kernel does not apply (rows not contiguous,
another dtype, turned off); calls from two threads at once; embeddings unchanged."""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
import pytest
import torch
from conftest import minilm_dir, random_batch, requires_minilm
from hypothesis import given, settings
from hypothesis import strategies as st

import registry_xf as rx
from registry_xf.layers import cpu_int8 as kernel
from registry_xf.layers import feedforward as feedforward_module
from registry_xf.layers.feedforward import FeedForward
from registry_xf.layers.int8_linear import (
    Int8Linear,
    dequantize_products,
    int8_feed_forward,
    int8_unavailable,
    quantize_rows_shifted,
)

pytestmark = pytest.mark.skipif(int8_unavailable() is not None, reason=str(int8_unavailable()))

CASES = int(os.environ.get("REGISTRY_XF_FUZZ_CASES", "150"))
ACTIVATIONS = [None, *kernel.ACTIVATIONS]


def kernel_library() -> ctypes.CDLL:
    lib = kernel.library()
    if isinstance(lib, str):
        pytest.skip(f"the kernel is unavailable here: {lib}")
    return lib


def layer_inputs(
    g: torch.Generator, rows: int, n_in: int, n_out: int, spread: float
) -> tuple[torch.Tensor, ...]:
    """Activations with rows of unlike scales, and an int8 layer's weights and columns."""
    x = torch.randn(rows, n_in, generator=g) * torch.rand(rows, 1, generator=g) * spread
    linear = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n_out, n_in, generator=g))
        linear.bias.copy_(torch.randn(n_out, generator=g))
    layer = Int8Linear(linear)
    return x, layer.qweight, layer.column_sums, layer.weight_scale, layer.bias


def check_quantization(lib: ctypes.CDLL, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kernel's codes, scales and shifts are quantize_rows_shifted's, exactly."""
    q, scale, shift = kernel.quantize_rows(lib, x)
    expected = quantize_rows_shifted(x)
    assert q.dtype == torch.int8 and scale.shape == shift.shape == (x.shape[0], 1)
    for got, want in zip((q, scale, shift), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    return q, scale, shift


def products_of(q: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    if q.shape[0] == 0:
        return torch.zeros(0, qweight.shape[1], dtype=torch.int32)
    return torch._int_mm(q, qweight)


def magnitude(products, scale, shift, column_sums, weight_scale, bias, residual):  # type: ignore[no-untyped-def]
    """The size of the terms summed for each output: float32's rounding is relative to it."""
    terms = (products.abs() + (shift * column_sums).abs()) * (scale * weight_scale).abs()
    return 1.0 + terms + bias.abs() + (0.0 if residual is None else residual.abs())


@settings(max_examples=CASES, deadline=None, derandomize=True)
@given(
    rows=st.integers(0, 40),
    n_in=st.integers(1, 100),
    n_out=st.integers(1, 100),
    spread=st.sampled_from([1e-30, 1e-3, 1.0, 30.0, 1e4]),
    activation=st.sampled_from(ACTIVATIONS),
    residual=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_passes_match_the_torch_functions(
    rows: int,
    n_in: int,
    n_out: int,
    spread: float,
    activation: str | None,
    residual: bool,
    seed: int,
) -> None:
    lib = kernel_library()
    g = torch.Generator().manual_seed(seed)
    x, qweight, column_sums, weight_scale, bias = layer_inputs(g, rows, n_in, n_out, spread)
    if rows:
        x[0, int(torch.randint(n_in, (1,), generator=g))] = -spread * 5  # a lopsided row
    q, scale, shift = check_quantization(lib, x)
    products = products_of(q, qweight)
    plus = torch.randn(rows, n_out, generator=g) if residual else None
    columns = (column_sums, weight_scale, bias)
    got = kernel.dequantize(lib, products, scale, shift, *columns, plus, activation)
    expected = dequantize_products(
        products, scale, shift, *columns, plus, activation, torch.float32
    )
    assert got is not None and got.shape == (rows, n_out) and got.dtype == torch.float32
    size = magnitude(products, scale, shift, *columns, plus)
    assert ((got - expected).abs() / size).max().item() <= 2e-6 if rows else not got.numel()


def test_wide_rows_and_many_rows_on_several_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Widths that are and are not multiples of 16, past the parallel threshold."""
    lib = kernel_library()
    monkeypatch.setattr(kernel, "SERIAL_UP_TO_THREADS", 0)  # every thread torch has
    g = torch.Generator().manual_seed(7)
    for n_in, n_out in [(1536, 384), (389, 1153)]:
        x, qweight, *columns = layer_inputs(g, kernel.PARALLEL_FROM // n_in + 3, n_in, n_out, 4)
        q, scale, shift = check_quantization(lib, x)
        check_quantization(lib, x[::3])  # rows apart
        products = torch._int_mm(q, qweight)
        for activation in ("gelu", None):
            got = kernel.dequantize(lib, products, scale, shift, *columns, None, activation)
            expected = dequantize_products(
                products, scale, shift, *columns, None, activation, torch.float32
            )
            size = magnitude(products, scale, shift, *columns, None)
            assert ((got - expected).abs() / size).max().item() <= 2e-6


def test_activations_against_float64() -> None:
    """Each activation's error over a wide range of values (GELU: erf to ~2e-7)."""
    lib = kernel_library()
    y = torch.cat([torch.linspace(-30, 30, 120_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    n = y.numel()
    products, ones, zeros = (
        torch.zeros(1, n, dtype=torch.int32),
        torch.ones(1, n),
        torch.zeros(1, n),
    )
    references = {
        "gelu": torch.nn.functional.gelu,
        "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
        "relu": torch.relu,
        "silu": torch.nn.functional.silu,
        "tanh": torch.tanh,
    }
    for name, reference in references.items():
        # bias = y, everything else neutral: the kernel's output is activation(y)
        got = kernel.dequantize(
            lib, products, torch.ones(1, 1), torch.zeros(1, 1), zeros, ones, y[None], None, name
        )
        assert got is not None
        error = (got[0].double() - reference(y.double())).abs() / (1.0 + y.double().abs())
        assert error.max().item() <= 3e-7, (name, error.max().item())


def test_residual_rows_with_a_stride_and_cases_left_to_torch() -> None:
    lib = kernel_library()
    g = torch.Generator().manual_seed(3)
    x, qweight, *columns = layer_inputs(g, 9, 40, 24, 2)
    q, scale, shift = kernel.quantize_rows(lib, x)
    products = torch._int_mm(q, qweight)
    wide = torch.randn(9, 30, generator=g)
    strided = wide[:, 3:27]  # rows 30 apart
    got = kernel.dequantize(lib, products, scale, shift, *columns, strided, "relu")
    expected = dequantize_products(products, scale, shift, *columns, strided, "relu", torch.float32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # left to torch: an activation it lacks; a residual of another dtype, layout or shape,
    # or whose rows overlap
    assert kernel.dequantize(lib, products, scale, shift, *columns, None, "softplus") is None
    for plus in (
        strided.double(),
        wide[:, 3:27].t().contiguous().t(),
        wide[:, :25],
        wide.as_strided((9, 24), (10, 1)),
    ):
        assert kernel.dequantize(lib, products, scale, shift, *columns, plus, None) is None
    assert kernel.ready(x.t()) is None  # columns, not rows, contiguous
    assert kernel.ready(x.double()) is None
    assert kernel.ready(x[:, ::2]) is None
    assert kernel.ready(x[::2]) is lib  # rows apart: fine
    leaf = x.clone().requires_grad_()
    assert kernel.ready(leaf) is None
    with torch.no_grad():
        assert kernel.ready(leaf) is lib


@pytest.mark.parametrize("rows", [0, 1, 2, 11])  # 3 * rows: the torch steps compiled from 32
def test_layer_with_and_without_the_kernel(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """An int8 layer's output with the kernel, with it turned off and for inputs it does
    not take (rows that are not contiguous) agree; the kernel runs only where it applies."""
    kernel_library()
    calls: list[int] = []
    real = kernel.multiply

    def counted(lib: ctypes.CDLL, x: torch.Tensor, qweight: torch.Tensor) -> tuple:
        calls.append(x.shape[0])
        return real(lib, x, qweight)

    monkeypatch.setattr(kernel, "multiply", counted)
    torch.manual_seed(rows)
    linear = torch.nn.Linear(37, 45)  # odd widths
    layer, plain = Int8Linear(linear), Int8Linear(linear, fused=False)
    x, residual = torch.randn(3, rows, 37), torch.randn(3, rows, 45)
    with torch.inference_mode():
        for options in ({}, {"activation": torch.nn.GELU()}, {"residual": residual}):
            expected = plain(x, **options)
            assert not calls  # fused=False: the plain torch steps
            torch.testing.assert_close(layer(x, **options), expected, rtol=1e-4, atol=1e-4)
            assert calls == ([3 * rows] if rows else [])
            calls.clear()
            monkeypatch.setenv(kernel.SWITCH, "0")
            torch.testing.assert_close(layer(x, **options), expected, rtol=1e-4, atol=1e-4)
            monkeypatch.setenv(kernel.SWITCH, "1")
            assert not calls
        spaced = torch.randn(rows + 1, 74)[:, ::2]  # every other column: the torch steps
        torch.testing.assert_close(layer(spaced), plain(spaced), rtol=1e-4, atol=1e-4)
        assert not calls


def test_two_threads_at_once_each_get_their_own_results() -> None:
    """Each thread multiplies in its own scratch memory."""
    lib = kernel_library()
    results: dict[int, list[bool]] = {0: [], 1: []}

    def work(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for step in range(20):
            rows = 300 + 7 * step  # a growing scratch buffer, too
            x, qweight, *columns = layer_inputs(g, rows, 384, 1536, 3)
            products, scale, shift = kernel.multiply(lib, x, qweight)
            got = kernel.dequantize(lib, products, scale, shift, *columns, None, "gelu")
            q, scale_, shift_ = quantize_rows_shifted(x)
            expected_products = torch._int_mm(q, qweight)
            expected = dequantize_products(
                expected_products, scale_, shift_, *columns, None, "gelu", torch.float32
            )
            size = magnitude(expected_products, scale_, shift_, *columns, None)
            results[seed].append(
                torch.equal(products, expected_products)
                and torch.equal(scale, scale_)
                and torch.equal(shift, shift_)
                and ((got - expected).abs() / size).max().item() <= 2e-6
            )

    threads = [threading.Thread(target=work, args=(seed,)) for seed in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {0: [True] * 20, 1: [True] * 20}


def test_products_beyond_the_scratch_limit_get_their_own_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lib = kernel_library()
    g = torch.Generator().manual_seed(5)
    x, qweight, *_ = layer_inputs(g, 50, 64, 96, 1)
    kept, _, _ = kernel.multiply(lib, x, qweight)
    again, _, _ = kernel.multiply(lib, x, qweight)
    assert kept.data_ptr() == again.data_ptr()  # the thread's scratch, reused
    monkeypatch.setattr(kernel, "SCRATCH_LIMIT", 1000)
    big, _, _ = kernel.multiply(lib, x, qweight)
    assert big.data_ptr() != kept.data_ptr()
    torch.testing.assert_close(big, torch._int_mm(quantize_rows_shifted(x)[0], qweight))


@pytest.mark.parametrize(
    "activation", [torch.nn.GELU(), torch.nn.SiLU(), torch.nn.Softplus()], ids=type
)
def test_feed_forward_in_one_pass(
    activation: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An int8 feed-forward layer quantises its activated rows as it makes them: the same
    result, bit for bit, as the layers one by one; not where a hook must see a layer's
    output, in training, or for an activation the kernel lacks."""
    kernel_library()
    torch.manual_seed(4)
    layer = FeedForward(40, 77, activation).eval()
    rx.quantize_int8(layer)
    calls: list[int] = []
    real = kernel.feed_forward

    def counted(*args: object) -> torch.Tensor | None:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(kernel, "feed_forward", counted)
    x, residual = torch.randn(3, 21, 40), torch.randn(3, 21, 40)
    fusable = not isinstance(activation, torch.nn.Softplus)
    with torch.inference_mode():
        one_pass = [layer(x, residual), layer(x)]
        assert calls == ([1, 1] if fusable else [])
        monkeypatch.setattr(feedforward_module, "int8_feed_forward", lambda *args: None)
        one_by_one = [layer(x, residual), layer(x)]
        for got, expected in zip(one_pass, one_by_one, strict=True):
            assert torch.equal(got, expected)
        monkeypatch.setattr(feedforward_module, "int8_feed_forward", int8_feed_forward)
        one_pass = one_pass[0]
        broadcast = residual[:1, :1]  # one row for all: the layers one by one
        assert int8_feed_forward(layer.up_proj, activation, layer.down_proj, x, broadcast) is None
        torch.testing.assert_close(layer(x, broadcast), layer(x) + broadcast)
        calls.clear()
        seen = []
        handle = layer.down_proj.register_forward_hook(lambda m, i, o: seen.append(o))
        torch.testing.assert_close(layer(x, residual), one_pass, rtol=0, atol=0)
        handle.remove()
        assert len(seen) == 1 and not calls
        layer.train()
        torch.testing.assert_close(layer(x, residual), one_pass, rtol=0, atol=0)
        assert not calls


def test_tiny_bert_int8_same_with_and_without_the_kernel(
    checkpoints, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    kernel_library()
    exact, model = rx.load(checkpoints["bert"]), rx.load(checkpoints["bert"])
    rx.quantize_int8(model)
    ids, mask = random_batch(seed=2, batch=6, seq=13)
    with torch.inference_mode():
        reference = exact(input_ids=ids, attention_mask=mask).last_hidden_state
        with_kernel = model(input_ids=ids, attention_mask=mask).last_hidden_state
        monkeypatch.setenv(kernel.SWITCH, "0")
        without = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(with_kernel[real], without[real], rtol=1e-3, atol=1e-3)
    cosine = torch.nn.functional.cosine_similarity(with_kernel[real], reference[real], dim=-1)
    assert cosine.min() >= 0.99, cosine


@requires_minilm
def test_minilm_int8_embeddings_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel_library()
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and dog ran is hello world quickly over".split()
    texts = [" ".join(rng.choice(words, size=rng.integers(1, 60))) for _ in range(40)]
    exact = rx.Embedder(minilm_dir()).embed(texts)
    embedder = rx.Embedder(minilm_dir(), quantize="int8")
    with_kernel = embedder.embed(texts)
    monkeypatch.setenv(kernel.SWITCH, "0")
    without = embedder.embed(texts)

    def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    # The same codes but where float rounding differs (GELU's erf, the order of the sums):
    # one code a step apart moves the next layer's input, whose rows may then be quantised
    # differently; so the embeddings differ by a fraction of int8's own error, no more.
    assert cosine(with_kernel, without).min() >= 0.999
    assert cosine(with_kernel, exact).min() >= max(0.99, cosine(without, exact).min() - 1e-3)
