"""Pipelines that put models to work: sentence embeddings, classification, reranking."""

from .classifier import Classifier
from .cross_encoder import CrossEncoder, RankedDocument
from .embedder import Embedder
from .poolers import Pooler
from .quantization import hamming_distance, hamming_similarity, quantize_embeddings

__all__ = [
    "Classifier",
    "CrossEncoder",
    "Embedder",
    "Pooler",
    "RankedDocument",
    "hamming_distance",
    "hamming_similarity",
    "quantize_embeddings",
]
