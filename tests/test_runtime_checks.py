"""Runtime inputs and settings: each bad one is an InputError or SettingsError that names
the argument, what was expected and what was found; good ones give the results they gave."""

from __future__ import annotations

import logging
import threading
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VOCAB, write_hf_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_tokenizer import write_tokenizer
from tokenizers import Tokenizer

import registry_xf as rx
from registry_xf.generation import GenerationSettings, Generator, SettingsError, Temperature
from registry_xf.tokenizers.hf_tokenizer import hf_tokenizer

HYPOTHESIS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = write_hf_checkpoint(tmp_path_factory.mktemp("runtime") / "bert", "bert")
    write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def bert(bert_dir: Path) -> rx.Encoder:
    return rx.load(bert_dir)


def tiny_llama(**hyper: int) -> torch.nn.Module:
    """A random one-layer Llama from configs/llama.cfg (no checkpoint)."""
    values = dict(
        vocab_size=VOCAB,
        hidden_width=16,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        head_width=8,
        intermediate_width=24,
        max_positions=64,
    )
    values.update(hyper)
    config = str(resources.files("registry_xf.configs") / "llama.cfg")
    torch.manual_seed(0)
    return rx.build(config, overrides={f"hyper.{k}": v for k, v in values.items()}, device="cpu")


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_llama()


IDS = torch.tensor([[2, 7, 8, 9, 3], [2, 10, 11, 3, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])


# -- the encoder ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        (IDS.float(), r"input_ids must hold integer token ids .* found dtype torch.float32"),
        (IDS.bool(), r"input_ids must hold integer token ids .* found dtype torch.bool"),
        (IDS.to(torch.uint8), r"input_ids .* found dtype torch.uint8"),
        (IDS.to(torch.int16), r"input_ids .* found dtype torch.int16"),
        (torch.zeros(0, 5, dtype=torch.long), r"input_ids is an empty batch .*\(0, 5\)"),
        (torch.zeros(2, 0, dtype=torch.long), r"input_ids has sequences of no tokens .*\(2, 0\)"),
        (IDS[None], r"input_ids must be \(batch, seq\); found shape \(1, 2, 5\)"),
        (IDS.tolist(), r"input_ids must be a torch tensor .* found a list"),
    ],
    ids=["float", "bool", "uint8", "int16", "empty-batch", "no-tokens", "3d", "list"],
)
def test_encoder_refuses_ids(bert: rx.Encoder, ids: object, expected: str) -> None:
    with pytest.raises(rx.InputError, match=expected):
        bert(ids)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(attention_mask=MASK.float()), r"attention_mask must be bool or integer .*float32"),
        (dict(attention_mask=MASK[:, :4]), r"attention_mask shape \(2, 4\) is not .*\(2, 5\)"),
        (dict(attention_mask=MASK[0]), r"attention_mask shape \(5,\) is not"),
        (
            dict(token_type_ids=torch.zeros(2, 4, dtype=torch.long)),
            r"token_type_ids must have shape \(2, 5\), as input_ids; found \(2, 4\)",
        ),
        (
            dict(token_type_ids=torch.zeros(1, 5, dtype=torch.long)),
            r"token_type_ids must have shape \(2, 5\), as input_ids; found \(1, 5\)",
        ),
        (
            dict(token_type_ids=torch.zeros(2, 5)),
            r"token_type_ids must be torch.int64 or torch.int32; found dtype torch.float32",
        ),
        (
            dict(positions=torch.arange(5)),
            r"positions must have shape \(2, 5\) or \(1, 5\), as input_ids; found \(5,\)",
        ),
        (
            dict(positions=torch.arange(5.0)[None]),
            r"positions must be torch.int64 or torch.int32; found dtype torch.float32",
        ),
        (dict(positions=[[0, 1, 2, 3, 4]]), r"positions must be a torch tensor .* found a list"),
    ],
    ids=[
        "float-mask",
        "short-mask",
        "1d-mask",
        "types-shape",
        "types-one-row",
        "types-float",
        "positions-1d",
        "positions-float",
        "positions-list",
    ],
)
def test_encoder_refuses_other_inputs(bert: rx.Encoder, kwargs: dict, expected: str) -> None:
    with pytest.raises(rx.InputError, match=expected):
        bert(IDS, **{"attention_mask": MASK, **kwargs})


