"""Config values are checked before anything is built: sizes, float settings, variables,
HF config.json values and config.json against its weights. Each bad value is a typed error
with its dotted path (or config.json key), found in bounded time."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import registry_xf as rx
from registry_xf.config.families import family_config_text
from registry_xf.config.resolve import MAX_EXPANDED_SIZE, interpolate, read_config
from registry_xf.config.schema import schema_for
from registry_xf.converters.base import all_converters
from registry_xf.layers.token_merging import TokenMerging
from registry_xf.loading.materialise import on_meta
from registry_xf.registry import registry
from registry_xf.types import MAX_LAYERS

FAST = 5.0  # seconds: every refusal here takes milliseconds; the bound allows a busy machine


def problems_of(error: rx.ConfigError) -> dict[str, str]:
    """Path → its problems (one line each)."""
    found: dict[str, str] = {}
    for p in error.problems:
        found[p.path] = "\n".join(filter(None, [found.get(p.path), str(p)]))
    return found


def refused(source: Any, **kwargs: Any) -> dict[str, str]:
    """The problems ``rx.build`` finds, checked to come quickly as a ConfigError."""
    start = time.perf_counter()
    with pytest.raises(rx.ConfigError) as info:
        rx.build(source, **kwargs)
    assert time.perf_counter() - start < FAST
    return problems_of(info.value)


def tiny_overrides(family: str) -> dict[str, Any]:
    """[hyper] values that make a family's model tiny (those the family has)."""
    tiny = {
        "vocab_size": 99,
        "hidden_width": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "head_width": 8,
        "intermediate_width": 37,
        "embedding_width": 16,
        "projection_width": 32,
        "max_positions": 64,
        "embedding_scale": 32**0.5,
        "sliding_window": 16,
    }
    hyper = read_config(family_config_text(family))["hyper"]
    if family == "falcon":
        tiny["n_kv_heads"] = 1  # the original multi-query layout of its .cfg
    return {f"hyper.{k}": v for k, v in tiny.items() if k in hyper}


def converter_name(family: str) -> str:
    return next(c.name for c in all_converters() if c.family == family)


def write_tiny_hf(path: Path, family: str) -> Path:
    """A tiny HF directory of ``family``: a random model exported by the converter."""
    torch.manual_seed(0)
    model = rx.build(family_config_text(family), overrides=tiny_overrides(family), device="cpu")
    return rx.export_hf(model, path, converter=converter_name(family))


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-hf")
    return {f: write_tiny_hf(root / f, f) for f in ("bert", "llama", "gpt2", "albert")}


