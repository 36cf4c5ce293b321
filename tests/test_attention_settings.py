"""The attention components' ``cpu_kernel`` setting: from a .cfg or ``load(overrides=...)``
it reaches the layers, which then never call registry_xf's CPU attention kernel and give
the outputs they give with it; bad values are ConfigErrors naming the dotted path; the
environment variable still turns the kernel off for the whole process."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import torch
from conftest import random_batch, write_hf_checkpoint

import registry_xf as rx
from registry_xf.layers import attention as attention_module
from registry_xf.layers import cpu_attention as kernel
from registry_xf.layers.attention import SelfAttention
from registry_xf.layers.cross_attention import CrossAttention

SETTING = "model.layers.layer.attention.cpu_kernel"


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT whose heads are 16 wide, a width the kernel computes."""
    return write_hf_checkpoint(
        tmp_path_factory.mktemp("bert") / "bert", "bert", 3, **{"num_attention_heads": 2}
    )


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Each call of the kernel from ``attend``: whether it computed the result. The real
    kernel runs; the list only records its calls."""
    calls: list[bool] = []

    def counting(real):  # type: ignore[no-untyped-def]
        def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            out = real(*args, **kwargs)
            calls.append(out is not None)
            return out

        return counted

    for entry in ("cpu_attention", "cpu_attention_packed"):  # padded and packed tokens
        monkeypatch.setattr(attention_module, entry, counting(getattr(attention_module, entry)))
    return calls


def hidden(model: torch.nn.Module, unpad: bool | None = None) -> torch.Tensor:
    ids, mask = random_batch(seed=4, batch=3, seq=20)
    with torch.no_grad():
        out = model(ids, mask, unpad=unpad).last_hidden_state
    return out * mask.unsqueeze(-1)  # unpadded layers leave zeros at padding


def test_the_setting_keeps_the_kernel_out_with_the_same_outputs(
    bert: Path, kernel_calls: list[bool]
) -> None:
    default = rx.load(bert)
    off = rx.load(bert, overrides={SETTING: False})
    layers = [m for m in off.modules() if isinstance(m, SelfAttention)]
    assert layers and all(m.cpu_kernel is False for m in layers)
    assert all(m.cpu_kernel for m in default.modules() if isinstance(m, SelfAttention))
    for unpad in (None, True):  # padded tokens, and packed ones (as Embedder runs them)
        kernel_calls.clear()
        with_kernel = hidden(default, unpad)
        assert kernel_calls, "the default model asks the kernel"
        kernel_calls.clear()
        without = hidden(off, unpad)
        assert kernel_calls == []
        torch.testing.assert_close(without, with_kernel, atol=1e-5, rtol=0)


def test_the_embedder_keeps_to_the_setting(kernel_calls: list[bool]) -> None:
    """The Embedder runs mean-pooled layers on packed tokens for the kernel's sake; a model
    whose setting turns the kernel off is never given to it that way either."""
    texts = ["a short one", "and a longer text than that one, with more words in it"]
    default = rx.Embedder()
    with_kernel = default.embed(texts)
    assert any(kernel_calls), "the default embedder asks the kernel"
    kernel_calls.clear()
    off = rx.Embedder(rx.load(default.model.record.origin.path, overrides={SETTING: False}))
    kernel_calls.clear()
    without = off.embed(texts)
    assert kernel_calls == []
    assert abs(without - with_kernel).max() < 1e-5


def test_the_setting_in_a_cfg_and_through_save(
    bert: Path, tmp_path: Path, kernel_calls: list[bool]
) -> None:
    """A .cfg that says so, and a saved model (whose config.cfg keeps the setting)."""
    config = rx.config_from_hf(bert)
    config["model"]["layers"]["layer"]["attention"]["cpu_kernel"] = False
    path = tmp_path / "model.cfg"
    config.to_disk(path)
    from_cfg = rx.load(path)
    saved = rx.load(rx.save(from_cfg, tmp_path / "saved"))
    for model in (from_cfg, saved):
        assert all(m.cpu_kernel is False for m in model.modules() if isinstance(m, SelfAttention))
        hidden(model)
    assert kernel_calls == []


def test_the_environment_variable_still_wins(
    bert: Path, monkeypatch: pytest.MonkeyPatch, kernel_calls: list[bool]
) -> None:
    """The kernel runs only where both allow it: the variable turns it off for every
    model, whatever their settings say."""
    if isinstance(kernel.library(), str):
        pytest.skip(f"the kernel is unavailable here: {kernel.library()}")
    model = rx.load(bert, overrides={SETTING: True})
    expected = hidden(model)
    assert kernel_calls and all(kernel_calls)  # it ran in every layer
    kernel_calls.clear()
    monkeypatch.setenv(kernel.SWITCH, "0")
    torch.testing.assert_close(hidden(model), expected, atol=1e-5, rtol=0)
    assert kernel_calls and not any(kernel_calls)  # asked, and declined


@pytest.mark.parametrize("value", ["maybe", 2, [True]])
def test_bad_values_name_the_dotted_path(bert: Path, value: object) -> None:
    with pytest.raises(rx.ConfigError) as info:
        rx.load(bert, overrides={SETTING: value})
    assert SETTING in str(info.value) and "bool" in str(info.value)


def test_cross_attention_takes_it_too() -> None:
    t5_cfg = str(resources.files("registry_xf.configs") / "t5.cfg")
    where = "model.decoder.layers.layer.cross_attention.cpu_kernel"
    model = rx.build(t5_cfg, overrides={where: False})
    cross = [m for m in model.modules() if isinstance(m, CrossAttention)]
    assert cross and all(m.cpu_kernel is False for m in cross)
    with pytest.raises(rx.ConfigError, match=where.replace(".", r"\.")):
        rx.build(t5_cfg, overrides={where: "sometimes"})
