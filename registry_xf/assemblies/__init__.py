"""Assemblies: whole models made of registered layers."""

from .base import Assembly, ModelRecord
from .decoder import CausalLM, CausalLMOutput, Decoder
from .encoder import Encoder
from .outputs import ModelOutput

__all__ = [
    "Assembly",
    "CausalLM",
    "CausalLMOutput",
    "Decoder",
    "Encoder",
    "ModelOutput",
    "ModelRecord",
]
