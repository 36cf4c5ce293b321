"""The compiled CPU attention kernel: torch's results (float32 within 1e-5) for drawn shapes
and padding masks, zeros for batch entries with no key; torch's attention wherever it does
not apply (no compiler, turned off, other masks, autograd); one whole library from two
processes building it at once; calls from two threads at once; MiniLM's embeddings
unchanged. The packed entry (sequences one after another, as an unpadded encoder's
projections): torch's results per sequence, the padded entry's exactly, bad offsets refused,
an unpadded encoder's hidden states unchanged."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import requires_minilm
from hypothesis import given, settings
from hypothesis import strategies as st

import registry_xf as rx
from registry_xf.layers import attention as attention_module
from registry_xf.layers import cpu_attention as kernel
from registry_xf.layers import cpu_kernels
from registry_xf.layers.attention import SelfAttention
from registry_xf.layers.attention_mask import AttentionMask

CASES = int(os.environ.get("REGISTRY_XF_FUZZ_CASES", "120"))


def kernel_library() -> ctypes.CDLL:
    lib = kernel.library()
    if isinstance(lib, str):
        pytest.skip(f"the kernel is unavailable here: {lib}")
    return lib


def fused_qkv(
    g: torch.Generator, b: int, n: int, heads: int, kv_heads: int, d: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as the model hands them over: strided views of one fused projection."""
    qkv = torch.randn(b, n, (heads + 2 * kv_heads) * d, generator=g).to(dtype)
    q, k, v = qkv.split((heads * d, kv_heads * d, kv_heads * d), dim=-1)
    q = q.view(b, n, heads, d).transpose(1, 2)
    k = k.view(b, n, kv_heads, d).transpose(1, 2)
    v = v.view(b, n, kv_heads, d).transpose(1, 2)
    return q, k, v


def padding_mask(g: torch.Generator, b: int, n: int, dead_rows: int) -> torch.Tensor:
    """(b, 1, 1, n) booleans: random keys allowed, the last ``dead_rows`` entries none."""
    allowed = torch.rand(b, n, generator=g) < 0.8
    allowed[:, 0] |= torch.rand(b, generator=g) < 0.5
    if dead_rows:
        allowed[-dead_rows:] = False
    return allowed[:, None, None, :]


def reference(q, k, v, mask, scale):  # type: ignore[no-untyped-def]
    """torch's attention in float32, zeros where a batch entry has no key (as ``attend``)."""
    q, k, v = q.float(), k.float(), v.float()
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    dead = ~mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask | dead, scale=scale, enable_gqa=gqa
    )
    return out.masked_fill(dead, 0.0)


