"""A seeded fuzz run over runtime inputs: token ids, masks, token types, positions and
caches of random kinds, shapes and values; generation prompts and settings; texts of
random characters. Every case either works or raises a registry_xf error, within a bound;
a case that works gives the output of the same inputs in their plain form (int64 ids and
masks, positions for every row, Python numbers), and, for the encoder, HF's output.

A few hundred cases by default; ``REGISTRY_XF_FUZZ_CASES=5000`` for a longer run,
``REGISTRY_XF_FUZZ_SEED`` for other cases.
"""

from __future__ import annotations

import faulthandler
import os
import random
import sys
import time
import traceback
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import VOCAB, assert_close_on_real_tokens, hf_encoder, write_hf_checkpoint
from tiny_tokenizer import write_tokenizer

import registry_xf as rx
from registry_xf.errors import RegistryXFError
from registry_xf.generation import Generator

CASES = int(os.environ.get("REGISTRY_XF_FUZZ_CASES", "300"))
SEED = int(os.environ.get("REGISTRY_XF_FUZZ_SEED", "20261130"))
CASE_BOUND_S = 20.0  # a case slower than this counts as a hang
MAX_POSITIONS = 32


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = write_hf_checkpoint(tmp_path_factory.mktemp("fuzz") / "bert", "bert")
    write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def targets(bert_dir: Path) -> dict[str, Any]:
    config = str(resources.files("registry_xf.configs") / "llama.cfg")
    hyper = dict(
        vocab_size=VOCAB,
        hidden_width=16,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        head_width=8,
        intermediate_width=24,
        max_positions=MAX_POSITIONS,
    )
    torch.manual_seed(0)
    llama = rx.build(config, overrides={f"hyper.{k}": v for k, v in hyper.items()}, device="cpu")
    bert = rx.load(bert_dir)
    return {
        "bert": bert,
        "hf_bert": hf_encoder(bert_dir),
        "llama": llama,
        "generator": Generator(llama, tokenizer=bert.tokenizer),
        "embedder": rx.Embedder(bert),
    }


# -- random inputs -----------------------------------------------------------------------------

GOOD_ID_DTYPES = [torch.int64, torch.int64, torch.int32]
BAD_ID_DTYPES = [torch.int16, torch.uint8, torch.bool, torch.float32, torch.float16]
GOOD_MASK_DTYPES = [torch.int64, torch.int64, torch.bool, torch.int32, torch.uint8]
BAD_MASK_DTYPES = [torch.float32, torch.float16, torch.complex64]
MUTATIONS = ["dtype", "shape", "value", "empty", "rank", "kind"]


def random_tensor(
    rng: random.Random, shape: tuple[int, ...], dtype: torch.dtype, low: int, high: int
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rng.getrandbits(63))
    values = torch.randint(low, high, shape, generator=generator)
    if dtype == torch.bool:
        return values != 0
    return values.to(dtype)


def mutated(
    rng: random.Random,
    tensor: torch.Tensor,
    how: str,
    bad_dtypes: list[torch.dtype],
    high: int,
) -> Any:
    """``tensor`` (batch, seq) made wrong in one way: dtype, shape, a value, size 0, rank
    or kind."""
    if how == "dtype":
        dtype = rng.choice(bad_dtypes)
        return tensor.to(dtype) if dtype != torch.bool else tensor != 0
    if how == "shape":
        rows, cols = tensor.shape
        shape = rng.choice([(rows + 1, cols), (rows, cols + 1), (max(rows - 1, 0), cols)])
        return random_tensor(rng, shape, tensor.dtype, 0, 2)
    if how == "value":
        if not tensor.numel() or tensor.dtype == torch.bool:
            return tensor
        bad = rng.choice([-1, high, high + 7, -(2**40), 2**62])
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
            bad = float(bad)
        elif tensor.dtype != torch.int64:
            info = torch.iinfo(tensor.dtype)
            bad = max(min(bad, info.max), info.min)
        out = tensor.clone()
        out.view(-1)[rng.randrange(out.numel())] = bad
        return out
    if how == "empty":
        return tensor[:0] if rng.random() < 0.5 else tensor[:, :0]
    if how == "rank":
        if not tensor.numel():
            return tensor.reshape(-1)
        return rng.choice([tensor[0], tensor[None], tensor.reshape(-1)[0]])
    return rng.choice([tensor.tolist(), tensor.numpy(), None if rng.random() < 0.5 else 3])


