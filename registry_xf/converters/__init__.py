"""Two-way converters between HF transformers checkpoints and registry_xf models.

Importing this package registers every family's converter.
"""

from . import albert, bert, distilbert, electra, llama, roberta  # noqa: F401  (registration)
from .base import HFConverter, KeyRule, converter_for_model_type, supported_model_types

__all__ = ["HFConverter", "KeyRule", "converter_for_model_type", "supported_model_types"]