def with_config_json(source: Path, target: Path, **changes: Any) -> Path:
    """A copy of an HF directory whose config.json has ``changes`` (None deletes a key)."""
    shutil.copytree(source, target)
    hf = json.loads((target / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            hf.pop(key, None)
        else:
            hf[key] = value
    (target / "config.json").write_text(json.dumps(hf))
    return target


# --- sizes and float settings in .cfg files ------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value", "path"),
    [
        ("n_heads", 0, "model.layers.layer.attention.n_heads"),
        ("n_heads", -4, "model.layers.layer.attention.n_heads"),
        ("hidden_width", -1, "model.embeddings.width"),
        ("hidden_width", 0, "model.layers.layer.attention.width"),
        ("n_layers", 1e9, "model.layers.n_layers"),
        ("n_layers", 10**9, "model.layers.n_layers"),
        ("n_layers", MAX_LAYERS + 1, "model.layers.n_layers"),
        ("n_layers", 2.5, "model.layers.n_layers"),
        ("vocab_size", 10**12, "model.embeddings.vocab_size"),
        ("max_positions", 0, "model.embeddings.positions.max_positions"),
        ("intermediate_width", 2**40, "model.layers.layer.feed_forward.intermediate_width"),
        ("layer_norm_eps", math.nan, "model.embeddings.norm.eps"),
        ("layer_norm_eps", math.inf, "model.layers.layer.attention_norm.eps"),
        ("layer_norm_eps", 0.0, "model.layers.layer.feed_forward_norm.eps"),
        ("layer_norm_eps", -1e-5, "model.embeddings.norm.eps"),
        ("dropout", -0.1, "model.embeddings.dropout"),
        ("dropout", 1.5, "model.layers.layer.dropout"),
        ("dropout", math.nan, "model.layers.layer.dropout"),
        ("attention_dropout", math.inf, "model.layers.layer.attention.dropout"),
    ],
)
def test_bad_sizes_and_settings_are_refused_with_their_path(
    setting: str, value: Any, path: str
) -> None:
    problems = refused(family_config_text("bert"), overrides={f"hyper.{setting}": value})
    assert path in problems
    assert f"[set by ${{hyper.{setting}}}]" in problems[path]


@pytest.mark.parametrize(
    ("setting", "value", "path", "words"),
    [
        ("rope_theta", math.nan, "model.decoder.layers.layer.attention.rotary.base", "finite"),
        ("rope_theta", 1.0, "model.decoder.layers.layer.attention.rotary.base", "greater"),
        ("rope_theta", -10000.0, "model.decoder.layers.layer.attention.rotary.base", "greater"),
        ("norm_eps", math.inf, "model.decoder.final_norm.eps", "finite"),
        ("n_kv_heads", 0, "model.decoder.layers.layer.attention.n_kv_heads", "greater"),
        ("head_width", -8, "model.decoder.layers.layer.attention.head_width", "greater"),
        ("sliding_window", 0, "model.decoder.layers.layer.attention.window", "greater"),
        (
            "rope_scaling",
            {"type": "linear", "factor": math.nan},
            "model.decoder.layers.layer.attention.rotary.scaling",
            "factor must be a finite number above 0",
        ),
        (
            "rope_scaling",
            {"type": "linear", "factor": -2.0},
            "model.decoder.layers.layer.attention.rotary.scaling",
            "factor must be a finite number above 0",
        ),
        (
            "rope_scaling",
            {
                "type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 4.0,
                "high_freq_factor": 4.0,
                "original_max_positions": 8192,
            },
            "model.decoder.layers.layer.attention.rotary.scaling",
            "must be above low_freq_factor",
        ),
        (
            "rope_scaling",
            {"type": "yarn", "factor": 4.0, "original_max_positions": 1e12},
            "model.decoder.layers.layer.attention.rotary.scaling",
            "original_max_positions must be a whole number",
        ),
    ],
)
def test_bad_decoder_settings_are_refused(setting: str, value: Any, path: str, words: str) -> None:
    overrides = {**tiny_overrides("llama"), f"hyper.{setting}": value}
    problems = refused(family_config_text("llama"), overrides=overrides)
    assert path in problems and words in problems[path]


def test_every_problem_is_reported_at_once() -> None:
    problems = refused(
        family_config_text("llama"),
        overrides={"hyper.n_layers": 0, "hyper.norm_eps": math.nan, "hyper.rope_theta": -1.0},
    )
    assert {
        "model.decoder.layers.n_layers",
        "model.decoder.final_norm.eps",
        "model.decoder.layers.layer.attention.rotary.base",
    } <= set(problems)


@pytest.mark.parametrize(
    ("overrides", "path", "words"),
    [
        ({"hyper.n_kv_heads": 3}, "model.decoder.layers.layer.attention", "not a multiple"),
        (
            {"model.decoder.layers.layer.attention.rotary.head_width": 16},
            "model.decoder.layers.layer.attention.rotary.head_width",
            "differs from the attention's head width 8",
        ),
        (
            {"model.decoder.layers.layer.feed_forward_norm.width": 64},
            "model.decoder.layers.layer.feed_forward_norm",
            "widths of the layer's parts differ",
        ),
        (
            {"model.decoder.layers.layer.attention.rotary.fraction": 0.1},
            "model.decoder.layers.layer.attention.rotary.fraction",
            "at least 2 are needed",
        ),
    ],
)
def test_settings_that_do_not_fit_together(
    overrides: dict[str, Any], path: str, words: str
) -> None:
    problems = refused(
        family_config_text("llama"), overrides={**tiny_overrides("llama"), **overrides}
    )
    assert path in problems and words in problems[path]


def test_padding_index_must_leave_positions() -> None:
    overrides = {**tiny_overrides("roberta"), "hyper.padding_idx": 63}
    problems = refused(family_config_text("roberta"), overrides=overrides)
    assert "leaves no usable position" in problems["model.embeddings.positions.padding_idx"]


def test_sizes_each_plausible_but_together_absurd() -> None:
    """Each size within its bound, the model not: refused before the layers are copied."""
    overrides = {
        "hyper.n_layers": MAX_LAYERS,
        "hyper.hidden_width": 65536,
        "hyper.intermediate_width": 262144,
        "hyper.n_heads": 512,
    }
    problems = refused(family_config_text("llama"), overrides=overrides)
    assert "more than the" in problems["model.decoder.layers"]


def test_bounds_leave_real_models_alone() -> None:
    """The family configs (real models' sizes) build, the largest families included."""
    for family in ("llama", "falcon", "gemma", "albert"):
        model = rx.build(family_config_text(family))
        assert sum(p.numel() for p in model.parameters()) > 10**7


# --- variables ---------------------------------------------------------------------------


def doubling_chain(n: int, as_list: bool) -> str:
    lines = ["[v]", 'a0 = "xyz"']
    for i in range(1, n):
        twice = (
            f"[${{v.a{i - 1}}}, ${{v.a{i - 1}}}]"
            if as_list
            else f'"${{v.a{i - 1}}}${{v.a{i - 1}}}"'
        )
        lines.append(f"a{i} = {twice}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("as_list", [False, True])
def test_exponential_variables_are_refused_quickly(as_list: bool) -> None:
    config = read_config(doubling_chain(60, as_list))
    start = time.perf_counter()
    with pytest.raises(rx.ConfigError, match=f"larger than {MAX_EXPANDED_SIZE:,}") as info:
        interpolate(config)
    assert time.perf_counter() - start < FAST
    assert info.value.problems[0].path.startswith("v.a")


def test_variables_used_many_times_stay_independent_copies() -> None:
    text = "[s]\nx = [1, 2]\n[a]\ny = ${s.x}\nz = ${s.x}\nw = ${a.y}\n[b]\nn = ${s.x}\n"
    config = interpolate(read_config(text))
    assert config["a"]["y"] == config["a"]["z"] == config["a"]["w"] == [1, 2]
    config["a"]["y"].append(3)
    assert config["a"]["z"] == [1, 2] and config["b"]["n"] == [1, 2]
    # a short chain that doubles stays well within the bound and expands fully
    short = interpolate(read_config(doubling_chain(8, False)))
    assert short["v"]["a7"].count("xyz") == 2**7


def test_variables_that_refer_to_themselves() -> None:
    with pytest.raises(rx.ConfigError, match=r"refers to itself \(\$\{b.y\} -> \$\{a.x\}") as info:
        interpolate(read_config("[a]\nx = ${b.y}\n[b]\ny = ${a.x}\n"))
    assert info.value.problems[0].path == "a.x"
    with pytest.raises(rx.ConfigError, match="refers to itself"):
        interpolate(read_config("[a]\nx = 1\ny = ${a}\n"))


# --- HF config.json ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "changes", "key"),
    [
        ("bert", {"num_hidden_layers": 1e9}, "num_hidden_layers"),
        ("bert", {"hidden_size": -1}, "hidden_size"),
        ("bert", {"num_attention_heads": 0}, "num_attention_heads"),
        ("bert", {"layer_norm_eps": "NaN"}, "layer_norm_eps"),
        ("bert", {"hidden_dropout_prob": -0.5}, "hidden_dropout_prob"),
        ("bert", {"vocab_size": 2**40}, "vocab_size"),
        ("bert", {"num_attention_heads": 5}, "num_attention_heads"),
        ("llama", {"num_attention_heads": 0}, "num_attention_heads"),
        ("llama", {"num_key_value_heads": 3}, "num_key_value_heads"),
        ("llama", {"rms_norm_eps": math.inf}, "rms_norm_eps"),
        ("llama", {"hidden_size": None}, "hidden_size"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "linear", "factor": -1.0}},
            "rope_parameters.factor",
        ),
        ("llama", {"rope_parameters": {"rope_theta": math.nan}}, "rope_parameters.rope_theta"),
        ("gpt2", {"n_layer": -2}, "n_layer"),
        ("gpt2", {"n_embd": "wide"}, "n_embd"),
    ],
)
def test_bad_config_json_values_name_the_key(
    tiny_hf: dict[str, Path], tmp_path: Path, family: str, changes: dict[str, Any], key: str
) -> None:
    directory = with_config_json(tiny_hf[family], tmp_path / family, **changes)
    start = time.perf_counter()
    with pytest.raises(rx.ConfigError) as info:
        rx.load(directory)
    assert time.perf_counter() - start < FAST
    assert str(directory / "config.json") in str(info.value)
    assert any(path.split(" ")[0] == key for path in problems_of(info.value)), str(info.value)


