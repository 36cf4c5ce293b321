"""Decoding steps of fixed shape, and their recording in CUDA graphs.

A recorded step must have the same shapes every time and read nothing back to the host:
the decoder's ``cache_position`` step. On a CPU these tests check that step against the
growing one (every decoder layout and T5, BART, Marian; left-padded batches, sequences
finishing early, sampling, the compiled model) and its errors; where a CUDA device is
present the tests marked ``cuda`` also record it and replay it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import test_decoders_a as a
import test_decoders_b as b
import torch
from test_generation import _can_compile_cpu_kernels

import registry_xf as rx
from registry_xf.errors import InputError, RegistryXFError
from registry_xf.generation import Generator
from registry_xf.generation.cuda_graph import DecodingGraph

VARIANTS = [*a.VARIANTS, *b.FAMILIES, "llama"]
WRITERS: dict[str, Callable[..., Path]] = {
    **{v: a.write_checkpoint for v in a.VARIANTS},
    **{f: b.write_checkpoint for f in [*b.FAMILIES, "llama"]},
}
# left-padded in a batch; long enough with 24 new tokens to pass Mistral's and Phi-3's
# sliding windows, so that the window is applied to the fixed-shape step's query too
PROMPTS = [[1, 40, 50, 60, 70, 80, 90], [1, 11, 12], [1, 14, 41, 42, 43]]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fixed_steps")
    return {v: WRITERS[v](root / v, v) for v in VARIANTS}


def greedy(generator: Generator, **settings: object) -> list[list[int]]:
    return generator.generate_ids(
        PROMPTS, **{"max_new_tokens": 24, "eos_token_ids": [], **settings}
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_fixed_shape_steps_give_the_growing_steps_tokens(
    checkpoints: dict[str, Path], variant: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = rx.load(checkpoints[variant])
    generator = Generator(model, cuda_graphs=True)
    with caplog.at_level(logging.WARNING, logger="registry_xf"):
        fixed = greedy(generator)
        assert greedy(generator) == fixed
    assert fixed == greedy(Generator(model))
    # on a CPU nothing is recorded, and the warning says so once per generator
    assert caplog.text.count("not a CUDA device") == 1


def test_recorded_steps_are_kept_for_calls_of_the_same_shape(
    checkpoints: dict[str, Path],
) -> None:
    """Calls whose caches round up to the same block reuse one step (its cache emptied,
    its stale slots masked); another batch size gets its own; four are kept."""
    from registry_xf.generation import cuda_graph

    model = rx.load(checkpoints["mistral"])
    growing, fixed = Generator(model), Generator(model, cuda_graphs=True)
    assert greedy(fixed) == greedy(growing)
    (first,) = fixed._recorded.steps.values()
    assert not fixed._recorded.busy  # returned after the call
    shorter = dict(max_new_tokens=9, eos_token_ids=[])
    assert fixed.generate_ids(PROMPTS[::-1], **shorter) == growing.generate_ids(
        PROMPTS[::-1], **shorter
    )
    assert list(fixed._recorded.steps.values()) == [first]
    assert first.mask.shape == (3, min(cuda_graph.SLOTS_PER_BLOCK, model.max_positions))
    for n in (1, 2, 4, 5):
        batch = (PROMPTS * 2)[:n]
        assert fixed.generate_ids(batch, **shorter) == growing.generate_ids(batch, **shorter)
    assert len(fixed._recorded.steps) == cuda_graph.KEPT_STEPS
    assert first not in fixed._recorded.steps.values()


def test_sequences_finishing_early_and_sampling(checkpoints: dict[str, Path]) -> None:
    """Finished sequences are fed padding while the others go on; a seeded sampler draws
    the same tokens from the same logits."""
    model = rx.load(checkpoints["llama"])
    growing, fixed = Generator(model), Generator(model, cuda_graphs=True)
    first = greedy(growing)
    eos = [first[1][3], first[2][5]]  # ends the second and the third sequence early
    ended = greedy(growing, eos_token_ids=eos)
    assert greedy(fixed, eos_token_ids=eos) == ended
    assert sorted(len(tokens) for tokens in ended) != [24, 24, 24]
    sampled = dict(temperature=0.8, top_k=20, seed=3)
    assert greedy(fixed, **sampled) == greedy(growing, **sampled)


@pytest.mark.parametrize("variant", ["mistral", "gpt2", "falcon-40b"])
def test_a_fixed_shape_step_gives_the_growing_steps_logits(
    checkpoints: dict[str, Path], variant: str
) -> None:
    """Two new tokens at once, at slots in the middle of a longer cache: the slots after
    them (stale values planted there) and the padding are masked, positions follow the
    real tokens, a sliding window counts from each query's slot."""
    model = rx.load(checkpoints[variant])
    ids, mask = b.left_padded_batch(5, batch=3, seq=12)
    batch, length, total = ids.shape[0], 10, 20
    growing = model.new_cache(batch, total)
    with torch.no_grad():
        model(ids[:, :length], mask[:, :length], cache=growing)
        expected = model(ids[:, length:], mask, cache=growing).logits
        fixed = model.new_cache(batch, total)
        model(ids[:, :length], mask[:, :length], cache=fixed)
        for keys, values in zip(fixed.keys, fixed.values, strict=True):
            keys[:, :, length:].normal_()
            values[:, :, length:].normal_()
        whole = torch.zeros(batch, total, dtype=torch.long)
        whole[:, : ids.shape[1]] = mask
        at = torch.arange(length, ids.shape[1])
        got = model(ids[:, length:], whole, cache=fixed, cache_position=at).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert fixed.length == length  # the caller keeps count


