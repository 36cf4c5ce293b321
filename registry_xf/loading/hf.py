"""HF directories: their config.json as a filled registry_xf config, and export back."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from confection import Config
from safetensors.torch import save_file
from torch import nn

from ..assemblies.with_head import EncoderWithHead
from ..config.families import family_config_text
from ..config.resolve import interpolate, read_config
from ..converters.base import HFConverter, converter_for_model_type, layer_index_regex
from ..converters.heads import HF_SUFFIX, TASKS, labels_to_hf
from ..errors import (
    CheckpointError,
    ConfigError,
    ConfigProblem,
    RegistryXFError,
    UnsupportedModelError,
)
from ..registry import registry
from ..types import dtype_name
from .atomic import atomic_directory, write_json
from .checkpoint import open_checkpoint, stored_shapes
from .head_layout import check_head_layout
from .hf_generation import GENERATION_CONFIG, generation_config_json, generation_section
from .materialise import parameter_slots
from .paths import safe_join
from .sentence_transformers_files import sentence_transformers_files
from .written import EXPORTED_KIND, WRITER, WRITER_KEY, is_exported_hf

logger = logging.getLogger(__name__)


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: missing (an HF model directory has a config.json)"
        ) from None
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _sentence_transformers_pooling(directory: Path) -> dict[str, Any] | None:
    """The pooler a sentence-transformers directory declares (modules.json), if any."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text(encoding="utf8"))
    types = [m.get("type", "") for m in modules]
    pooling = next((m for m in modules if m.get("type", "").endswith("Pooling")), None)
    if pooling is None:
        return None
    folder = safe_join(directory, pooling.get("path"), where=str(modules_file))
    settings = json.loads((folder / "config.json").read_text(encoding="utf8"))
    if pooling.get("type", "").endswith("SpladePooling"):  # a sparse encoder's
        return {
            "@poolers": "registry_xf.SpladePooler.v1",
            "strategy": settings.get("pooling_strategy", "max"),
            "activation": settings.get("activation_function", "relu"),
        }
    mode = settings.get("pooling_mode")  # sentence-transformers >= 6; older: one flag per mode
    if settings.get("pooling_mode_cls_token") or mode == "cls":
        name = "registry_xf.CLSPooler.v1"
    elif settings.get("pooling_mode_max_tokens") or mode == "max":
        name = "registry_xf.MaxPooler.v1"
    elif mode in (None, "mean", ["mean"]):
        name = "registry_xf.MeanPooler.v1"
    else:
        raise UnsupportedModelError(
            f"{folder / 'config.json'}: pooling_mode {mode!r} is not supported "
            "(expected 'mean', 'cls' or 'max')"
        )
    return {
        "@poolers": name,
        "normalize": any(t.endswith("Normalize") for t in types),
        "include_prompt": bool(settings.get("include_prompt", True)),
    }


def _sentence_transformers_embedding(directory: Path) -> dict[str, Any] | None:
    """The ``[embedding]`` section (named prompts, default prompt name, Matryoshka width,
    similarity function) from
    config_sentence_transformers.json, if the directory has one."""
    path = directory / "config_sentence_transformers.json"
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf8"))
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    prompts = settings.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(
        isinstance(k, str) and isinstance(v, (str, type(None))) for k, v in prompts.items()
    ):
        raise CheckpointError(f"{path}: 'prompts' must map prompt names to texts")
    for name, text in prompts.items():  # what a .cfg section cannot hold as it is
        if not name.strip() or name != name.strip() or any(c in name for c in ".=:[]"):
            raise UnsupportedModelError(
                f"{path}: prompt name {name!r}: expected no '.', '=', ':', '[', ']' or "
                "surrounding spaces (it becomes a config key)"
            )
        if text and "${" in text:  # confection writes such strings as variables, unquoted
            raise UnsupportedModelError(
                f"{path}: prompt {name!r} contains '${{', which a registry_xf config reads as a "
                "variable; give it as embed(texts, prompt=...) instead"
            )
    section: dict[str, Any] = {"prompts": {k: v or "" for k, v in prompts.items()}}
    for key in ("default_prompt_name", "truncate_dim", "similarity_fn_name"):
        if settings.get(key) is not None:
            section[key] = settings[key]
    return section


def _max_length(directory: Path) -> int | None:
    st_config = directory / "sentence_bert_config.json"
    if st_config.is_file():
        value = json.loads(st_config.read_text(encoding="utf8")).get("max_seq_length")
        if isinstance(value, int):
            return value
    return None


