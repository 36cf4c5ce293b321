"""Registries: no silent overwrites, close-name hints, components from other packages."""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import catalogue
import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB
from torch import nn

import registry_xf as rx

PLUGIN_DIR = Path(__file__).parent / "plugin"
PLUGIN_NAME = "test_plugin.ScaledLayerNorm.v1"

# A small BERT-shaped encoder whose embedding norm comes from the plugin package.
PLUGIN_CONFIG = f"""
[model]
@architectures = "registry_xf.Encoder.v1"

[model.embeddings]
@layers = "registry_xf.TransformerEmbeddings.v1"
vocab_size = {VOCAB}
width = 16
type_vocab_size = 2

[model.embeddings.positions]
@layers = "registry_xf.LearnedPositions.v1"
max_positions = 32
width = 16

[model.embeddings.norm]
@layers = "{PLUGIN_NAME}"
width = 16
eps = 1e-12
factor = 2.5

[model.layers]
@layers = "registry_xf.LayerStack.v1"
n_layers = 1

[model.layers.layer]
@layers = "registry_xf.TransformerLayer.v1"

[model.layers.layer.attention]
@layers = "registry_xf.SelfAttention.v1"
width = 16
n_heads = 2

[model.layers.layer.attention_norm]
@layers = "registry_xf.LayerNorm.v1"
width = 16

[model.layers.layer.feed_forward]
@layers = "registry_xf.FeedForward.v1"
width = 16
intermediate_width = 24

[model.layers.layer.feed_forward_norm]
@layers = "registry_xf.LayerNorm.v1"
width = 16
"""


@pytest.fixture
def forget() -> Iterator[list[str]]:
    """Names (in the layers registry) to unregister after the test."""
    names: list[str] = []
    yield names
    for name in names:
        catalogue.REGISTRY.pop(("registry_xf", "layers", name), None)


@pytest.fixture(scope="module")
def plugin() -> None:
    """The entry-point test package, installed if it is not."""
    try:
        importlib.metadata.distribution("registry-xf-test-plugin")
    except importlib.metadata.PackageNotFoundError:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", str(PLUGIN_DIR)],
            check=True,
        )
        importlib.invalidate_caches()


def one() -> nn.Module:
    return nn.Identity()


def other() -> nn.Module:
    return nn.ReLU()


def test_registering_a_name_twice_needs_override(forget: list[str]) -> None:
    name = "test_registry.Thing.v1"
    forget.append(name)
    rx.registry.layers.register(name, func=one)
    rx.registry.layers.register(name, func=one)  # the same function again changes nothing
    with pytest.raises(rx.RegistryNameError, match="already registered") as info:
        rx.registry.layers.register(name, func=other)
    message = str(info.value)
    assert f"'{name}'" in message and "'layers'" in message and "override=True" in message
    assert message == info.value.args[0]  # not quoted as KeyError messages are
    assert isinstance(rx.registry.layers.get(name)(), nn.Identity)  # unchanged

    with pytest.raises(rx.RegistryNameError):  # the decorator form refuses too

        @rx.registry.layers.register(name)
        def again() -> nn.Module:
            return nn.Tanh()

    rx.registry.layers.register(name, func=other, override=True)
    assert isinstance(rx.registry.layers.get(name)(), nn.ReLU)


def test_builtin_names_are_protected() -> None:
    with pytest.raises(rx.RegistryNameError, match="register a new version"):
        rx.registry.layers.register("registry_xf.LayerNorm.v1", func=one)
    norm = rx.registry.layers.get("registry_xf.LayerNorm.v1")(width=4)
    assert isinstance(norm, nn.LayerNorm)


def test_entry_point_names_are_protected(plugin: None) -> None:
    with pytest.raises(rx.RegistryNameError, match="already registered"):
        rx.registry.layers.register(PLUGIN_NAME, func=one)
    # the plugin may register its own function under its own name (decorator and entry point)
    from registry_xf_test_plugin import scaled_layer_norm

    rx.registry.layers.register(PLUGIN_NAME, func=scaled_layer_norm)


