"""Pipelines that put models to work: sentence embeddings, classification."""

from .classifier import Classifier
from .embedder import Embedder
from .poolers import Pooler
from .quantization import hamming_distance, hamming_similarity, quantize_embeddings

__all__ = [
    "Classifier",
    "Embedder",
    "Pooler",
    "hamming_distance",
    "hamming_similarity",
    "quantize_embeddings",
]
