"""Assemblies: whole models made of registered layers."""

from .base import Assembly
from .decoder import CausalLM, CausalLMOutput, Decoder
from .encoder import Encoder
from .outputs import ModelOutput

__all__ = ["Assembly", "CausalLM", "CausalLMOutput", "Decoder", "Encoder", "ModelOutput"]