@settings(max_examples=CASES, deadline=None, derandomize=True)
@given(
    b=st.integers(1, 4),
    heads_kv=st.sampled_from([(1, 1), (2, 2), (3, 3), (4, 2), (4, 1)]),
    n=st.integers(1, 70),
    d=st.sampled_from([16, 32, 48, 64]),
    masked=st.booleans(),
    dead_rows=st.integers(0, 2),
    contiguous=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_equals_torch_attention_in_float32(
    b: int,
    heads_kv: tuple[int, int],
    n: int,
    d: int,
    masked: bool,
    dead_rows: int,
    contiguous: bool,
    seed: int,
) -> None:
    kernel_library()
    g = torch.Generator().manual_seed(seed)
    heads, kv_heads = heads_kv
    q, k, v = fused_qkv(g, b, n, heads, kv_heads, d, torch.float32)
    if contiguous:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    mask = padding_mask(g, b, n, min(dead_rows, b)) if masked else None
    scale = d**-0.5
    out = kernel.cpu_attention(q, k, v, mask, scale)
    assert out is not None
    torch.testing.assert_close(out, reference(q, k, v, mask, scale), rtol=0, atol=1e-5)
    if masked and dead_rows:
        assert not out[-min(dead_rows, b) :].any()  # no key at all: zeros


def test_long_sequences_many_threads_and_a_shared_mask() -> None:
    kernel_library()
    g = torch.Generator().manual_seed(3)
    q, k, v = fused_qkv(g, 5, 300, 12, 12, 32, torch.float32)
    mask = padding_mask(g, 1, 300, 0)  # one mask row for every batch entry
    out = kernel.cpu_attention(q, k, v, mask, 0.2)
    assert out is not None
    torch.testing.assert_close(out, reference(q, k, v, mask, 0.2), rtol=0, atol=1e-5)
    # fewer queries than keys (the rows a last layer reads): one at a time, one block of 16
    # and one of 8 after it, two blocks of 16 overlapping
    for n_q in (7, 23, 29):
        out = kernel.cpu_attention(q[:, :, :n_q], k, v, mask, 0.2)
        assert out is not None
        expected = reference(q[:, :, :n_q], k, v, mask, 0.2)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("d", [16, 32, 48, 64])
def test_bfloat16_close_to_float32(d: int) -> None:
    if not kernel_library().rx_attention_bf16():
        pytest.skip("the CPU has no AVX512-BF16")
    g = torch.Generator().manual_seed(d)
    q, k, v = fused_qkv(g, 3, 90, 4, 4, d, torch.bfloat16)
    mask = padding_mask(g, 3, 90, 1)
    out = kernel.cpu_attention(q, k, v, mask, d**-0.5)
    assert out is not None and out.dtype == torch.bfloat16
    expected = reference(q, k, v, mask, d**-0.5)
    cosine = F.cosine_similarity(out.float().flatten(2), expected.flatten(2), dim=-1)
    assert cosine[:-1].min() > 0.9999
    assert not out[-1].any()


def test_cases_it_does_not_compute_fall_back() -> None:
    g = torch.Generator().manual_seed(1)
    q, k, v = fused_qkv(g, 2, 10, 2, 2, 32, torch.float32)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()[None, None]
    assert kernel.cpu_attention(q, k, v, causal, 0.1) is None
    assert kernel.cpu_attention(q, k, v, torch.zeros(2, 1, 1, 10), 0.1) is None  # a bias
    odd = fused_qkv(g, 2, 10, 2, 2, 24, torch.float32)
    assert kernel.cpu_attention(*odd, None, 0.1) is None
    assert kernel.cpu_attention(q.double(), k.double(), v.double(), None, 0.1) is None
    leaf = q.detach().requires_grad_()
    assert kernel.cpu_attention(leaf, k, v, None, 0.1) is None
    with torch.no_grad():  # no autograd needed: the kernel may run
        assert (kernel.cpu_attention(leaf, k, v, None, 0.1) is None) == isinstance(
            kernel.library(), str
        )


def test_turned_off_or_without_a_compiler_torch_attention_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    layer = SelfAttention(64, 2).eval()
    x = torch.randn(3, 9, 64)
    key_mask = torch.ones(3, 9, dtype=torch.bool)
    key_mask[0, 5:] = False
    key_mask[2] = False  # nothing to attend to: zeros
    with torch.no_grad():
        eager = layer.backend
        layer.backend = "eager"
        expected = layer(x, AttentionMask(key_mask))
        layer.backend = eager
        monkeypatch.setenv(cpu_kernels.COMPILER, str(tmp_path / "no-such-c++"))
        assert "no C++ compiler" in kernel.library()  # type: ignore[operator]
        q, k, v = layer.project(x)
        assert kernel.cpu_attention(q, k, v, None, layer.scale) is None
        torch.testing.assert_close(layer(x, AttentionMask(key_mask)), expected)
        monkeypatch.delenv(cpu_kernels.COMPILER)
        monkeypatch.setenv(kernel.SWITCH, "0")
        assert kernel.cpu_attention(q, k, v, None, layer.scale) is None
        torch.testing.assert_close(layer(x, AttentionMask(key_mask)), expected)
        monkeypatch.setenv(kernel.SWITCH, "1")
        torch.testing.assert_close(layer(x, AttentionMask(key_mask)), expected)


def test_a_failing_compiler_is_a_reason_not_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if cpu_kernels.unavailable_here():
        pytest.skip(cpu_kernels.unavailable_here())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    failing = tmp_path / "failing-c++"
    failing.write_text("#!/bin/sh\necho 'no such flag' >&2\nexit 1\n")
    failing.chmod(0o755)
    reason = cpu_kernels.load(kernel.SOURCE, str(failing))
    assert isinstance(reason, str) and "no such flag" in reason
    assert not list(cpu_kernels.kernels_dir().glob(".cpu_attention-*"))  # no temporary left


BUILD = """
import sys, torch
from registry_xf.layers import cpu_attention as kernel
lib = kernel.library()
assert not isinstance(lib, str), lib
q = torch.randn(2, 3, 40, 32)
out = kernel.cpu_attention(q, q, q, None, 0.2)
ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, scale=0.2)
assert (out - ref).abs().max() < 1e-5
print(lib._name)
"""


def test_two_processes_building_at_once_leave_one_whole_library(tmp_path: Path) -> None:
    kernel_library()
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), PYTHONPATH=os.pathsep.join(sys.path))
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (_, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err.decode()[-2000:]
    folder = tmp_path / "registry_xf" / "kernels"
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 1 and files[0].endswith(".so"), files  # no temporary left
    assert {out.decode().strip() for out, _ in outputs} == {str(folder / files[0])}
    ctypes.CDLL(str(folder / files[0])).rx_attention_bf16()  # a whole library


def test_two_threads_at_once_each_get_their_own_results() -> None:
    kernel_library()
    results: dict[int, list[bool]] = {0: [], 1: []}

    def work(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for _ in range(15):
            q, k, v = fused_qkv(g, 6, 80, 4, 4, 32, torch.float32)
            mask = padding_mask(g, 6, 80, 1)
            out = kernel.cpu_attention(q, k, v, mask, 0.17)
            ok = out is not None and torch.allclose(
                out, reference(q, k, v, mask, 0.17), rtol=0, atol=1e-5
            )
            results[seed].append(ok)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {0: [True] * 15, 1: [True] * 15}


@requires_minilm
def test_minilm_embeddings_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel_library()
    calls = []
    real = attention_module.cpu_attention

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(attention_module, "cpu_attention", counted)
    real_packed = attention_module.cpu_attention_packed

    packed_calls = []

    def counted_packed(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = real_packed(*args, **kwargs)
        calls.append(out is not None)
        packed_calls.append(out is not None)
        return out

    monkeypatch.setattr(attention_module, "cpu_attention_packed", counted_packed)
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and dog ran is hello world quickly over".split()
    texts = [" ".join(rng.choice(words, size=rng.integers(0, 60))) for _ in range(40)]
    embedder = rx.Embedder()
    monkeypatch.setenv(kernel.SWITCH, "0")
    before = embedder.embed(texts)
    monkeypatch.setenv(kernel.SWITCH, "1")
    calls.clear()
    after = embedder.embed(texts)
    assert calls and all(calls)  # every layer of every batch ran the kernel
    assert packed_calls  # mean pooling: unpadded layers, the packed entry
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5)


@requires_minilm
def test_minilm_bfloat16_embeddings_as_close_to_float32_as_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not kernel_library().rx_attention_bf16():
        pytest.skip("the CPU has no AVX512-BF16")
    rng = np.random.default_rng(1)
    words = "the cat sat on a mat and dog ran is hello world quickly over".split()
    texts = [" ".join(rng.choice(words, size=rng.integers(1, 60))) for _ in range(30)]
    exact = rx.Embedder().embed(texts)
    embedder = rx.Embedder(dtype=torch.bfloat16)
    monkeypatch.setenv(kernel.SWITCH, "0")
    before = embedder.embed(texts)
    monkeypatch.setenv(kernel.SWITCH, "1")
    after = embedder.embed(texts)

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())

    assert cosine(after, exact) >= min(0.9999, cosine(before, exact) - 1e-5)


def packed_qkv(
    g: torch.Generator, lengths: list[int], heads: int, kv_heads: int, d: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of packed sequences as views of one fused projection's rows, and offsets."""
    n = sum(lengths)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * d, generator=g).to(dtype)
    q, k, v = qkv.split((heads * d, kv_heads * d, kv_heads * d), dim=-1)
    offsets = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int64)
    return q.view(n, heads, d), k.view(n, kv_heads, d), v.view(n, kv_heads, d), offsets


