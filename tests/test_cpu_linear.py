"""The compiled CPU linear kernel.

bfloat16 products: torch's float32 product of the bfloat16-rounded operands (within 1e-5)
for drawn and odd shapes, every epilogue and one row; oneDNN wherever it does not apply
(turned off, autograd, no AVX512-BF16, no compiler); calls from two threads at once; packed
layers under CPU autocast; MiniLM-shaped embeddings with bfloat16 products within cosine
0.9999 of float32, with and without the kernel.

float32 products: float64's result within 1e-5 for drawn and odd shapes, every epilogue and
the LayerNorm inside; packed layers call it from ``F32_KERNEL_FROM_ROWS`` rows (oneDNN below,
with the switch off, or for what it does not take) and give oneDNN's results; a build for
a CPU without AVX512-BF16 still has it; MiniLM-shaped float32 embeddings equal oneDNN's.
"""

from __future__ import annotations

import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_hf_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_tokenizer import write_tokenizer
from torch import nn

import registry_xf as rx
from registry_xf.layers import cpu_kernels
from registry_xf.layers import cpu_linear as kernel
from registry_xf.layers.norms import LayerNorm, RMSNorm
from registry_xf.layers.packed_linear import (
    F32_KERNEL_FROM_ROWS,
    PackedLinear,
    linear_plus,
    linear_then_activation,
    register_packed_linear,
)

CASES = int(os.environ.get("REGISTRY_XF_FUZZ_CASES", "60"))
ACTIVATIONS = {
    None: lambda t: t,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}


def require_kernel(products: torch.dtype = torch.bfloat16) -> None:
    lib = kernel.library(products)
    if isinstance(lib, str):
        pytest.skip(f"the kernel is unavailable here: {lib}")


@dataclass
class KernelCall:
    ran: bool  # the kernel computed the result (else the caller runs oneDNN)
    norm: object  # the LayerNorm it was given, or None


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[KernelCall]:
    """Every call of the kernel's entry (``kernel.linear``) from here on, as the layers
    make them."""
    calls: list[KernelCall] = []
    real = kernel.linear

    def recorded(*args: object, **kwargs: object) -> torch.Tensor | None:
        out = real(*args, **kwargs)
        norm = args[7] if len(args) > 7 else kwargs.get("norm")
        calls.append(KernelCall(out is not None, norm))
        return out

    monkeypatch.setattr(kernel, "linear", recorded)
    return calls


def operands(
    m: int, k: int, n: int, seed: int = 0, lead: tuple[int, ...] = ()
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, m, k, generator=g)
    weight = torch.randn(n, k, generator=g) * k**-0.5
    bias = torch.randn(n, generator=g)
    residual = torch.randn(*lead, m, n, generator=g)
    return x, weight, bias, residual


