"""Activation functions, registered, plus the short names HF configs use."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator
from torch import nn

from ..errors import RegistryNameError, did_you_mean
from ..registry import registry


@registry.activations.register("registry_xf.GELU.v1")
def gelu(approximate: Literal["none", "tanh"] = "none") -> nn.Module:
    """GELU; ``approximate="tanh"`` is the fast variant (HF's ``gelu_new``)."""
    return nn.GELU(approximate=approximate)


@registry.activations.register("registry_xf.ReLU.v1")
def relu() -> nn.Module:
    return nn.ReLU()


@registry.activations.register("registry_xf.SiLU.v1")
def silu() -> nn.Module:
    """SiLU (swish): the gate of SwiGLU feed-forward layers."""
    return nn.SiLU()


@registry.activations.register("registry_xf.Tanh.v1")
def tanh() -> nn.Module:
    return nn.Tanh()


# Short names accepted wherever an activation is expected (HF ``hidden_act`` values).
SHORT_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "gelu": ("registry_xf.GELU.v1", {}),
    "gelu_new": ("registry_xf.GELU.v1", {"approximate": "tanh"}),
    "gelu_pytorch_tanh": ("registry_xf.GELU.v1", {"approximate": "tanh"}),
    "relu": ("registry_xf.ReLU.v1", {}),
    "silu": ("registry_xf.SiLU.v1", {}),
    "swish": ("registry_xf.SiLU.v1", {}),
    "tanh": ("registry_xf.Tanh.v1", {}),
}


def to_activation(value: Any) -> nn.Module:
    """A short name (``"gelu"``), a registered name, or a module → an activation module."""
    if isinstance(value, nn.Module):
        return value
    if isinstance(value, str):
        if value in SHORT_NAMES:
            name, kwargs = SHORT_NAMES[value]
            return registry.activations.get(name)(**kwargs)
        try:
            return registry.activations.get(value)()
        except RegistryNameError:
            raise ValueError(
                f"unknown activation '{value}'."
                + did_you_mean(value, [*SHORT_NAMES, *registry.activations.names()])
                + f" Short names: {', '.join(SHORT_NAMES)}"
            ) from None
    raise ValueError("expected an activation name such as 'gelu' or an activation module")


Activation = Annotated[nn.Module, BeforeValidator(to_activation)]
