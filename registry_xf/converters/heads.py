"""Task heads in HF checkpoints: each BERT-like family's head names and settings.

An HF task model (``BertForSequenceClassification``...) is the family's bare model under a
prefix (``bert.``) plus a head. Ours is ``EncoderWithHead``: ``encoder.*`` is the bare
encoder (the family's rules apply) and ``head.*`` the head, whose names map to HF's here.
Each family reads its head's settings from ``config.json`` the way its HF class does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import UnsupportedModelError
from .base import KeyRule, rule

# HF class name suffix → our task name (the head's ``task``).
TASKS = {
    "ForSequenceClassification": "sequence_classification",
    "ForTokenClassification": "token_classification",
    "ForMaskedLM": "masked_lm",
}
HF_SUFFIX = {task: suffix for suffix, task in TASKS.items()}

HEAD_COMPONENTS = {
    "sequence_classification": "registry_xf.SequenceClassificationHead.v1",
    "token_classification": "registry_xf.TokenClassificationHead.v1",
    "masked_lm": "registry_xf.MaskedLMHead.v1",
}

PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")


@dataclass(frozen=True)
class HeadLayout:
    """One family's heads: HF names (without the base prefix) and settings.

    ``base_prefix`` is where HF task models keep the bare model (``bert.``); ``in_base``
    lists head names that live inside it (BERT's and ALBERT's pooler) and so take the
    prefix on export. ``classifier_dropout`` reads the classification dropout from
    config.json; ``mlm`` gives the masked-LM head's settings beyond its width and
    vocabulary, ``sequence`` and ``token`` settings of the classification heads that
    replace or add to the ones read here (values may be ``${hyper...}`` references).
    """

    base_prefix: str
    rules: tuple[KeyRule, ...]
    in_base: tuple[str, ...] = ()
    sequence_activation: str = "tanh"
    # the config.json key that names the sequence head's activation, where HF reads one
    # (DeBERTa's pooler_hidden_act); ``sequence_activation`` is its default
    sequence_activation_key: str | None = None
    dropout_before_dense: bool = False
    sequence_dropout: Callable[[dict[str, Any]], float] = lambda hf: _first(
        hf, "classifier_dropout", "hidden_dropout_prob"
    )
    token_dropout: Callable[[dict[str, Any]], float] = lambda hf: _first(
        hf, "classifier_dropout", "hidden_dropout_prob"
    )
    mlm: dict[str, Any] = field(default_factory=dict)
    sequence: dict[str, Any] = field(default_factory=dict)
    token: dict[str, Any] = field(default_factory=dict)
    # whether the masked-LM head's decoder is the token embeddings (HF's tie_word_embeddings)
    mlm_tied: Callable[[dict[str, Any]], bool] = lambda hf: bool(
        hf.get("tie_word_embeddings", True)
    )
    # the [hyper] switch whose value picks one of two masked-LM head layouts (the rules'
    # ``when`` read it); a checkpoint holding the other layout's head contradicts config.json
    mlm_layout_setting: str | None = None

    def head_section(self, task: str, hf: dict[str, Any], where: str) -> dict[str, Any]:
        """The ``[model.head]`` section for an HF task model's ``config.json``."""
        if task == "masked_lm":
            return {
                "@heads": HEAD_COMPONENTS[task],
                "width": "${hyper.hidden_width}",
                "vocab_size": "${hyper.vocab_size}",
                "tie_embeddings": self.mlm_tied(hf),
                **self.mlm,
            }
        section: dict[str, Any] = {
            "@heads": HEAD_COMPONENTS[task],
            "width": "${hyper.hidden_width}",
            "labels": labels_from_hf(hf, where),
        }
        if task == "token_classification":
            return {**section, "dropout": self.token_dropout(hf), **self.token}
        problem_type = hf.get("problem_type")
        if problem_type is not None and problem_type not in PROBLEM_TYPES:
            raise UnsupportedModelError(
                f"{where}: problem_type {problem_type!r} is not one of {', '.join(PROBLEM_TYPES)}"
            )
        activation = self.sequence_activation
        if self.sequence_activation_key is not None:
            activation = str(hf.get(self.sequence_activation_key) or activation)
        section.update(
            activation=activation,
            dropout=self.sequence_dropout(hf),
            dropout_before_dense=self.dropout_before_dense,
        )
        if problem_type is not None:
            section["problem_type"] = problem_type
        return {**section, **self.sequence}

    def head_settings_to_hf(self, head: Any) -> dict[str, Any]:
        """config.json entries for the head's own settings (its activation, where HF
        reads one from the config)."""
        if self.sequence_activation_key is None or head.task != "sequence_classification":
            return {}
        return {self.sequence_activation_key: activation_name(head.activation)}

    def export_name(self, ours: str, hf_name: str) -> str:
        """The HF name in a task checkpoint of our ``ours`` (given its bare HF name)."""
        if ours.startswith("encoder.") or (
            ours.startswith("head.") and hf_name.startswith(self.in_base)
        ):
            return self.base_prefix + hf_name
        return hf_name


