"""registry_xf in spaCy 3.8: the ``registry_xf_transformer`` component and its listener,
and ``registry_xf_token_classifier`` (a token classifier's labels as ``doc.ents``).

Installed with ``pip install registry-xf[spacy]``; spaCy finds the component and the
architectures through entry points, so ``nlp.add_pipe("registry_xf_transformer")`` works
without importing registry_xf.
"""

from .architectures import transformer_listener_v1, transformer_model_v1
from .component import FACTORY, Transformer, make_transformer
from .hooks import install as add_vector_hooks
from .listener import TransformerListener
from .outputs import DocTransformerOutput
from .token_classifier import TOKEN_CLASSIFIER_FACTORY, TokenClassifier, make_token_classifier

__all__ = [
    "FACTORY",
    "TOKEN_CLASSIFIER_FACTORY",
    "DocTransformerOutput",
    "Transformer",
    "TokenClassifier",
    "TransformerListener",
    "add_vector_hooks",
    "make_token_classifier",
    "make_transformer",
    "transformer_listener_v1",
    "transformer_model_v1",
]