def test_encoder_refuses_inputs_on_another_device(bert: rx.Encoder) -> None:
    with pytest.raises(rx.InputError, match=r"input_ids is on meta and the model on cpu"):
        bert(IDS.to("meta"))
    with pytest.raises(rx.InputError, match=r"attention_mask is on meta and input_ids on cpu"):
        bert(IDS, MASK.to("meta"))


def test_equivalent_encoder_inputs_give_the_same_output(bert: rx.Encoder) -> None:
    with torch.no_grad():
        expected = bert(IDS, MASK).last_hidden_state
        for ids, mask in [(IDS.int(), MASK), (IDS, MASK.bool()), (IDS.int(), MASK.to(torch.uint8))]:
            torch.testing.assert_close(bert(ids, mask).last_hidden_state, expected, rtol=0, atol=0)
        positions = torch.arange(5)[None]
        one_row = bert(IDS, MASK, positions=positions).last_hidden_state
        every_row = bert(IDS, MASK, positions=positions.expand(2, -1)).last_hidden_state
        torch.testing.assert_close(one_row, every_row, rtol=0, atol=0)


@HYPOTHESIS
@given(
    ids=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12),
    dtype=st.sampled_from([torch.int64, torch.int32]),
    mask_dtype=st.sampled_from([torch.int64, torch.int32, torch.bool, torch.uint8]),
    n_padded=st.integers(0, 3),
)
def test_any_valid_encoder_input_runs_and_ignores_its_dtype(
    bert: rx.Encoder, ids: list[int], dtype: torch.dtype, mask_dtype: torch.dtype, n_padded: int
) -> None:
    """Property: ids in the vocabulary and a 0/1 mask of any accepted dtype give finite
    outputs, the same as int64 ids with an int64 mask."""
    row = torch.tensor([ids])
    mask = torch.ones_like(row)
    mask[0, len(ids) - min(n_padded, len(ids) - 1) :] = 0
    with torch.no_grad():
        expected = bert(row, mask).last_hidden_state
        got = bert(row.to(dtype), mask.to(mask_dtype)).last_hidden_state
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# -- the decoder and its cache -----------------------------------------------------------


