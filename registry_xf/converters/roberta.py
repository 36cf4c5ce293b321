"""RoBERTa, XLM-RoBERTa and CamemBERT: one layout, three families of checkpoints."""

from typing import Any

from ..registry import registry
from .base import HFConverter
from .bert_like import BERT_HEADS, BERT_RULES, BERT_SETTINGS, require_absolute_positions
from .heads import roberta_head_layout


def _padding_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    return {"padding_idx": hf.get("pad_token_id", 1)}


def _padding_to_hf(hyper: dict[str, Any]) -> dict[str, Any]:
    return {"pad_token_id": hyper["padding_idx"]}


def _roberta_like(name: str, family: str, model_type: str, architecture: str) -> HFConverter:
    return HFConverter(
        name=name,
        family=family,
        model_types=(model_type,),
        hf_architecture=architecture,
        settings=BERT_SETTINGS,
        rules=BERT_RULES,
        checkpoint_prefixes=("roberta.",),
        ignored=BERT_HEADS,
        extra_from_hf=_padding_from_hf,
        extra_to_hf=_padding_to_hf,
        checks=require_absolute_positions,
        heads=roberta_head_layout(),
    )


@registry.converters.register("registry_xf.HFRoBERTa.v1")
def roberta_converter() -> HFConverter:
    """HF ``roberta`` checkpoints ↔ configs/roberta.cfg."""
    return _roberta_like("registry_xf.HFRoBERTa.v1", "roberta", "roberta", "RobertaModel")


@registry.converters.register("registry_xf.HFXLMRoBERTa.v1")
def xlm_roberta_converter() -> HFConverter:
    """HF ``xlm-roberta`` checkpoints ↔ configs/xlm_roberta.cfg."""
    return _roberta_like(
        "registry_xf.HFXLMRoBERTa.v1", "xlm_roberta", "xlm-roberta", "XLMRobertaModel"
    )


@registry.converters.register("registry_xf.HFCamemBERT.v1")
def camembert_converter() -> HFConverter:
    """HF ``camembert`` checkpoints ↔ configs/camembert.cfg."""
    return _roberta_like("registry_xf.HFCamemBERT.v1", "camembert", "camembert", "CamembertModel")