def activation_name(module: Any) -> str:
    """HF's name of an activation module (the inverse of the short names)."""
    from ..layers.activations import SHORT_NAMES, to_activation

    for name in SHORT_NAMES:
        candidate = to_activation(name)
        if type(candidate) is type(module) and candidate.extra_repr() == module.extra_repr():
            return name
    raise UnsupportedModelError(
        f"the head's activation {module!r} has no HF name; HF names: {', '.join(SHORT_NAMES)}"
    )


def _first(hf: dict[str, Any], *keys: str) -> float:
    for key in keys:
        if hf.get(key) is not None:
            return float(hf[key])
    return 0.1


def labels_from_hf(hf: dict[str, Any], where: str) -> list[str]:
    """Label names in logit order: ``id2label`` (keys 0..n-1), else ``LABEL_i`` for
    ``num_labels`` (HF's default of 2 when neither is given)."""
    id2label = hf.get("id2label")
    if id2label is None:
        n = hf.get("num_labels", 2)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise UnsupportedModelError(
                f"{where}: num_labels must be a positive integer; got {n!r}"
            )
        return [f"LABEL_{i}" for i in range(n)]
    if not isinstance(id2label, dict) or not id2label:
        raise UnsupportedModelError(
            f"{where}: id2label must be a non-empty object; got {id2label!r}"
        )
    try:
        by_index = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise UnsupportedModelError(
            f"{where}: id2label keys must be label indices (0, 1, ...); got {sorted(id2label)}"
        ) from None
    if sorted(by_index) != list(range(len(by_index))):
        raise UnsupportedModelError(
            f"{where}: id2label keys must be 0..{len(by_index) - 1}; got {sorted(by_index)}"
        )
    n = hf.get("num_labels")
    if n is not None and n != len(by_index):
        raise UnsupportedModelError(
            f"{where}: num_labels {n} differs from the {len(by_index)} labels of id2label"
        )
    labels = [by_index[i] for i in range(len(by_index))]
    variables = [label for label in labels if "${" in label]
    if variables:
        raise UnsupportedModelError(
            f"{where}: label names with '${{' cannot be carried in a config, which would read "
            f"them as variables: {variables}"
        )
    return labels


