"""Two-way converters between HF transformers checkpoints and registry_xf models."""

from .base import HFConverter, KeyRule, converter_for_model_type, supported_model_types

__all__ = ["HFConverter", "KeyRule", "converter_for_model_type", "supported_model_types"]