def test_unknown_names_suggest_close_ones() -> None:
    with pytest.raises(rx.RegistryNameError) as info:
        rx.registry.layers.get("registry_xf.LayerNrom.v1")
    message = str(info.value)
    assert "'registry_xf.LayerNrom.v1' is not registered in registry 'layers'" in message
    assert "Did you mean 'registry_xf.LayerNorm.v1'" in message
    assert "registry-xf list layers" in message
    assert isinstance(info.value, KeyError)

    with pytest.raises(rx.RegistryNameError, match="Did you mean 'registry_xf.GELU.v1'"):
        rx.registry.activations.get("registry_xf.Gelu.v1")
    with pytest.raises(rx.RegistryNameError) as info:
        rx.registry.layers.get("completely-different")
    assert "Did you mean" not in str(info.value)
    with pytest.raises(rx.RegistryNameError, match="no registry 'layer'. Did you mean 'layers'"):
        rx.registry.get_registry("layer")


def test_plugin_is_listed(plugin: None) -> None:
    assert PLUGIN_NAME in rx.registry.layers.names()
    assert PLUGIN_NAME not in rx.registry.activations.names()


def test_plugin_component_in_a_config(plugin: None) -> None:
    torch.manual_seed(0)
    model = rx.build(PLUGIN_CONFIG, device="cpu").eval()
    norm = model.embeddings.norm
    assert type(norm).__name__ == "ScaledLayerNorm" and norm.factor == 2.5
    assert "embeddings.norm.weight" in model.state_dict()
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        embedded = model.embeddings(ids)
        summed = (
            model.embeddings.word_embeddings(ids)
            + model.embeddings.token_type_embeddings.weight[0]
            + model.embeddings.positions.weight[:7]
        )
        expected = 2.5 * F.layer_norm(summed, (16,), norm.weight, norm.bias, eps=1e-12)
        torch.testing.assert_close(embedded, expected)
        assert torch.isfinite(model(ids).last_hidden_state).all()

    # its arguments are checked like those of built-in components
    with pytest.raises(rx.ConfigError) as info:
        rx.build(PLUGIN_CONFIG.replace("factor = 2.5", 'factor = "big"\nscale = 3'))
    paths = {p.path for p in info.value.problems}
    assert paths == {"model.embeddings.norm.factor", "model.embeddings.norm.scale"}


def test_plugin_is_found_without_importing_it(plugin: None) -> None:
    # forget the plugin module and anything looked up from it before
    sys.modules.pop("registry_xf_test_plugin", None)
    catalogue.REGISTRY.pop(("registry_xf", "layers", PLUGIN_NAME), None)
    model = rx.build(PLUGIN_CONFIG)  # the config names it; its entry point imports it
    assert type(model.embeddings.norm).__module__ == "registry_xf_test_plugin"
    assert "registry_xf_test_plugin" in sys.modules


def test_package_installed_after_import_is_found(tmp_path: Path) -> None:
    """Entry points are read when looked up, not from a list taken at import time."""
    module, name = "registry_xf_late_plugin", "test_registry.Late.v1"
    (tmp_path / f"{module}.py").write_text(
        "from torch import nn\n\ndef make(width: int) -> nn.Module:\n"
        "    return nn.Linear(width, width)\n"
    )
    info = tmp_path / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: registry-xf-late-plugin\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(f"[registry_xf_layers]\n{name} = {module}:make\n")
    assert name not in rx.registry.layers.names()
    sys.path.append(str(tmp_path))
    importlib.invalidate_caches()
    try:
        assert name in rx.registry.layers.names()
        layer = rx.registry.layers.get(name)(width="3")  # validated: "3" becomes 3
        assert isinstance(layer, nn.Linear) and layer.in_features == 3
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(module, None)
        catalogue.REGISTRY.pop(("registry_xf", "layers", name), None)
        importlib.invalidate_caches()
    assert name not in rx.registry.layers.names()
