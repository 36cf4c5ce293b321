"""Read, override, validate, fill and resolve configs.

Resolution takes two passes over the config tree. The first builds nothing: it looks
up every ``@registry = "name"``, converts every argument and collects every problem
with its dotted path, so one error lists them all. The second calls the functions,
children first.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from confection import Config

from ..errors import ConfigError, ConfigProblem, RegistryNameError, close_names
from .families import expand_extends
from .schema import Schema, Unbuilt, has_unbuilt, schema_for
from .text import parse_config


def read_config(
    source: str | Path | Config | Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """A config (not interpolated) from a ``.cfg`` path, config text or mapping, with overrides.

    Overrides are dotted paths (``{"hyper.n_layers": 4}``); a path that does not exist
    in the config is an error naming the closest paths.
    """
    name = None
    base_dir = None
    if isinstance(source, Config):
        text = source.to_str(interpolate=False)
    elif isinstance(source, Mapping):
        text = Config(source).to_str(interpolate=False)
    elif isinstance(source, Path) or (isinstance(source, str) and "\n" not in source):
        path = Path(source)
        if not path.is_file():
            raise ConfigError([ConfigProblem("", f"config file not found: {path}")])
        text = path.read_text(encoding="utf8")
        name, base_dir = str(path), path.parent
    else:
        text = source
    text = expand_extends(text, base_dir, where=name)
    try:
        base = _parsed(text)
    except Exception as e:  # confection's parse errors: keep them, add the file name
        raise ConfigError([ConfigProblem("", f"cannot parse config: {e}")], source=name) from None
    overrides = dict(overrides or {})
    if not overrides:
        return base.copy()  # a fresh copy the caller may edit
    try:
        try:
            key = _frozen(overrides)
        except TypeError:  # values that cannot be a cache key: parse again
            return _with_overrides(text, base, overrides)
        return _cached_with_overrides(text, key).copy()  # a fresh copy the caller may edit
    except ConfigError as e:
        raise ConfigError(e.problems, source=name) from None


@functools.lru_cache(maxsize=32)
def _cached_with_overrides(text: str, frozen: Any) -> Config:
    """``_with_overrides`` remembered: loading an HF model applies its config.json values
    as overrides to the family's config at every load. Shared: only copy it."""
    return _with_overrides(text, _parsed(text), _thawed(frozen))


def _with_overrides(text: str, base: Config, overrides: dict[str, Any]) -> Config:
    problems = [
        ConfigProblem(
            key, "override names a setting that is not in the config." + _suggest_path(key, base)
        )
        for key in overrides
        if not _settable(base, key)
    ]
    if problems:
        raise ConfigError(problems)
    try:
        return parse_config(text, overrides)
    except Exception as e:
        raise ConfigError([ConfigProblem("", f"cannot apply overrides: {e}")]) from None


def _frozen(value: Any) -> Any:
    """A hashable form of a value made of JSON-like builtins, keeping their types apart
    (``1``, ``1.0`` and ``True``; lists and tuples). TypeError for anything else."""
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return (kind, value)
    if kind in (list, tuple):
        return (kind, tuple(_frozen(v) for v in value))
    if kind is dict:
        return (kind, tuple((k, _frozen(v)) for k, v in value.items()))
    raise TypeError(f"cannot freeze {kind.__name__}")


def _thawed(frozen: Any) -> Any:
    """The value ``_frozen`` was made from (a fresh copy)."""
    kind, value = frozen
    if kind in (list, tuple):
        return kind(_thawed(v) for v in value)
    if kind is dict:
        return {k: _thawed(v) for k, v in value}
    return value


@functools.lru_cache(maxsize=32)
def _parsed(text: str) -> Config:
    """A parsed config, shared: only read it (family configs are parsed once)."""
    return parse_config(text)


_VARIABLE = re.compile(r"\$\{([^}]+)\}")
# A variable, or "$${": the escape of a literal "${" (see config/text.py), read left to right.
_VARIABLE_OR_ESCAPE = re.compile(r"\$\$\{|\$\{([^}]+)\}")

MAX_EXPANDED_SIZE = 1_000_000
"""Values (numbers, strings, list items, settings) and characters a config may hold once
its variables are substituted. Family configs hold a few hundred; a chain of variables
that each use the one before twice doubles at every link, and would take the resolver
hours and all memory: such a config is refused at this size instead."""
MAX_VARIABLE_DEPTH = 64
"""Variables that refer to variables, at most this deep (family configs: 1)."""


class _TooLarge(Exception):
    """Raised inside ``interpolate`` once the expanded config passes its size bound."""


