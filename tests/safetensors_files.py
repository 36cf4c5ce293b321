"""Tiny checkpoints for the weight-checking tests, and safetensors files edited byte by byte.

A safetensors file is an 8-byte little-endian header length, a JSON header (per tensor:
``dtype``, ``shape``, ``data_offsets`` into the data; an optional ``__metadata__``) and
the data. Tests that must write what no well-behaved writer would (an integer dtype on a
float tensor, a shape that does not fit the config) edit the header here directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

LLAMA_CONFIG: dict[str, Any] = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=40,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,  # key and value parts have half the query's rows
    intermediate_size=24,
    max_position_embeddings=32,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    hidden_act="silu",
    rope_theta=10000.0,
)
LAYER = "model.layers.0."
# The HF names whose rows registry_xf's Llama fuses into one matrix.
QKV = tuple(f"{LAYER}self_attn.{p}_proj.weight" for p in "qkv")
GATE_UP = (f"{LAYER}mlp.gate_proj.weight", f"{LAYER}mlp.up_proj.weight")


def llama_tensors(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights of a one-layer Llama with grouped query attention, in HF names."""
    c = LLAMA_CONFIG
    hidden, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv_rows = hidden // c["num_attention_heads"] * c["num_key_value_heads"]
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        QKV[0]: (hidden, hidden),
        QKV[1]: (kv_rows, hidden),
        QKV[2]: (kv_rows, hidden),
        f"{LAYER}self_attn.o_proj.weight": (hidden, hidden),
        f"{LAYER}input_layernorm.weight": (hidden,),
        f"{LAYER}post_attention_layernorm.weight": (hidden,),
        GATE_UP[0]: (inter, hidden),
        GATE_UP[1]: (inter, hidden),
        f"{LAYER}mlp.down_proj.weight": (hidden, inter),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}


def write_llama(
    path: Path, tensors: dict[str, torch.Tensor] | None = None, **config: Any
) -> dict[str, torch.Tensor]:
    """An HF Llama directory (config.json, model.safetensors) at ``path``; its tensors."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = llama_tensors() if tensors is None else tensors
    (path / "config.json").write_text(json.dumps({**LLAMA_CONFIG, **config}))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return tensors


# Bytes per element of each safetensors dtype (the 4- and 6-bit floats pack elements).
DTYPE_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}


def read_raw(path: Path) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's header (as parsed JSON) and its data bytes."""
    blob = path.read_bytes()
    length = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def write_raw(path: Path, header: dict[str, Any] | str, data: bytes) -> None:
    """A safetensors file from a header (a dict, or JSON text as it is) and data bytes."""
    text = header if isinstance(header, str) else json.dumps(header)
    encoded = text.encode("utf8")
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)


def tensor_bytes(header: dict[str, Any], data: bytes) -> dict[str, bytes]:
    """Each tensor's bytes, by name."""
    out = {}
    for name, entry in header.items():
        if name != "__metadata__":
            start, end = entry["data_offsets"]
            out[name] = data[start:end]
    return out


def pack(
    entries: dict[str, tuple[str, list[int], bytes]], metadata: dict[str, str] | None = None
) -> tuple[dict[str, Any], bytes]:
    """A header and data for tensors given as (dtype, shape, bytes), laid out in order."""
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": metadata}
    data = bytearray()
    for name, (dtype, shape, raw) in entries.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    return header, bytes(data)


def relabel(path: Path, name: str, dtype: str, shape: list[int] | None = None) -> None:
    """Give tensor ``name`` of the file another dtype (and shape), its bytes resized to
    fit them (cut, or padded with zeros), as a writer that mislabels a tensor would."""
    header, data = read_raw(path)
    raw = tensor_bytes(header, data)
    entries = {
        k: (v["dtype"], v["shape"], raw[k]) for k, v in header.items() if k != "__metadata__"
    }
    shape = entries[name][1] if shape is None else shape
    n = 1
    for d in shape:
        n *= d
    size = -(-n * DTYPE_BITS[dtype] // 8)
    old = entries[name][2]
    entries[name] = (dtype, shape, (old + bytes(size))[:size])
    write_raw(path, *pack(entries, header.get("__metadata__")))