def labels_to_hf(labels: tuple[str, ...]) -> dict[str, Any]:
    """config.json's label maps for label names in logit order."""
    return {
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def head_rules(
    sequence: tuple[str, str], mlm: tuple[str, str, str, str], token: str = "classifier"
) -> tuple[KeyRule, ...]:
    """Rules for the three heads: the sequence head's (dense, projection) modules, the
    masked-LM head's (transform, norm, decoder, tied bias) and the token classifier.

    A tied masked-LM head's bias is ``head.bias`` (HF stores the tied one apart from the
    decoder, ``cls.predictions.bias``); an untied head's is the decoder's own."""
    dense, out_proj = sequence
    transform, norm, decoder, tied_bias = mlm
    return (
        rule("head.dense.{p}", f"{dense}.{{p}}"),
        rule("head.out_proj.{p}", f"{out_proj}.{{p}}"),
        rule("head.classifier.{p}", f"{token}.{{p}}"),
        rule("head.transform.{p}", f"{transform}.{{p}}"),
        rule("head.transform_norm.{p}", f"{norm}.{{p}}"),
        rule("head.decoder.{p}", f"{decoder}.{{p}}"),
        rule("head.bias", tied_bias),
    )


BERT_HEAD_LAYOUT = HeadLayout(
    base_prefix="bert.",
    rules=head_rules(
        ("pooler.dense", "classifier"),
        (
            "cls.predictions.transform.dense",
            "cls.predictions.transform.LayerNorm",
            "cls.predictions.decoder",
            "cls.predictions.bias",
        ),
    ),
    in_base=("pooler.",),
    mlm={"activation": "${hyper.activation}", "layer_norm_eps": "${hyper.layer_norm_eps}"},
)


def roberta_head_layout(prefix: str = "roberta.") -> HeadLayout:
    """RoBERTa, XLM-RoBERTa and CamemBERT: a dense-tanh-dense head over <s>."""
    return HeadLayout(
        base_prefix=prefix,
        rules=head_rules(
            ("classifier.dense", "classifier.out_proj"),
            ("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder", "lm_head.bias"),
        ),
        dropout_before_dense=True,
        mlm={"activation": "gelu", "layer_norm_eps": "${hyper.layer_norm_eps}"},
    )


ELECTRA_HEAD_LAYOUT = HeadLayout(
    base_prefix="electra.",
    rules=head_rules(
        ("classifier.dense", "classifier.out_proj"),
        (
            "generator_predictions.dense",
            "generator_predictions.LayerNorm",
            "generator_lm_head",
            "generator_lm_head.bias",
        ),
    ),
    sequence_activation="gelu",
    dropout_before_dense=True,
    mlm={
        "activation": "gelu",
        "embedding_width": "${hyper.embedding_width}",
        "layer_norm_eps": "${hyper.layer_norm_eps}",
    },
)

ALBERT_HEAD_LAYOUT = HeadLayout(
    base_prefix="albert.",
    rules=head_rules(
        ("pooler", "classifier"),
        ("predictions.dense", "predictions.LayerNorm", "predictions.decoder", "predictions.bias"),
    ),
    in_base=("pooler.",),
    sequence_dropout=lambda hf: _first(hf, "classifier_dropout_prob"),
    token_dropout=lambda hf: _first(hf, "classifier_dropout_prob", "hidden_dropout_prob"),
    mlm={
        "activation": "${hyper.activation}",
        "embedding_width": "${hyper.embedding_width}",
        "layer_norm_eps": "${hyper.layer_norm_eps}",
    },
)

DISTILBERT_HEAD_LAYOUT = HeadLayout(
    base_prefix="distilbert.",
    rules=head_rules(
        ("pre_classifier", "classifier"),
        ("vocab_transform", "vocab_layer_norm", "vocab_projector", "vocab_projector.bias"),
    ),
    sequence_activation="relu",
    sequence_dropout=lambda hf: _first(hf, "seq_classif_dropout"),
    token_dropout=lambda hf: _first(hf, "dropout"),
    mlm={"activation": "${hyper.activation}", "layer_norm_eps": 1e-12},
)


def _legacy_mlm(hyper: Mapping[str, Any]) -> bool:
    return hyper.get("legacy_mlm_head", True) is not False


def _lm_predictions(hyper: Mapping[str, Any]) -> bool:
    return not _legacy_mlm(hyper)


def _deberta_v2_rules() -> tuple[KeyRule, ...]:
    """HF's two masked-LM heads, chosen by config.json's ``legacy``: ``cls.predictions``
    (legacy, the default) with a decoder tied to the word embeddings, or
    ``lm_predictions.lm_head``, which multiplies by the word embeddings themselves (no
    decoder tensor at all, so an untied head has no name there)."""
    rules = head_rules(
        ("pooler.dense", "classifier"),
        (
            "cls.predictions.transform.dense",
            "cls.predictions.transform.LayerNorm",
            "cls.predictions.decoder",
            "cls.predictions.bias",
        ),
    )
    legacy = tuple(replace(r, when=_legacy_mlm) if r.hf[0].startswith("cls.") else r for r in rules)
    return (
        rule("head.transform.{p}", "lm_predictions.lm_head.dense.{p}", when=_lm_predictions),
        rule(
            "head.transform_norm.{p}", "lm_predictions.lm_head.LayerNorm.{p}", when=_lm_predictions
        ),
        rule("head.bias", "lm_predictions.lm_head.bias", when=_lm_predictions),
        *legacy,
    )


DEBERTA_V2_HEAD_LAYOUT = HeadLayout(
    base_prefix="deberta.",
    rules=_deberta_v2_rules(),
    # ContextPooler: dropout, dense, pooler_hidden_act; then dropout and the classifier
    sequence_activation="gelu",
    sequence_activation_key="pooler_hidden_act",
    dropout_before_dense=True,
    sequence_dropout=lambda hf: _first(hf, "cls_dropout", "hidden_dropout_prob"),
    token_dropout=lambda hf: _first(hf, "hidden_dropout_prob"),
    mlm={"activation": "${hyper.activation}", "layer_norm_eps": "${hyper.layer_norm_eps}"},
    # legacy = false: HF reads the word embeddings whatever tie_word_embeddings says
    mlm_tied=lambda hf: (
        hf.get("legacy", True) is False or bool(hf.get("tie_word_embeddings", True))
    ),
    mlm_layout_setting="legacy_mlm_head",
)