def test_decoder_refuses_ids_and_masks(llama: torch.nn.Module) -> None:
    ids = torch.tensor([[1, 5, 6]])
    for bad, expected in [
        (ids.float(), r"input_ids .* found dtype torch.float32"),
        (ids[:0], r"input_ids is an empty batch"),
        (ids[:, :0], r"input_ids has sequences of no tokens"),
    ]:
        with pytest.raises(rx.InputError, match=expected):
            llama(bad)
    with pytest.raises(rx.InputError, match=r"attention_mask shape \(1, 4\) is not"):
        llama(ids, torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(rx.InputError, match=r"attention_mask must be bool or integer"):
        llama(ids, torch.ones(1, 3))
    with pytest.raises(rx.InputError, match=r"positions must have shape \(1, 3\)"):
        llama(ids, positions=torch.arange(4)[None])


def test_cache_for_another_batch_or_length_or_model(llama: torch.nn.Module) -> None:
    ids = torch.tensor([[1, 5, 6], [1, 7, 8]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        with pytest.raises(rx.InputError, match=r"made for a batch of 3 and input_ids .* 2"):
            llama(ids, mask, cache=llama.new_cache(3, 8))
        with pytest.raises(rx.InputError, match=r"KV cache overflow: 0 cached \+ 3 new .* 2"):
            llama(ids, mask, cache=llama.new_cache(2, 2))
        other = tiny_llama(n_kv_heads=2)
        with pytest.raises(rx.InputError, match=r"holds 2 heads .* gives 1"):
            llama(ids, mask, cache=other.new_cache(2, 8))
        deeper = tiny_llama(n_layers=2)
        with pytest.raises(rx.InputError, match=r"the KV cache has 2 layers and the model 1"):
            llama(ids, mask, cache=deeper.new_cache(2, 8))
        with pytest.raises(rx.InputError, match=r"cache must be a KVCache .* found dict"):
            llama(ids, mask, cache={})
        cache = llama.new_cache(2, 8)
        llama(ids, mask, cache=cache)
        # a mask that does not cover the 3 cached tokens
        with pytest.raises(rx.InputError, match=r"so 1 cached ones, but the cache holds 3"):
            llama(ids[:, :1], mask[:, :2], cache=cache)
        with pytest.raises(rx.InputError, match=r"covers 2 tokens, fewer than the 3"):
            llama(ids, mask[:, :2], cache=cache)
        assert cache.length == 3  # nothing refused changed the cache
        llama(ids[:, :1], torch.ones(2, 4, dtype=torch.long), cache=cache)
        assert cache.length == 4


def test_cached_steps_still_equal_a_full_forward(llama: torch.nn.Module) -> None:
    ids = torch.tensor([[0, 1, 5, 6, 7, 8], [1, 9, 10, 11, 12, 13]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        full = llama(ids, mask).logits
        cache = llama.new_cache(2, 6)
        steps = [llama(ids[:, :3], mask[:, :3], cache=cache).logits]
        for t in range(3, 6):
            steps.append(
                llama(ids[:, t : t + 1].int(), mask[:, : t + 1].bool(), cache=cache).logits
            )
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], atol=1e-5, rtol=0)


# -- generation settings --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (dict(seed=2**64), r"seed: Input should be less than or equal to 18446744073709551615"),
        (dict(seed=-1), r"seed: Input should be greater than or equal to 0"),
        (dict(seed=True), r"seed: expected a number, found a bool"),
        (dict(eos_token_ids=-3), r"eos_token_ids.0: Input should be greater than or equal to 0"),
        (dict(temperature=float("nan")), r"temperature: Input should be a finite number"),
        (dict(temperature=float("inf")), r"temperature: Input should be a finite number"),
        (dict(temperature=-1e-45), r"temperature: Input should be greater than or equal to 0"),
        (dict(repetition_penalty=1e-300), r"repetition_penalty: .* greater than or equal to"),
        (dict(max_new_tokens=2**40), r"max_new_tokens: .* less than or equal to 1048576"),
        (dict(temperature=1, top_p=float("nan")), r"top_p: Input should be a finite number"),
    ],
)
def test_settings_out_of_range(settings: dict, expected: str) -> None:
    with pytest.raises(SettingsError, match=expected):
        GenerationSettings(**settings)


SETTING_NAMES = [*GenerationSettings.model_fields, "temprature"]
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.lists(st.integers(min_value=-(2**70), max_value=2**70), max_size=3),
)


@HYPOTHESIS
@given(values=st.dictionaries(st.sampled_from(SETTING_NAMES), ANY_VALUE, max_size=4))
def test_any_settings_are_in_range_or_a_settings_error(values: dict) -> None:
    """Property: settings built from anything are in their stated ranges, or refused with a
    SettingsError (never another exception)."""
    try:
        s = GenerationSettings(**values)
    except SettingsError:
        return
    assert 1 <= s.max_new_tokens <= 2**20
    assert s.seed is None or 0 <= s.seed < 2**64
    assert s.temperature is None or (0 <= s.temperature < float("inf"))
    assert all(0 <= t for t in s.eos_token_ids or [])
    assert s.repetition_penalty is None or 1e-6 <= s.repetition_penalty <= 1e6


def test_numpy_numbers_are_settings() -> None:
    s = GenerationSettings(
        max_new_tokens=np.int64(3),
        seed=np.uint64(2**64 - 1),
        eos_token_ids=[np.int32(2)],
        temperature=np.float32(0.5),
    )
    assert (s.max_new_tokens, s.seed, s.eos_token_ids, s.temperature) == (3, 2**64 - 1, [2], 0.5)
    assert type(s.seed) is int and type(s.eos_token_ids[0]) is int
    assert GenerationSettings(eos_token_ids=np.int64(5)).eos_token_ids == [5]


