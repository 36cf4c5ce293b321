"""Two-way converters between HF transformers checkpoints and registry_xf models.

Importing this package registers every family's converter.
"""

from . import (  # noqa: F401  (registration)
    albert,
    bart,
    bert,
    deberta_v2,
    distilbert,
    electra,
    falcon,
    gemma,
    gpt2,
    gpt_neox,
    llama,
    marian,
    mistral,
    modernbert,
    phi3,
    qwen2,
    roberta,
    t5,
)
from .base import HFConverter, KeyRule, converter_for_model_type, supported_model_types

__all__ = ["HFConverter", "KeyRule", "converter_for_model_type", "supported_model_types"]
