"""Pipelines that put models to work: sentence embeddings."""

from .embedder import Embedder
from .poolers import Pooler

__all__ = ["Embedder", "Pooler"]