def test_end_and_prompt_ids_against_the_vocabulary(llama: torch.nn.Module) -> None:
    g = Generator(llama)
    for eos in (2**70, VOCAB):
        with pytest.raises(
            SettingsError, match=rf"eos_token_ids \[{eos}\] outside .*\[0, {VOCAB}\)"
        ):
            g.generate_ids([[1, 5]], eos_token_ids=[eos], max_new_tokens=2)
    with pytest.raises(rx.InputError, match=rf"outside the vocabulary \[0, {VOCAB}\): \[{2**70}\]"):
        g.generate_ids([[1, 2**70]], max_new_tokens=2)
    with pytest.raises(rx.InputError, match=r"prompt 0 has a token id that is not an integer: 5.0"):
        g.generate_ids([[1, 5.0]], max_new_tokens=2)
    with pytest.raises(
        rx.InputError, match=r"prompt 0 has a token id that is not an integer: True"
    ):
        g.generate_ids([[1, True]], max_new_tokens=2)
    with pytest.raises(rx.InputError, match=r"prompt 0 has a token id that is not an integer"):
        g.generate_ids(torch.tensor([[1.0, 5.0]]), max_new_tokens=2)
    with pytest.raises(rx.InputError, match=r"prompt 0 must be a list of token ids; found int"):
        g.generate_ids([1, 5], max_new_tokens=2)


def test_numpy_and_tensor_ids_give_the_python_int_results(llama: torch.nn.Module) -> None:
    g = Generator(llama, settings={"max_new_tokens": 4, "eos_token_ids": []})
    prompts = [[1, 5, 6, 7], [1, 9]]
    expected = g.generate_ids(prompts)
    assert g.generate_ids([[np.int64(t) for t in p] for p in prompts]) == expected
    assert g.generate_ids([np.asarray(p, dtype=np.int32) for p in prompts]) == expected
    assert g.generate_ids([torch.tensor(p) for p in prompts]) == expected
    assert g.generate_ids(np.asarray([prompts[0]])) == expected[:1]


@pytest.mark.parametrize("temperature", [1e-45, 5e-324, 1e-30, 1e-5])
def test_tiny_temperature_samples_the_most_likely_token(
    llama: torch.nn.Module, temperature: float
) -> None:
    g = Generator(llama, settings={"max_new_tokens": 6, "eos_token_ids": []})
    prompts = [[1, 5, 6, 7], [1, 9]]
    greedy = g.generate_ids(prompts)
    assert g.generate_ids(prompts, temperature=temperature, seed=2**64 - 1) == greedy


def test_tiny_temperature_keeps_ties_and_the_distribution() -> None:
    scores = torch.tensor([[3.0, 3.0, 1.0, float("-inf")], [1e30, -1e30, 0.0, 1e30 - 1e24]])
    probs = Temperature(1e-45)(torch.zeros(2, 1, dtype=torch.long), scores).softmax(-1)
    assert torch.isfinite(probs).all()
    assert probs[0].tolist() == [0.5, 0.5, 0.0, 0.0]
    assert probs[1].tolist() == [1.0, 0.0, 0.0, 0.0]
    # the shifted scaling gives the plain one's distribution where that one is finite
    plain = torch.randn(3, 50) * 4
    for t in (9e-5, 5e-5):
        shifted = Temperature(t)(torch.zeros(3, 1, dtype=torch.long), plain * t * 1e4)
        torch.testing.assert_close(shifted.softmax(-1), (plain * 1e4).softmax(-1))
    with pytest.raises(SettingsError, match="temperature must be finite and > 0"):
        Temperature(float("nan"))


# -- texts: surrogates and other characters ----------------------------------------------------


