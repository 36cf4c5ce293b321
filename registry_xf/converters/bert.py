"""BERT."""

from ..registry import registry
from .base import HFConverter
from .bert_like import BERT_HEADS, BERT_RULES, BERT_SETTINGS, require_absolute_positions
from .heads import BERT_HEAD_LAYOUT


@registry.converters.register("registry_xf.HFBert.v1")
def bert_converter() -> HFConverter:
    """HF ``bert`` checkpoints ↔ configs/bert.cfg."""
    return HFConverter(
        name="registry_xf.HFBert.v1",
        family="bert",
        model_types=("bert",),
        hf_architecture="BertModel",
        settings=BERT_SETTINGS,
        rules=BERT_RULES,
        checkpoint_prefixes=("bert.",),
        ignored=BERT_HEADS,
        checks=require_absolute_positions,
        heads=BERT_HEAD_LAYOUT,
    )
