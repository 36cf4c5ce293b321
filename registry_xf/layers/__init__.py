"""Building blocks: embeddings, positions, attention, feed-forward, norms, layers."""

from .activations import Activation
from .attention import SelfAttention
from .attention_mask import AttentionMask
from .conv_layer_stack import FirstConvLayerStack
from .cross_attention import CrossAttention, EncoderMemory
from .disentangled_attention import DisentangledSelfAttention, RelativeEmbeddings
from .embeddings import TransformerEmbeddings
from .feedforward import FeedForward
from .layer_stacks import LayerStack, PatternLayerStack, SharedLayerStack
from .norms import LayerNorm, RMSNorm
from .positions import ALiBi, LearnedPositions, RotaryEmbeddings, SinusoidalPositions
from .relative_bias import RelativePositionBias
from .token_merging import TokenMerging
from .transformer_layer import TransformerLayer

__all__ = [
    "ALiBi",
    "Activation",
    "AttentionMask",
    "CrossAttention",
    "DisentangledSelfAttention",
    "EncoderMemory",
    "FirstConvLayerStack",
    "FeedForward",
    "LayerNorm",
    "LayerStack",
    "LearnedPositions",
    "PatternLayerStack",
    "RMSNorm",
    "RelativeEmbeddings",
    "RelativePositionBias",
    "RotaryEmbeddings",
    "SelfAttention",
    "SharedLayerStack",
    "SinusoidalPositions",
    "TokenMerging",
    "TransformerEmbeddings",
    "TransformerLayer",
]
