"""registry_xf: transformer models built from a registry of small, versioned components.

A model is a config file naming registered components; loading builds it on the meta
device and reads each weight once, straight onto the target device and dtype.
"""

import logging

from . import converters as _converters  # noqa: F401  (importing registers them)
from . import heads as _heads  # noqa: F401  (importing registers the heads)
from . import layers as _layers  # noqa: F401  (importing registers the components)
from .about import FORMAT_VERSION, __version__
from .assemblies import (
    Assembly,
    Encoder,
    EncoderWithHead,
    HeadOutput,
    ModelOutput,
    ModelRecord,
)
from .config.resolve import fill, read_config, resolve, validate
from .errors import (
    CheckpointError,
    ConfigError,
    InputError,
    LoadError,
    RegistryNameError,
    RegistryXFError,
    SaveError,
    TensorParallelError,
    UnsafePathError,
    UnsupportedModelError,
)
from .generation import GenerationSettings, Generator, SettingsError
from .layers.int8_linear import quantize_int8
from .loading import weights as _weights  # noqa: F401
from .loading.hf import export_hf
from .loading.hub import fetch
from .loading.load import build, load
from .loading.onnx_export import ExportError, export_onnx
from .loading.save import save
from .loading.sources import DEFAULT_MODEL, config_from_hf
from .pipelines import (
    Classifier,
    CrossEncoder,
    Embedder,
    Pooler,
    RankedDocument,
    SparseEncoder,
    SpladePooler,
)
from .registry import registry
from .tokenizers import HFTokenizer

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "DEFAULT_MODEL",
    "FORMAT_VERSION",
    "Assembly",
    "CheckpointError",
    "Classifier",
    "ConfigError",
    "CrossEncoder",
    "Embedder",
    "Encoder",
    "EncoderWithHead",
    "ExportError",
    "GenerationSettings",
    "Generator",
    "HFTokenizer",
    "HeadOutput",
    "InputError",
    "LoadError",
    "ModelOutput",
    "ModelRecord",
    "Pooler",
    "RankedDocument",
    "RegistryNameError",
    "RegistryXFError",
    "SaveError",
    "SettingsError",
    "SparseEncoder",
    "SpladePooler",
    "TensorParallelError",
    "UnsafePathError",
    "UnsupportedModelError",
    "__version__",
    "build",
    "config_from_hf",
    "export_hf",
    "export_onnx",
    "fetch",
    "fill",
    "load",
    "quantize_int8",
    "read_config",
    "registry",
    "resolve",
    "save",
    "validate",
]
