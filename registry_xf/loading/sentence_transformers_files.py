"""The files that make an exported HF directory a sentence-transformers model too: the
pooler (modules.json and its folders), the prompts, similarity function and Matryoshka
width (config_sentence_transformers.json), the sequence limit (sentence_bert_config.json).

They are written from the model's ``[pooling]`` and ``[embedding]`` sections, the ones
reading such a directory fills, so an export carries a sentence-transformers model's
settings through registry_xf and back. Module names and settings are those every
sentence-transformers version since they were introduced reads (3.x for dense models, 5.x
for sparse ones).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..about import __version__
from ..errors import RegistryXFError

CONFIG_FILE = "config_sentence_transformers.json"
_DENSE_MODES = {
    "registry_xf.MeanPooler.v1": "mean",
    "registry_xf.CLSPooler.v1": "cls",
    "registry_xf.MaxPooler.v1": "max",
}
_SPLADE = "registry_xf.SpladePooler.v1"
_EMBEDDING_KEYS = ("default_prompt_name", "similarity_fn_name", "truncate_dim")


def sentence_transformers_files(
    config: Mapping[str, Any], width: int, max_length: int | None
) -> dict[str, Any]:
    """JSON files (relative path -> content) for a model whose interpolated ``config`` has
    a ``[pooling]`` or ``[embedding]`` section; empty for one with neither (an HF
    directory without them reads as mean pooling in both libraries)."""
    pooling = config.get("pooling")
    embedding = config.get("embedding")
    if not isinstance(pooling, Mapping) and not isinstance(embedding, Mapping):
        return {}
    files: dict[str, Any] = {}
    sparse = False
    if isinstance(pooling, Mapping):
        sparse = pooling.get("@poolers") == _SPLADE
        files.update(_splade_files(pooling) if sparse else _dense_files(pooling, width))
        settings: dict[str, Any] = {"do_lower_case": False}
        if max_length is not None:
            settings["max_seq_length"] = max_length
        files["sentence_bert_config.json"] = settings
    st_config: dict[str, Any] = {
        "__version__": {"registry_xf": __version__},
        "model_type": "SparseEncoder" if sparse else "SentenceTransformer",
    }
    if isinstance(embedding, Mapping):
        st_config["prompts"] = dict(embedding.get("prompts") or {})
        st_config.update({k: embedding[k] for k in _EMBEDDING_KEYS if embedding.get(k) is not None})
    files[CONFIG_FILE] = st_config
    return files


def _dense_files(pooling: Mapping[str, Any], width: int) -> dict[str, Any]:
    name = pooling.get("@poolers")
    mode = _DENSE_MODES.get(name) if isinstance(name, str) else None
    if mode is None:
        known = ", ".join((*_DENSE_MODES, _SPLADE))
        raise RegistryXFError(
            f"pooling.@poolers: {name!r} has no sentence-transformers equivalent; expected "
            f"one of {known} (or a model without a [pooling] section)"
        )
    modules = [
        _module(0, "", "sentence_transformers.models.Transformer"),
        _module(1, "1_Pooling", "sentence_transformers.models.Pooling"),
    ]
    files: dict[str, Any] = {
        "1_Pooling/config.json": {
            "word_embedding_dimension": width,
            "pooling_mode_cls_token": mode == "cls",
            "pooling_mode_mean_tokens": mode == "mean",
            "pooling_mode_max_tokens": mode == "max",
            "include_prompt": bool(pooling.get("include_prompt", True)),
        }
    }
    if pooling.get("normalize"):
        modules.append(_module(2, "2_Normalize", "sentence_transformers.models.Normalize"))
        files["2_Normalize/config.json"] = {}
    files["modules.json"] = modules
    return files


def _splade_files(pooling: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "modules.json": [
            _module(0, "", "sentence_transformers.sparse_encoder.models.MLMTransformer"),
            _module(
                1, "1_SpladePooling", "sentence_transformers.sparse_encoder.models.SpladePooling"
            ),
        ],
        "1_SpladePooling/config.json": {
            "pooling_strategy": pooling.get("strategy", "max"),
            "activation_function": pooling.get("activation", "relu"),
            "word_embedding_dimension": None,
        },
    }


def _module(index: int, path: str, kind: str) -> dict[str, Any]:
    return {"idx": index, "name": str(index), "path": path, "type": kind}
