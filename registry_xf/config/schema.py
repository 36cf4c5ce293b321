"""Argument schemas of registered functions, built from their type hints.

confection checks a value's type but never converts it, so ``"bfloat16"`` would reach a
function that expects a ``torch.dtype``. Each registered function therefore gets a
schema: one pydantic ``TypeAdapter`` per parameter, which converts values and reports
every problem with its parameter name. The resolver prefixes those names with the
config path; direct calls (and confection) go through the ``validated`` wrapper.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError

from ..errors import ConfigError, ConfigProblem, RegistryXFError, did_you_mean
from ..types import BASE_DIR

_ADAPTER_CONFIG = ConfigDict(arbitrary_types_allowed=True)


@dataclass
class Param:
    name: str
    annotation: Any
    default: Any
    doc_annotation: str

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    @functools.cached_property
    def adapter(self) -> TypeAdapter | None:
        if self.annotation is inspect.Parameter.empty or self.annotation is Any:
            return None
        try:
            return TypeAdapter(self.annotation, config=_ADAPTER_CONFIG)
        except Exception:  # pydantic cannot build a validator: accept as-is
            return TypeAdapter(Any)

    def convert_default(self, context: dict[str, Any] | None = None) -> Any:
        """The default, converted like a config value (a default that fails stays as is)."""
        if self.default is None or self.adapter is None:
            return self.default
        try:
            return self.adapter.validate_python(self.default, context=context)
        except ValidationError:
            return self.default


@dataclass
class Schema:
    """What a registered function accepts."""

    func: Callable[..., Any]
    params: dict[str, Param] = field(default_factory=dict)
    accepts_any_kwargs: bool = False

    def check(
        self,
        args: dict[str, Any],
        path: str = "",
        *,
        partial: bool = False,
        base_dir: Path | None = None,
    ) -> tuple[dict[str, Any], list[ConfigProblem]]:
        """Convert ``args``; return the converted arguments and every problem found.

        Values that are or hold ``Unbuilt`` (not yet built sub-components) pass through;
        ``partial`` checks only the arguments given (no check for missing ones);
        ``base_dir`` is where relative paths are read from (else the working directory).
        """
        context = {BASE_DIR: base_dir}
        problems: list[ConfigProblem] = []
        converted: dict[str, Any] = {}
        prefix = f"{path}." if path else ""
        for name, value in args.items():
            param = self.params.get(name)
            if param is None:
                if self.accepts_any_kwargs:
                    converted[name] = value
                    continue
                problems.append(
                    ConfigProblem(
                        prefix + name,
                        f"unexpected argument for {_func_name(self.func)}."
                        + did_you_mean(name, self.params)
                        + f" Accepted: {', '.join(self.params) or 'none'}",
                    )
                )
                continue
            if has_unbuilt(value) or param.adapter is None:  # checked once built
                converted[name] = value
                continue
            try:
                converted[name] = param.adapter.validate_python(value, context=context)
            except ValidationError as e:
                for err in e.errors(include_url=False):
                    loc = ".".join(str(p) for p in err["loc"])
                    where = prefix + name + (f".{loc}" if loc else "")
                    problems.append(
                        ConfigProblem(
                            where,
                            f"{_clean(err['msg'])}; expected {param.doc_annotation}",
                            found=value,
                            has_found=True,
                        )
                    )
        for name, param in self.params.items():
            if not partial and name not in args and not param.required:
                # Defaults are config values too: "gelu" must become an activation module.
                converted[name] = param.convert_default(context)
            if not partial and param.required and name not in args:
                problems.append(
                    ConfigProblem(
                        prefix + name,
                        f"missing required argument of {_func_name(self.func)}; "
                        f"expected {param.doc_annotation}",
                    )
                )
        return converted, problems

    def defaults(self) -> dict[str, Any]:
        return {n: p.default for n, p in self.params.items() if not p.required}


class Unbuilt:
    """Stands for a sub-component during validation, before anything is built."""

    def __init__(self, path: str):
        self.path = path

    def __repr__(self) -> str:
        return f"<component at {self.path}>"


def has_unbuilt(value: Any) -> bool:
    """Whether ``value`` is, or holds (in dicts and lists), a sub-component not yet built."""
    if isinstance(value, Unbuilt):
        return True
    if isinstance(value, dict):
        return any(has_unbuilt(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(has_unbuilt(v) for v in value)
    return False


def _clean(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def _func_name(func: Callable[..., Any]) -> str:
    return getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))


def _annotation_text(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return "any value"
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("torch.nn.modules.module.", "")


def _converting(annotation: Any) -> Any:
    """``annotation`` with bare ``torch.dtype``, ``torch.device`` and ``Path`` replaced by
    the types that convert config strings into them (``DType``, ``Device``, ``PathLike``)."""
    from ..types import CONVERTING

    for plain, converting in CONVERTING:
        if annotation is plain:
            return converting
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = tuple(_converting(a) for a in typing.get_args(annotation))
        return typing.Union[members]  # noqa: UP007 - built from a tuple
    return annotation


@functools.cache
def schema_for(func: Callable[..., Any]) -> Schema:
    """The (cached) schema of a function or class, from its signature and type hints."""
    func = inspect.unwrap(func)
    target = func.__init__ if inspect.isclass(func) else func  # type: ignore[misc]
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception:
        hints = {}
    sig = inspect.signature(func)
    schema = Schema(func=func)
    for name, p in sig.parameters.items():
        if p.kind is p.VAR_KEYWORD:
            schema.accepts_any_kwargs = True
            continue
        if p.kind is p.VAR_POSITIONAL:
            continue
        annotation = hints.get(name, p.annotation)
        schema.params[name] = Param(
            name, _converting(annotation), p.default, _annotation_text(annotation)
        )
    return schema


def validated(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``func`` so that its keyword arguments are converted before the call.

    The wrapper shows an all-``Any`` signature, so confection lets values through to be
    converted here instead of rejecting ``"bfloat16"`` for a ``torch.dtype``.
    """
    if getattr(func, "__registry_xf_validated__", False):
        return func
    schema = schema_for(func)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if args:  # positional use from Python: bind to names first
            bound = inspect.signature(schema.func).bind_partial(*args)
            kwargs = {**bound.arguments, **kwargs}
        converted, problems = schema.check(kwargs)
        if problems:
            raise ConfigError(problems, source=_func_name(schema.func))
        try:
            return schema.func(**converted)
        except RegistryXFError:
            raise
        except (ValueError, TypeError) as e:  # arguments that do not fit together
            name = _func_name(schema.func)
            raise ConfigError([ConfigProblem("", f"{name}: {e}")], source=name) from None

    sig = inspect.signature(func)
    wrapper.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[p.replace(annotation=Any) for p in sig.parameters.values()],
        return_annotation=Any,
    )
    # confection (spaCy's resolver included) reads annotations too: Any there as well
    wrapper.__annotations__ = {name: Any for name in sig.parameters} | {"return": Any}
    wrapper.__registry_xf_validated__ = True  # type: ignore[attr-defined]
    return wrapper