def padded(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Packed (tokens, heads, d) → (batch, heads, longest, d), zeros at padding."""
    rows = torch.nn.utils.rnn.pad_sequence(list(x.split(lengths)), batch_first=True)
    return rows.transpose(1, 2)


def key_mask(lengths: list[int]) -> torch.Tensor:
    return (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None])[:, None, None]


@settings(max_examples=CASES, deadline=None, derandomize=True)
@given(
    lengths=st.lists(st.integers(0, 80), min_size=1, max_size=6).filter(any),
    heads_kv=st.sampled_from([(1, 1), (3, 3), (4, 2), (12, 12)]),
    d=st.sampled_from([16, 32, 48, 64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_packed_equals_torch_per_sequence_and_the_padded_entry(
    lengths: list[int], heads_kv: tuple[int, int], d: int, seed: int
) -> None:
    kernel_library()
    g = torch.Generator().manual_seed(seed)
    heads, kv_heads = heads_kv
    q, k, v, offsets = packed_qkv(g, lengths, heads, kv_heads, d, torch.float32)
    out = kernel.cpu_attention_packed(q, k, v, offsets, d**-0.5)
    assert out is not None and out.shape == q.shape
    for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
        if start < end:
            one = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]
            expected = reference(*one, None, d**-0.5)[0].transpose(0, 1)
            torch.testing.assert_close(out[start:end], expected, rtol=0, atol=1e-5)
    # the padded entry on the same rows: the same arithmetic, bit for bit
    padded_out = kernel.cpu_attention(
        *(padded(t, lengths) for t in (q, k, v)), key_mask(lengths), d**-0.5
    )
    assert padded_out is not None
    mask = key_mask(lengths)[:, 0, 0]
    assert torch.equal(padded_out.transpose(1, 2)[mask], out)


# Lengths around the kernel's boundaries: 16-key vectors, 48-key score tiles, blocks of 8 or
# 12 queries and of 16 (two score tiles) for heads up to 32 wide, and the race's longest texts.
BOUNDARY_LENGTHS = [1, 2, 7, 8, 9, 15, 16, 17, 23, 24, 25, 31, 33, 47, 48, 49, 64, 65, 131, 250]


@pytest.mark.parametrize(("heads", "d"), [(12, 32), (2, 16), (2, 48), (2, 64)])
def test_packed_long_sequences_across_tile_boundaries(heads: int, d: int) -> None:
    """MiniLM's layout (12 heads of 32 in one fused projection) and the other widths, on
    every length where a tile or block of the kernel ends: torch's results, and the padded
    entry's (whose keys are gathered through the mask) bit for bit."""
    kernel_library()
    g = torch.Generator().manual_seed(d)
    lengths = BOUNDARY_LENGTHS
    q, k, v, offsets = packed_qkv(g, lengths, heads, heads, d, torch.float32)
    scale = d**-0.5
    out = kernel.cpu_attention_packed(q, k, v, offsets, scale)
    assert out is not None
    for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
        one = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]
        expected = reference(*one, None, scale)[0].transpose(0, 1)
        torch.testing.assert_close(out[start:end], expected, rtol=0, atol=1e-5)
    padded_out = kernel.cpu_attention(
        *(padded(t, lengths) for t in (q, k, v)), key_mask(lengths), scale
    )
    assert padded_out is not None
    assert torch.equal(padded_out.transpose(1, 2)[key_mask(lengths)[:, 0, 0]], out)


