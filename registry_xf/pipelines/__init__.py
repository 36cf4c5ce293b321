"""Pipelines that put models to work: sentence embeddings, classification, reranking, sparse
embeddings."""

from .classifier import Classifier
from .cross_encoder import CrossEncoder, RankedDocument
from .embedder import Embedder
from .poolers import Pooler
from .quantization import hamming_distance, hamming_similarity, quantize_embeddings
from .sparse_encoder import SparseEncoder
from .splade_pooler import SpladePooler

__all__ = [
    "Classifier",
    "CrossEncoder",
    "Embedder",
    "Pooler",
    "RankedDocument",
    "SparseEncoder",
    "SpladePooler",
    "hamming_distance",
    "hamming_similarity",
    "quantize_embeddings",
]
