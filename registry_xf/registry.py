"""The registries that every component is found in.

Each registry is a catalogue registry in the ``registry_xf`` namespace, also filled
from the entry-point group ``registry_xf_<name>`` so that an installed package can add
components without being imported by hand. ``registry`` bundles them as a confection
registry: a ``.cfg`` refers to a component with ``@layers = "registry_xf.SelfAttention.v1"``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import catalogue
import confection

from .config.schema import validated
from .errors import RegistryNameError, did_you_mean

F = TypeVar("F", bound=Callable[..., Any])

REGISTRY_NAMES = (
    "architectures",
    "layers",
    "activations",
    "tokenizers",
    "loaders",
    "converters",
    "poolers",
    "logits_processors",
    "stopping_criteria",
    "heads",
    "sharding",
)


class Registry(catalogue.Registry):
    """A catalogue registry that refuses silent overwrites and suggests close names.

    Functions are stored wrapped so that, when called (by our resolver or by
    confection's), their arguments are validated and converted with pydantic.
    """

    @property
    def name(self) -> str:
        return self.namespace[-1]

    def register(  # type: ignore[override]
        self, name: str, *, func: F | None = None, override: bool = False
    ) -> Callable[[F], F]:
        """Register ``func`` under ``name``; a name that exists is an error unless ``override``."""

        def do_registration(f: F) -> F:
            # Taken: by another function, or by an installed package's entry point naming
            # another function (a plugin may both declare and decorate the same one).
            path = [*self.namespace, name]
            if catalogue.check_exists(*path):
                taken = inspect.unwrap(catalogue._get(path)) is not f
            elif self.entry_points:
                target = _installed_names().get((self.entry_point_namespace, name))
                here = f"{getattr(f, '__module__', '')}:{getattr(f, '__qualname__', '')}"
                taken = target is not None and target.replace(" ", "") != here
            else:
                taken = False
            if not override and taken:
                raise RegistryNameError(
                    f"'{name}' is already registered in registry '{self.name}'. A released "
                    "name never changes behaviour: register a new version (.v2), or pass "
                    "override=True to replace it on purpose."
                )
            catalogue._set(list(self.namespace) + [name], validated(f))
            return f

        if func is not None:
            return do_registration(func)  # type: ignore[return-value]
        return do_registration

    def get(self, name: str) -> Any:
        """The (validating) function registered as ``name``, in-process or by entry point."""
        path = [*self.namespace, name]
        if not catalogue.check_exists(*path) and self.entry_points:
            found = self.get_entry_point(name)
            if found is not None:
                # Register it, so later look-ups do not scan the installed packages again.
                catalogue._set(path, validated(found))
        if not catalogue.check_exists(*path):
            raise RegistryNameError(
                f"'{name}' is not registered in registry '{self.name}'."
                + did_you_mean(name, self.get_all())
                + f" Use `registry-xf list {self.name}` to see every name."
            )
        return catalogue._get(path)

    def _get_entry_points(self) -> list[importlib.metadata.EntryPoint]:
        # Read now, not from the list catalogue took when it was imported: a package
        # installed since then (pip install in a running session) is found too.
        return list(importlib.metadata.entry_points(group=self.entry_point_namespace))

    def names(self) -> list[str]:
        """All registered names, entry points included, sorted."""
        return sorted(self.get_all())


@functools.cache
def _installed_names() -> dict[tuple[str, str], str]:
    """(group, name) → ``module:attr`` of our entry points, read once per process."""
    found = importlib.metadata.entry_points()
    return {
        (ep.group, ep.name): ep.value
        for group in (f"registry_xf_{name}" for name in REGISTRY_NAMES)
        for ep in found.select(group=group)
    }


def _create(name: str) -> Registry:
    return Registry(("registry_xf", name), entry_points=True)


class registry(confection.registry):
    """All registry_xf registries, as one confection registry."""

    architectures = _create("architectures")
    layers = _create("layers")
    activations = _create("activations")
    tokenizers = _create("tokenizers")
    loaders = _create("loaders")
    converters = _create("converters")
    poolers = _create("poolers")
    logits_processors = _create("logits_processors")
    stopping_criteria = _create("stopping_criteria")
    heads = _create("heads")
    sharding = _create("sharding")

    @classmethod
    def get_registry(cls, name: str) -> Registry:
        """The registry called ``name`` (as written after ``@`` in a config)."""
        if name not in REGISTRY_NAMES:
            raise RegistryNameError(
                f"There is no registry '{name}'."
                + did_you_mean(name, REGISTRY_NAMES)
                + f" Registries: {', '.join(REGISTRY_NAMES)}."
            )
        return getattr(cls, name)