def _cross_encoder_activation(hf: Mapping[str, Any]) -> str | None:
    """The activation sentence-transformers' CrossEncoder saved in config.json (a dotted
    path such as "torch.nn.modules.activation.Sigmoid"; the key before v4 too), if any."""
    settings = hf.get("sentence_transformers")
    if isinstance(settings, Mapping) and isinstance(settings.get("activation_fn"), str):
        return str(settings["activation_fn"])
    legacy = hf.get("sbert_ce_default_activation_function")
    return legacy if isinstance(legacy, str) else None


def _requested_converter(overrides: Mapping[str, Any] | None) -> HFConverter | None:
    """The converter an override of ``weights.converter`` names: it also picks the family
    config (the encoder alone of a T5 checkpoint: ``registry_xf.HFT5Encoder.v1``)."""
    value = (overrides or {}).get("weights.converter.@converters")
    section = (overrides or {}).get("weights.converter")
    if value is None and isinstance(section, Mapping):
        value = section.get("@converters")
    return registry.converters.get(value)() if isinstance(value, str) else None


WITH_HEAD = "registry_xf.EncoderWithHead.v1"


def hf_task(hf: Mapping[str, Any], converter: HFConverter) -> str | None:
    """The head task of an HF task model (from ``architectures``) that ``converter``'s family
    has a head for; None for a bare model or a task without one here (its head is skipped)."""
    architectures = hf.get("architectures") or []
    if converter.heads is None or not isinstance(architectures, list):
        return None
    for architecture in architectures:
        for suffix, task in TASKS.items():
            if isinstance(architecture, str) and architecture.endswith(suffix):
                return task
    return None


def hf_config(
    directory: Path, overrides: Mapping[str, Any] | None = None, *, head: bool = True
) -> Config:
    """``config_from_hf`` without writing out the defaults (what loading needs).

    A task checkpoint (``*ForSequenceClassification``, ``*ForTokenClassification``,
    ``*ForMaskedLM``) becomes an ``EncoderWithHead``; with ``head=False`` it is the bare
    encoder, and the head's tensors are skipped.
    """
    if directory.is_file() and directory.name == "config.json":
        directory = directory.parent
    hf = read_hf_config(directory)
    where = directory / "config.json"
    converter = converter_for_model_type(hf.get("model_type"), where=str(where))
    converter = converter.for_architectures(hf.get("architectures"))
    converter = _requested_converter(overrides) or converter
    try:
        hyper = converter.hyper_from_hf(hf)
    except UnsupportedModelError as e:  # name the file, not just "config.json"
        raise UnsupportedModelError(f"{where}: {str(e).removeprefix('config.json: ')}") from None
    except ConfigError as e:
        raise ConfigError(e.problems, source=str(where)) from None
    config = read_config(
        family_config_text(converter.family_for(hf) if converter.family_for else converter.family),
        {f"hyper.{k}": v for k, v in hyper.items()},
    )
    family_hyper = interpolate(config).get("hyper", {})
    check_config_against_weights(directory, hf, converter, family_hyper)
    if _stored_head_differs(directory, converter, family_hyper):
        config["hyper"]["tie_embeddings"] = False
    task = hf_task(hf, converter) if head else None
    if task is not None:
        check_head_layout(directory, converter, _HEAD_MARKERS[task], family_hyper)
    if task is not None and not _holds_head(directory, converter, task, family_hyper):
        logger.info("%s: no %s head weights in the checkpoint; loading the encoder", where, task)
        task = None
    if task is not None and converter.heads is not None:
        config["model"] = {
            "@architectures": WITH_HEAD,
            "encoder": config["model"],
            "head": converter.heads.head_section(task, hf, str(where)),
        }
    config["weights"] = {
        "@loaders": "registry_xf.Safetensors.v1",
        "path": str(directory),
        "converter": {"@converters": converter.name},
    }
    if (directory / "tokenizer.json").is_file():
        config["tokenizer"] = {"@tokenizers": "registry_xf.HFTokenizer.v1", "path": str(directory)}
        max_length = _max_length(directory)
        if max_length is not None:
            config["tokenizer"]["max_length"] = max_length
    pooling = _sentence_transformers_pooling(directory)
    if pooling is not None:
        config["pooling"] = pooling
    embedding = _sentence_transformers_embedding(directory)
    if embedding is not None:
        config["embedding"] = embedding
    activation = _cross_encoder_activation(hf)
    if activation is not None and task == "sequence_classification":
        config["cross_encoder"] = {"activation_fn": activation}
    architecture = config["model"].get("@architectures")
    if architecture in ("registry_xf.CausalLM.v1", "registry_xf.Seq2SeqLM.v1"):
        seq2seq = architecture == "registry_xf.Seq2SeqLM.v1"
        generation = generation_section(directory, hf, encoder_decoder=seq2seq)
        if generation:
            config["generation"] = generation
    if not overrides:
        return config
    try:
        return read_config(config, overrides)
    except ConfigError as e:
        raise ConfigError(e.problems, source=e.source or str(directory)) from None


