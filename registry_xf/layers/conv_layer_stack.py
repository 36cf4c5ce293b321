"""A layer stack whose first layer is joined by a convolution of its input (DeBERTa-v2).

deberta-v2-xlarge and -xxlarge convolve the embeddings along the sequence and add the
result to the first layer's output, then norm: local n-gram information beside the
attention's relative positions. ``kernel_size = 0`` leaves the plain stack, so one config
serves checkpoints with and without it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError, ConfigProblem
from ..registry import registry
from ..types import Eps, LayerCount, Probability, Width
from .activations import Activation
from .attention_mask import AttentionMask
from .layer_stacks import LayerStack, with_merging, within_size_bound
from .token_merging import TokenMerging


class InputConvolution(nn.Module):
    """``norm(layer_output + activation(conv(input)))``, padding zeroed before and after."""

    def __init__(
        self,
        width: int,
        kernel_size: int,
        groups: int,
        activation: nn.Module,
        eps: float,
        dropout: float,
    ):
        super().__init__()
        self.conv = nn.Conv1d(
            width, width, kernel_size, padding=(kernel_size - 1) // 2, groups=groups
        )
        self.activation = activation
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, layer_input: torch.Tensor, layer_output: torch.Tensor, keep: torch.Tensor | None
    ) -> torch.Tensor:
        """``keep`` (batch, seq): True for real tokens; padding neither feeds the
        convolution nor leaves it (zeros, as HF's masked embeddings)."""
        keep = None if keep is None else keep[..., None].to(layer_input.dtype)
        h = layer_input if keep is None else layer_input * keep
        conv = self.conv(h.transpose(1, 2)).transpose(1, 2)
        if keep is not None:
            conv = conv * keep
        out = self.norm(layer_output + self.activation(self.dropout(conv)))
        return out if keep is None else out * keep


class _FirstLayer(nn.Module):
    """The first layer as the encoder calls it, with the convolution joined (holds no
    parameters of its own: the stack's)."""

    def __init__(self, layer: nn.Module, convolution: InputConvolution):
        super().__init__()
        self.layer, self.convolution = layer, convolution

    def forward(self, x: torch.Tensor, mask: AttentionMask, *args, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        out = self.layer(x, mask, *args, **kwargs)
        return self.convolution(x, out, mask.key_mask)


class FirstConvLayerStack(LayerStack):
    """``n_layers`` copies of a layer; the first one's input, convolved, joins its output."""

    def __init__(self, layer: nn.Module, n_layers: int, convolution: InputConvolution | None):
        super().__init__(layer, n_layers)
        self.convolution = convolution

    def applied(self) -> Sequence[nn.Module]:
        layers = list(self)
        if self.convolution is not None:
            # a fresh wrapper (a plain object, not a submodule: no second name for weights)
            layers[0] = _FirstLayer(layers[0], self.convolution)
        return layers

    def __iter__(self):  # type: ignore[no-untyped-def]
        # the layers only: ``convolution`` is a submodule of the stack but not a layer
        return (self[i] for i in range(len(self)))

    def __len__(self) -> int:
        return len(self._modules) - (1 if "convolution" in self._modules else 0)


@registry.layers.register("registry_xf.FirstConvLayerStack.v1")
def first_conv_layer_stack(
    layer: nn.Module,
    n_layers: LayerCount,
    width: Width,
    kernel_size: int = 0,
    groups: int = 1,
    activation: Activation = "tanh",  # type: ignore[assignment]
    eps: Eps = 1e-7,
    dropout: Probability = 0.0,
    token_merging: TokenMerging | None = None,
) -> nn.Module:
    """``n_layers`` copies of ``layer``; with ``kernel_size`` > 0 the first layer's input is
    convolved (``groups``), activated and added to its output, then normed (DeBERTa-v2's
    ConvLayer); ``kernel_size = 0``: no convolution. ``token_merging`` shortens the
    sequences between layers: merges come after a layer, so the convolution always sees
    every token."""
    problems = []
    if kernel_size < 0 or kernel_size > 63 or (kernel_size and kernel_size % 2 == 0):
        # an even kernel would shorten the sequence by one (the padding is (k - 1) // 2)
        problems.append(
            ConfigProblem("kernel_size", "expected 0 (none) or odd, up to 63", kernel_size, True)
        )
    if groups < 1 or width % groups:
        problems.append(
            ConfigProblem("groups", f"expected a divisor of the width {width}", groups, True)
        )
    if problems:
        raise ConfigError(problems)
    convolution = (
        InputConvolution(width, kernel_size, groups, activation, eps, dropout)
        if kernel_size
        else None
    )
    stack = FirstConvLayerStack(within_size_bound(layer, n_layers), n_layers, convolution)
    return with_merging(stack, token_merging, n_layers)