def test_softmax_of_far_apart_scores_stays_exact() -> None:
    """Scores hundreds apart (one key dominates, the others' exponentials underflow) and all
    far below zero: the row maximum taken from the score tiles must come from real keys
    only, never from the zero scores of the padding keys, or every weight would underflow."""
    kernel_library()
    g = torch.Generator().manual_seed(5)
    lengths = [17, 50, 1]
    q, k, v, offsets = packed_qkv(g, lengths, 2, 2, 32, torch.float32)
    q = q * 0 + 4.0  # every query the same, all positive
    k = k.abs() * -40.0  # every score far below zero: about -700 after scaling
    k[3] = k[3] * 0.5  # one key per sequence stands out by hundreds
    k[20] = k[20] * 0.5
    out = kernel.cpu_attention_packed(q, k, v, offsets, 32**-0.5)
    assert out is not None and torch.isfinite(out).all()
    for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
        one = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]
        expected = reference(*one, None, 32**-0.5)[0].transpose(0, 1)
        torch.testing.assert_close(out[start:end], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("d", [16, 32, 48, 64])
def test_packed_bfloat16_long_sequences_close_to_float32(d: int) -> None:
    if not kernel_library().rx_attention_bf16():
        pytest.skip("the CPU has no AVX512-BF16")
    g = torch.Generator().manual_seed(d + 1)
    q, k, v, offsets = packed_qkv(g, BOUNDARY_LENGTHS, 4, 4, d, torch.bfloat16)
    out = kernel.cpu_attention_packed(q, k, v, offsets, d**-0.5)
    assert out is not None and out.dtype == torch.bfloat16
    exact = kernel.cpu_attention_packed(q.float(), k.float(), v.float(), offsets, d**-0.5)
    assert exact is not None
    assert F.cosine_similarity(out.float(), exact, dim=-1).min() > 0.9999


@pytest.mark.parametrize("d", [16, 32, 48, 64])
def test_packed_bfloat16_close_to_float32(d: int) -> None:
    if not kernel_library().rx_attention_bf16():
        pytest.skip("the CPU has no AVX512-BF16")
    g = torch.Generator().manual_seed(d)
    lengths = [90, 3, 57, 1]
    q, k, v, offsets = packed_qkv(g, lengths, 4, 2, d, torch.bfloat16)
    out = kernel.cpu_attention_packed(q, k, v, offsets, d**-0.5)
    assert out is not None and out.dtype == torch.bfloat16
    exact = kernel.cpu_attention_packed(q.float(), k.float(), v.float(), offsets, d**-0.5)
    assert exact is not None
    cosine = F.cosine_similarity(out.float(), exact, dim=-1)
    assert cosine.min() > 0.9999


def test_packed_offsets_that_do_not_fit_are_refused_and_other_cases_fall_back() -> None:
    kernel_library()
    g = torch.Generator().manual_seed(2)
    q, k, v, offsets = packed_qkv(g, [5, 7], 2, 2, 32, torch.float32)
    for bad in ([0, 7, 5], [1, 5, 12], [0, 5, 13]):
        with pytest.raises(rx.errors.InputError, match="offsets"):
            kernel.cpu_attention_packed(q, k, v, torch.tensor(bad), 0.1)
    assert kernel.cpu_attention_packed(q, k, v, offsets.int(), 0.1) is None
    assert kernel.cpu_attention_packed(q.double(), k.double(), v.double(), offsets, 0.1) is None
    leaf = q.detach().requires_grad_()
    assert kernel.cpu_attention_packed(leaf, k, v, offsets, 0.1) is None
    odd = packed_qkv(g, [5, 7], 2, 2, 24, torch.float32)
    assert kernel.cpu_attention_packed(*odd, 0.1) is None


def test_packed_from_two_threads_at_once() -> None:
    kernel_library()
    results: dict[int, list[bool]] = {0: [], 1: []}

    def work(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for _ in range(10):
            lengths = torch.randint(1, 90, (6,), generator=g).tolist()
            q, k, v, offsets = packed_qkv(g, lengths, 4, 4, 32, torch.float32)
            out = kernel.cpu_attention_packed(q, k, v, offsets, 0.17)
            expected = kernel.cpu_attention(
                *(padded(t, lengths) for t in (q, k, v)), key_mask(lengths), 0.17
            )
            mask = key_mask(lengths)[:, 0, 0]
            ok = out is not None and expected is not None
            results[seed].append(ok and torch.equal(expected.transpose(1, 2)[mask], out))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {0: [True] * 10, 1: [True] * 10}


@requires_minilm
def test_minilm_unpadded_call_leaves_real_tokens_unchanged() -> None:
    kernel_library()
    model = rx.Embedder().model
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1000, 2000, (4, 23), generator=g)
    mask = torch.ones(4, 23, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 1:] = 0
    mask[3, 20:] = 0
    with torch.inference_mode():
        padded_out = model(ids, mask).last_hidden_state
        unpadded_out = model(ids, mask, unpad=True).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(unpadded_out[real], padded_out[real], rtol=0, atol=1e-5)
    assert not unpadded_out[~real].any()  # zeros at padding


def test_leftovers_of_killed_builds_are_removed_but_not_running_ones(tmp_path: Path) -> None:
    stale = tmp_path / ".cpu_attention-abc-old.so"
    running = tmp_path / ".cpu_attention-abc-new.so"
    library = tmp_path / "cpu_attention-abc.so"
    for path in (stale, running, library):
        path.write_bytes(b"x")
    old = time.time() - 3 * cpu_kernels.COMPILE_TIMEOUT_S
    os.utime(stale, (old, old))
    os.utime(library, (old, old))
    cpu_kernels.remove_stale_builds(tmp_path)
    assert not stale.exists()
    assert running.exists() and library.exists()
