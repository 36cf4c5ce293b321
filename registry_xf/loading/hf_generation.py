"""What an HF checkpoint says about generation, as the ``[generation]`` section of a config.

HF transformers reads generation_config.json when the directory has one, and otherwise the
generation keys of config.json (older BART and Marian files keep them there); never some of
each. The keys read here are those the Generator applies the way HF's ``generate`` does;
the others that would change which tokens come out (beam search, sampling defaults,
multi-token bad words...) are named in a warning, so that a difference from HF's output
never goes unexplained.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

logger = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"

# HF key -> [generation] key, for single ids and counts read as they are
COUNTS = {
    "no_repeat_ngram_size": "no_repeat_ngram_size",
    "min_length": "min_length",
    "min_new_tokens": "min_new_tokens",
}

# HF's defaults of the keys not applied here: a value other than these is warned about
NOT_APPLIED = {
    "num_beams": 1,
    "do_sample": False,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "guidance_scale": None,
    "penalty_alpha": None,
    "dola_layers": None,
}


def hf_generation_source(directory: Path, hf: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """(file name, its JSON) of the file HF reads generation settings from."""
    path = directory / GENERATION_CONFIG
    if not path.is_file():
        return "config.json", hf
    try:
        found = json.loads(path.read_text(encoding="utf8"))
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(found, Mapping):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(found).__name__}")
    return GENERATION_CONFIG, found


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _ids(value: Any) -> list[int] | None:
    """An id or a non-empty list of ids, as a list; None for anything else."""
    if _is_id(value):
        return [value]
    if isinstance(value, list) and value and all(_is_id(v) for v in value):
        return list(value)
    return None


def _checked(where: str, key: str, value: Any, kind: str) -> Any:
    """``value`` of a key the generator applies: null, or what ``kind`` says."""
    ok = {
        "id": _is_id(value),
        "ids": _ids(value) is not None,
        "count": _is_id(value),
    }[kind]
    if value is None or ok:
        return value
    expected = {"id": "a token id (an integer >= 0)", "ids": "a token id or a list of them"}
    raise CheckpointError(
        f"{where}: {key} must be {expected.get(kind, 'an integer >= 0')} or null; found {value!r}"
    )


def generation_section(
    directory: Path, hf: Mapping[str, Any], *, encoder_decoder: bool
) -> dict[str, Any]:
    """The ``[generation]`` values of an HF causal or encoder-decoder LM's directory."""
    name, source = hf_generation_source(directory, hf)
    where = str(directory / name)
    section: dict[str, Any] = {}
    eos = _ids(source.get("eos_token_id"))
    if eos is not None:
        section["eos_token_ids"] = eos
    if encoder_decoder:
        for key in ("decoder_start_token_id", "pad_token_id", "bos_token_id"):
            value = source.get(key)
            if _is_id(value):
                section[key] = value
        # HF starts the decoder from bos_token_id where no start id is given
        bos = section.pop("bos_token_id", None)
        if "decoder_start_token_id" not in section and bos is not None:
            section["decoder_start_token_id"] = bos
    forced_bos = _checked(where, "forced_bos_token_id", source.get("forced_bos_token_id"), "id")
    if forced_bos is not None:
        section["forced_bos_token_id"] = forced_bos
    forced_eos = _checked(where, "forced_eos_token_id", source.get("forced_eos_token_id"), "ids")
    if forced_eos is not None:
        section["forced_eos_token_ids"] = _ids(forced_eos)
    for key, ours in COUNTS.items():
        value = _checked(where, key, source.get(key), "count")
        if value:  # 0 is HF's "off"
            section[ours] = value
    suppressed = _suppressed(where, source, eos or [])
    if suppressed:
        section["suppress_token_ids"] = suppressed
    _warn_not_applied(where, source)
    return section


def _suppressed(where: str, source: Mapping[str, Any], eos: list[int]) -> list[int]:
    """``suppress_tokens`` and the single-token ``bad_words_ids`` (Marian bans its padding
    id so), less the end-of-sequence ids, which HF's bad words never ban."""
    found: list[int] = []
    tokens = source.get("suppress_tokens")
    if tokens is not None:
        if not (isinstance(tokens, list) and all(_is_id(t) for t in tokens)):
            raise CheckpointError(f"{where}: suppress_tokens must be a list of token ids")
        found += tokens
    bad = source.get("bad_words_ids")
    if bad is not None:
        if not (
            isinstance(bad, list)
            and all(isinstance(w, list) and w and all(_is_id(t) for t in w) for w in bad)
        ):
            raise CheckpointError(f"{where}: bad_words_ids must be a list of lists of token ids")
        found += [w[0] for w in bad if len(w) == 1 and w[0] not in eos]
    return sorted(set(found))


def _warn_not_applied(where: str, source: Mapping[str, Any]) -> None:
    """Log the settings HF's generate would apply and this generator does not."""
    differing = [
        f"{key}={source[key]!r}"
        for key, default in NOT_APPLIED.items()
        if key in source and source[key] is not None and source[key] != default
    ]
    bad = source.get("bad_words_ids")
    if isinstance(bad, list) and any(isinstance(w, list) and len(w) > 1 for w in bad):
        differing.append("bad_words_ids (sequences of more than one token)")
    if differing:
        logger.warning(
            "%s: not applied by registry_xf's Generator, which decodes greedily or samples "
            "as each call's settings say: %s. HF's generate would use them, so its output "
            "can differ.",
            where,
            ", ".join(differing),
        )


def generation_config_json(section: Mapping[str, Any]) -> dict[str, Any]:
    """An HF generation_config.json holding a ``[generation]`` section's values (what
    ``generation_section`` reads back): an exported model generates as the loaded one."""
    out: dict[str, Any] = {}

    def one_or_list(ids: list[int]) -> int | list[int]:
        return ids[0] if len(ids) == 1 else list(ids)

    if section.get("eos_token_ids"):
        out["eos_token_id"] = one_or_list(section["eos_token_ids"])
    for key in ("decoder_start_token_id", "pad_token_id", "forced_bos_token_id", *COUNTS):
        if section.get(key) is not None:
            out[key] = section[key]
    if section.get("forced_eos_token_ids"):
        out["forced_eos_token_id"] = one_or_list(section["forced_eos_token_ids"])
    if section.get("suppress_token_ids"):
        out["suppress_tokens"] = list(section["suppress_token_ids"])
    return out