@pytest.mark.parametrize(
    ("family", "changes", "key", "says"),
    [
        ("bert", {"vocab_size": 100}, "vocab_size", "word_embeddings.weight say 99"),
        ("bert", {"num_hidden_layers": 3}, "num_hidden_layers", "layers 0 to 1 (2)"),
        ("bert", {"hidden_size": 64}, "hidden_size", "say 32"),
        ("llama", {"vocab_size": 98}, "vocab_size", "and lm_head.weight say 99"),
        ("llama", {"num_key_value_heads": 4}, "num_key_value_heads", "k_proj.weight say 16"),
        ("llama", {"head_dim": 4}, "num_attention_heads", "make 16 rows; the weights' model"),
        ("llama", {"num_hidden_layers": 1}, "num_hidden_layers", "layers 0 to 1"),
        ("gpt2", {"n_head": 2, "n_embd": 64}, "n_embd", "say 32"),
        ("albert", {"num_hidden_groups": 2}, "num_hidden_groups", "layers 0 to 0 (1)"),
    ],
)
def test_config_json_is_checked_against_the_weights(
    tiny_hf: dict[str, Path],
    tmp_path: Path,
    family: str,
    changes: dict[str, Any],
    key: str,
    says: str,
) -> None:
    directory = with_config_json(tiny_hf[family], tmp_path / family, **changes)
    with pytest.raises(rx.ConfigError) as info:
        rx.config_from_hf(directory)  # found where the config is made: nothing is built
    problems = problems_of(info.value)
    assert str(directory / "config.json") in str(info.value)
    assert key in problems and says in problems[key], str(info.value)
    with pytest.raises(rx.ConfigError):
        rx.load(directory)


