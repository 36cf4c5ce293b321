"""A seeded fuzz run over config text: the family .cfg files and tiny HF config.json files,
mutated (numbers, types, variables, sections, deleted keys, registered names), then built on
the meta device or loaded with their tiny weights.

Every case must end in a model or a registry_xf error, within a time bound per case, without
allocating more than a bound outside the meta device. A few hundred cases by default;
``REGISTRY_XF_FUZZ_CASES=5000`` runs more (the seed stays fixed: cases are reproducible by
number).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import resource
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from test_config_checks import write_tiny_hf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import registry_xf as rx
from registry_xf.config.families import family_config_text
from registry_xf.converters.base import all_converters
from registry_xf.converters.hf_values import HF_KEY_KINDS
from registry_xf.registry import registry

SEED = 1130
CASES = int(os.environ.get("REGISTRY_XF_FUZZ_CASES", "300"))
CASE_SECONDS = 20.0  # far above the slowest case (a family config on meta: ~0.3 s)
META_BUILD_ELEMENTS = 1024  # off-meta tensor elements a build on meta may create (it makes 0)
LOAD_ELEMENTS = 10**7  # the tiny models hold ~30,000 parameters
RSS_GROWTH = 1 << 30  # bytes of peak memory the whole run may add

FAMILIES = sorted({c.family for c in all_converters()})
HF_FAMILIES = FAMILIES


class CaseTimeout(Exception):
    """A case ran past ``CASE_SECONDS``: the resolver or a converter hangs."""


@contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    def stop(signum: int, frame: Any) -> None:
        raise CaseTimeout(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class AllocationCounter(TorchDispatchMode):
    """Counts the elements of tensors that operators create off the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self.elements += leaf.numel()
        return out


# --- mutations of .cfg text --------------------------------------------------------------

_NUMBER = re.compile(r"^(\s*[\w.]+\s*=\s*)(-?[\d.]+(?:e-?\d+)?)\s*$")
_ASSIGNMENT = re.compile(r"^(\s*[\w.]+\s*=\s*)(.+)$")
_SECTION = re.compile(r"^\[([\w.]+)\]\s*$")
_NAME = re.compile(r'^(\s*@\w+\s*=\s*)"([^"]+)"\s*$')

NUMBERS = [
    "0",
    "-1",
    "1",
    "-0.0",
    "1e9",
    "1000000000",
    "99999999999999999999999",
    "1e400",
    "NaN",
    "Infinity",
    "-Infinity",
    "0.5",
    "1e-45",
    "2.5",
    "4096",
    "1025",
    # plausible values: models that build, or sizes that do not fit together
    "2",
    "3",
    "4",
    "8",
    "16",
    "64",
    "0.1",
    "1e-06",
]
OTHER_VALUES = ['"12"', '"wide"', "true", "false", "null", "[1, 2]", "[]", '{"a": 1}', '""', '"${"']