def interpolate(config: Mapping[str, Any]) -> Config:
    """The config with every ``${section.key}`` replaced by its value.

    A value that is only a variable takes the referenced value as it is (a number, a
    list, a whole section); a variable inside a longer string is replaced by its text.
    Done here rather than by confection, which writes the config out and parses it again.

    Each variable is worked out once (later uses copy it), and the expanded config may
    hold at most ``MAX_EXPANDED_SIZE`` values and characters: time and memory stay
    bounded whatever the variables do. A variable that refers to itself is an error.
    """
    problems: list[ConfigProblem] = []
    done: dict[str, tuple[Any, int]] = {}  # variable -> (value, size)
    pending: list[str] = []  # variables being worked out, outermost first
    budget = [MAX_EXPANDED_SIZE]

    def spend(size: int, path: str) -> None:
        budget[0] -= size
        if budget[0] < 0:
            problems.append(
                ConfigProblem(
                    path,
                    f"substituting the variables makes the config larger than "
                    f"{MAX_EXPANDED_SIZE:,} values and characters (variables that use "
                    "each other several times grow exponentially); refused",
                )
            )
            raise _TooLarge

    def lookup(dotted: str, path: str) -> Any:
        if dotted in done:
            value, size = done[dotted]
            spend(size, path)
            return copy.deepcopy(value)
        if dotted in pending:
            chain = " -> ".join(f"${{{v}}}" for v in [*pending[pending.index(dotted) :], dotted])
            problems.append(ConfigProblem(path, f"${{{dotted}}} refers to itself ({chain})"))
            return None
        if len(pending) >= MAX_VARIABLE_DEPTH:
            problems.append(
                ConfigProblem(
                    path, f"variables nest more than {MAX_VARIABLE_DEPTH} deep at ${{{dotted}}}"
                )
            )
            return None
        node: Any = config
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                problems.append(
                    ConfigProblem(
                        path, f"${{{dotted}}} names no setting." + _suggest_path(dotted, config)
                    )
                )
                return None
            node = node[part]
        pending.append(dotted)
        before = budget[0]
        try:
            value = substitute(node, path)
        finally:
            pending.pop()
        done[dotted] = (value, before - budget[0])
        return copy.deepcopy(value)

    def substitute(node: Any, path: str) -> Any:
        if isinstance(node, Mapping):
            spend(1, path)
            return {k: substitute(v, f"{path}.{k}" if path else k) for k, v in node.items()}
        if isinstance(node, list):
            spend(1, path)
            return [substitute(v, f"{path}.{i}") for i, v in enumerate(node)]
        if isinstance(node, str) and "$" in node:
            whole = _VARIABLE.fullmatch(node)
            if whole:
                return lookup(whole.group(1), path)
            text = _VARIABLE_OR_ESCAPE.sub(
                lambda m: m.group(0)[1:] if m.group(1) is None else str(lookup(m.group(1), path)),
                node,
            )
            spend(len(text), path)
            return text
        spend(len(node) if isinstance(node, str) else 1, path)
        return node

    try:
        result = substitute(config, "")
    except _TooLarge:
        raise ConfigError(problems[-1:]) from None
    if problems:
        raise ConfigError(problems)
    return Config(result)


def _has_path(config: Mapping[str, Any], dotted: str) -> bool:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _settable(config: Mapping[str, Any], dotted: str) -> bool:
    """A setting in the config, or an argument of a component whose section is there
    (a default not written out; the resolver checks that the component takes it)."""
    if _has_path(config, dotted):
        return True
    parent = dotted.rpartition(".")[0]
    node: Any = config
    for part in parent.split(".") if parent else []:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return bool(parent) and isinstance(node, Mapping) and _promise(node) is not None


def _all_paths(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, Mapping):
        return [prefix] if prefix else []
    paths = []
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        paths += _all_paths(value, path) if isinstance(value, Mapping) else [path]
    return paths


def _suggest_path(key: str, config: Mapping[str, Any]) -> str:
    found = close_names(key, _all_paths(config))
    return (" Did you mean " + " or ".join(repr(f) for f in found) + "?") if found else ""


def _promise(node: Mapping[str, Any]) -> tuple[str, str] | None:
    keys = [k for k in node if isinstance(k, str) and k.startswith("@")]
    if not keys:
        return None
    return keys[0][1:], node[keys[0]]


class _Deferred(Unbuilt):
    """A validated call, made once the whole config is known to be valid."""

    def __init__(self, path: str, schema: Schema, kwargs: dict[str, Any]):
        super().__init__(path)
        self.schema = schema
        self.kwargs = kwargs