def plain(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.long()


def plain_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A mask as HF reads it: 1 for a real token (any nonzero value), 0 for padding."""
    return None if mask is None else (mask != 0).long()


def valid_mask(rng: random.Random, batch: int, seq: int) -> torch.Tensor:
    mask = random_tensor(rng, (batch, seq), rng.choice(GOOD_MASK_DTYPES), 0, 2)
    mask[:, 0] = 1 if mask.dtype != torch.bool else True  # every row sees a token
    return mask


# -- the cases ---------------------------------------------------------------------------------


def encoder_case(rng: random.Random, t: dict[str, Any]) -> str:
    batch, seq = rng.randint(1, 3), rng.randint(1, 8)
    inputs: dict[str, Any] = {
        "input_ids": random_tensor(rng, (batch, seq), rng.choice(GOOD_ID_DTYPES), 0, VOCAB),
        "attention_mask": valid_mask(rng, batch, seq) if rng.random() < 0.7 else None,
        "token_type_ids": random_tensor(rng, (batch, seq), rng.choice(GOOD_ID_DTYPES), 0, 2)
        if rng.random() < 0.4
        else None,
        "positions": random_tensor(
            rng, (rng.choice([batch, 1]), seq), rng.choice(GOOD_ID_DTYPES), 0, 64
        )
        if rng.random() < 0.3
        else None,
    }
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        names = [n for n, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() == 2]
        if not names:
            break
        name = rng.choice(names)
        bad_dtypes = BAD_MASK_DTYPES if name == "attention_mask" else BAD_ID_DTYPES
        inputs[name] = mutated(rng, inputs[name], rng.choice(MUTATIONS), bad_dtypes, VOCAB)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    types, positions = inputs["token_type_ids"], inputs["positions"]
    with torch.no_grad():
        got = t["bert"](ids, mask, types, positions).last_hidden_state
        # accepted: the plain form gives the same, and HF agrees on the real tokens
        plain_positions = plain(positions)
        if plain_positions is not None:
            plain_positions = plain_positions.expand(ids.shape[0], -1)
        expected = t["bert"](ids.long(), plain_mask(mask), plain(types), plain_positions)
        torch.testing.assert_close(got, expected.last_hidden_state, rtol=0, atol=0)
        reference = t["hf_bert"](
            input_ids=ids.long(),
            attention_mask=plain_mask(mask),
            token_type_ids=plain(types),
            position_ids=plain_positions,
        ).last_hidden_state
    real = torch.ones_like(ids, dtype=torch.long) if mask is None else plain_mask(mask)
    assert_close_on_real_tokens(got, reference, real)
    assert torch.isfinite(got).all()
    return "ok"


def decoder_case(rng: random.Random, t: dict[str, Any]) -> str:
    llama = t["llama"]
    batch, seq = rng.randint(1, 3), rng.randint(1, 6)
    cache, n_past = None, 0
    if rng.random() < 0.5:
        cache_batch = batch if rng.random() < 0.8 else rng.choice([0, -1, batch + 1, 2.0])
        cache_length = rng.choice(
            [seq + 4, seq + 8, MAX_POSITIONS, 1, 0, MAX_POSITIONS + 1, 2**62, np.int64(seq + 4)]
        )
        cache = llama.new_cache(cache_batch, cache_length)
        if rng.random() < 0.5:  # a prefilled cache, then more tokens
            n_past = rng.randint(1, 4)
            with torch.no_grad():
                llama(torch.ones(batch, n_past, dtype=torch.long), cache=cache)
    inputs: dict[str, Any] = {
        "input_ids": random_tensor(rng, (batch, seq), rng.choice(GOOD_ID_DTYPES), 0, VOCAB),
        "attention_mask": valid_mask(rng, batch, n_past + seq) if rng.random() < 0.7 else None,
        "positions": random_tensor(
            rng, (rng.choice([batch, 1]), seq), rng.choice(GOOD_ID_DTYPES), n_past, n_past + 8
        )
        if rng.random() < 0.3
        else None,
    }
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        names = [n for n, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() == 2]
        if not names:
            break
        name = rng.choice(names)
        bad_dtypes = BAD_MASK_DTYPES if name == "attention_mask" else BAD_ID_DTYPES
        inputs[name] = mutated(rng, inputs[name], rng.choice(MUTATIONS), bad_dtypes, VOCAB)
    ids, mask, positions = inputs["input_ids"], inputs["attention_mask"], inputs["positions"]
    with torch.no_grad():
        got = llama(ids, mask, positions, cache).logits
        if cache is None:
            plain_positions = plain(positions)
            if plain_positions is not None:
                plain_positions = plain_positions.expand(ids.shape[0], -1)
            expected = llama(ids.long(), plain_mask(mask), plain_positions).logits
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert torch.isfinite(got).all()
    return "ok"


GOOD_SETTINGS: dict[str, list[Any]] = {
    "max_new_tokens": [1, 2, 3, np.int64(2)],
    "temperature": [None, 0, 0.7, 1.0, 1e-45, 5e-324, 1e-30, np.float32(0.5)],
    "top_k": [None, 1, 5, 10**12, np.int32(3)],
    "top_p": [None, 0.5, 1.0, 1e-9],
    "min_p": [None, 0.0, 0.1, 1.0],
    "repetition_penalty": [None, 1.0, 1.3, 0.5, 1e-6, 1e6],
    "no_repeat_ngram_size": [None, 0, 1, 2, 3, 50, np.int64(2)],
    "min_new_tokens": [None, 0, 1, 3, 10**6],
    "eos_token_ids": [None, [], 3, [3, 5], [np.int64(4)]],
    "stop": [[], ["the"], "a"],
    "seed": [None, 0, 7, 2**64 - 1, np.uint64(5)],
}
BAD_SETTINGS: dict[str, list[Any]] = {
    "max_new_tokens": [0, -1, 2**40, True, None],
    "temperature": [-1.0, float("nan"), float("inf"), "hot"],
    "top_k": [0, -3, 2.5],
    "top_p": [0.0, 1.5, float("nan")],
    "min_p": [-0.1, 2.0],
    "repetition_penalty": [0.0, 1e-300, float("inf")],
    "no_repeat_ngram_size": [-1, 2.5, True, 2**40],
    "min_new_tokens": [-1, "3", 2**40],
    "eos_token_ids": [[VOCAB], [2**70], [-1], "x", [3.5]],
    "stop": [[""], [None]],
    "seed": [2**64, -1, 2**70, True],
    "sed": [1],
}
PROMPT_ITEMS: list[Callable[[random.Random], Any]] = [
    lambda r: r.randrange(VOCAB),
    lambda r: r.randrange(VOCAB),
    lambda r: r.randrange(VOCAB),
    lambda r: np.int64(r.randrange(VOCAB)),
    lambda r: np.uint8(r.randrange(VOCAB)),
    lambda r: r.choice([-1, VOCAB, 2**70, -(2**70)]),
    lambda r: r.choice([1.0, True, "a", None, np.float64(2.0), [1]]),
]


def random_prompts(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.1:
        return rng.choice([[], 5, "text", None, [[]]])
    n = rng.randint(1, 3)
    prompts = [
        [
            rng.choice(PROMPT_ITEMS[:3] if rng.random() < 0.6 else PROMPT_ITEMS)(rng)
            for _ in range(rng.randint(0, 6))
        ]
        for _ in range(n)
    ]
    if roll < 0.25:
        width = max(len(p) for p in prompts)
        ids = torch.randint(0, VOCAB, (n, max(width, 1)))
        return ids.to(rng.choice([torch.int64, torch.int32, torch.float32, torch.bool]))
    if roll < 0.35:
        return [
            np.asarray([rng.randrange(VOCAB) for _ in p] or [1], dtype=np.int32) for p in prompts
        ]
    return prompts


def as_python(value: Any) -> Any:
    if isinstance(value, list):
        return [as_python(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor) or isinstance(value, np.ndarray):
        return value.tolist()
    return value


def generator_case(rng: random.Random, t: dict[str, Any]) -> str:
    generator: Generator = t["generator"]
    settings = {k: rng.choice(v) for k, v in GOOD_SETTINGS.items() if rng.random() < 0.3}
    if rng.random() < 0.4:
        bad = rng.choice(list(BAD_SETTINGS))
        settings[bad] = rng.choice(BAD_SETTINGS[bad])
    settings.setdefault("max_new_tokens", rng.randint(1, 3))
    if rng.random() < 0.25:
        text = random_text(rng)
        got = generator.generate(text, **settings)
        assert isinstance(got, list) and all(isinstance(x, str) for x in got)
        return "ok"
    prompts = random_prompts(rng)
    got = generator.generate_ids(prompts, **settings)
    s = generator.settings_for(**settings)
    assert all(len(new) <= s.max_new_tokens for new in got)
    assert all(0 <= t < VOCAB for new in got for t in new)
    if not s.sampling or s.seed is not None:  # deterministic: the plain form agrees
        plain_settings = {k: as_python(v) for k, v in settings.items()}
        assert generator.generate_ids(as_python(prompts), **plain_settings) == got
    return "ok"


CHARACTERS = [
    (0x20, 0x7E),  # ASCII
    (0x00, 0x1F),  # control characters
    (0x80, 0x24F),  # Latin
    (0x300, 0x36F),  # combining marks
    (0x4E00, 0x4E80),  # CJK
    (0xD800, 0xDFFF),  # surrogates
    (0x200B, 0x200F),  # zero width, direction marks
    (0x1F600, 0x1F64F),  # emoji
    (0xFFF0, 0xFFFF),  # specials, non-characters
]


def random_text(rng: random.Random) -> str:
    length = rng.choice([0, 0, 1, 3, 10, 40, 200])
    out = []
    for _ in range(length):
        low, high = rng.choice(CHARACTERS[:1] * 4 + CHARACTERS)
        out.append(chr(rng.randint(low, high)))
    return "".join(out)


def embedder_case(rng: random.Random, t: dict[str, Any]) -> str:
    texts: list[Any] = [random_text(rng) for _ in range(rng.randint(0, 4))]
    if texts and rng.random() < 0.1:
        texts[rng.randrange(len(texts))] = rng.choice([None, b"bytes", 3])
    vectors = t["embedder"].embed(texts)
    assert vectors.shape == (len(texts), t["bert"].width)
    assert np.isfinite(vectors).all()
    return "ok"


def tokenizer_case(rng: random.Random, t: dict[str, Any]) -> str:
    tokenizer = t["bert"].tokenizer
    max_length = rng.choice([None, 1, 2, 3, 5, 64, 0, -1, 2**70, 10**9, 2.5, True])
    truncation = rng.random() < 0.7
    specials = rng.random() < 0.8
    texts = [random_text(rng) for _ in range(rng.randint(0, 3))]
    encodings = tokenizer.encode(
        texts, max_length=max_length, truncation=truncation, add_special_tokens=specials
    )
    limit = max_length or tokenizer.max_length
    if truncation and limit and limit < 10**9:
        assert all(len(e.ids) <= limit for e in encodings)
    batch = tokenizer.pad(encodings)
    assert batch.input_ids.shape[0] == len(texts)
    return "ok"


CASE_KINDS: list[tuple[Callable[[random.Random, dict[str, Any]], str], int]] = [
    (encoder_case, 30),
    (decoder_case, 25),
    (generator_case, 25),
    (embedder_case, 10),
    (tokenizer_case, 10),
]


def test_runtime_inputs_fuzz(targets: dict[str, Any]) -> None:
    rng = random.Random(SEED)
    kinds = [kind for kind, weight in CASE_KINDS for _ in range(weight)]
    outcomes: dict[str, int] = {}
    failures: list[str] = []
    slowest = 0.0
    for case in range(CASES):
        kind = rng.choice(kinds)
        case_rng = random.Random(rng.getrandbits(64))
        faulthandler.dump_traceback_later(CASE_BOUND_S * 3, file=sys.stderr)
        start = time.perf_counter()
        try:
            outcome = kind(case_rng, targets)
        except RegistryXFError as e:
            outcome = type(e).__name__
        except Exception:  # anything else is a finding
            failures.append(f"case {case} ({kind.__name__}):\n{traceback.format_exc(limit=-4)}")
            outcome = "failure"
        finally:
            faulthandler.cancel_dump_traceback_later()
        took = time.perf_counter() - start
        slowest = max(slowest, took)
        if took > CASE_BOUND_S:
            failures.append(f"case {case} ({kind.__name__}) took {took:.1f} s")
        key = f"{kind.__name__}: {outcome}"
        outcomes[key] = outcomes.get(key, 0) + 1
    summary = "\n".join(f"  {k}: {n}" for k, n in sorted(outcomes.items()))
    assert not failures, f"{len(failures)} of {CASES} cases failed:\n" + "\n".join(failures[:5])
    # the run must exercise both sides: inputs accepted and inputs refused, for each kind
    for kind, _ in CASE_KINDS:
        if CASES >= 200:
            assert outcomes.get(f"{kind.__name__}: ok"), summary
    assert any(k.endswith("InputError") for k in outcomes), summary
    assert any(k.endswith("SettingsError") for k in outcomes), summary
    print(f"{CASES} cases, slowest {slowest:.2f} s\n{summary}")
