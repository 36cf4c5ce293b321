"""Tokenizers (on HF ``tokenizers``: WordPiece, BPE, Unigram from tokenizer.json)."""

from .hf_tokenizer import Batch, HFTokenizer

__all__ = ["Batch", "HFTokenizer"]