def expected(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    residual: torch.Tensor | None,
    products: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The float64 product of the operands rounded to ``products``, then the epilogue."""
    xr, wr = x.to(products).double(), weight.to(products).double()
    out = xr @ wr.T + (0 if bias is None else bias.double())
    out = ACTIVATIONS[activation](out)
    return out if residual is None else out + residual.double()


def run(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    norm: nn.LayerNorm | None = None,
    products: torch.dtype = torch.bfloat16,
) -> torch.Tensor | None:
    packed = kernel.pack_weight(weight, products)
    return kernel.linear(
        x, weight, lambda: packed, bias, activation, residual, out_dtype, norm, products
    )


def assert_matches(
    got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5, operands: tuple = ()
) -> None:
    """``got`` is ``want`` to ``rtol`` of the largest output, or with ``operands`` (x,
    weight) of the largest sum of absolute terms: float32 sums are exact to their terms'
    size, not the result's (a drawn row whose terms cancel has a small result)."""
    scale = float(want.abs().max()) or 1.0
    if operands:
        x, weight = operands
        scale = max(scale, float((x.abs().double() @ weight.abs().double().T).max()))
    error = float((got.double() - want).abs().max()) / scale
    assert error < rtol, f"relative error {error:.2e}"


PRODUCTS = [torch.bfloat16, torch.float32]


@pytest.mark.parametrize("products", PRODUCTS)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_every_epilogue(
    products: torch.dtype, activation: str | None, with_residual: bool, with_bias: bool
) -> None:
    require_kernel(products)
    x, weight, bias, residual = operands(37, 130, 97, seed=1)  # odd everywhere
    bias = bias if with_bias else None
    residual = residual if with_residual else None
    got = run(x, weight, bias, activation, residual, products=products)
    assert got is not None and got.dtype == torch.float32 and got.shape == (37, 97)
    assert_matches(got, expected(x, weight, bias, activation, residual, products))


@pytest.mark.parametrize("products", PRODUCTS)
def test_gelu_is_accurate_over_a_wide_range(products: torch.dtype) -> None:
    """The epilogue's GELU (cpu_activations.h): within 1e-6 (absolute, relative to |x|) of
    float64's from -30 to 30, in both forms; at infinities what torch's gives."""
    require_kernel(products)
    # x = [t, 1] and the weight's row [1, 0]: the product is t exactly (t in `products`)
    t = torch.cat([torch.linspace(-30, 30, 60001), torch.tensor([float("inf"), -float("inf")])])
    t = t.to(products).float()
    x = torch.stack([t, torch.ones_like(t)], 1)
    weight = torch.tensor([[1.0, 0.0]])
    for name, reference in (("gelu", "none"), ("gelu_tanh", "tanh")):
        got = run(x, weight, activation=name, products=products)[:, 0]
        want = F.gelu(t[:-2].double(), approximate=reference)
        error = (got[:-2].double() - want).abs() / t[:-2].abs().clamp(min=1)
        assert float(error.max()) < 1e-6, (name, float(error.max()))
        torch.testing.assert_close(got[-2:], F.gelu(t[-2:], approximate=reference), equal_nan=True)


@pytest.mark.parametrize(("m", "k", "n"), [(1, 384, 1152), (1, 1, 1), (7, 3, 65), (300, 1537, 129)])
def test_odd_shapes_and_one_row(m: int, k: int, n: int) -> None:
    require_kernel()
    x, weight, bias, _ = operands(m, k, n, seed=m + k + n)
    assert_matches(run(x, weight, bias), expected(x, weight, bias, None, None))


def test_bfloat16_input_and_output() -> None:
    require_kernel()
    x, weight, bias, _ = operands(50, 96, 70, seed=4)
    xb = x.to(torch.bfloat16)
    got = run(xb, weight, bias, "gelu", out_dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    want = expected(x, weight, bias, "gelu", None)
    assert_matches(got.double(), want, rtol=1e-2)  # bfloat16 output: 8 bits
    assert_matches(run(xb, weight, bias), expected(x, weight, bias, None, None))


def test_leading_dimensions_and_threads() -> None:
    """(batch, positions, width) inputs; a product big enough for every thread."""
    require_kernel()
    x, weight, bias, residual = operands(160, 384, 1152, seed=5, lead=(3,))
    got = run(x, weight, bias, None, residual)
    assert got.shape == (3, 160, 1152)
    assert_matches(got, expected(x, weight, bias, None, residual))


@settings(max_examples=CASES, deadline=None)
@given(
    m=st.integers(1, 200),
    k=st.integers(1, 300),
    n=st.integers(1, 200),
    activation=st.sampled_from(list(ACTIVATIONS)),
    seed=st.integers(0, 2**16),
)
def test_drawn_shapes(m: int, k: int, n: int, activation: str | None, seed: int) -> None:
    require_kernel()
    x, weight, bias, residual = operands(m, k, n, seed=seed)
    got = run(x, weight, bias, activation, residual)
    assert_matches(got, expected(x, weight, bias, activation, residual), operands=(x, weight))


def test_calls_from_two_threads_at_once() -> None:
    require_kernel()
    x, weight, bias, residual = operands(400, 384, 384, seed=6)
    want = expected(x, weight, bias, "gelu", residual)
    results: list[torch.Tensor | None] = [None] * 4

    def call(i: int) -> None:
        results[i] = run(x, weight, bias, "gelu", residual)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in results:
        assert got is not None
        assert_matches(got, want)


def test_where_the_kernel_does_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    x, weight, bias, residual = operands(20, 64, 48, seed=7)
    monkeypatch.setenv(kernel.SWITCHES[torch.bfloat16], "0")
    assert run(x, weight, bias) is None
    monkeypatch.setenv(kernel.SWITCHES[torch.bfloat16], "1")
    assert run(x, weight.double(), bias) is None  # a float64 weight
    assert run(x.t(), weight[:, :20], bias) is None  # an input that is not contiguous
    assert run(x, weight, bias, residual=residual.to(torch.bfloat16)) is None
    assert run(x, weight, bias, residual=residual[:, :5]) is None
    asked: list[int] = []

    def never_packed() -> torch.Tensor:
        asked.append(1)
        return kernel.pack_weight(weight)

    with torch.enable_grad():
        x_grad = x.clone().requires_grad_()
        assert kernel.linear(x_grad, weight, never_packed, bias) is None
    assert not asked  # nothing packed where the kernel does not run


def test_no_avx512_bf16_or_no_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A CPU without AVX512-BF16 (its flags as /proc/cpuinfo would list them) or a missing
    compiler: the reason, and None from every call (the layer then runs oneDNN)."""
    x, weight, bias, _ = operands(20, 64, 48, seed=8)
    flags = cpu_kernels.cpu_flags() - {"avx512_bf16"}
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: flags)
    try:
        assert kernel.library() == "the CPU lacks AVX512-BF16"
        assert run(x, weight, bias) is None
    finally:
        monkeypatch.undo()
    if not kernel.cpu_has_bf16():
        return
    monkeypatch.setenv(cpu_kernels.COMPILER, str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert "no C++ compiler" in kernel.library()
    assert run(x, weight, bias) is None


def packed_layer(k: int, n: int, seed: int) -> PackedLinear:
    register_packed_linear()
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(k, n)
    with torch.no_grad():
        layer.weight.normal_(0, k**-0.5, generator=g)
        layer.bias.normal_(0, 0.1, generator=g)
    layer.__class__ = PackedLinear
    return layer


@pytest.mark.parametrize("entry", ["activation", "residual", "plain"])
def test_packed_layers_under_autocast(
    monkeypatch: pytest.MonkeyPatch, kernel_calls: list[KernelCall], entry: str
) -> None:
    """``linear_then_activation`` and ``linear_plus`` give what oneDNN's path gives (to
    bfloat16 rounding), in the same dtypes; a plain product stays with oneDNN."""
    layer = packed_layer(96, 160, seed=9)
    g = torch.Generator().manual_seed(10)
    x, residual = torch.randn(33, 96, generator=g), torch.randn(33, 160, generator=g)
    gelu = nn.GELU()
    calls = {
        "activation": lambda: linear_then_activation(layer, gelu, x),
        "residual": lambda: linear_plus(layer, x, residual),
        "plain": lambda: layer(x),
    }[entry]
    results = {}
    for switch in ("0", "1"):
        monkeypatch.setenv(kernel.SWITCHES[torch.bfloat16], switch)
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
            results[switch] = calls()
    onednn, ours = results["0"], results["1"]
    assert ours.dtype == onednn.dtype and ours.shape == onednn.shape
    assert_matches(ours.double(), onednn.double(), rtol=2e-2)
    uses_kernel = entry != "plain" and not isinstance(kernel.library(), str)
    assert any(call.ran for call in kernel_calls) == uses_kernel


@pytest.fixture(scope="module")
def minilm_shaped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BERT with all-MiniLM-L6-v2's widths (384, 12 heads, 1536) and two layers."""
    path = write_hf_checkpoint(
        tmp_path_factory.mktemp("bf16gemm") / "bert",
        "bert",
        seed=11,
        hidden_size=384,
        num_attention_heads=12,
        intermediate_size=1536,
        num_hidden_layers=2,
    )
    write_tokenizer(path)
    return path


def test_minilm_shaped_embeddings(minilm_shaped: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = ["the cat sat on the mat and the dog ran", "hello world", "a dog ran"] * 5
    exact = rx.Embedder(str(minilm_shaped)).embed(texts)
    mixed = rx.Embedder(str(minilm_shaped), matmul_dtype="bfloat16", batch_tokens=64)
    found = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(kernel.SWITCHES[torch.bfloat16], switch)
        found[switch] = mixed.embed(texts)
        cosines = (found[switch] * exact).sum(1) / (
            np.linalg.norm(found[switch], axis=1) * np.linalg.norm(exact, axis=1)
        )
        assert cosines.min() >= 0.9999, (switch, cosines.min())
    assert not np.allclose(found["0"], exact, atol=1e-6)  # products did run in bfloat16


def layer_norm_of(n: int, seed: int, affine: bool = True, bias: bool = True) -> nn.LayerNorm:
    norm = LayerNorm(n, eps=1e-12, elementwise_affine=affine, bias=bias)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if affine:
            norm.weight.normal_(1, 0.5, generator=g)
        if norm.bias is not None:
            norm.bias.normal_(0, 0.5, generator=g)
    return norm.requires_grad_(False)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("m", "k", "n", "affine", "bias"),
    [
        (37, 130, 97, True, True),  # odd everywhere, one thread's product
        (301, 384, 200, True, True),  # several blocks of rows for two threads
        (61, 1536, 384, True, True),  # one block of rows: two threads split it, not the panels
        (1, 384, 384, True, False),  # one row; a LayerNorm without bias
        (45, 64, 65, False, False),  # no weight either; a last panel of one column
    ],
)
def test_layer_norm_inside_the_kernel(
    threads: int, m: int, k: int, n: int, affine: bool, bias: bool
) -> None:
    """The kernel's LayerNorm of its finished rows equals torch's LayerNorm of its output
    to float32 rounding, for odd row counts, widths that are not whole panels, 1 and 2
    threads, with and without the norm's weight and bias."""
    require_kernel()
    x, weight, linear_bias, residual = operands(m, k, n, seed=m + k + n)
    residual = residual * 4 + 2  # rows whose mean and spread are far from 0 and 1
    norm = layer_norm_of(n, seed=k, affine=affine, bias=bias)
    packed = kernel.pack_weight(weight)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        plain = kernel.linear(x, weight, lambda: packed, linear_bias, None, residual)
        fused = kernel.linear(
            x, weight, lambda: packed, linear_bias, None, residual, torch.float32, norm
        )
    finally:
        torch.set_num_threads(previous)
    assert plain is not None and fused is not None and fused.shape == (m, n)
    want = norm(plain)
    scale = float(want.abs().max())
    assert float((fused - want).abs().max()) <= 1e-5 * scale
    assert not torch.equal(fused, plain)


@settings(max_examples=CASES, deadline=None)
@given(
    m=st.integers(1, 200),
    k=st.integers(1, 300),
    n=st.integers(1, 200),
    seed=st.integers(0, 2**16),
)
def test_drawn_shapes_with_the_norm_inside(m: int, k: int, n: int, seed: int) -> None:
    require_kernel()
    x, weight, bias, residual = operands(m, k, n, seed=seed)
    norm = layer_norm_of(n, seed=seed)
    packed = kernel.pack_weight(weight)
    plain = kernel.linear(x, weight, lambda: packed, bias, None, residual)
    fused = kernel.linear(x, weight, lambda: packed, bias, None, residual, torch.float32, norm)
    assert_normalised(fused, plain, norm)


def assert_normalised(fused: torch.Tensor, rows: torch.Tensor, norm: nn.LayerNorm) -> None:
    """``fused`` is ``norm(rows)`` to float32 rounding. A LayerNorm divides each row by its
    spread, and with it the rounding of the row's mean: a row of nearly equal values (drawn
    now and then) is allowed that much more."""
    want = norm(rows).double()
    spread = rows.double().var(-1, unbiased=False, keepdim=True).add(norm.eps).sqrt()
    gain = 1.0 if norm.weight is None else float(norm.weight.abs().max())
    amplified = rows.double().abs().amax(-1, keepdim=True) / spread * gain * 2**-22
    allowed = 1e-5 * max(float(want.abs().max()), 1.0) + amplified
    assert bool(((fused.double() - want).abs() <= allowed).all())


def test_layer_norm_not_in_the_kernel(
    monkeypatch: pytest.MonkeyPatch, kernel_calls: list[KernelCall]
) -> None:
    """No norm on a bfloat16 output, over another width, or with the norm switched off:
    None from the kernel, and ``linear_plus`` then runs the norm after the kernel; an
    RMSNorm, a LayerNorm subclass or a hooked LayerNorm is never passed to the kernel."""
    require_kernel()
    x, weight, bias, residual = operands(40, 96, 80, seed=12)
    packed = kernel.pack_weight(weight)
    norm = layer_norm_of(80, seed=13)

    def fused(out_dtype: torch.dtype, layer_norm: nn.LayerNorm) -> torch.Tensor | None:
        call = kernel.linear
        return call(x, weight, lambda: packed, bias, None, residual, out_dtype, layer_norm)

    assert fused(torch.bfloat16, norm) is None
    assert fused(torch.float32, layer_norm_of(40, seed=13)) is None
    monkeypatch.setenv(kernel.NORM_SWITCH, "0")
    assert fused(torch.float32, norm) is None
    monkeypatch.delenv(kernel.NORM_SWITCH)
    assert fused(torch.float32, norm) is not None

    class ScaledLayerNorm(LayerNorm):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return super().forward(t) * 2

    hooked = layer_norm_of(80, seed=13)
    hooked.register_forward_hook(lambda module, args, out: out + 1)
    layer = packed_layer(96, 80, seed=14)
    norms = [RMSNorm(80), ScaledLayerNorm(80), hooked]
    kernel_calls.clear()  # the direct calls above
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        for other in norms:
            got = linear_plus(layer, x, residual, other)
            assert torch.equal(got, other(linear_plus(layer, x, residual)))
        assert all(call.norm is None for call in kernel_calls)
        monkeypatch.setenv(kernel.NORM_SWITCH, "0")  # the kernel, then torch's LayerNorm
        unfused = linear_plus(layer, x, residual, norm)
        monkeypatch.delenv(kernel.NORM_SWITCH)
        got = linear_plus(layer, x, residual, norm)
    assert kernel_calls[-1].norm is norm
    assert float((got - unfused).abs().max()) <= 1e-5 * float(unfused.abs().max())


def test_minilm_shaped_embeddings_with_the_norm_inside(
    minilm_shaped: Path, monkeypatch: pytest.MonkeyPatch, kernel_calls: list[KernelCall]
) -> None:
    """A post-norm BERT under ``matmul_dtype="bfloat16"``: both norms of every layer run
    inside the kernel, and the embeddings equal those with torch's LayerNorms to float32
    rounding (batches of odd token counts, one and two threads)."""
    require_kernel()
    texts = ["the cat sat on the mat and the dog ran far away", "hello world", "a dog"] * 7
    mixed = rx.Embedder(str(minilm_shaped), matmul_dtype="bfloat16", batch_tokens=256)
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            found = {}
            for switch in ("0", "1"):
                monkeypatch.setenv(kernel.NORM_SWITCH, switch)
                kernel_calls.clear()
                found[switch] = mixed.embed(texts)
                normed = any(call.ran and call.norm is not None for call in kernel_calls)
                assert normed == (switch == "1")
            cosines = (found["0"] * found["1"]).sum(1) / (
                np.linalg.norm(found["0"], axis=1) * np.linalg.norm(found["1"], axis=1)
            )
            assert cosines.min() >= 0.999999, (threads, cosines.min())
            assert np.abs(found["0"] - found["1"]).max() < 1e-4
    finally:
        torch.set_num_threads(previous)


# float32 products


def expected_f32(*args: object) -> torch.Tensor:
    return expected(*args, products=torch.float32)


def run_f32(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    norm: nn.LayerNorm | None = None,
) -> torch.Tensor | None:
    return run(x, weight, bias, activation, residual, torch.float32, norm, torch.float32)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("m", "k", "n"),
    [(1, 384, 1152), (1, 1, 1), (7, 3, 65), (300, 1537, 129), (2047, 384, 384), (13, 800, 64)],
)
def test_f32_odd_shapes_threads_and_one_row(threads: int, m: int, k: int, n: int) -> None:
    """Row counts that leave a partial micro-tile (read from a padded copy), k beyond one
    slice, one row, widths that are not whole panels, one and two threads."""
    require_kernel(torch.float32)
    x, weight, bias, residual = operands(m, k, n, seed=m + k + n)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = run_f32(x, weight, bias, "gelu", residual)
    finally:
        torch.set_num_threads(previous)
    assert_matches(got, expected_f32(x, weight, bias, "gelu", residual))


