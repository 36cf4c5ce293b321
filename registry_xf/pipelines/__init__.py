"""Pipelines that put models to work: sentence embeddings."""

from .embedder import Embedder
from .poolers import Pooler
from .quantization import hamming_distance, hamming_similarity, quantize_embeddings

__all__ = ["Embedder", "Pooler", "hamming_distance", "hamming_similarity", "quantize_embeddings"]
