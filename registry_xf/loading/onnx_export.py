"""Export of any registry_xf encoder to ONNX, for onnxruntime, OpenVINO or any ONNX runtime.

The graph takes ``input_ids`` and ``attention_mask`` (and ``token_type_ids`` where the
model has several token types), int64 (batch, seq) with both axes dynamic, and gives
``last_hidden_state`` (batch, seq, width); with ``pooled=True`` also ``sentence_embedding``
(batch, width), pooled and normalised as the model's pooler says (what
``registry_xf.Embedder`` returns, without prompts or truncation).

The exporter is torch's own (``torch.onnx.export(dynamo=True)``, which needs the ``onnx``
and ``onnxscript`` packages: ``pip install registry-xf[onnx]``): it traces the model as
``torch.compile`` does, so the padding and masking branches stay in the graph for any
input, where the older tracer would freeze those of its example batch. The file is
written crash-safe: a hidden folder beside it, then a rename.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from torch import nn

from ..assemblies.encoder import Encoder
from ..assemblies.with_head import EncoderWithHead
from ..errors import InputError, RegistryXFError, UnsupportedModelError
from .atomic import atomic_file, check_file_target

logger = logging.getLogger(__name__)

# ONNX keeps a model in one file up to 2 GiB (protobuf's limit); larger weights go to a
# data file beside it, named after it.
ONE_FILE_LIMIT_BYTES = 2**31 - 2**24
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8


class ExportError(RegistryXFError, RuntimeError):
    """A model that could not be exported, or an export that could not run here."""


class _Exported(nn.Module):
    """The encoder with the inputs and outputs of the exported graph."""

    def __init__(self, encoder: Encoder, pooler: nn.Module | None):
        super().__init__()
        self.encoder = encoder
        self.pooler = pooler

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        hidden = self.encoder(input_ids, attention_mask, token_type_ids).last_hidden_state
        if self.pooler is None:
            return (hidden,)
        return hidden, self.pooler(hidden, attention_mask)


def uses_token_types(encoder: Encoder) -> bool:
    """Whether the encoder has token types to choose from (BERT's two; RoBERTa's single
    type is added without an input, as it is when ``token_type_ids`` is None)."""
    table = getattr(encoder.embeddings, "token_type_embeddings", None)
    return table is not None and table.num_embeddings > 1


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    pooled: bool = False,
    opset: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (an encoder, or an encoder with a head: its encoder) to ``path`` as
    ONNX with dynamic batch and sequence axes; return the path.

    ``pooled=True`` adds the output ``sentence_embedding``: the model's pooler (mean pooling where
    it has none) with its normalisation. ``opset`` is the ONNX opset (default: torch's).
    An existing file is replaced only with ``overwrite=True``.
    """
    encoder = _encoder_of(model)
    path = Path(path)
    if path.suffix != ".onnx":
        raise InputError(f"path {str(path)!r}: expected a file name ending in .onnx")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 17):
        raise InputError(f"opset={opset!r}: expected an integer of at least 17 (or None)")
    check_file_target(path, overwrite=overwrite)
    _check_exporter()
    pooler = _pooler_of(model) if pooled else None
    wrapped = _Exported(encoder, pooler).eval()
    names = ["input_ids", "attention_mask"] + (
        ["token_type_ids"] if uses_token_types(encoder) else []
    )
    device = encoder.embeddings.word_embeddings.weight.device
    example = _example_inputs(names, device)
    batch = torch.export.Dim("batch")
    limit = encoder.max_positions  # sequences past the position table are refused anyway
    seq = torch.export.Dim("seq", max=limit) if limit else torch.export.Dim("seq")
    outputs = ["last_hidden_state"] + (["sentence_embedding"] if pooled else [])
    size = sum(p.numel() * p.element_size() for p in encoder.parameters())
    was_training = encoder.training
    encoder.eval()
    try:
        # With autograd on, packed linear layers run as plain ``F.linear`` (an ONNX Gemm),
        # not as their CPU operator, which ONNX has no translation for.
        with torch.inference_mode(False), torch.enable_grad():
            program = torch.onnx.export(
                wrapped,
                tuple(example[name] for name in names),
                input_names=names,
                output_names=outputs,
                dynamic_shapes={name: {0: batch, 1: seq} for name in names},
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
    except RegistryXFError:
        raise
    except Exception as e:  # the exporter's many error types: say which model failed
        raise ExportError(
            f"{type(encoder).__name__} could not be exported to ONNX: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    finally:
        encoder.train(was_training)
    _check_dynamic(program, names, type(encoder).__name__)
    external = size > ONE_FILE_LIMIT_BYTES
    with atomic_file(path, overwrite=overwrite) as folder:
        program.save(str(folder / path.name), external_data=external)
    logger.info("exported %s to %s (%s)", type(encoder).__name__, path, ", ".join(outputs))
    return path


def _check_dynamic(program: object, names: list[str], what: str) -> None:
    """Refuse a graph whose batch or sequence size came out fixed: where torch cannot keep
    a size symbolic, its exporter falls back to the example's sizes without an error."""
    graph = program.model.graph  # type: ignore[attr-defined]  (an onnx_ir model)
    for value in graph.inputs:
        if value.name in names and any(isinstance(d, int) for d in value.shape.dims[:2]):
            raise ExportError(
                f"{what}: the exported input {value.name} has the fixed shape "
                f"{tuple(value.shape.dims)} (the example's): something in the model fixes the "
                "batch or sequence size while tracing"
            )


def _encoder_of(model: nn.Module) -> Encoder:
    if isinstance(model, EncoderWithHead):
        model = model.encoder
    if not isinstance(model, Encoder):
        raise UnsupportedModelError(
            f"export_onnx takes an encoder (registry_xf.Encoder or an encoder with a head); "
            f"found {type(model).__name__}"
        )
    return model


def _pooler_of(model: nn.Module) -> nn.Module:
    from ..pipelines.poolers import Pooler

    pooler = getattr(model, "pooler", None)
    if pooler is None and isinstance(model, EncoderWithHead):
        pooler = getattr(model.encoder, "pooler", None)
    if pooler is None:
        return Pooler("mean")
    if type(pooler) is not Pooler:
        raise UnsupportedModelError(
            f"pooled=True: the model pools with {type(pooler).__name__}, which the export does "
            "not take (mean, CLS and max pooling do); export with pooled=False"
        )
    return pooler


def _check_exporter() -> None:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(
            f"export_onnx needs the package(s) {', '.join(missing)}: "
            "pip install 'registry-xf[onnx]'"
        )


def _example_inputs(names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """A padded example batch: the exporter sees the masking path, with sizes it will not
    mistake for constants (neither 0 nor 1)."""
    ids = torch.full((EXAMPLE_BATCH, EXAMPLE_SEQ), 2, dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    mask[1, EXAMPLE_SEQ // 2 :] = 0
    example = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        example["token_type_ids"] = torch.zeros_like(ids)
    return example
