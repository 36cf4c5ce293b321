"""Embedder(streams=N): batches on N threads give the embeddings of one stream (to float
rounding), in the input order; torch's thread count comes back; a failing batch's error
reaches the caller; bad settings are typed errors."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_hf_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_tokenizer import write_tokenizer

import registry_xf as rx
from registry_xf.errors import InputError
from registry_xf.pipelines.streams import check_streams, run_in_streams

WORDS = "the cat sat on a mat and dog ran is hello world".split()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_hf_checkpoint(tmp_path_factory.mktemp("streams") / "bert", "bert", seed=5)
    write_tokenizer(path)
    return path


def corpus(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(0, 30))) for _ in range(n)]


def test_streams_give_the_embeddings_of_one_stream_in_order(tiny_dir: Path) -> None:
    one = rx.Embedder(str(tiny_dir), batch_tokens=64)
    two = rx.Embedder(one.model, batch_tokens=64, streams=2)
    texts = corpus(120, seed=1)  # empty texts included
    threads = torch.get_num_threads()
    expected = one.embed(texts)
    got = two.embed(texts)
    assert torch.get_num_threads() == threads
    # each batch as it is alone, on fewer threads: sums split otherwise round otherwise
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # prompted embeddings go through the same streams
    np.testing.assert_allclose(
        two.embed(texts, prompt="query: "), one.embed(texts, prompt="query: "), rtol=0, atol=1e-6
    )


def test_a_failing_item_stops_the_streams_and_reaches_the_caller() -> None:
    done: list[int] = []
    lock = threading.Lock()

    def work(item: int) -> None:
        if item == 7:
            raise ValueError("item 7 is bad")
        with lock:
            done.append(item)

    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match="item 7 is bad"):
        run_in_streams(work, range(1000), streams=2)
    assert torch.get_num_threads() == threads
    assert len(done) < 1000 and 7 not in done  # the other stream stopped early

    seen: list[bool] = []
    run_in_streams(lambda item: seen.append(torch.is_inference_mode_enabled()), range(4), 2)
    assert seen == [True] * 4


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 1000), max_size=60), st.integers(1, 2))
def test_every_item_is_worked_once(items: list[int], streams: int) -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def work(item: int) -> None:
        with lock:
            seen.append(item)

    run_in_streams(work, items, streams)
    assert sorted(seen) == sorted(items)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2", 10**6])
def test_bad_stream_counts_are_input_errors(tiny_dir: Path, bad: object) -> None:
    with pytest.raises(InputError, match=r"streams=.*expected an integer from 1 to"):
        check_streams(bad)
    with pytest.raises(InputError, match=r"streams="):
        rx.Embedder(str(tiny_dir), streams=bad)  # type: ignore[arg-type]


def test_int8_loops_stay_compiled_when_streams_change_the_thread_count(tiny_dir: Path) -> None:
    """Each thread count in use gets graphs of its own: alternating one and two streams
    must not exhaust torch.compile's recompilation limit (which would fall back to the
    slower unfused steps for the whole process)."""
    from registry_xf.layers.int8_linear import _Fused

    one = rx.Embedder(str(tiny_dir), batch_tokens=64, quantize="int8")
    two = rx.Embedder(one.model, batch_tokens=64, streams=2)
    texts = corpus(60, seed=2)
    for _ in range(3):
        np.testing.assert_allclose(two.embed(texts), one.embed(texts), rtol=0, atol=1e-5)
    assert _Fused.failed is None
