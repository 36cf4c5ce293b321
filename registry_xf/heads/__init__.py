"""Task heads: registered components that turn an encoder's hidden states into logits."""

from .masked_lm import MaskedLMHead
from .sequence_classification import SequenceClassificationHead
from .token_classification import TokenClassificationHead

__all__ = ["MaskedLMHead", "SequenceClassificationHead", "TokenClassificationHead"]
