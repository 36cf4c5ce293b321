"""ELECTRA (the discriminator's encoder)."""

from typing import Any

from ..registry import registry
from .base import HFConverter, Setting, rule
from .bert_like import BERT_HEADS, BERT_RULES, BERT_SETTINGS, require_absolute_positions
from .heads import ELECTRA_HEAD_LAYOUT


def _from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    embedding, hidden = hf.get("embedding_size", hf["hidden_size"]), hf["hidden_size"]
    return {"projection_width": hidden if embedding != hidden else None}


@registry.converters.register("registry_xf.HFElectra.v1")
def electra_converter() -> HFConverter:
    """HF ``electra`` checkpoints (discriminator or bare model) ↔ configs/electra.cfg."""
    return HFConverter(
        name="registry_xf.HFElectra.v1",
        family="electra",
        model_types=("electra",),
        hf_architecture="ElectraModel",
        settings=(*BERT_SETTINGS, Setting("embedding_width", "embedding_size")),
        rules=(*BERT_RULES, rule("embeddings.projection.{p}", "embeddings_project.{p}")),
        checkpoint_prefixes=("electra.",),
        ignored=(*BERT_HEADS, r"discriminator_predictions\.", r"generator_"),
        extra_from_hf=_from_hf,
        checks=require_absolute_positions,
        heads=ELECTRA_HEAD_LAYOUT,
    )