@settings(max_examples=CASES, deadline=None)
@given(
    m=st.integers(1, 200),
    k=st.integers(1, 500),
    n=st.integers(1, 200),
    activation=st.sampled_from(list(ACTIVATIONS)),
    with_norm=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_f32_drawn_shapes(
    m: int, k: int, n: int, activation: str | None, with_norm: bool, seed: int
) -> None:
    """float64's result to 1e-5; with the LayerNorm inside, torch's LayerNorm of the
    kernel's own sums (a row of nearly equal values makes a norm amplify any rounding, so
    float64's sums are no reference for it)."""
    require_kernel(torch.float32)
    x, weight, bias, residual = operands(m, k, n, seed=seed)
    got = run_f32(x, weight, bias, activation, residual)
    want = expected_f32(x, weight, bias, activation, residual)
    assert_matches(got, want, operands=(x, weight))
    if with_norm:
        norm = layer_norm_of(n, seed=seed)
        assert_normalised(run_f32(x, weight, bias, activation, residual, norm), got, norm)


def test_f32_where_the_kernel_does_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switched off, a bfloat16 input, a bfloat16 output, autograd: None (oneDNN runs)."""
    x, weight, bias, _ = operands(20, 64, 48, seed=22)
    packed = kernel.pack_weight(weight, torch.float32)

    def call(x: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        return kernel.linear(
            x, weight, lambda: packed, bias, None, None, out_dtype, None, torch.float32
        )

    monkeypatch.setenv(kernel.SWITCHES[torch.float32], "0")
    assert call(x) is None
    monkeypatch.setenv(kernel.SWITCHES[torch.float32], "1")
    assert call(x.to(torch.bfloat16)) is None
    assert call(x, torch.bfloat16) is None
    with torch.enable_grad():
        assert call(x.clone().requires_grad_()) is None


def test_f32_products_without_avx512_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 products need AVX-512 only: on a CPU without AVX512-BF16 the library still
    serves them, and the source builds for such a CPU."""
    require_kernel(torch.float32)
    flags = cpu_kernels.cpu_flags() - {"avx512_bf16"}
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: flags)
    assert kernel.library(torch.bfloat16) == "the CPU lacks AVX512-BF16"
    assert not isinstance(kernel.library(torch.float32), str)
    monkeypatch.undo()
    build = subprocess.run(
        [cpu_kernels.compiler(), "-fsyntax-only", "-std=c++17", "-fopenmp", "-march=native"]
        + ["-mno-avx512bf16", str(kernel.SOURCE)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr


@pytest.mark.parametrize("entry", ["activation", "residual", "norm", "plain"])
def test_f32_packed_layers(
    monkeypatch: pytest.MonkeyPatch, kernel_calls: list[KernelCall], entry: str
) -> None:
    """Each entry point calls the kernel for float32 inputs of ``F32_KERNEL_FROM_ROWS`` rows
    or more and oneDNN below that or with the switch off, with the same results to float32
    rounding."""
    require_kernel(torch.float32)
    layer = packed_layer(96, 160, seed=23)
    norm = layer_norm_of(160, seed=24)
    gelu = nn.GELU()
    g = torch.Generator().manual_seed(25)
    for rows in (F32_KERNEL_FROM_ROWS - 1, F32_KERNEL_FROM_ROWS, 3 * F32_KERNEL_FROM_ROWS + 5):
        x, residual = torch.randn(rows, 96, generator=g), torch.randn(rows, 160, generator=g)

        def call(x: torch.Tensor = x, residual: torch.Tensor = residual) -> torch.Tensor:
            if entry == "activation":
                return linear_then_activation(layer, gelu, x)
            if entry == "plain":
                return layer(x)
            return linear_plus(layer, x, residual, norm if entry == "norm" else None)

        results = {}
        for switch in ("0", "1"):
            monkeypatch.setenv(kernel.SWITCHES[torch.float32], switch)
            kernel_calls.clear()
            with torch.inference_mode():
                results[switch] = call()
            ran = any(made.ran for made in kernel_calls)
            assert ran == (switch == "1" and rows >= F32_KERNEL_FROM_ROWS)
        onednn, ours = results["0"], results["1"]
        assert ours.dtype == torch.float32 and ours.shape == onednn.shape
        assert float((ours - onednn).abs().max()) <= 1e-5 * float(onednn.abs().max())
    with torch.enable_grad():  # training: oneDNN or torch, never the kernel
        kernel_calls.clear()
        layer(x)
        assert not any(made.ran for made in kernel_calls)


def test_f32_minilm_shaped_embeddings(
    minilm_shaped: Path, monkeypatch: pytest.MonkeyPatch, kernel_calls: list[KernelCall]
) -> None:
    """float32 embeddings with the kernel (every product, both norms of every layer) equal
    oneDNN's to float32 rounding, on one and two threads."""
    require_kernel(torch.float32)
    texts = ["the cat sat on the mat and the dog ran far away", "hello world", "a dog"] * 20
    embedder = rx.Embedder(str(minilm_shaped), batch_tokens=512)
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            found = {}
            for switch in ("0", "1"):
                monkeypatch.setenv(kernel.SWITCHES[torch.float32], switch)
                kernel_calls.clear()
                found[switch] = embedder.embed(texts)
                assert any(call.ran for call in kernel_calls) == (switch == "1")
            assert np.abs(found["0"] - found["1"]).max() < 1e-5
    finally:
        torch.set_num_threads(previous)