# One parameter of each head, whose presence says the checkpoint holds the head.
_HEAD_MARKERS = {
    "sequence_classification": "head.out_proj.weight",
    "token_classification": "head.classifier.weight",
    "masked_lm": "head.transform.weight",
}


def _holds_head(
    directory: Path, converter: HFConverter, task: str, hyper: Mapping[str, Any]
) -> bool:
    """Whether the checkpoint stores ``task``'s head: many checkpoints of bare encoders
    (sentence-transformers models among them) name a ``*ForMaskedLM`` architecture they
    were fine-tuned from without keeping its head. Undecidable (no safetensors): True."""
    keys = _checkpoint_keys(directory)
    found = converter.hf_names(_HEAD_MARKERS[task], hyper)
    if keys is None or found is None:
        return True
    return found[1][0] in set(converter.strip_prefix(keys).values())


def _checkpoint_keys(directory: Path) -> list[str] | None:
    """Tensor names of the directory's safetensors (headers only, read as JSON); None where
    it has none or they cannot be read (loading the weights then reports what is wrong)."""
    stored = stored_shapes(directory)
    return None if stored is None else list(stored)


def converter_of(model: nn.Module) -> HFConverter:
    """The HF converter for a loaded model (from its config's weights or its family)."""
    record = getattr(model, "record", None)
    config = record.config if record is not None else None
    name = None
    if config is not None:
        weights = config.get("weights", {})
        converter = weights.get("converter") if isinstance(weights, Mapping) else None
        if isinstance(converter, Mapping):
            name = converter.get("@converters")
    name = name or (record.converter if record is not None else None)
    if name is None:
        raise RegistryXFError(
            "this model has no HF converter on record (it was not loaded from an HF "
            "checkpoint); pass converter=... to export_hf"
        )
    return registry.converters.get(name)()


def refuse_shard(model: nn.Module, action: str) -> None:
    """A RegistryXFError for one rank's part of a tensor-parallel model: written out, it
    would be a model of wrong sizes."""
    if getattr(getattr(model, "record", None), "parallel", None) is not None:
        raise RegistryXFError(
            f"this model is one rank's shard of a tensor-parallel model: {action} the "
            "model loaded without device_mesh"
        )