def test_alibi_places_queries_at_their_slots() -> None:
    """Queries at slots 10 and 11 of a 20-slot cache get the biases they get as the last
    two of 12 keys."""
    from registry_xf.layers.positions import ALiBi

    alibi = ALiBi(n_heads=6)
    at = alibi(2, 20, torch.tensor([10, 11]))
    assert at.shape == (1, 6, 2, 20)
    assert torch.equal(at[..., :12], alibi(2, 12))


@pytest.mark.skipif(not _can_compile_cpu_kernels(), reason="no C++ compiler or Python headers")
def test_compiled_fixed_shape_steps_give_the_eager_tokens(checkpoints: dict[str, Path]) -> None:
    import torch._dynamo

    model = rx.load(checkpoints["mistral"])
    eager = greedy(Generator(model), max_new_tokens=12)
    torch._dynamo.reset()
    try:
        compiled = Generator(model, compile=True, cuda_graphs=True)
        assert greedy(compiled, max_new_tokens=12) == eager
    finally:
        torch._dynamo.reset()


def test_what_a_fixed_shape_step_refuses(checkpoints: dict[str, Path]) -> None:
    model = rx.load(checkpoints["mistral"])
    ids = torch.tensor([[5, 6]])
    whole = torch.ones(1, 8, dtype=torch.long)
    cache = model.new_cache(1, 8)
    at = torch.tensor([0, 1])
    bad = torch.tensor([[5, 999]])
    cases = [
        (dict(attention_mask=whole, cache_position=at), "needs a cache"),
        (dict(attention_mask=whole, cache=cache, cache_position=at.int()), "torch.long"),
        (dict(attention_mask=whole, cache=cache, cache_position=at[:1]), r"shape \(2,\)"),
        (dict(attention_mask=whole[:, :4], cache=cache, cache_position=at), "max_length"),
        (dict(cache=cache, cache_position=at), "attention_mask over the whole cache"),
        (dict(attention_mask=whole, cache=cache, cache_position=at + 7), "outside the cache's 8"),
        (dict(attention_mask=whole, cache=cache, cache_position=at - 1), "-1 is outside"),
        # token ids are checked in a step of fixed shape too, where it is not recorded
        (dict(attention_mask=whole, cache=cache, cache_position=at, input_ids=bad), "999"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            model(**{"input_ids": ids, **kwargs})
    assert all(not keys.any() for keys in cache.keys)  # nothing was written


def test_models_whose_steps_cannot_be_recorded_are_refused(tmp_path: Path) -> None:
    path = b.write_checkpoint(
        tmp_path / "dynamic",
        "qwen2",
        rope_parameters={"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0},
    )
    with pytest.raises(RegistryXFError, match="dynamic RoPE scaling"):
        Generator(rx.load(path), cuda_graphs=True)
    mask = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(RegistryXFError, match="needs a CUDA device"):
        DecodingGraph(lambda *args, **kwargs: None, None, mask, record=True)  # type: ignore[arg-type]


SEQ2SEQ = ["t5", "flan", "bart", "marian"]


@pytest.fixture(scope="module")
def seq2seq_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from test_seq2seq import write_bart_like, write_t5

    root = tmp_path_factory.mktemp("fixed_seq2seq")
    writers = {"t5": write_t5, "flan": write_t5, "bart": write_bart_like, "marian": write_bart_like}
    return {v: writers[v](root / v, v) for v in SEQ2SEQ}


@pytest.mark.parametrize("variant", SEQ2SEQ)
def test_encoder_decoders_fixed_shape_steps(
    seq2seq_checkpoints: dict[str, Path], variant: str
) -> None:
    """T5's relative position bias counts from each query's slot; BART's and Marian's
    positions follow the mask; sequences ending early and sampling as in the causal case."""
    from test_seq2seq import source_batch

    model = rx.load(seq2seq_checkpoints[variant])
    growing, fixed = Generator(model), Generator(model, cuda_graphs=True)
    prompts = source_batch()
    first = growing.generate_ids(prompts, max_new_tokens=20, eos_token_ids=[])
    assert fixed.generate_ids(prompts, max_new_tokens=20, eos_token_ids=[]) == first
    eos = [first[1][3]]
    ended = growing.generate_ids(prompts, max_new_tokens=20, eos_token_ids=eos)
    assert fixed.generate_ids(prompts, max_new_tokens=20, eos_token_ids=eos) == ended
    sampled = dict(max_new_tokens=12, temperature=1.5, top_p=0.9, seed=7)
    assert fixed.generate_ids(prompts, **sampled) == growing.generate_ids(prompts, **sampled)


@pytest.mark.skipif(not _can_compile_cpu_kernels(), reason="no C++ compiler or Python headers")
def test_compiled_encoder_decoder_fixed_shape_steps(seq2seq_checkpoints: dict[str, Path]) -> None:
    import torch._dynamo
    from test_seq2seq import source_batch

    model = rx.load(seq2seq_checkpoints["flan"])
    settings = dict(max_new_tokens=10, eos_token_ids=[])
    eager = Generator(model).generate_ids(source_batch(), **settings)
    torch._dynamo.reset()
    try:
        compiled = Generator(model, compile=True, cuda_graphs=True)
        assert compiled.generate_ids(source_batch(), **settings) == eager
    finally:
        torch._dynamo.reset()


def test_relative_bias_places_queries_at_their_slots() -> None:
    from registry_xf.layers.relative_bias import RelativePositionBias

    bias = RelativePositionBias(n_heads=3, n_buckets=8, max_distance=16, bidirectional=False)
    torch.nn.init.normal_(bias.weight)
    at = bias(2, 20, torch.tensor([10, 11]))
    assert at.shape == (1, 3, 2, 20)
    assert torch.equal(at[..., :12], bias(2, 12))


# -- recorded, on a CUDA device ---------------------------------------------------------


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("variant", VARIANTS)
def test_recorded_steps_give_the_eager_tokens(checkpoints: dict[str, Path], variant: str) -> None:
    model = rx.load(checkpoints[variant], device="cuda")
    assert greedy(Generator(model, cuda_graphs=True)) == greedy(Generator(model))


@cuda
@pytest.mark.cuda
def test_a_recorded_step_replays_the_unrecorded_one_bit_for_bit(
    checkpoints: dict[str, Path],
) -> None:
    """bfloat16: the graph runs the very kernels of the step it recorded, on the same
    memory; it is recorded once and its logits stay in one buffer."""
    model = rx.load(checkpoints["mistral"], device="cuda", dtype="bfloat16")
    batch, width, total = 3, 7, 20
    ids = torch.randint(3, 90, (batch, total), device="cuda")
    mask = torch.zeros(batch, total, dtype=torch.long, device="cuda")
    mask[:, :width] = 1
    runs: dict[bool, list[torch.Tensor]] = {}
    for record in (False, True):
        cache = model.new_cache(batch, total)
        with torch.inference_mode():
            model(ids[:, :width], mask[:, :width], cache=cache)
        step = DecodingGraph(model, cache, mask.clone(), record=record)
        runs[record] = []
        for length in range(width, total):
            step.mask[:, length] = 1
            runs[record].append(step(ids[:, length], length).clone())
        if record:
            assert step.graph is not None and step.logits is not None
            assert step(ids[:, -1], total - 1).data_ptr() == step.logits.data_ptr()
    for unrecorded, recorded in zip(runs[False], runs[True], strict=True):
        assert torch.equal(unrecorded, recorded)


@cuda
@pytest.mark.cuda
def test_compiled_recorded_steps_give_the_eager_tokens(checkpoints: dict[str, Path]) -> None:
    pytest.importorskip("triton")
    import torch._dynamo

    model = rx.load(checkpoints["mistral"], device="cuda")
    eager = greedy(Generator(model))
    torch._dynamo.reset()
    try:
        assert greedy(Generator(model, compile=True, cuda_graphs=True)) == eager
    finally:
        torch._dynamo.reset()


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("variant", SEQ2SEQ)
def test_recorded_encoder_decoder_steps_give_the_eager_tokens(
    seq2seq_checkpoints: dict[str, Path], variant: str
) -> None:
    from test_seq2seq import source_batch

    model = rx.load(seq2seq_checkpoints[variant], device="cuda")
    settings = dict(max_new_tokens=20, eos_token_ids=[])
    eager = Generator(model).generate_ids(source_batch(), **settings)
    assert Generator(model, cuda_graphs=True).generate_ids(source_batch(), **settings) == eager
