"""registry_xf's registries, visible to spaCy's config resolver.

A spaCy config can then hold registry_xf sections as they are written in a ``.cfg``
(``@architectures = "registry_xf.Encoder.v1"``, ``@layers = ...``, ``@loaders = ...``).
Registries spaCy has (architectures, layers, tokenizers) receive our names beside its own
(ours all start with ``registry_xf.``, so nothing collides); the others are created.
"""

from __future__ import annotations

from spacy.util import registry as spacy_registry

from ...registry import REGISTRY_NAMES, registry


def share_registries() -> None:
    """Register every registry_xf component in spaCy's registry of the same name."""
    for name in REGISTRY_NAMES:
        if not hasattr(spacy_registry, name):
            spacy_registry.create(name, entry_points=False)
        theirs = getattr(spacy_registry, name)
        for key, func in getattr(registry, name).get_all().items():
            if key not in theirs:
                theirs.register(key, func=func)
