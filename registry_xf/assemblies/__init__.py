"""Assemblies: whole models made of registered layers."""

from .base import Assembly, ModelRecord
from .decoder import CausalLM, CausalLMOutput, Decoder
from .encoder import Encoder
from .outputs import HeadOutput, ModelOutput
from .with_head import EncoderWithHead

__all__ = [
    "Assembly",
    "CausalLM",
    "CausalLMOutput",
    "Decoder",
    "Encoder",
    "EncoderWithHead",
    "HeadOutput",
    "ModelOutput",
    "ModelRecord",
]