def test_lone_surrogates_read_as_replacement_characters(
    bert: rx.Encoder, caplog: pytest.LogCaptureFixture
) -> None:
    import registry_xf.tokenizers.hf_tokenizer as module

    module._warned_surrogates = False
    embedder = rx.Embedder(bert)
    texts = ["the cat\ud800 sat", "\udfff", "fine", "a\udc80b\ud83d"]
    with caplog.at_level(logging.WARNING, logger="registry_xf.tokenizers.hf_tokenizer"):
        got = embedder.embed(texts)
        embedder.embed(texts)
    replaced = [t.translate({c: "\ufffd" for c in range(0xD800, 0xE000)}) for t in texts]
    np.testing.assert_array_equal(got, embedder.embed(replaced))
    warnings = [r for r in caplog.records if "lone surrogate" in r.getMessage()]
    assert len(warnings) == 1 and "text 0 (of 4)" in warnings[0].getMessage()
    offsets = bert.tokenizer(["the cat\ud800 sat"]).offsets[0]
    assert offsets == bert.tokenizer([replaced[0]]).offsets[0]  # one character for one


def test_texts_that_are_not_strings(bert: rx.Encoder) -> None:
    with pytest.raises(rx.InputError, match=r"text 1 is a bytes, not a str"):
        rx.Embedder(bert).embed(["fine", b"bytes"])  # type: ignore[list-item]
    with pytest.raises(rx.InputError, match=r"max_length must be an int of at least 1; found 0"):
        bert.tokenizer.encode(["x"], max_length=0)


def test_empty_and_control_texts(bert: rx.Encoder) -> None:
    vectors = rx.Embedder(bert).embed(["", "\x00\x1b[31m\u200b", "the cat"])
    assert vectors.shape == (3, bert.width) and np.isfinite(vectors).all()


# -- one tokenizer, many threads -----------------------------------------------------------


def test_tokenizer_shared_between_threads(bert_dir: Path) -> None:
    """Eight threads, each with its own settings, encode with one tokenizer: every result
    equals the one-thread result, and the shared tokenizers object never truncates."""
    tokenizer = hf_tokenizer(bert_dir, max_length=12)
    words = "the cat sat on the mat and the dog ran on the mat hello world".split()
    texts = [" ".join(words[: 3 + (i * 5) % len(words)] * (1 + i % 3)) for i in range(24)]
    settings_by_thread = [
        dict(),
        dict(truncation=False),
        dict(max_length=5),
        dict(max_length=20),
        dict(truncation=False, add_special_tokens=False),
        dict(max_length=7, add_special_tokens=False),
        dict(),
        dict(truncation=False),
    ]
    expected = [[e.ids for e in tokenizer.encode(texts, **kwargs)] for kwargs in settings_by_thread]
    assert max(len(ids) for ids in expected[1]) > 20  # untruncated texts are long
    failures: list[str] = []
    start = threading.Barrier(len(settings_by_thread))

    def work(index: int) -> None:
        start.wait()
        for round_ in range(100):
            got = [e.ids for e in tokenizer.encode(texts, **settings_by_thread[index])]
            if got != expected[index]:
                failures.append(f"thread {index}, round {round_}")
                return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(settings_by_thread))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert failures == []
    assert tokenizer.tokenizer.truncation is None


@HYPOTHESIS
@given(
    text=st.text(max_size=80),
    max_length=st.integers(1, 40),
    add_special_tokens=st.booleans(),
)
def test_truncation_equals_the_tokenizers_library(
    bert_dir: Path, text: str, max_length: int, add_special_tokens: bool
) -> None:
    """Property: our truncating encode equals tokenizers' own truncation, specials kept."""
    ours = hf_tokenizer(bert_dir, max_length=None)
    theirs = Tokenizer.from_file(str(bert_dir / "tokenizer.json"))
    theirs.enable_truncation(max_length)
    clean = text.translate({c: "\ufffd" for c in range(0xD800, 0xE000)})
    if add_special_tokens and max_length <= 2:  # [CLS] and [SEP] leave no room
        with pytest.raises(rx.InputError, match="leaves no room for text"):
            ours.encode([text], max_length=max_length, add_special_tokens=True)
        return
    expected = theirs.encode(clean, add_special_tokens=add_special_tokens)
    assert len(expected.ids) <= max_length
    (got,) = ours.encode([text], max_length=max_length, add_special_tokens=add_special_tokens)
    assert (got.ids, got.offsets, got.type_ids) == (
        expected.ids,
        expected.offsets,
        expected.type_ids,
    )
