"""Named prompts, a default prompt and query/document routing, shared by the pipelines
that embed texts (dense and sparse), as sentence-transformers' models offer them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from ..config.resolve import interpolate
from ..errors import InputError, did_you_mean

# The prompt names that the query and document helpers try, in order (sentence-transformers'
# encode_query / encode_document); "query" and "document" always exist, empty unless set.
QUERY_PROMPT_NAMES = ("query",)
DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")


class Prompting:
    """Prompts of a pipeline: the model's ``[embedding]`` section (read from
    config_sentence_transformers.json), added to and overridden by the caller's."""

    prompts: dict[str, str]
    default_prompt_name: str | None

    def init_prompts(
        self,
        settings: Mapping[str, Any],
        prompts: Mapping[str, str] | None,
        default_prompt_name: str | None,
    ) -> None:
        if prompts is not None and (
            not isinstance(prompts, Mapping)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items())
        ):
            raise InputError(f"prompts must map prompt names to texts (str: str); got {prompts!r}")
        self.prompts = {"query": "", "document": ""}
        self.prompts.update(settings.get("prompts") or {})
        self.prompts.update(prompts or {})
        self.default_prompt_name = default_prompt_name or settings.get("default_prompt_name")
        if self.default_prompt_name is not None:
            self._named_prompt(self.default_prompt_name, "default_prompt_name")

    def resolve_prompt(self, prompt: str | None, prompt_name: str | None) -> str | None:
        """The prompt text prepended for these arguments (None: no prompt)."""
        if prompt is not None and prompt_name is not None:
            raise InputError(
                f"prompt={prompt!r} and prompt_name={prompt_name!r}: give one or the other"
            )
        if prompt is not None:
            if not isinstance(prompt, str):
                raise InputError(f"prompt must be a str; found {type(prompt).__name__}")
            return prompt
        if prompt_name is not None:
            return self._named_prompt(prompt_name, "prompt_name")
        if self.default_prompt_name is not None:
            return self.prompts.get(self.default_prompt_name)
        return None

    def task_prompt(self, names: Sequence[str], settings: dict[str, Any]) -> dict[str, Any]:
        """``settings`` with the first of ``names`` that is a prompt as ``prompt_name``,
        unless they give a prompt already (an empty "query" prompt thus overrides the
        default prompt, as in sentence-transformers)."""
        if settings.get("prompt") is None and settings.get("prompt_name") is None:
            found = next((n for n in names if n in self.prompts), None)
            if found is not None:
                settings = {**settings, "prompt_name": found}
        return settings

    def _named_prompt(self, name: Any, argument: str) -> str:
        if not isinstance(name, str) or name not in self.prompts:
            known = ", ".join(repr(n) for n in self.prompts)
            hint = did_you_mean(name, self.prompts) if isinstance(name, str) else ""
            raise InputError(
                f"{argument}={name!r}: no such prompt; this model knows {known}." + hint
            )
        return self.prompts[name]


def embedding_settings(model: nn.Module) -> Mapping[str, Any]:
    """The model config's ``[embedding]`` section (prompts, default prompt, truncate_dim)."""
    config = getattr(model, "config", None)
    if not isinstance(config, Mapping) or "embedding" not in config:
        return {}
    section = interpolate(config).get("embedding")  # variables and escapes read as values
    return section if isinstance(section, Mapping) else {}


def check_texts(texts: Any) -> list[str]:
    """``texts`` (one text or any iterable of them) as a list; anything else is named."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, bytes | Mapping) or not isinstance(texts, Iterable):
        raise InputError(f"texts must be a str or a list of str; found {type(texts).__name__}")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"text {i} is a {type(text).__name__}, not a str")
    return texts
