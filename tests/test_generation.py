"""Generation: greedy parity with HF's generate, sampling, processors, stopping, streaming."""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

import registry_xf as rx
from registry_xf.cli import main
from registry_xf.generation import (
    GenerationSettings,
    Generator,
    MinP,
    RepetitionPenalty,
    SettingsError,
    Temperature,
    TopK,
    TopP,
)
from registry_xf.registry import registry

SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at")]
MAX_POSITIONS = 96
PAD, BOS, EOS = 0, 1, 2


def byte_level_pieces() -> list[str]:
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return SPECIALS + alphabet + [a + b for a, b in MERGES]


VOCAB = len(byte_level_pieces())  # 265


def write_byte_level_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer.json (any text encodes; "<s>" first) of VOCAB pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {piece: i for i, piece in enumerate(byte_level_pieces())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", BOS)]
    )
    tok.add_special_tokens(SPECIALS)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf8")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LlamaForCausalLM with a byte-level tokenizer, saved by transformers."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=37,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=0.2,  # spread-out next-token distributions
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    directory = tmp_path_factory.mktemp("generation") / "llama"
    tf.LlamaForCausalLM(config).save_pretrained(directory)
    write_byte_level_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def model(llama_dir: Path) -> torch.nn.Module:
    return rx.load(llama_dir)


@pytest.fixture(scope="module")
def hf_model(llama_dir: Path):  # type: ignore[no-untyped-def]
    import transformers as tf

    return tf.LlamaForCausalLM.from_pretrained(llama_dir, attn_implementation="eager").eval()


PROMPTS = [[BOS, 40, 50, 60, 70, 80, 90, 100], [BOS, 11, 12], [BOS, 140, 141, 142, 143]]


def left_pad(prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def hf_greedy(hf_model, prompts, max_new_tokens: int, eos) -> list[list[int]]:  # type: ignore[no-untyped-def]
    ids, mask = left_pad(prompts)
    out = hf_model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=PAD,
    )
    return out[:, ids.shape[1] :].tolist()


def full_forward_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding the slow way: a full forward over the whole sequence each step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).logits
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def next_token_probs(model: torch.nn.Module, prompt: list[int], new: list[int]) -> torch.Tensor:
    """The next-token distribution before each new token, (len(new), vocab)."""
    ids = torch.tensor([prompt + new])
    with torch.no_grad():
        logits = model(ids, torch.ones_like(ids)).logits[0]
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(new)].float().softmax(-1)


class Script:
    """A logits processor that forces the tokens of ``script``, one per step."""

    def __init__(self, script: Sequence[int]):
        self.script = list(script)
        self.step = 0

    def __call__(self, input_ids, scores, attention_mask=None):  # type: ignore[no-untyped-def]
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.script[min(self.step, len(self.script) - 1)]] = 0.0
        self.step += 1
        return forced


# -- greedy parity ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def greedy(model: torch.nn.Module) -> list[list[int]]:
    """32 greedy new tokens for each of PROMPTS, end-of-sequence disabled."""
    return Generator(model).generate_ids(PROMPTS, max_new_tokens=32, eos_token_ids=[])


def test_greedy_matches_hf_generate(greedy: list[list[int]], hf_model) -> None:  # type: ignore[no-untyped-def]
    assert [len(x) for x in greedy] == [32, 32, 32]
    assert greedy == hf_greedy(hf_model, PROMPTS, 32, eos=None)


def test_greedy_matches_hf_generate_with_eos(
    model: torch.nn.Module,
    hf_model,  # type: ignore[no-untyped-def]
    greedy: list[list[int]],
) -> None:
    free = greedy
    # end-of-sequence ids that the sequences do produce, at different steps
    eos = sorted({free[0][5], free[1][12]})
    ours = Generator(model).generate_ids(PROMPTS, max_new_tokens=32, eos_token_ids=eos)
    hf = hf_greedy(hf_model, PROMPTS, 32, eos=eos)
    assert len(ours[0]) <= 6 and len(ours[1]) <= 13
    for got, expected in zip(ours, hf, strict=True):
        assert got == expected[: len(got)]
        assert len(got) == 32 or got[-1] in eos  # ends at its end-of-sequence token
        assert all(t == PAD for t in expected[len(got) :])  # HF pads the finished ones
    # stopping one sequence changes nothing for the others
    for got, unstopped in zip(ours, free, strict=True):
        assert got == unstopped[: len(got)]


