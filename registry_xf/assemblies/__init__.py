"""Assemblies: whole models made of registered layers."""

from .base import Assembly, ModelRecord
from .decoder import CausalLM, CausalLMOutput, Decoder
from .encoder import Encoder
from .encoder_decoder import EncoderDecoder, Seq2SeqLM, Seq2SeqOutput
from .outputs import HeadOutput, ModelOutput
from .with_head import EncoderWithHead

__all__ = [
    "Assembly",
    "CausalLM",
    "CausalLMOutput",
    "Decoder",
    "Encoder",
    "EncoderDecoder",
    "EncoderWithHead",
    "HeadOutput",
    "ModelOutput",
    "ModelRecord",
    "Seq2SeqLM",
    "Seq2SeqOutput",
]