def test_one_odd_tensor_is_the_files_fault_not_config_json(
    tiny_hf: dict[str, Path], tmp_path: Path
) -> None:
    """A key projection whose rows disagree with the value projection's: loading names the
    tensor (the weights do not agree with themselves on the key/value heads)."""
    from safetensors.torch import load_file, save_file

    directory = with_config_json(tiny_hf["llama"], tmp_path / "llama")
    tensors = load_file(directory / "model.safetensors")
    name = "model.layers.0.self_attn.k_proj.weight"
    tensors[name] = torch.zeros(8, 32)
    save_file(tensors, directory / "model.safetensors")
    rx.config_from_hf(directory)  # config.json itself is not blamed
    with pytest.raises(rx.LoadError, match="k_proj"):
        rx.load(directory)


def test_tiny_hf_directories_load(tiny_hf: dict[str, Path]) -> None:
    """The directories the checks above change load as they are."""
    for directory in tiny_hf.values():
        assert rx.load(directory).load_report.ok


# --- the command line --------------------------------------------------------------------


@pytest.mark.parametrize("command", ["config", "embed"])
@pytest.mark.parametrize(("setting", "value"), [("n_heads", "0"), ("hidden_width", "-1")])
def test_cli_bad_override_is_one_error_line(
    tiny_hf: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    command: str,
    setting: str,
    value: str,
) -> None:
    from registry_xf.cli import main

    args = [command, str(tiny_hf["bert"])] if command == "config" else [command, "a text"]
    if command == "embed":
        args += ["--model", str(tiny_hf["bert"])]
    assert main([*args, f"--hyper.{setting}", value]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert sum("error:" in line for line in lines) == 1 and lines[0].startswith(
        f"registry-xf {command}: error:"
    )
    assert f"[model.layers.layer.attention.{'n_heads' if setting == 'n_heads' else 'width'}]" in (
        captured.err
    )
    assert "Traceback" not in captured.err


def test_cli_exit_status_in_a_process(tiny_hf: dict[str, Path]) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "registry_xf.cli",
            "config",
            str(tiny_hf["bert"]),
            "--hyper.n_heads",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr


# --- every registered component's numeric parameters (property-based) --------------------


# Valid arguments for each registered component that has numeric parameters: each property
# run changes one numeric parameter of one component to an arbitrary value.
def _layer() -> nn.Module:
    get = registry.layers.get
    return get("registry_xf.TransformerLayer.v1")(
        attention=get("registry_xf.SelfAttention.v1")(width=32, n_heads=4),
        feed_forward=get("registry_xf.FeedForward.v1")(width=32, intermediate_width=37),
        attention_norm=get("registry_xf.LayerNorm.v1")(width=32),
        feed_forward_norm=get("registry_xf.LayerNorm.v1")(width=32),
    )


def valid_arguments() -> dict[tuple[str, str], Any]:
    get = registry.layers.get
    return {
        ("layers", "registry_xf.SelfAttention.v1"): lambda: {"width": 32, "n_heads": 4},
        ("layers", "registry_xf.FeedForward.v1"): lambda: {"width": 32, "intermediate_width": 37},
        ("layers", "registry_xf.LayerNorm.v1"): lambda: {"width": 32},
        ("layers", "registry_xf.RMSNorm.v1"): lambda: {"width": 32},
        ("layers", "registry_xf.LearnedPositions.v1"): lambda: {"max_positions": 64, "width": 32},
        ("layers", "registry_xf.SinusoidalPositions.v1"): lambda: {
            "max_positions": 64,
            "width": 32,
        },
        ("layers", "registry_xf.RotaryEmbeddings.v1"): lambda: {"head_width": 8},
        ("layers", "registry_xf.ALiBi.v1"): lambda: {"n_heads": 4},
        ("layers", "registry_xf.CrossAttention.v1"): lambda: {"width": 32, "n_heads": 4},
        ("layers", "registry_xf.RelativePositionBias.v1"): lambda: {"n_heads": 4},
        ("layers", "registry_xf.TransformerEmbeddings.v1"): lambda: {"vocab_size": 99, "width": 32},
        ("layers", "registry_xf.DisentangledSelfAttention.v1"): lambda: {"width": 32, "n_heads": 4},
        ("layers", "registry_xf.RelativeEmbeddings.v1"): lambda: {"width": 32, "max_distance": 64},
        ("layers", "registry_xf.TokenMerging.v1"): lambda: {"fraction": 0.2},
        ("layers", "registry_xf.FirstConvLayerStack.v1"): lambda: {
            "layer": _layer(),
            "n_layers": 2,
            "width": 32,
            "kernel_size": 3,
        },
        ("layers", "registry_xf.TransformerLayer.v1"): lambda: {
            "attention": get("registry_xf.SelfAttention.v1")(width=32, n_heads=4),
            "feed_forward": get("registry_xf.FeedForward.v1")(width=32, intermediate_width=37),
            "attention_norm": get("registry_xf.LayerNorm.v1")(width=32),
            "feed_forward_norm": get("registry_xf.LayerNorm.v1")(width=32),
        },
        ("layers", "registry_xf.LayerStack.v1"): lambda: {"layer": _layer(), "n_layers": 2},
        ("layers", "registry_xf.SharedLayerStack.v1"): lambda: {"layer": _layer(), "n_layers": 2},
        ("layers", "registry_xf.PatternLayerStack.v1"): lambda: {
            "kinds": {"a": _layer()},
            "pattern": ["a"],
            "n_layers": 2,
        },
        ("architectures", "registry_xf.Decoder.v1"): lambda: {
            "embeddings": get("registry_xf.TransformerEmbeddings.v1")(vocab_size=99, width=32),
            "layers": get("registry_xf.LayerStack.v1")(layer=_layer(), n_layers=2),
        },
    }


def _plain(annotation: Any) -> set[type]:
    """The plain types an annotation admits (Annotated and Optional taken apart)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _plain(typing.get_args(annotation)[0])
    if origin is not None and type(None) in typing.get_args(annotation):
        return set().union(*(_plain(a) for a in typing.get_args(annotation)))
    return {annotation} if isinstance(annotation, type) else set()


def numeric_parameters() -> list[tuple[str, str, str, type]]:
    found = []
    for registry_name in ("layers", "architectures"):
        reg = registry.get_registry(registry_name)
        for name in reg.names():
            if not name.startswith("registry_xf."):
                continue  # plugins in the tests define their own
            for param in schema_for(reg.get(name)).params.values():
                kinds = _plain(param.annotation) & {int, float}
                if kinds and bool not in _plain(param.annotation):
                    found.append((registry_name, name, param.name, max(kinds, key=str)))
    return found


NUMERIC = numeric_parameters()


def test_every_numeric_parameter_is_covered() -> None:
    """A new component with numbers in its signature joins the property below."""
    assert {(r, n) for r, n, _, _ in NUMERIC} <= set(valid_arguments())
    assert len(NUMERIC) >= 30


ANY_NUMBER = st.one_of(
    st.sampled_from([0, -1, 1, 2, 3, 1e9, 10**9, 2**63, -(2**63), 10**400, 0.5, 1e-45]),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308]),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["12", "wide", None, True, [4]]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index=st.integers(min_value=0, max_value=len(NUMERIC) - 1), value=ANY_NUMBER)
def test_numeric_parameters_take_sane_values_or_a_typed_error(index: int, value: Any) -> None:
    registry_name, name, param, kind = NUMERIC[index]
    arguments = valid_arguments()[(registry_name, name)]()
    arguments[param] = value
    component = registry.get_registry(registry_name).get(name)
    start = time.perf_counter()
    try:
        with on_meta():
            built = component(**arguments)
    except rx.ConfigError as e:
        assert e.problems, str(e)
        return
    finally:
        assert time.perf_counter() - start < FAST
    # a module, or a setting object a stack carries (Token Merging holds no weights)
    assert isinstance(built, (nn.Module, TokenMerging))
    # accepted: None where the parameter is optional, else a finite number in range
    assert not isinstance(value, list), (name, param, value)
    if value is not None:
        number = float(value)
        assert math.isfinite(number), (name, param, value)
        if kind is int:
            assert 0 <= number <= 2**24, (name, param, value)


@pytest.mark.parametrize(
    "name, argument",
    [
        ("registry_xf.Temperature.v1", "temperature"),
        ("registry_xf.TopP.v1", "p"),
        ("registry_xf.MinP.v1", "p"),
        ("registry_xf.RepetitionPenalty.v1", "penalty"),
    ],
)
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_logits_processors_refuse_non_finite_settings(
    name: str, argument: str, value: float
) -> None:
    with pytest.raises(rx.ConfigError, match=rf"\[{argument}\].*finite"):
        rx.registry.logits_processors.get(name)(**{argument: value})


@settings(max_examples=200, deadline=None)
@given(
    index=st.sampled_from(["0", "7", "12", "x", "1a", "weight"]),
    template=st.sampled_from(
        [t for c in all_converters() for r in c.rules for t in r.hf if "{i}" in t]
    ),
)
def test_layer_index_pattern_agrees_with_each_template(index: str, template: str) -> None:
    """The one pattern of the config.json layer check finds the layer index exactly where
    the first template (in order) whose ``{i}`` is a number matches the name."""
    from registry_xf.converters.base import layer_index_regex, template_regex

    converter = next(c for c in all_converters() if any(template in r.hf for r in c.rules))
    templates = tuple(t for r in converter.rules for t in r.hf if "{i}" in t)
    name = template.replace("{i}", index).replace("{p}", "weight")
    name = name.replace("{", "").replace("}", "")  # any other placeholder: a plain word
    expected = None
    for pattern in map(template_regex, templates):
        m = pattern.match(name)
        if m is not None and m.group("i").isdigit():
            expected = m.group("i")
            break
    found = layer_index_regex(templates).match(name)
    assert (found.group(found.lastgroup) if found else None) == expected
