"""The transformer as a thinc model: Docs in, piece hidden states and alignments out.

The torch encoder sits in a thinc ``PyTorchShim``, so spaCy's optimizer updates it when
fine-tuning, and ``model.to_gpu()`` or ``spacy.require_gpu()`` move it. It is loaded on
first use (or by ``nlp.initialize()``), so a pipeline read back with ``spacy.load`` takes
its weights from the pipeline folder and never from the original source.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from spacy.tokens import Doc
from thinc.api import Model, PyTorchShim, get_torch_default_device, torch2xp, xp2torch
from thinc.types import Ragged
from torch import nn

from ...errors import ConfigError, ConfigProblem, InputError, RegistryXFError
from ...loading.load import load, with_weights
from ...types import to_dtype
from ..embedder import Embedder
from ..poolers import Pooler
from .alignment import align_tokens
from .outputs import DocTransformerOutput
from .windows import strided_windows

logger = logging.getLogger(__name__)

# positions assumed for models that do not declare a limit (rotary, ALiBi)
_DEFAULT_LIMIT = 512


def transformer_model(spec: EncoderSpec, settings: RunSettings) -> Model:
    """A thinc model around the encoder ``spec`` describes (loaded on first use)."""
    return Model(
        "registry_xf_transformer",
        _forward,
        init=_init,
        attrs={
            "spec": spec,
            "window": settings.window,
            "stride": settings.stride,
            "all_layers": settings.all_layers,
            "trainable": settings.trainable,
            "batch_tokens": settings.batch_tokens,
            "prompt_name": settings.prompt_name,
            "truncate_dim": settings.truncate_dim,
        },
    )


@dataclass
class RunSettings:
    """How docs are run through the encoder (see ``registry_xf.TransformerModel.v1``)."""

    window: int | None
    stride: int | None
    all_layers: bool
    trainable: bool
    batch_tokens: int
    prompt_name: str | None = None
    truncate_dim: int | None = None


@dataclass
class EncoderSpec:
    """Where the encoder comes from: a source to load, or registry_xf sections (an encoder
    built by spaCy's resolver, its weights and tokenizer); used when it is first loaded."""

    source: str | None
    overrides: dict[str, Any]
    encoder: nn.Module | None
    weights: Any
    tokenizer: Any
    pooling: Any
    hyper: dict[str, Any]
    dtype: str
    pack: bool | None


def encoder_of(model: Model) -> nn.Module:
    """The torch encoder of a transformer model, loaded now if it was not yet."""
    if not model.shims:
        spec: EncoderSpec = model.attrs["spec"]
        device = get_torch_default_device()
        if spec.encoder is not None:
            module = with_weights(
                spec.encoder,
                spec.weights,
                tokenizer=spec.tokenizer,
                pooler=spec.pooling,
                hyper=spec.hyper,
                device=device,
                dtype=spec.dtype,
            )
        else:
            module = load(
                spec.source,
                device=device,
                dtype=spec.dtype,
                overrides=spec.overrides,
                pack=spec.pack,
                head=False,  # the pipeline wants hidden states: a task head is skipped
            )
        set_encoder(model, module)
    return model.shims[0]._model


def set_encoder(model: Model, module: nn.Module) -> None:
    """Put ``module`` (a loaded registry_xf encoder) in the model, replacing any before it."""
    if getattr(module, "tokenizer", None) is None:
        raise RegistryXFError(
            "the transformer's source has no tokenizer: a spaCy pipeline needs its "
            "tokenizer.json to split docs into pieces"
        )
    if not model.attrs["trainable"]:  # (train/eval mode is set by each forward pass)
        module.requires_grad_(False)
    shim = PyTorchShim(
        module,
        device=_device_of(module),
        serialize_model=_serialize,
        deserialize_model=_deserialize,
    )
    model.shims[:] = [shim]
    model.attrs["pieces"] = _Pieces.of(
        module, model.attrs.get("prompt_name"), model.attrs.get("truncate_dim")
    )


def in_worker_process() -> bool:
    """Whether this is a worker of ``nlp.pipe(n_process=...)`` (a multiprocessing child)."""
    return multiprocessing.parent_process() is not None


def _one_thread_per_worker() -> None:
    """In a worker process, run torch on one thread.

    A forked child cannot use the OpenMP thread pool its parent started (it hangs in the
    first parallel kernel); one thread per worker is also what several workers want.
    """
    global _threads_set_in
    if _threads_set_in != os.getpid() and in_worker_process():
        torch.set_num_threads(1)
        _threads_set_in = os.getpid()


_threads_set_in: int | None = None


def is_loaded(model: Model) -> bool:
    return bool(model.shims)


def _init(model: Model, X: Any = None, Y: Any = None) -> None:
    encoder_of(model)


def _device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _dtype(name: str) -> torch.dtype | None:
    return None if name == "auto" else to_dtype(name)


def _serialize(module: nn.Module) -> bytes:
    """The state dict as safetensors (for thinc's ``to_bytes``); shared tensors copied."""
    seen: set[int] = set()
    tensors = {}
    for name, tensor in module.state_dict().items():
        shared = tensor.data_ptr() in seen
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.clone() if shared else tensor.contiguous()
    return save_safetensors(tensors)


def _deserialize(module: nn.Module, data: bytes, device: torch.device) -> nn.Module:
    module.load_state_dict(load_safetensors(data))
    return module.to(device)


@dataclass
class _Pieces:
    """How docs become model inputs: the tokenizer, its special tokens, the window size."""

    tokenizer: Any
    prefix: list[int]
    suffix: list[int]
    limit: int  # content pieces one window can hold
    pooler: Pooler
    prompt: list[int] = field(default_factory=list)  # after the prefix of every window
    prompt_length: int = 0  # tokens the pooler leaves out where it excludes the prompt
    truncate_dim: int | None = None  # of the sentence embedding

    @classmethod
    def of(
        cls, module: nn.Module, prompt_name: str | None = None, truncate_dim: int | None = None
    ) -> _Pieces:
        tokenizer = module.tokenizer
        raw = tokenizer.tokenizer
        with_specials = raw.encode("a", add_special_tokens=True).ids
        without = raw.encode("a", add_special_tokens=False).ids
        at = next(
            i
            for i in range(len(with_specials) - len(without) + 1)
            if with_specials[i : i + len(without)] == without
        )
        prefix, suffix = with_specials[:at], with_specials[at + len(without) :]
        embeddings = getattr(module, "embeddings", None)
        positions = getattr(embeddings, "max_positions", None) or _DEFAULT_LIMIT
        if tokenizer.max_length:
            positions = min(positions, tokenizer.max_length)
        pooler = getattr(module, "pooler", None) or Pooler("mean")
        settings = _embedding_settings(module, prompt_name, truncate_dim)
        prompt_text = settings.resolve_prompt(None, prompt_name)
        prompt = raw.encode(prompt_text, add_special_tokens=False).ids if prompt_text else []
        limit = positions - len(prefix) - len(suffix) - len(prompt)
        if limit < 1:
            raise ConfigError(
                [ConfigProblem("model.prompt_name", f"the prompt leaves no room: {limit} pieces")]
            )
        return cls(
            tokenizer,
            prefix,
            suffix,
            limit,
            pooler,
            prompt,
            settings.prompt_length(prompt_text) if prompt_text else 0,
            settings.truncate_dim,
        )


def _embedding_settings(
    module: nn.Module, prompt_name: str | None, truncate_dim: int | None
) -> Embedder:
    """The model's prompts and Matryoshka width, checked, with the config path named."""
    try:
        settings = Embedder(module, truncate_dim=truncate_dim)
        settings.resolve_prompt(None, prompt_name)
    except InputError as e:
        path = "model.truncate_dim" if str(e).startswith("truncate_dim") else "model.prompt_name"
        raise ConfigError([ConfigProblem(path, str(e))]) from None
    return settings


@dataclass
class _DocPieces:
    ids: np.ndarray
    alignment: tuple[np.ndarray, np.ndarray]
    windows: list[tuple[int, int]]


def _prepare(docs: Sequence[Doc], pieces: _Pieces, size: int, stride: int) -> list[_DocPieces]:
    encodings = pieces.tokenizer.encode(
        [doc.text for doc in docs], add_special_tokens=False, truncation=False
    )
    prepared = []
    for doc, encoding in zip(docs, encodings, strict=True):
        ids = np.asarray(encoding.ids, dtype=np.int64)
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        spans = np.asarray([(t.idx, t.idx + len(t.text)) for t in doc], dtype=np.int64)
        alignment = align_tokens(spans.reshape(-1, 2), offsets)
        prepared.append(_DocPieces(ids, alignment, strided_windows(len(ids), size, stride)))
    return prepared


def _batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Window indices, longest first, grouped so a padded batch stays under ``budget``."""
    order = np.argsort(np.asarray(lengths), kind="stable")[::-1]
    batches: list[list[int]] = []
    batch: list[int] = []
    for index in order:
        longest = lengths[batch[0]] if batch else lengths[index]
        if batch and (len(batch) + 1) * longest > budget:
            batches.append(batch)
            batch = []
        batch.append(int(index))
    if batch:
        batches.append(batch)
    return batches


def _forward(
    model: Model, docs: list[Doc], is_train: bool
) -> tuple[list[DocTransformerOutput], Callable[[Any], list]]:
    module = encoder_of(model)
    _one_thread_per_worker()
    pieces: _Pieces = model.attrs["pieces"]
    size = min(model.attrs["window"] or pieces.limit, pieces.limit)
    stride = min(model.attrs["stride"] or max(1, size * 3 // 4), size)
    training = is_train and model.attrs["trainable"]
    all_layers = model.attrs["all_layers"]
    prepared = _prepare(docs, pieces, size, stride)
    windows = [(d, start, end) for d, p in enumerate(prepared) for start, end in p.windows]
    n_special = len(pieces.prefix) + len(pieces.prompt) + len(pieces.suffix)
    lengths = [end - start + n_special for _, start, end in windows]
    device = _device_of(module)
    pad = pieces.tokenizer.pad_id
    # per window: (hidden states of its content pieces per layer, pooled embedding)
    results: list[Any] = [None] * len(windows)
    context = torch.enable_grad() if training else torch.inference_mode()
    with context:
        module.train(training)
        for batch in _batches(lengths, model.attrs["batch_tokens"]):
            longest = lengths[batch[0]]
            ids = np.full((len(batch), longest), pad, dtype=np.int64)
            mask = np.zeros((len(batch), longest), dtype=np.int64)
            first = len(pieces.prefix) + len(pieces.prompt)
            for row, w in enumerate(batch):
                d, start, end = windows[w]
                ids[row, :first] = pieces.prefix + pieces.prompt
                ids[row, first : first + end - start] = prepared[d].ids[start:end]
                ids[row, first + end - start : lengths[w]] = pieces.suffix
                mask[row, : lengths[w]] = 1
            input_ids = torch.from_numpy(ids).to(device)
            attention_mask = torch.from_numpy(mask).to(device)
            output = module(input_ids, attention_mask, output_hidden_states=all_layers)
            layers = output.hidden_states if all_layers else [output.last_hidden_state]
            pooled = pieces.pooler.pool(
                output.last_hidden_state, attention_mask, pieces.prompt_length
            )[:, : pieces.truncate_dim]
            if pieces.pooler.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
            pooled = pooled.float()
            for row, w in enumerate(batch):
                _, start, end = windows[w]
                states = [layer[row, first : first + end - start].float() for layer in layers]
                results[w] = (states, pooled[row])
    outputs: list[DocTransformerOutput] = []
    kept: list[torch.Tensor] = []  # the last hidden states, for backprop
    w = 0
    for p in prepared:
        mine = results[w : w + len(p.windows)]
        w += len(p.windows)
        layer_states = [
            _merge([r[0][i] for r in mine], p.windows, len(p.ids)) for i in range(len(mine[0][0]))
        ]
        embedding = mine[0][1] if len(mine) == 1 else _weighted_mean(mine, p.windows)
        kept.append(layer_states[-1])
        outputs.append(
            DocTransformerOutput(
                last_hidden_state=_to_xp(model, layer_states[-1]),
                alignment=Ragged(
                    model.ops.asarray1i(p.alignment[0]), model.ops.asarray1i(p.alignment[1])
                ),
                embedding=_to_xp(model, embedding),
                piece_ids=model.ops.asarray1i(p.ids.astype(np.int32)),
                all_hidden_states=[_to_xp(model, s) for s in layer_states] if all_layers else None,
            )
        )

    def backprop(d_states: list[Any]) -> list:
        if training:
            pairs = [
                (t, g) for t, g in zip(kept, d_states, strict=True) if g is not None and t.numel()
            ]
            if pairs:
                torch.autograd.backward(
                    [t for t, _ in pairs],
                    [xp2torch(g, device=t.device).to(t.dtype) for t, g in pairs],
                )
        return []

    return outputs, backprop


def _weighted_mean(results: list[Any], windows: list[tuple[int, int]]) -> torch.Tensor:
    """A long doc's embedding: its windows' embeddings, weighted by their lengths."""
    embeddings = torch.stack([r[1] for r in results])
    weights = torch.tensor([end - start for start, end in windows], device=embeddings.device)
    return (embeddings * weights[:, None]).sum(0) / weights.sum()


def _merge(parts: list[torch.Tensor], windows: list[tuple[int, int]], n: int) -> torch.Tensor:
    """One (n, width) tensor from windows' states, overlaps averaged."""
    if len(parts) == 1:
        return parts[0]
    width = parts[0].shape[-1]
    index = torch.cat([torch.arange(start, end) for start, end in windows]).to(parts[0].device)
    total = torch.zeros(n, width, device=parts[0].device).index_add(0, index, torch.cat(parts))
    counts = torch.bincount(index, minlength=n).clamp(min=1).to(total.dtype)
    return total / counts[:, None]


def _to_xp(model: Model, tensor: torch.Tensor) -> Any:
    tensor = tensor.detach()
    if tensor.device.type == "cpu":
        return tensor.clone().numpy()
    return model.ops.asarray(torch2xp(tensor.contiguous()))
