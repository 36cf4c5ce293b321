"""Embedder(compile=True) and matmul_dtype: the compiled pass gives the eager embeddings;
bfloat16 products keep the float32 parts; bad settings are typed errors; a compiler that
fails falls back to the eager pass with a logged reason."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_hf_checkpoint
from tiny_tokenizer import write_tokenizer

import registry_xf as rx
from registry_xf.errors import InputError
from registry_xf.pipelines.compiled_forward import CompiledForward

# mixed lengths (several batches under a small budget) and a single text (its own graph)
TEXTS = ["the cat sat on the mat and the dog ran", "hello world", "a dog ran", "is the cat"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_hf_checkpoint(tmp_path_factory.mktemp("compile") / "bert", "bert", seed=3)
    write_tokenizer(path)
    return path


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_compiled_embeddings_equal_eager(tiny_dir: Path) -> None:
    eager = rx.Embedder(str(tiny_dir), batch_tokens=24)
    compiled = rx.Embedder(eager.model, batch_tokens=24, compile=True)
    assert isinstance(compiled._forward, CompiledForward)
    expected = eager.embed(TEXTS)
    np.testing.assert_allclose(compiled.embed(TEXTS), expected, atol=1e-5)
    # other lengths and batch sizes reuse the dynamic graph; one text gets its own
    np.testing.assert_allclose(
        compiled.embed(TEXTS[::-1] * 3), eager.embed(TEXTS[::-1] * 3), atol=1e-5
    )
    np.testing.assert_allclose(compiled.embed(TEXTS[:1]), expected[:1], atol=1e-5)
    assert compiled._forward.compiled is not None  # no fallback happened


def test_bfloat16_products_keep_float32_parts(tiny_dir: Path) -> None:
    exact = rx.Embedder(str(tiny_dir)).embed(TEXTS)
    mixed = rx.Embedder(str(tiny_dir), matmul_dtype="bfloat16")
    seen: list[torch.dtype] = []
    norm = mixed.model.layers.applied()[0].attention_norm
    handle = norm.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    got = mixed.embed(TEXTS)
    handle.remove()
    assert seen and set(seen) == {torch.float32}  # the residual stream stays float32
    assert got.dtype == np.float32
    assert cosines(got, exact).min() > 0.999
    assert not np.allclose(got, exact, atol=1e-6)  # the products did run in bfloat16
    assert rx.Embedder(mixed.model, matmul_dtype=torch.bfloat16).matmul_dtype == torch.bfloat16
    # compiled: weights frozen into the graph as packed bfloat16 copies, the same products
    compiled = rx.Embedder(mixed.model, matmul_dtype="bfloat16", compile=True)
    assert cosines(compiled.embed(TEXTS), got).min() > 0.9999
    assert compiled._forward.compiled is not None and compiled._forward.frozen


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"compile": "yes"}, "compile='yes': expected True or False"),
        ({"compile": 1}, "compile=1: expected True or False"),
        ({"matmul_dtype": "float16"}, "matmul_dtype='float16': expected None or one of"),
        ({"matmul_dtype": torch.int8}, "matmul_dtype='int8': expected None or one of"),
    ],
)
def test_bad_settings_are_input_errors(tiny_dir: Path, setting: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        rx.Embedder(str(tiny_dir), **setting)


def test_a_failing_compiler_falls_back_to_eager(
    tiny_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    embedder = rx.Embedder(str(tiny_dir))
    expected = embedder.embed(TEXTS)

    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("C++ compile error: no compiler\nmore detail")

    forward = CompiledForward(embedder._pooled, frozen=False)
    forward.compiled = broken  # what a failed inductor build raises at the first call
    embedder._forward = forward
    with caplog.at_level(logging.WARNING, logger="registry_xf.pipelines.compiled_forward"):
        got = embedder.embed(TEXTS)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert "compiling failed, running eagerly (RuntimeError: C++ compile error" in caplog.text
    assert forward.compiled is None  # not tried again


def test_without_a_cpp_compiler_runs_eagerly(
    tiny_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from torch._inductor import config

    from registry_xf.pipelines.compiled_forward import compile_unavailable

    # inductor's own patching: a monkeypatch undo would delete (hide) the setting
    compile_unavailable.cache_clear()
    try:
        with (
            config.patch({"cpp.cxx": (None, "/nonexistent/g++")}),
            caplog.at_level(logging.WARNING, logger="registry_xf.pipelines.compiled_forward"),
        ):
            embedder = rx.Embedder(str(tiny_dir), compile=True)
    finally:
        compile_unavailable.cache_clear()
    assert config.cpp.cxx != (None, "/nonexistent/g++")
    assert "compile=True: running eagerly (torch.compile is unavailable" in caplog.text
    assert embedder._forward.compiled is None
    np.testing.assert_allclose(
        embedder.embed(TEXTS), rx.Embedder(embedder.model).embed(TEXTS), atol=1e-6
    )


@pytest.mark.parametrize("frozen", [True, False])
def test_freezing_is_set_only_while_a_pass_runs(tiny_dir: Path, frozen: bool) -> None:
    """Inductor's global ``freezing`` is what a compiling pass reads: it holds the pass's
    own value during the pass, and its earlier value after it, also after a failure."""
    from torch._inductor import config as inductor_config

    embedder = rx.Embedder(str(tiny_dir))
    seen: list[bool] = []

    def recording(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append(inductor_config.freezing)
        return embedder._pooled(*args, **kwargs)  # type: ignore[arg-type]

    forward = CompiledForward(embedder._pooled, frozen=frozen)
    forward.compiled = recording
    embedder._forward = forward
    before = inductor_config.freezing
    expected = rx.Embedder(embedder.model).embed(TEXTS)
    np.testing.assert_allclose(embedder.embed(TEXTS), expected, atol=0)
    assert seen and set(seen) == {frozen} and inductor_config.freezing == before

    def failing(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append(inductor_config.freezing)
        raise RuntimeError("inductor failed")

    forward.compiled, seen[:] = failing, []
    np.testing.assert_allclose(embedder.embed(TEXTS[:1]), expected[:1], atol=0)
    assert seen == [frozen] and inductor_config.freezing == before


def test_eager_bfloat16_products_keep_their_weights(tiny_dir: Path) -> None:
    """Eagerly, ``matmul_dtype="bfloat16"`` multiplies with bfloat16 copies of the packed
    weights made at the first batch and kept (not converted at every batch): the same
    embeddings as autocast over plain layers, to bfloat16 rounding of a fused GELU."""
    from registry_xf.layers.packed_linear import PackedLinear, packed_weight_in

    mixed = rx.Embedder(str(tiny_dir), matmul_dtype="bfloat16", batch_tokens=24)
    plain = rx.Embedder(
        rx.load(str(tiny_dir), pack=False), matmul_dtype="bfloat16", batch_tokens=24
    )
    got = mixed.embed(TEXTS)
    assert cosines(got, plain.embed(TEXTS)).min() > 0.9999
    layers = [m for m in mixed.model.modules() if isinstance(m, PackedLinear)]
    assert layers
    kept = [packed_weight_in(m.weight, torch.bfloat16) for m in layers]
    np.testing.assert_array_equal(mixed.embed(TEXTS), got)  # deterministic, copies reused
    again = [packed_weight_in(m.weight, torch.bfloat16) for m in layers]
    assert all(a is k for a, k in zip(again, kept, strict=True))