def test_incremental_decoding_equals_full_forwards(
    model: torch.nn.Module, greedy: list[list[int]]
) -> None:
    ours = greedy
    for prompt, got in zip(PROMPTS, ours, strict=True):
        assert got == full_forward_greedy(model, prompt, 32)
    alone = [
        Generator(model).generate_ids([p], max_new_tokens=32, eos_token_ids=[])[0] for p in PROMPTS
    ]
    assert alone == ours  # left padding in a batch changes nothing


def _can_compile_cpu_kernels() -> bool:
    """torch.compile on a CPU builds C++ kernels: it needs a compiler and Python's headers."""
    include = sysconfig.get_paths().get("include")
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    return compiler is not None and include is not None and Path(include, "Python.h").exists()


@pytest.mark.skipif(not _can_compile_cpu_kernels(), reason="no C++ compiler or Python headers")
def test_compiled_generation_gives_the_eager_tokens(
    model: torch.nn.Module, greedy: list[list[int]]
) -> None:
    """``compile=True``: the whole model compiles (the packed linear layers as one opaque
    operator, the cache written in place), greedy decoding of a left-padded batch gives
    exactly the eager tokens, and other lengths and batch sizes reuse the two graphs."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    generator = Generator(model, compile=True)
    try:
        assert generator.generate_ids(PROMPTS, max_new_tokens=32, eos_token_ids=[]) == greedy
        shorter = generator.generate_ids(PROMPTS[:2], max_new_tokens=20, eos_token_ids=[])
        assert shorter == [tokens[:20] for tokens in greedy[:2]]
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # prompt, step
    finally:
        torch._dynamo.reset()


def test_greedy_with_repetition_penalty_matches_hf(model: torch.nn.Module, hf_model) -> None:  # type: ignore[no-untyped-def]
    prompts = [[BOS, 40, 40, 50, 60], [BOS, 11, 12, 13, 11]]  # same length: HF counts padding
    ours = Generator(model).generate_ids(
        prompts, max_new_tokens=32, eos_token_ids=[], repetition_penalty=1.5
    )
    ids, mask = left_pad(prompts)
    hf = hf_model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=32,
        do_sample=False,
        repetition_penalty=1.5,
        eos_token_id=None,
        pad_token_id=PAD,
    )
    assert ours == hf[:, ids.shape[1] :].tolist()
    assert ours != Generator(model).generate_ids(prompts, max_new_tokens=32, eos_token_ids=[])


def test_generate_ids_takes_a_tensor(model: torch.nn.Module) -> None:
    g = Generator(model)
    assert g.generate_ids(torch.tensor([PROMPTS[0]]), max_new_tokens=5) == g.generate_ids(
        [PROMPTS[0]], max_new_tokens=5
    )
    assert g.generate_ids([], max_new_tokens=5) == []


def test_a_generator_takes_a_source(model: torch.nn.Module, llama_dir: Path) -> None:
    from_source = Generator(str(llama_dir))
    assert from_source.model.record.origin.path == llama_dir
    assert from_source.generate_ids([PROMPTS[0]], max_new_tokens=8) == Generator(
        model
    ).generate_ids([PROMPTS[0]], max_new_tokens=8)


# -- sampling -----------------------------------------------------------------------------


def test_sampling_with_a_seed_is_reproducible(
    model: torch.nn.Module, greedy: list[list[int]]
) -> None:
    g = Generator(model)
    settings = dict(max_new_tokens=32, temperature=1.0, seed=7, eos_token_ids=[])
    first = g.generate_ids(PROMPTS, **settings)
    assert first == g.generate_ids(PROMPTS, **settings)
    assert first != g.generate_ids(PROMPTS, **{**settings, "seed": 8})
    assert first != greedy


@pytest.mark.parametrize(
    "settings",
    [dict(top_k=1), dict(min_p=1.0), dict(top_p=1e-6), dict(temperature=0.5, top_k=1)],
    ids=["top_k=1", "min_p=1", "top_p=tiny", "temperature+top_k=1"],
)
def test_narrowest_sampling_is_greedy(
    model: torch.nn.Module, greedy: list[list[int]], settings: dict
) -> None:
    g = Generator(model)
    sampled = g.generate_ids(
        PROMPTS, max_new_tokens=32, eos_token_ids=[], seed=0, **{"temperature": 1.0, **settings}
    )
    assert sampled == greedy


def _allowed_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """The nucleus: the most likely tokens until their probabilities sum to >= p."""
    ordered, order = probs.sort(descending=True)
    before = ordered.cumsum(-1) - ordered  # probability of the more likely tokens
    keep = before < p
    return torch.zeros_like(keep).scatter(-1, order, keep)


@pytest.mark.parametrize(
    "settings",
    [dict(top_k=3), dict(top_p=0.5), dict(min_p=0.3), dict(top_k=5, top_p=0.8, min_p=0.1)],
    ids=["top_k", "top_p", "min_p", "all"],
)
def test_sampling_keeps_to_the_allowed_tokens(model: torch.nn.Module, settings: dict) -> None:
    g = Generator(model)
    prompt = PROMPTS[0]
    seen_other_than_greedy = False
    for seed in range(3):
        new = g.generate_ids(
            [prompt], max_new_tokens=24, eos_token_ids=[], temperature=1.0, seed=seed, **settings
        )[0]
        probs = next_token_probs(model, prompt, new)
        for step, token in enumerate(new):
            p = probs[step]
            allowed = torch.ones_like(p, dtype=torch.bool)
            if "top_k" in settings:
                allowed &= p >= p.topk(settings["top_k"]).values[-1]
            if "top_p" in settings:
                # top-p on what top-k left, renormalised
                kept = torch.where(allowed, p, torch.zeros_like(p))
                allowed &= _allowed_top_p(kept / kept.sum(), settings["top_p"])
            if "min_p" in settings:
                kept = torch.where(allowed, p, torch.zeros_like(p))
                allowed &= kept >= settings["min_p"] * kept.max() * (1 - 1e-5)
            assert allowed[token], f"step {step}: token {token} was not allowed"
            seen_other_than_greedy |= token != int(p.argmax())
    assert seen_other_than_greedy  # the test would be empty if every pick were the greedy one


# -- the processors on tensors, against HF's -----------------------------------------------


def test_processors_match_hf_on_tensors() -> None:
    import transformers as tf

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 50, generator=g) * 3
    scores[0, :5] = scores[0, 5]  # ties
    ids = torch.randint(0, 50, (4, 12), generator=g)
    pairs = [
        (Temperature(0.7), tf.TemperatureLogitsWarper(0.7)),
        (TopK(5), tf.TopKLogitsWarper(5)),
        (TopK(100), tf.TopKLogitsWarper(100)),
        (TopP(0.6), tf.TopPLogitsWarper(0.6)),
        (TopP(1.0), tf.TopPLogitsWarper(1.0)),
        (MinP(0.2), tf.MinPLogitsWarper(0.2)),
        (MinP(1.0), tf.MinPLogitsWarper(1.0)),
        (RepetitionPenalty(1.3), tf.RepetitionPenaltyLogitsProcessor(1.3)),
        (RepetitionPenalty(0.8), tf.RepetitionPenaltyLogitsProcessor(0.8)),
    ]
    for ours, theirs in pairs:
        expected = theirs(ids, scores.clone())
        got = ours(ids, scores.clone(), torch.ones_like(ids))
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=repr(ours))


def test_repetition_penalty_ignores_padding() -> None:
    scores = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    ids = torch.tensor([[0, 0, 1, 2]])
    mask = torch.tensor([[0, 0, 1, 1]])  # the two 0s are padding
    got = RepetitionPenalty(2.0)(ids, scores, mask)
    assert got.tolist() == [[2.0, -4.0, 1.0, -2.0]]


def test_components_are_registered() -> None:
    assert {
        "registry_xf.Temperature.v1",
        "registry_xf.TopK.v1",
        "registry_xf.TopP.v1",
        "registry_xf.MinP.v1",
        "registry_xf.RepetitionPenalty.v1",
    } <= set(registry.logits_processors.names())
    assert {
        "registry_xf.MaxNewTokens.v1",
        "registry_xf.EOSToken.v1",
        "registry_xf.StopStrings.v1",
    } <= set(registry.stopping_criteria.names())
    top_k = registry.logits_processors.get("registry_xf.TopK.v1")(k="3")  # converted
    assert isinstance(top_k, TopK) and top_k.k == 3
    with pytest.raises(rx.ConfigError, match="greater than or equal to 1"):
        registry.logits_processors.get("registry_xf.TopK.v1")(k=0)
    g = Generator(tiny_model())
    s = g.settings_for(temperature=0.5, top_k=4, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    assert [type(p).__name__ for p in g.logits_processors(s)] == [
        "RepetitionPenalty",
        "Temperature",
        "TopK",
        "TopP",
        "MinP",
    ]


def tiny_model() -> torch.nn.Module:
    """A random one-layer Llama built from configs/llama.cfg: no checkpoint, no tokenizer."""
    from importlib import resources

    hyper = dict(
        vocab_size=VOCAB,
        hidden_width=16,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        head_width=8,
        intermediate_width=24,
        max_positions=64,
    )
    config = str(resources.files("registry_xf.configs") / "llama.cfg")
    overrides = {f"hyper.{k}": v for k, v in hyper.items()}
    return rx.build(config, overrides=overrides, device="cpu")


# -- eos, text, stop strings, streaming ----------------------------------------------------


def test_default_eos_comes_from_the_checkpoint(model: torch.nn.Module, llama_dir: Path) -> None:
    assert model.config["generation"] == {"eos_token_ids": [EOS]}
    assert Generator(model).default_eos_token_ids() == [EOS]
    # a model without [generation] falls back on the tokenizer's eos_token
    bare = tiny_model()
    tokenizer = registry.tokenizers.get("registry_xf.HFTokenizer.v1")(path=llama_dir)
    assert Generator(bare, tokenizer=tokenizer).default_eos_token_ids() == [EOS]
    assert Generator(bare).default_eos_token_ids() == []
    # generation_config.json wins over config.json
    (llama_dir / "generation_config.json").rename(llama_dir / "saved_generation_config.json")
    try:
        assert rx.config_from_hf(llama_dir)["generation"] == {"eos_token_ids": [EOS]}
        data = {"eos_token_id": [EOS, 7]}
        (llama_dir / "generation_config.json").write_text(json.dumps(data), encoding="utf8")
        assert rx.config_from_hf(llama_dir)["generation"] == {"eos_token_ids": [EOS, 7]}
    finally:
        (llama_dir / "saved_generation_config.json").replace(llama_dir / "generation_config.json")


def test_eos_ends_a_sequence_and_not_its_text(model: torch.nn.Module) -> None:
    tokenizer = model.tokenizer
    text_ids = tokenizer.encode(["hé the"], add_special_tokens=False)[0].ids
    g = Generator(model, logits_processors=[Script([*text_ids, EOS, 50, 51])])
    ids = g.generate_ids([PROMPTS[0]], max_new_tokens=20)[0]
    assert ids == [*text_ids, EOS]
    g = Generator(model, logits_processors=[Script([*text_ids, EOS, 50, 51])])
    assert g.generate("the cat") == ["hé the"]


def test_generate_decodes_generate_ids(model: torch.nn.Module) -> None:
    g = Generator(model)
    prompts = ["the cat", "hello there, the", "x"]
    texts = g.generate(prompts, max_new_tokens=24)
    encoded = [e.ids for e in model.tokenizer.encode(prompts)]
    assert encoded[0][0] == BOS
    for text, ids in zip(texts, g.generate_ids(encoded, max_new_tokens=24), strict=True):
        if ids and ids[-1] == EOS:
            ids = ids[:-1]
        assert text == model.tokenizer.decode(ids)
    assert g.generate("the cat", max_new_tokens=24) == texts[:1]


def scripted(model: torch.nn.Module, text: str) -> Generator:
    """A generator whose new tokens spell ``text`` and then end-of-sequence."""
    ids = model.tokenizer.encode([text], add_special_tokens=False)[0].ids
    return Generator(model, logits_processors=[Script([*ids, EOS])])


def test_stop_strings_cut_the_text(model: torch.nn.Module) -> None:
    text = "one the cat, two the cat, three"
    assert scripted(model, text).generate("the cat", max_new_tokens=40) == [text]
    cases = [([", two"], "one the cat"), (["three", "cat"], "one the "), ("one", "")]
    for stop, expected in cases:
        g = scripted(model, text)
        assert g.generate("the cat", max_new_tokens=40, stop=stop) == [expected]
    g = scripted(model, text)
    ids = g.generate_ids([[BOS]], max_new_tokens=40, stop=[", two"])[0]
    # the ids end with the token that completed the stop string
    assert model.tokenizer.decode(ids) == "one the cat, two"


def test_stop_strings_end_each_sequence_of_a_batch(model: torch.nn.Module) -> None:
    g = Generator(model)
    free = g.generate(["the cat", "hello", "a"], max_new_tokens=30, eos_token_ids=[])
    # a stop string each sequence produces: two characters from the middle of the first
    stop = next(
        free[0][i : i + 2]
        for i in range(3, len(free[0]) - 2)
        if "\ufffd" not in free[0][i : i + 2] and free[0][i : i + 2].strip()
    )
    stopped = g.generate(
        ["the cat", "hello", "a"], max_new_tokens=30, eos_token_ids=[], stop=[stop]
    )
    for got, full in zip(stopped, free, strict=True):
        assert got == full[: full.find(stop)] if stop in full else got == full
    assert stopped[0] != free[0]


def test_stream_joins_to_the_generated_text(model: torch.nn.Module) -> None:
    g = Generator(model)
    for settings in (
        dict(max_new_tokens=40),
        dict(max_new_tokens=40, temperature=1.0, seed=3),
        dict(max_new_tokens=40, temperature=1.0, seed=4, stop=["e", "\ufffd"]),
    ):
        pieces = list(g.stream("the cat", **settings))
        assert "".join(pieces) == g.generate("the cat", **settings)[0]
        assert all(pieces)


def test_overlapping_calls_with_cuda_graphs_share_no_step(model: torch.nn.Module) -> None:
    """Two streams of one generator read in turn, and calls from several threads, each
    get a recorded step (cache and mask) of their own: the texts of calls made alone."""
    from concurrent.futures import ThreadPoolExecutor

    g = Generator(model, cuda_graphs=True)
    prompts, settings = ["the cat", "a dog"], dict(max_new_tokens=40, eos_token_ids=[])
    alone = [Generator(model).generate(p, **settings)[0] for p in prompts]
    streams = [g.stream(p, **settings) for p in prompts]
    texts = ["", ""]
    pending = {0, 1}
    while pending:
        for i in sorted(pending):
            piece = next(streams[i], None)
            if piece is None:
                pending.discard(i)
            else:
                texts[i] += piece
    assert texts == alone
    with ThreadPoolExecutor(4) as pool:
        calls = [pool.submit(g.generate, prompts[i % 2], **settings) for i in range(8)]
        assert [c.result()[0] for c in calls] == [alone[i % 2] for i in range(8)]
    assert not g._recorded.busy
    assert len(g._recorded.steps) == 1  # the one shape's kept step


def test_stream_waits_for_whole_characters(model: torch.nn.Module) -> None:
    text = "hé€ the cat 🐈 done"
    pieces = list(scripted(model, text).stream("the cat", max_new_tokens=40))
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert len(pieces) > 5  # streamed, not given at once
    assert any("🐈" in piece for piece in pieces)  # four tokens, one piece


def test_stream_holds_back_a_possible_stop_string(model: torch.nn.Module) -> None:
    text = "the cat sat on the mat"
    pieces = list(scripted(model, text).stream("x", max_new_tokens=40, stop=[" on the"]))
    assert "".join(pieces) == "the cat sat"
    pieces = list(scripted(model, text).stream("x", max_new_tokens=40, stop=[" on a"]))
    assert "".join(pieces) == text


# -- bad input ------------------------------------------------------------------------------


def test_misspelt_setting_suggests_the_name(model: torch.nn.Module) -> None:
    g = Generator(model)
    with pytest.raises(SettingsError, match="Did you mean 'max_new_tokens'"):
        g.generate_ids(PROMPTS, max_new_token=4)
    with pytest.raises(SettingsError, match="Did you mean 'temperature'"):
        g.generate("the cat", tempreature=0.5)
    with pytest.raises(SettingsError, match="Did you mean 'repetition_penalty'"):
        GenerationSettings(repetition_penality=1.2)
    with pytest.raises(SettingsError, match="top_p"):
        g.generate_ids(PROMPTS, temperature=1.0, top_p=1.5)
    with pytest.raises(SettingsError, match="only when sampling"):
        g.generate_ids(PROMPTS, top_k=4)
    with pytest.raises(SettingsError, match="max_new_tokens"):
        g.generate_ids(PROMPTS, max_new_tokens=0)
    assert isinstance(SettingsError("x"), rx.RegistryXFError)


def test_prompt_too_long_for_the_model(model: torch.nn.Module, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    g = Generator(model)
    calls = []
    monkeypatch.setattr(model, "new_cache", lambda *a: calls.append(a))
    with pytest.raises(rx.InputError, match="longer than the model's 96 positions"):
        g.generate_ids([[BOS] * 90, [BOS]], max_new_tokens=10)
    with pytest.raises(rx.InputError, match="longer than the model's 96 positions"):
        g.generate_ids([[BOS] * (MAX_POSITIONS + 1)], max_new_tokens=1)
    with pytest.raises(rx.InputError, match="longer than the model's"):
        g.generate("x" * 100, max_new_tokens=1)
    with pytest.raises(rx.InputError, match="outside the vocabulary"):
        g.generate_ids([[BOS, VOCAB]], max_new_tokens=1)
    with pytest.raises(rx.InputError, match="empty"):
        g.generate_ids([[BOS], []], max_new_tokens=1)
    assert calls == []  # refused before any work
    monkeypatch.undo()
    assert len(g.generate_ids([[BOS] * 86], max_new_tokens=10, eos_token_ids=[])[0]) == 10


def test_cache_overflow(model: torch.nn.Module) -> None:
    cache = model.new_cache(1, 6)
    ids = torch.tensor([[BOS, 5, 6, 7]])
    with torch.no_grad():
        model(ids, torch.ones_like(ids), cache=cache, last_only=True)
        with pytest.raises(rx.InputError, match="KV cache overflow"):
            model(ids[:, :3], torch.ones(1, 7, dtype=torch.long), cache=cache, last_only=True)
        with pytest.raises(rx.InputError, match="KV cache overflow"):
            model(torch.ones(1, 7, dtype=torch.long), cache=model.new_cache(1, 6))


def test_generator_needs_a_causal_lm_and_text_a_tokenizer(model: torch.nn.Module) -> None:
    with pytest.raises(rx.RegistryXFError, match="causal language model"):
        Generator(torch.nn.Linear(2, 2))
    bare = tiny_model()
    with pytest.raises(rx.RegistryXFError, match="no tokenizer"):
        Generator(bare).generate("hello")
    with pytest.raises(SettingsError, match="need a tokenizer"):
        Generator(bare).generate_ids([[BOS]], stop=["x"])
    assert len(Generator(bare).generate_ids([[BOS, 3]], max_new_tokens=3)[0]) == 3


def test_generator_defaults(model: torch.nn.Module) -> None:
    g = Generator(model, settings={"max_new_tokens": 5, "eos_token_ids": []})
    assert [len(x) for x in g.generate_ids(PROMPTS)] == [5, 5, 5]
    assert [len(x) for x in g.generate_ids(PROMPTS, max_new_tokens=3)] == [3, 3, 3]
    assert g.settings.max_new_tokens == 5
    with pytest.raises(SettingsError, match="Did you mean 'seed'"):
        Generator(model, settings={"sed": 1})


# -- command line ---------------------------------------------------------------------------


def test_cli_generate(llama_dir: Path, model: torch.nn.Module, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["generate", "--model", str(llama_dir), "the cat", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out == Generator(model).generate("the cat", max_new_tokens=12)[0] + "\n"
    argv = ["generate", "--model", str(llama_dir), "the cat", "--max-new-tokens", "12"]
    argv += ["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--min-p", "0.01"]
    argv += ["--repetition-penalty", "1.1", "--seed", "3", "--stop", "e", "--stop", "a"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    expected = Generator(model).generate(
        "the cat",
        max_new_tokens=12,
        temperature=0.8,
        top_k=20,
        top_p=0.9,
        min_p=0.01,
        repetition_penalty=1.1,
        seed=3,
        stop=["e", "a"],
    )[0]
    assert out == expected + "\n"
    # the steps of fixed shape a CUDA graph records (unrecorded on a CPU): the same text
    assert main([*argv, "--cuda-graphs"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert (
        main(["generate", "--model", str(llama_dir), "x", "--top-p", "2", "--temperature", "1"])
        == 2
    )
    captured = capsys.readouterr()
    assert captured.out == "" and "top_p" in captured.err
    argv = ["generate", "--model", str(llama_dir), "x", "--hyper.attention_backend", "eager"]
    assert main([*argv, "--max-new-tokens", "2"]) == 0


@pytest.mark.skipif(not _can_compile_cpu_kernels(), reason="no C++ compiler or Python headers")
def test_cli_generate_compiled(llama_dir: Path, model: torch.nn.Module, capsys) -> None:  # type: ignore[no-untyped-def]
    import torch._dynamo

    argv = ["generate", "--model", str(llama_dir), "the cat", "--max-new-tokens", "12"]
    try:
        assert main([*argv, "--compile"]) == 0
    finally:
        torch._dynamo.reset()
    out = capsys.readouterr().out
    assert out == Generator(model).generate("the cat", max_new_tokens=12)[0] + "\n"


def test_no_repeat_ngram_and_min_new_tokens_match_hf(model: torch.nn.Module, hf_model) -> None:  # type: ignore[no-untyped-def]
    """Causal generation takes the n-gram and minimum-length settings too (prompts of one
    length: HF's n-grams would count padding, ours do not)."""
    prompts = [[BOS, 40, 40, 50, 60], [BOS, 11, 12, 13, 11]]
    ids, mask = left_pad(prompts)
    eos = Generator(model).generate_ids(prompts, max_new_tokens=32, eos_token_ids=[])[0][2]
    for kw in ({"no_repeat_ngram_size": 3}, {"no_repeat_ngram_size": 1}, {"min_new_tokens": 6}):
        ours = Generator(model).generate_ids(prompts, max_new_tokens=32, eos_token_ids=[eos], **kw)
        hf = hf_model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=PAD,
            **kw,
        )
        expected = []
        for row in hf[:, ids.shape[1] :].tolist():
            expected.append(row[: row.index(eos) + 1] if eos in row else row)
        assert ours == expected, kw


def test_cli_generate_ngram_and_min_new_tokens(
    llama_dir: Path, model: torch.nn.Module, capsys
) -> None:  # type: ignore[no-untyped-def]
    argv = ["generate", "--model", str(llama_dir), "the cat", "--max-new-tokens", "12"]
    assert main([*argv, "--no-repeat-ngram-size", "2", "--min-new-tokens", "4"]) == 0
    expected = Generator(model).generate(
        "the cat", max_new_tokens=12, no_repeat_ngram_size=2, min_new_tokens=4
    )[0]
    assert capsys.readouterr().out == expected + "\n"
    assert main([*argv, "--no-repeat-ngram-size", "-1"]) == 2
    assert "no_repeat_ngram_size" in capsys.readouterr().err