class _Walker:
    """Validates a config tree; with ``build``, also prepares the calls that build it."""

    def __init__(self, build: bool, base_dir: Path | None = None):
        self.build = build
        self.base_dir = base_dir
        self.problems: list[ConfigProblem] = []

    def walk(self, node: Any, path: str) -> tuple[Any, Any]:
        """Return (value or deferred call, filled config node)."""
        if isinstance(node, Mapping):
            promise = _promise(node)
            if promise is not None:
                return self.call(node, promise, path)
            resolved, filled = {}, {}
            for key, value in node.items():
                resolved[key], filled[key] = self.walk(value, f"{path}.{key}" if path else key)
            return resolved, filled
        if isinstance(node, list):
            pairs = [self.walk(v, f"{path}.{i}") for i, v in enumerate(node)]
            return [p[0] for p in pairs], [p[1] for p in pairs]
        return node, node

    def call(self, node: Mapping[str, Any], promise: tuple[str, str], path: str) -> tuple[Any, Any]:
        from ..registry import registry

        reg_name, func_name = promise
        args, filled = {}, {f"@{reg_name}": func_name}
        for key, value in node.items():
            if key == f"@{reg_name}":
                continue
            args[key], filled[key] = self.walk(value, f"{path}.{key}")
        try:
            func = registry.get_registry(reg_name).get(func_name)
        except RegistryNameError as e:
            self.problems.append(ConfigProblem(f"{path}.@{reg_name}", str(e)))
            return Unbuilt(path), filled
        schema = schema_for(func)
        converted, problems = schema.check(args, path, base_dir=self.base_dir)
        self.problems += problems
        if self.build:  # the filled config is only wanted without building (``fill``)
            return _Deferred(path, schema, converted), filled
        for name, default in schema.defaults().items():
            if name not in filled and _serialisable(default):
                filled[name] = default
        return Unbuilt(path), filled


def _realise(value: Any, problems: list[ConfigProblem]) -> Any:
    """Make the deferred calls in ``value``, children first."""
    if isinstance(value, _Deferred):
        kwargs = {k: _realise(v, problems) for k, v in value.kwargs.items()}
        if any(has_unbuilt(v) for v in kwargs.values()):
            return Unbuilt(value.path)  # a child failed; its problem is recorded
        built_children = {k: v for k, v in kwargs.items() if has_unbuilt(value.kwargs[k])}
        checked, child_problems = value.schema.check(built_children, value.path, partial=True)
        if child_problems:  # a component of the wrong kind where another was expected
            problems += child_problems
            return Unbuilt(value.path)
        kwargs.update(checked)
        try:
            return value.schema.func(**kwargs)
        except ConfigError as e:
            problems += [
                ConfigProblem(
                    f"{value.path}.{p.path}" if p.path else value.path,
                    p.message,
                    p.found,
                    p.has_found,
                )
                for p in e.problems
            ]
        except (ValueError, TypeError) as e:
            name = getattr(value.schema.func, "__qualname__", "component")
            problems.append(ConfigProblem(value.path, f"{name}: {e}"))
        return Unbuilt(value.path)
    if isinstance(value, dict):
        return {k: _realise(v, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_realise(v, problems) for v in value]
    return value


def _serialisable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def validate(config: Mapping[str, Any], source: str | None = None) -> Config:
    """Check an interpolated config without building anything; return it filled with defaults.

    Raises ``ConfigError`` listing every problem with its dotted path.
    """
    walker = _Walker(build=False)
    _, filled = walker.walk(config, "")
    if walker.problems:
        raise ConfigError(walker.problems, source=source)
    return Config(filled)


def fill(config: Config, source: str | None = None) -> Config:
    """The config with every default written out, variables (``${...}``) kept.

    Validates the interpolated config first, so a filled config is a valid one.
    """
    validate(interpolate(config), source=source)
    walker = _Walker(build=False)
    _, filled = walker.walk(config, "")
    return Config(filled)


def resolve(
    config: Mapping[str, Any],
    source: str | None = None,
    raw: Mapping[str, Any] | None = None,
    *,
    base_dir: Path | None = None,
) -> dict[str, Any]:
    """Build every component of an interpolated config; return the resolved tree.

    Nothing is built unless the whole config is valid. ``raw``, the config before
    interpolation, lets errors name the variable a bad value came from. Relative paths
    in the config are read from ``base_dir`` (the config file's or model's directory;
    None: the working directory).
    """
    walker = _Walker(build=True, base_dir=base_dir)
    tree, _ = walker.walk(config, "")
    if walker.problems:
        raise ConfigError(_explain_variables(walker.problems, raw), source=source)
    problems: list[ConfigProblem] = []
    resolved = _realise(tree, problems)
    if problems:
        raise ConfigError(_explain_variables(problems, raw), source=source)
    return resolved


def _explain_variables(
    problems: list[ConfigProblem], raw: Mapping[str, Any] | None
) -> list[ConfigProblem]:
    """Add "set by ${hyper.x}" to problems whose value was interpolated from a variable."""
    if raw is None:
        return problems
    explained = []
    for p in problems:
        node: Any = raw
        for part in p.path.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, str) and "${" in node:
            p = ConfigProblem(p.path, f"{p.message} [set by {node}]", p.found, p.has_found)
        explained.append(p)
    return explained