def export_hf(
    model: nn.Module,
    path: str | Path,
    *,
    converter: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as an HF directory (config.json, model.safetensors, tokenizer).

    The result loads in HF transformers with the family's ``*Model`` class, or for a model
    with a head, its ``*For<Task>`` class (labels, problem type and tying included).
    """
    refuse_shard(model, "export")
    conv = registry.converters.get(converter)() if converter else converter_of(model)
    files = hf_files(model, conv)
    for change in files.folded:
        logger.info("export to HF: %s", change)
    target = Path(path)
    with atomic_directory(
        target, overwrite=overwrite, replaceable=is_exported_hf, kind=EXPORTED_KIND
    ) as tmp:
        files.write(tmp, getattr(model, "tokenizer", None))
    return target


@dataclass
class HFFiles:
    """The contents of an HF directory for a model, made before anything is written (so
    that a model that cannot be written leaves nothing behind). ``export_hf`` writes them;
    so does ``save`` for a sentence-transformers model, beside its own files."""

    config: dict[str, Any]  # config.json
    tensors: dict[str, torch.Tensor]  # model.safetensors, under HF's names
    sentence_transformers: dict[str, Any]  # relative path -> JSON (modules.json...)
    generation: dict[str, Any]  # generation_config.json, where there are settings
    # What the converter changed so that HF computes what the model does (see
    # HFConverter.fold_for_hf): the tensors then hold HF's values, not ours bit for bit.
    folded: list[str]

    def write(self, directory: Path, tokenizer: Any = None) -> None:
        """Write the files (and the tokenizer's) into ``directory``, a folder that
        ``atomic_directory`` gave: it appears whole or not at all."""
        write_json(directory / "config.json", self.config)
        if self.generation:  # HF then reads these settings from this file alone, as we do
            write_json(directory / GENERATION_CONFIG, self.generation)
        metadata = {"format": "pt", WRITER_KEY: WRITER}
        save_file(self.tensors, str(directory / "model.safetensors"), metadata=metadata)
        if tokenizer is not None:
            tokenizer.save(directory)
        for name, data in self.sentence_transformers.items():  # pooler, prompts
            (directory / name).parent.mkdir(exist_ok=True)
            write_json(directory / name, data)


def hf_files(model: nn.Module, conv: HFConverter) -> HFFiles:
    """What ``export_hf`` writes for ``model`` with converter ``conv``. Raises a
    RegistryXFError for a parameter without an HF name, a head HF has no task model for,
    or a pooler sentence-transformers has no module for."""
    config = interpolate(model.config)
    hyper = dict(config["hyper"])
    hf_config = conv.hyper_to_hf(hyper)
    head = getattr(model, "head", None) if isinstance(model, EncoderWithHead) else None
    if head is not None:
        hf_config.update(_head_to_hf(head, conv))
    tensors = {}
    for ours, places in parameter_slots(model).items():
        found = conv.hf_names(ours, hyper)
        if found is None:
            raise RegistryXFError(f"{conv.name} has no HF name for {ours}")
        rule, names = found
        tensor = places[0][0]._parameters.get(places[0][1])
        if tensor is None:
            tensor = places[0][0]._buffers[places[0][1]]
        owner = model.get_submodule(ours.rsplit(".", 2)[0]) if ours.count(".") >= 2 else model
        sizes = getattr(owner, "split", None) or [tensor.shape[rule.dim] // len(names)] * len(names)
        parts = rule.split(tensor.detach(), sizes, hyper)
        for name, part in zip(names, parts, strict=True):
            if head is not None and conv.heads is not None:
                name = conv.heads.export_name(ours, name)
            tensors[name] = part.contiguous().cpu()
    hf_config["torch_dtype"] = dtype_name(next(iter(tensors.values())).dtype)
    folded = conv.fold_for_hf(hyper, hf_config, tensors) if conv.fold_for_hf else None
    tokenizer = getattr(model, "tokenizer", None)
    return HFFiles(
        config=hf_config,
        tensors=tensors,
        sentence_transformers=sentence_transformers_files(
            config, model.width, getattr(tokenizer, "max_length", None)
        ),
        generation=generation_config_json(config.get("generation") or {}),
        folded=[folded] if folded else [],
    )


# --- config.json against the weights' header ----------------------------------------------

# config.json keys that set a [hyper] value beside the converters' one-to-one settings.
_DERIVED_KEYS = {
    "n_kv_heads": ("num_key_value_heads", "num_kv_heads"),
    "head_width": ("head_dim",),
    "intermediate_width": ("n_inner", "ffn_hidden_size"),
    "embedding_width": ("embedding_size",),
}


def _stored_head_differs(directory: Path, converter: HFConverter, hyper: Mapping[str, Any]) -> bool:
    """Whether config.json ties the head to the token embeddings while the weights hold a
    head of other values. HF transformers then loads the stored head untied, with a
    warning; so does this (with a warning naming both tensors), rather than skip it."""
    if hyper.get("tie_embeddings") is not True:
        return False
    head = converter.hf_names("lm_head.weight", hyper)
    table = converter.hf_names("encoder.embeddings.word_embeddings.weight", hyper)
    if table is None:
        table = converter.hf_names("decoder.embeddings.word_embeddings.weight", hyper)
    keys = _checkpoint_keys(directory)
    if head is None or table is None or keys is None:
        return False
    by_name = {name: key for key, name in converter.strip_prefix(keys).items()}
    head_key, table_key = by_name.get(head[1][0]), by_name.get(table[1][0])
    if head_key is None or table_key is None:
        return False
    with open_checkpoint(directory, "cpu") as ckpt:
        stored_head, stored_table = ckpt.get(head_key), ckpt.get(table_key)
        if stored_head.shape == stored_table.shape and bool((stored_head == stored_table).all()):
            return False
    logger.warning(
        "%s: config.json ties the output head to the token embeddings (tie_word_embeddings), "
        "but the weights hold a %s that differs from %s: loading that head untied "
        "(hyper.tie_embeddings = false), as HF transformers does. Set tie_word_embeddings "
        "to false in config.json to say so, or drop the tensor to tie.",
        directory,
        head_key,
        table_key,
    )
    return True


def check_config_against_weights(
    directory: Path, hf: Mapping[str, Any], converter: HFConverter, hyper: Mapping[str, Any]
) -> None:
    """Refuse a config.json that disagrees with its safetensors files, before anything is
    built: the vocabulary and widths against the embedding and projection shapes, the
    number of layers against the layer indexes in the tensor names, and the heads against
    the query/key/value shapes. Reads the files' headers only.

    ``hyper`` holds the ``[hyper]`` values config.json gives (the family's defaults for
    the rest). A directory without weights passes: loading reports what is missing.
    """
    stored = stored_shapes(directory)
    if stored is None:  # no weights, or headers that loading will report on
        return
    stripped = converter.strip_prefix(list(stored))
    names = {name: key for key, name in stripped.items()}
    facts = _WeightFacts(converter, hyper, names, stored.__getitem__)
    problems = [
        ConfigProblem(_key_text(converter, hf, hyper, name), message, hyper.get(name), True)
        for name, message in facts.disagreements()
    ]
    if problems:
        raise ConfigError(problems, source=str(directory / "config.json"))


def _key_text(
    converter: HFConverter, hf: Mapping[str, Any], hyper: Mapping[str, Any], name: str
) -> str:
    """The config.json key that sets the [hyper] value ``name``, as an error's path."""
    keys = [s.hf for s in converter.settings if s.hyper == name] or list(
        _DERIVED_KEYS.get(name, ())
    )
    present = [k for k in keys if k in hf]
    if present:
        return present[0]
    if keys:
        return f"{keys[0]} (absent: {name} = {hyper.get(name)!r} by default)"
    return f"hyper.{name} (derived from config.json)"


class _WeightFacts:
    """What the weights' shapes say about the [hyper] values, compared with them.

    The weights "say" a value only where two tensors agree on it (the embedding's and the
    projections' widths, the key and value rows, the query rows and the output projection's
    columns; every layer holding the same tensors). A single odd tensor is a fault of the
    file, not of config.json: loading reports it, naming the tensor.
    """

    def __init__(
        self,
        converter: HFConverter,
        hyper: Mapping[str, Any],
        names: Mapping[str, str],
        shape_of: Callable[[str], tuple[int, ...]],
    ):
        self.converter = converter
        self.hyper = hyper
        self.names = names  # HF name without prefix -> name in the files
        self.shape_of = shape_of

    def disagreements(self) -> list[tuple[str, str]]:
        """(``[hyper]`` name, what the weights say) for each value they contradict."""
        found = self._layer_count()
        width = self._hidden_width()
        if width is not None and width[0] != self.hyper.get("hidden_width"):
            found.append(("hidden_width", f"the weights' {width[1]} say {width[0]}"))
        vocab = self._vocab_size()
        if vocab is not None and vocab[0] != self.hyper.get("vocab_size"):
            found.append(("vocab_size", f"the weights' {vocab[1]} say {vocab[0]}"))
        return found + self._heads()

    def _matrices(self, suffix: str) -> list[tuple[str, tuple[int, ...]]] | None:
        """The HF tensors of our parameter ``*suffix`` (layer 0) as (name, shape in our
        layout); None unless every one of them is in the files and is a matrix."""
        for rule in self.converter.rules:
            ours = rule.ours.replace("{i}", "0").replace("{p}", "weight")
            if not ours.endswith(suffix):
                continue
            found = self.converter.hf_names(ours, self.hyper)
            if found is None or found[0] is not rule:
                continue
            if any(name not in self.names for name in found[1]):
                continue
            matrices = []
            for name in found[1]:
                shape = tuple(self.shape_of(self.names[name]))
                if len(shape) != 2 or 0 in shape:
                    return None
                matrices.append((self.names[name], shape[::-1] if rule.transpose else shape))
            return matrices
        return None

    def _single(self, suffix: str) -> tuple[str, tuple[int, ...]] | None:
        found = self._matrices(suffix)
        return found[0] if found is not None and len(found) == 1 else None

    def _hidden_width(self) -> tuple[int, str] | None:
        """The width every witness agrees on (at least two): the output projections' rows,
        and the token embeddings' columns where they are not narrower (ALBERT, ELECTRA)."""
        witnesses = [
            (shape[0], name)
            for suffix in (
                "layers.0.attention.o_proj.weight",
                "layers.0.feed_forward.down_proj.weight",
            )
            if (found := self._single(suffix)) is not None
            for name, shape in [found]
        ]
        embedding = self._single("embeddings.word_embeddings.weight")
        if embedding is not None and not self.hyper.get("embedding_width"):
            witnesses.append((embedding[1][1], embedding[0]))
        if len(witnesses) < 2 or len({w for w, _ in witnesses}) > 1:
            return None
        return witnesses[0][0], " and ".join(name for _, name in witnesses)

    def _vocab_size(self) -> tuple[int, str] | None:
        """The rows of the token embeddings, where the output projection (if untied) or the
        agreed hidden width confirms the matrix."""
        embedding = self._single("embeddings.word_embeddings.weight")
        if embedding is None:
            return None
        name, shape = embedding
        head = self._single("lm_head.weight")
        if head is not None:
            return (shape[0], f"{name} and {head[0]}") if head[1] == shape else None
        width = self._hidden_width()
        if self.hyper.get("embedding_width") or (width is not None and width[0] == shape[1]):
            return shape[0], name
        return None

    def _layer_count(self) -> list[tuple[str, str]]:
        """The layers in the tensor names, when they are 0 to N - 1 and all hold the same
        tensors."""
        setting = self.converter.layer_index_setting
        expected = self.hyper.get(setting)
        per_layer: dict[int, set[str]] = {}
        templates = tuple(
            template for rule in self.converter.rules for template in rule.hf if "{i}" in template
        )
        pattern = layer_index_regex(templates)
        for name in self.names if templates else ():
            m = pattern.match(name)
            if m is not None:
                index = m.group(m.lastgroup)  # type: ignore[arg-type]
                rest = name.replace(f".{index}.", ".{i}.", 1)
                per_layer.setdefault(int(index), set()).add(rest)
        if not per_layer or expected is None:
            return []
        count = len(per_layer)
        complete = set(per_layer) == set(range(count)) and all(
            tensors == per_layer[0] for tensors in per_layer.values()
        )
        if not complete or count == expected:
            return []
        return [(setting, f"the weights' tensor names have layers 0 to {count - 1} ({count})")]

    def _heads(self) -> list[tuple[str, str]]:
        """Query and key/value widths, where the output projection's columns confirm the
        query rows and the key and value rows agree."""
        hyper = self.hyper
        n_heads, hidden = hyper.get("n_heads"), hyper.get("hidden_width")
        output = self._single("layers.0.attention.o_proj.weight")
        parts = self._matrices("layers.0.attention.qkv_proj.weight")
        if not n_heads or not hidden or output is None or parts is None:
            return []
        n_kv = hyper.get("n_kv_heads") or n_heads
        head_width = hyper.get("head_width") or hidden // n_heads
        q_width = output[1][1]
        if len(parts) == 3:
            (q_name, q), (k_name, k), (_, v) = parts
            if q[0] != q_width or k[0] != v[0]:
                return []
            kv_width, kv_name = k[0], k_name
        elif len(parts) == 1:
            kv_name, (rows, _) = parts[0]
            q_name = f"{output[0]} (columns)"
            if rows <= q_width or (rows - q_width) % 2:
                return []
            kv_width = (rows - q_width) // 2
        else:
            return []
        found = []
        if q_width != n_heads * head_width:
            found.append(
                (
                    "n_heads",
                    f"{n_heads} query heads of width {head_width} make {n_heads * head_width} "
                    f"rows; the weights' {q_name} say {q_width}",
                )
            )
        elif kv_width != n_kv * head_width:
            found.append(
                (
                    "n_kv_heads",
                    f"{n_kv} key/value heads of width {head_width} make {n_kv * head_width} "
                    f"rows; the weights' {kv_name} say {kv_width}",
                )
            )
        return found


def _head_to_hf(head: nn.Module, converter: HFConverter) -> dict[str, Any]:
    """config.json entries of an HF task model with ``head``."""
    task = getattr(head, "task", None)
    if task not in HF_SUFFIX or converter.heads is None:
        raise RegistryXFError(
            f"{converter.name} cannot export a {type(head).__name__} head: HF task models "
            f"exist for {', '.join(HF_SUFFIX)} heads, of the families whose converter has heads"
        )
    base = converter.hf_architecture.removesuffix("Model")
    out: dict[str, Any] = {"architectures": [base + HF_SUFFIX[task]]}
    if task == "masked_lm":
        out["tie_word_embeddings"] = bool(head.tie_embeddings)
        return out
    out.update(labels_to_hf(head.labels))
    out.update(converter.heads.head_settings_to_hf(head))
    if head.problem_type is not None:
        out["problem_type"] = head.problem_type
    return out