def _lines_matching(lines: list[str], pattern: re.Pattern[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if pattern.match(line)]


def mutate_cfg(text: str, rng: random.Random) -> tuple[str, list[str]]:
    """``text`` with one to three random mutations, and what they were."""
    lines = text.splitlines()
    done = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(
            ["number"] * 6 + ["type", "variable", "section", "delete", "name", "chain"]
        )
        if kind == "number" and (found := _lines_matching(lines, _NUMBER)):
            i = rng.choice(found)
            m = _NUMBER.match(lines[i])
            assert m is not None
            lines[i] = m.group(1) + rng.choice(NUMBERS)
        elif kind == "type" and (found := _lines_matching(lines, _ASSIGNMENT)):
            i = rng.choice(found)
            m = _ASSIGNMENT.match(lines[i])
            assert m is not None
            lines[i] = m.group(1) + rng.choice(OTHER_VALUES + NUMBERS)
        elif kind == "variable" and (found := _lines_matching(lines, _ASSIGNMENT)):
            i = rng.choice(found)
            m = _ASSIGNMENT.match(lines[i])
            assert m is not None
            section = _section_of(lines, i)
            key = m.group(1).split("=")[0].strip()
            target = rng.choice(
                [
                    "${hyper.n_layers}",
                    "${hyper.nothing}",
                    f"${{{section}.{key}}}",  # itself
                    f'"${{{section}.{key}}}${{{section}.{key}}}"',
                    "${model}",
                    '"${hyper.n_layers}${hyper.n_layers}"',
                    "${hyper}",
                ]
            )
            lines[i] = m.group(1) + target
        elif kind == "section" and (found := _lines_matching(lines, _SECTION)):
            i = rng.choice(found)
            action = rng.choice(["delete", "duplicate", "rename"])
            if action == "delete":
                del lines[i]
            elif action == "duplicate":
                lines.insert(i, lines[i])
            else:
                lines[i] = lines[i].replace("]", "_x]", 1)
        elif kind == "delete" and (found := _lines_matching(lines, _ASSIGNMENT)):
            del lines[rng.choice(found)]
        elif kind == "name" and (found := _lines_matching(lines, _NAME)):
            i = rng.choice(found)
            m = _NAME.match(lines[i])
            assert m is not None
            names = registry.layers.names() + registry.architectures.names()
            other = rng.choice([*names, m.group(2)[:-1] + "2", m.group(2).lower()])
            lines[i] = f'{m.group(1)}"{other}"'
        elif kind == "chain":
            n = rng.randint(5, 40)
            chain = ["[fuzz]", "a0 = 2"] + [
                f'a{k} = "${{fuzz.a{k - 1}}}${{fuzz.a{k - 1}}}"' for k in range(1, n)
            ]
            lines = chain + lines
            found = _lines_matching(lines, _ASSIGNMENT)
            i = rng.choice(found)
            m = _ASSIGNMENT.match(lines[i])
            assert m is not None
            lines[i] = m.group(1) + f"${{fuzz.a{n - 1}}}"
        else:
            continue
        done.append(kind)
    return "\n".join(lines) + "\n", done


def _section_of(lines: list[str], index: int) -> str:
    for line in reversed(lines[:index]):
        m = _SECTION.match(line)
        if m:
            return m.group(1)
    return "hyper"


# --- mutations of config.json ------------------------------------------------------------

JSON_VALUES: list[Any] = [
    0,
    -1,
    1,
    2,
    3,
    1e9,
    10**9,
    2**64,
    0.5,
    -0.5,
    1e-45,
    math.nan,
    math.inf,
    -math.inf,
    "12",
    "gelu",
    None,
    True,
    [],
    [1, 2],
    {},
    {"type": "linear", "factor": -1},
    {"rope_type": "yarn", "factor": math.nan, "original_max_position_embeddings": 0},
]
EXTRA_KEYS = sorted(
    {*HF_KEY_KINDS, "rope_scaling", "rope_parameters", "model_type", "layer_types"}
    | {"hidden_act", "tie_word_embeddings", "use_sliding_window", "max_window_layers"}
    | {"new_decoder_architecture", "multi_query", "parallel_attn", "pad_token_id", "n_inner"}
)


def mutate_config_json(hf: dict[str, Any], rng: random.Random) -> tuple[dict[str, Any], str]:
    hf = dict(hf)
    kind = rng.choice(["value", "value", "value", "delete", "model_type", "rope"])
    if kind == "delete" and hf:
        key = rng.choice(sorted(hf))
        del hf[key]
        return hf, f"delete {key}"
    if kind == "model_type":
        hf["model_type"] = rng.choice([*(t for c in all_converters() for t in c.model_types), 7])
        return hf, f"model_type {hf['model_type']!r}"
    if kind == "rope":
        scaling = {
            rng.choice(["type", "rope_type"]): rng.choice(["linear", "dynamic", "llama3", "yarn"]),
            "factor": rng.choice(JSON_VALUES[:14]),
            "original_max_position_embeddings": rng.choice(JSON_VALUES[:10]),
            "low_freq_factor": rng.choice([1.0, 4.0, math.nan]),
            "high_freq_factor": rng.choice([1.0, 4.0, -1.0]),
        }
        hf[rng.choice(["rope_scaling", "rope_parameters"])] = scaling
        return hf, f"rope {scaling}"
    key = rng.choice(sorted({*hf, *EXTRA_KEYS}))
    hf[key] = rng.choice(JSON_VALUES)
    return hf, f"{key} = {hf[key]!r}"


# --- the run -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz-hf")
    return {f: write_tiny_hf(root / f, f) for f in HF_FAMILIES}


# config.json sizes that fix the shape of some tensor in every family that reads them
SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "n_embd",
    "dim",
    "intermediate_size",
    "hidden_dim",
    "n_inner",
    "ffn_hidden_size",
    "num_hidden_layers",
    "n_layer",
    "n_layers",
)


def silently_loaded(original: dict[str, Any], changed: dict[str, Any]) -> str | None:
    """Which shape-setting key of config.json changed, when the checkpoint loaded anyway."""
    for key in SHAPE_KEYS:
        if key in original and changed.get(key, original[key]) != original[key]:
            return key
    return None


def run_case(
    action: Callable[[], Any], limit: int, loaded: Callable[[], str | None] = lambda: None
) -> str | None:
    """None if ``action`` ended well (a model or a registry_xf error), else what went wrong;
    ``loaded`` says what is wrong with its having ended in a model."""
    counter = AllocationCounter()
    start = time.perf_counter()
    try:
        with time_bound(CASE_SECONDS), counter:
            action()
        silent = loaded()
        if silent is not None:
            return f"loaded although config.json's {silent} disagrees with the weights"
    except rx.RegistryXFError:
        pass
    except CaseTimeout as e:
        return f"hang: {e}"
    except Exception as e:  # the failures this test exists to find
        return f"{type(e).__name__}: {str(e)[:300]}"
    if counter.elements > limit:
        return f"allocated {counter.elements:,} tensor elements off meta (bound {limit:,})"
    if time.perf_counter() - start > CASE_SECONDS:
        return "too slow"
    return None


def test_fuzz_config_text(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    rng = random.Random(SEED)
    texts = {f: family_config_text(f) for f in FAMILIES}
    configs = {f: json.loads((d / "config.json").read_text()) for f, d in tiny_dirs.items()}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    failures, slowest = [], 0.0
    for case in range(CASES):
        start = time.perf_counter()
        if case % 3 < 2:  # a family .cfg, built on meta
            family = rng.choice(FAMILIES)
            text, what = mutate_cfg(texts[family], rng)
            problem = run_case(lambda text=text: rx.build(text), META_BUILD_ELEMENTS)
            where = f"{family}.cfg {what}"
        else:  # a tiny HF directory with a mutated config.json, loaded
            family = rng.choice(HF_FAMILIES)
            hf, what = mutate_config_json(configs[family], rng)
            directory = tmp_path / f"case{case}"
            directory.mkdir()
            os.link(tiny_dirs[family] / "model.safetensors", directory / "model.safetensors")
            (directory / "config.json").write_text(json.dumps(hf))
            problem = run_case(
                lambda d=directory: rx.load(d),
                LOAD_ELEMENTS,
                lambda hf=hf, family=family: silently_loaded(configs[family], hf),
            )
            shutil.rmtree(directory)
            where = f"{family} config.json {what}"
        slowest = max(slowest, time.perf_counter() - start)
        if problem is not None:
            failures.append(f"case {case} ({where}): {problem}")
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    assert not failures, f"{len(failures)} of {CASES} cases failed:\n" + "\n".join(failures[:20])
    assert slowest < CASE_SECONDS
    assert rss_growth < RSS_GROWTH, f"peak memory grew by {rss_growth:,} bytes"
