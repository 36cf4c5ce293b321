"""Seeded fuzzing of safetensors checkpoints: headers mutated, then loaded.

Tiny checkpoints (a BERT written by transformers; a Llama with fused query/key/value and
gate/up matrices, in one file and in two shards) have their headers mutated: dtype
strings, shapes, offsets, names added, dropped and renamed, fused parts resized or
relabelled, names duplicated across shards, shard indexes, metadata, header bytes. Every
load must end, within a bound, in one of:

- a load whose weights equal the unmutated checkpoint's, where the mutation was harmless;
- a registry_xf error that names the checkpoint, where the header disagrees with the
  config or with itself (never a silent load);
- either of those, where the format cannot tell (two tensors' data swapped by their
  offsets is as undetectable as flipped data bytes).

``REGISTRY_XF_FUZZ_CASES`` sets the number of cases (300 by default);
``REGISTRY_XF_FUZZ_SEED`` another seed.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_hf_checkpoint
from safetensors_files import (
    DTYPE_BITS,
    GATE_UP,
    QKV,
    pack,
    read_raw,
    tensor_bytes,
    write_llama,
    write_raw,
)

import registry_xf as rx
from registry_xf.loading.checkpoint import DTYPE_KINDS

CASES = int(os.environ.get("REGISTRY_XF_FUZZ_CASES", "300"))
SEED = int(os.environ.get("REGISTRY_XF_FUZZ_SEED", "20261130"))
CASE_SECONDS = 20.0  # a load takes ~15 ms; this bounds a hang, not the speed
INDEX = "model.safetensors.index.json"
NOT_DTYPES = ["XYZ", "f32", "", "F32 ", "FLOAT", 32, None, ["F32"], {"F32": 1}, 3.5]

Header = dict[str, Any]


@dataclass
class Base:
    """An unmutated checkpoint: its files, and what loading it gives."""

    name: str
    directory: Path
    files: dict[str, tuple[Header, bytes]]  # safetensors file name -> header, data
    index: dict[str, Any] | None
    reference: dict[str, torch.Tensor]
    skipped: set[str]  # checkpoint keys the model does not use (task heads)


@dataclass
class Case:
    what: str
    # "same", "fail", "same-or-fail", "either", or "cast:<name>" / "exact-cast:<name>"
    # (loads with that one tensor cast to the model's dtype; exact: to the same values)
    expect: str
    files: dict[str, tuple[Header | str, bytes] | bytes]  # bytes: the whole file
    index: Any = None
    raw_index: str | None = None


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _base(name: str, directory: Path) -> Base:
    index_file = directory / INDEX
    index = json.loads(index_file.read_text()) if index_file.is_file() else None
    names = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    model = rx.load(directory)
    return Base(
        name,
        directory,
        {n: read_raw(directory / n) for n in names},
        index,
        _state(model),
        set(model.load_report.skipped),
    )


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> list[Base]:
    root = tmp_path_factory.mktemp("fuzz_bases")
    write_llama(root / "llama")
    sharded = root / "llama-sharded"
    tensors = write_llama(sharded)
    header, data = read_raw(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    raw = tensor_bytes(header, data)
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[:6], names[6:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        entries = {k: (header[k]["dtype"], header[k]["shape"], raw[k]) for k in part}
        write_raw(sharded / shard, *pack(entries, {"format": "pt"}))
        weight_map.update(dict.fromkeys(part, shard))
    (sharded / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_hf_checkpoint(root / "bert", "bert")
    return [_base(n, root / n) for n in ("llama", "llama-sharded", "bert")]


# --- mutations ---------------------------------------------------------------------------


def _tensors(header: Header) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def _fits(dtype: object, shape: list[int], nbytes: int) -> bool:
    """Whether a header entry is self-consistent (safetensors refuses it otherwise)."""
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        return False
    n = 1
    for d in shape:
        n *= d
    return n * DTYPE_BITS[dtype] % 8 == 0 and n * DTYPE_BITS[dtype] // 8 == nbytes


def _repack(header: Header, data: bytes, changes: dict[str, Any], order: list[str] | None = None):
    """Header and data with entries replaced (name -> (dtype, shape, bytes), or None to
    drop), laid out afresh in ``order``."""
    raw = tensor_bytes(header, data)
    entries = {k: (header[k]["dtype"], header[k]["shape"], raw[k]) for k in _tensors(header)}
    for name, change in changes.items():
        if change is None:
            entries.pop(name)
        else:
            entries[name] = change
    if order is not None:
        entries = {k: entries[k] for k in order if k in entries} | entries
    return pack(entries, header.get("__metadata__"))


def _resized(raw: bytes, dtype: str, shape: list[int]) -> bytes:
    n = 1
    for d in shape:
        n *= d
    size = -(-n * DTYPE_BITS[dtype] // 8)
    return (raw + bytes(size))[:size]


class Mutator:
    """One case's mutation of a base, its random choices from ``rng``."""

    def __init__(self, rng: random.Random, base: Base):
        self.rng = rng
        self.base = base
        self.files: dict[str, tuple[Any, bytes]] = copy.deepcopy(base.files)
        self.index = copy.deepcopy(base.index)
        self.file = rng.choice(sorted(self.files))
        self.header, self.data = self.files[self.file]
        self.name = rng.choice(sorted(_tensors(self.header)))
        self.entry = self.header[self.name]
        self.used = self.name not in base.skipped
        self.nbytes = self.entry["data_offsets"][1] - self.entry["data_offsets"][0]

    def case(self, what: str, expect: str, header: Any = None, data: bytes | None = None):
        files = dict(self.files)
        if header is not None or data is not None:
            files[self.file] = (
                self.header if header is None else header,
                self.data if data is None else data,
            )
        return Case(f"{self.base.name}/{self.file}: {what}", expect, files, self.index)

    def whole_file(self, what: str, expect: str, blob: bytes) -> Case:
        """A case whose mutated file is written as ``blob``, byte for byte."""
        case = self.case(what, expect)
        case.files[self.file] = blob
        return case

    def unused(self, expect_if_used: str) -> str:
        return expect_if_used if self.used else "same"

    # harmless ------------------------------------------------------------------------

    def metadata(self) -> Case:
        h = copy.deepcopy(self.header)
        choice = self.rng.randrange(3)
        if choice == 0:
            h.pop("__metadata__", None)
        elif choice == 1:
            h["__metadata__"] = None
        else:
            h["__metadata__"] = {
                f"k{i}": "".join(self.rng.choices('ab\u00e9\u4e2d"\\ {}', k=self.rng.randrange(9)))
                for i in range(self.rng.randrange(6))
            }
        return self.case(f"metadata {h.get('__metadata__', '(none)')!r}", "same", h)

    def reorder_header(self) -> Case:
        keys = list(self.header)
        self.rng.shuffle(keys)
        return self.case("header entries reordered", "same", {k: self.header[k] for k in keys})

    def relayout_data(self) -> Case:
        order = _tensors(self.header)
        self.rng.shuffle(order)
        h, d = _repack(self.header, self.data, {}, order)
        return self.case("data laid out in another order", "same", h, d)

    # dtypes --------------------------------------------------------------------------

    def relabel(self) -> Case:
        """Only the dtype string changes: the bytes stay as they are."""
        dtype = self.rng.choice([*DTYPE_BITS, *NOT_DTYPES])
        if dtype == self.entry["dtype"]:
            dtype = "I32"
        h = copy.deepcopy(self.header)
        h[self.name]["dtype"] = dtype
        valid = _fits(dtype, self.entry["shape"], self.nbytes)
        expect = "fail" if self.used or not valid else "same"
        return self.case(f"{self.name} relabelled {dtype!r}", expect, h)

    def relabel_resized(self) -> Case:
        """Another dtype, with bytes to fit it: a mislabelled or re-encoded tensor."""
        dtype = self.rng.choice([d for d in DTYPE_BITS if d != self.entry["dtype"]])
        raw = tensor_bytes(self.header, self.data)[self.name]
        shape = self.entry["shape"]
        if dtype == "F64" and self.rng.random() < 0.5:  # the same values, exactly
            raw = torch.frombuffer(bytearray(raw), dtype=torch.float32).double().numpy().tobytes()
            expect = f"exact-cast:{self.name}"
        elif DTYPE_KINDS[dtype] == "float":
            expect = f"cast:{self.name}"
        else:
            expect = "fail"
        h, d = _repack(
            self.header, self.data, {self.name: (dtype, shape, _resized(raw, dtype, shape))}
        )
        return self.case(f"{self.name} stored as {dtype}", self.unused(expect), h, d)

    # shapes --------------------------------------------------------------------------

    def _other_shape(self) -> list[int]:
        shape = list(self.entry["shape"])
        rng = self.rng
        for _ in range(20):
            choice = rng.randrange(6)
            if choice == 0 and len(shape) > 1:
                new = shape[::-1]
            elif choice == 1:
                new = [*shape, 1] if rng.random() < 0.5 else [1, *shape]
            elif choice == 2 and shape:
                new = list(shape)
                new[rng.randrange(len(new))] += rng.choice([-1, 1, 7])
            elif choice == 3 and shape:
                new = [shape[0], 1]
            elif choice == 4:
                new = [rng.randrange(0, 70) for _ in range(rng.randrange(4))]
            else:
                new = [0] + shape[1:]
            if new != shape and all(d >= 0 for d in new):
                return new
        return [*shape, 2]

    def reshape(self) -> Case:
        """Another shape, with bytes to fit it: the header is consistent, the config not."""
        shape = self._other_shape()
        raw = tensor_bytes(self.header, self.data)[self.name]
        dtype = self.entry["dtype"]
        h, d = _repack(
            self.header, self.data, {self.name: (dtype, shape, _resized(raw, dtype, shape))}
        )
        return self.case(f"{self.name} shaped {shape}", self.unused("fail"), h, d)

    def reshape_in_place(self) -> Case:
        """Another shape, bytes unchanged: consistent only where the count stays."""
        shape = self._other_shape()
        h = copy.deepcopy(self.header)
        h[self.name]["shape"] = shape
        valid = _fits(self.entry["dtype"], shape, self.nbytes)
        expect = "fail" if self.used or not valid else "same"
        return self.case(f"{self.name} relabelled shape {shape}", expect, h)

    def fused_part(self) -> Case:
        """A part of a fused matrix resized, its rows traded with another, or relabelled."""
        group = self.rng.choice([QKV, GATE_UP])
        present = [n for n in group if n in self.header]
        if not present:
            return self.reshape()
        name = self.rng.choice(present)
        self.name, self.entry, self.used = name, self.header[name], True
        raw = tensor_bytes(self.header, self.data)
        rows, cols = self.entry["shape"]
        choice = self.rng.randrange(3)
        if choice == 0:
            shape = [rows * cols // 16, 16] if self.rng.random() < 0.5 else [cols, 1]
            change = {name: ("F32", shape, _resized(raw[name], "F32", shape))}
            what = f"fused part {name} shaped {shape}"
        elif choice == 1 and len(present) == len(group):
            other = self.rng.choice([n for n in group if n != name])
            moved = self.rng.choice([1, 4, 8])
            a = [rows + moved, cols]
            b = [self.header[other]["shape"][0] - moved, cols]
            change = {
                name: ("F32", a, _resized(raw[name], "F32", a)),
                other: ("F32", b, _resized(raw[other], "F32", b)),
            }
            what = f"fused parts {name} and {other} trade {moved} rows"
        else:
            dtype = self.rng.choice(["I32", "U32", "I64", "I16", "F8_E4M3", "BOOL", "C64"])
            change = {name: (dtype, [rows, cols], _resized(raw[name], dtype, [rows, cols]))}
            what = f"fused part {name} stored as {dtype}"
        h, d = _repack(self.header, self.data, change)
        return self.case(what, "fail", h, d)

    # offsets and layout --------------------------------------------------------------

    def offsets(self) -> Case:
        start, end = self.entry["data_offsets"]
        size = len(self.data)
        options = [
            [start + 1, end + 1],
            [start - 1, end],
            [end, start],
            [start, end + 4],
            [start, size + 8],
            [-8, end],
            [start],
            [start, end, end],
            [float(start), end],
            [str(start), end],
            None,
            [0, self.nbytes] if start else [4, 4 + self.nbytes],
            [start, 2**64],
        ]
        new = self.rng.choice(options)
        h = copy.deepcopy(self.header)
        h[self.name]["data_offsets"] = new
        return self.case(f"{self.name} data_offsets {new}", "fail", h)

    def swap_offsets(self) -> Case:
        """Two same-size tensors swap their data: what a checksum-less format cannot see."""
        same = [
            n
            for n in _tensors(self.header)
            if n != self.name
            and self.header[n]["data_offsets"][1] - self.header[n]["data_offsets"][0] == self.nbytes
        ]
        if not same:
            return self.offsets()
        other = self.rng.choice(same)
        h = copy.deepcopy(self.header)
        h[self.name]["data_offsets"], h[other]["data_offsets"] = (
            h[other]["data_offsets"],
            h[self.name]["data_offsets"],
        )
        return self.case(f"{self.name} and {other} swap data", "either", h)

    def length_and_size(self) -> Case:
        text = json.dumps(self.header)
        choice = self.rng.randrange(4)
        if choice == 0:  # the length prefix off by a little
            encoded = text.encode()
            delta = self.rng.choice([-9, -1, 1, 7])
            blob = (len(encoded) + delta).to_bytes(8, "little") + encoded + self.data
            return self.whole_file(f"header length off by {delta}", "fail", blob)
        if choice == 1:
            cut = self.rng.randrange(len(self.data))
            return self.case(f"data cut to {cut} bytes", "fail", self.header, self.data[:cut])
        if choice == 2:
            return self.case("bytes after the data", "fail", self.header, self.data + b"\0" * 3)
        return self.case("header padded with spaces", "same", text + " " * 8, self.data)

    # names ---------------------------------------------------------------------------

    def drop(self) -> Case:
        h, d = _repack(self.header, self.data, {self.name: None})
        return self.case(f"{self.name} dropped", self.unused("fail"), h, d)

    def extra(self) -> Case:
        layer = self.name.replace(".0.", ".9.") if ".0." in self.name else None
        name = layer or f"fuzz_extra.{self.rng.randrange(100)}.weight"
        raw = tensor_bytes(self.header, self.data)[self.name]
        h, d = _repack(
            self.header, self.data, {name: (self.entry["dtype"], self.entry["shape"], raw)}
        )
        return self.case(f"extra tensor {name}", "fail", h, d)

    def rename(self) -> Case:
        new = self.rng.choice([self.name + "_", self.name.upper(), "x." + self.name])
        h = {(new if k == self.name else k): v for k, v in self.header.items()}
        return self.case(f"{self.name} renamed {new}", self.unused("fail"), h)

    def duplicate_key(self) -> Case:
        text = json.dumps(self.header)
        dup = f"{text[:-1]}, {json.dumps(self.name)}: {json.dumps(self.entry)}}}"
        return self.case(f"{self.name} twice in the header", "same-or-fail", dup, self.data)

    def header_byte(self) -> Case:
        text = bytearray(json.dumps(self.header).encode())
        at = self.rng.randrange(len(text))
        text[at] = self.rng.choice(b'0123456789",:{}[] aeFIU\\\xff')
        what = f"header byte {at} set to {bytes(text[at : at + 1])!r}"
        blob = len(text).to_bytes(8, "little") + bytes(text) + self.data
        return self.whole_file(what, "same-or-fail", blob)

    # shards --------------------------------------------------------------------------

    def shards(self) -> Case:
        if self.index is None:
            return self.drop()
        weight_map = self.index["weight_map"]
        files = sorted(self.files)
        other = next(f for f in files if f != self.file)
        choice = self.rng.randrange(5)
        if choice == 0:  # one tensor in both shards
            oh, od = self.files[other]
            raw = tensor_bytes(self.header, self.data)[self.name]
            h, d = _repack(oh, od, {self.name: (self.entry["dtype"], self.entry["shape"], raw)})
            case = self.case(f"{self.name} also in {other}", "fail")
            case.files[other] = (h, d)
            return case
        if choice == 1:  # a shard name that leaves the directory
            escape = self.rng.choice(
                [f"../{self.file}", "/tmp/" + self.file, f"sub/../../{self.file}"]
            )
            self.index["weight_map"] = {
                k: (escape if v == self.file else v) for k, v in weight_map.items()
            }
            return self.case(f"index names {escape}", "fail")
        if choice == 2:  # the index places some tensors in the wrong shard
            keys = self.rng.sample(sorted(weight_map), 3)
            for k in keys:
                weight_map[k] = other if weight_map[k] == self.file else self.file
            return self.case(f"index misplaces {keys}", "same")
        if choice == 3:  # a shard left out of the index
            self.index["weight_map"] = {k: v for k, v in weight_map.items() if v != self.file}
            return self.case(f"index leaves out {self.file}", "fail")
        bad = self.rng.choice(["{", "[]", '{"weight_map": []}', '{"weight_map": {"a": 5}}', ""])
        case = self.case(f"index text {bad!r}", "fail")
        case.raw_index = bad
        return case


MUTATIONS: list[Callable[[Mutator], Case]] = [
    Mutator.metadata,
    Mutator.reorder_header,
    Mutator.relayout_data,
    Mutator.relabel,
    Mutator.relabel,
    Mutator.relabel_resized,
    Mutator.relabel_resized,
    Mutator.reshape,
    Mutator.reshape_in_place,
    Mutator.fused_part,
    Mutator.fused_part,
    Mutator.offsets,
    Mutator.swap_offsets,
    Mutator.length_and_size,
    Mutator.drop,
    Mutator.extra,
    Mutator.rename,
    Mutator.duplicate_key,
    Mutator.header_byte,
    Mutator.shards,
    Mutator.shards,
]


# --- running a case ----------------------------------------------------------------------


def _write(case: Case, base: Base, directory: Path) -> None:
    directory.mkdir()
    shutil.copy(base.directory / "config.json", directory)
    for name, content in case.files.items():
        if isinstance(content, bytes):
            (directory / name).write_bytes(content)
        else:
            write_raw(directory / name, *content)
    if case.raw_index is not None:
        (directory / INDEX).write_text(case.raw_index)
    elif case.index is not None:
        (directory / INDEX).write_text(json.dumps(case.index))


def _load_bounded(directory: Path) -> tuple[str, Any]:
    """("loaded", model), ("raised", exception) or ("hung", None) past CASE_SECONDS."""
    outcome: list[tuple[str, Any]] = []

    def target() -> None:
        try:
            outcome.append(("loaded", rx.load(directory)))
        except BaseException as e:  # judged by the caller
            outcome.append(("raised", e))

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(CASE_SECONDS)
    return outcome[0] if outcome else ("hung", None)


def _judge(case: Case, base: Base, directory: Path, kind: str, result: Any) -> str | None:
    """What is wrong with the outcome, or None."""
    if kind == "hung":
        return f"no outcome within {CASE_SECONDS} s"
    if kind == "raised":
        if not isinstance(result, rx.RegistryXFError):
            return f"raised {type(result).__name__}: {result}"
        if str(directory) not in str(result):
            return f"{type(result).__name__} does not name the checkpoint: {result}"
        if case.expect == "same" or "cast:" in case.expect:
            return f"refused a harmless change: {result}"
        return None
    state, report = _state(result), result.load_report
    if case.expect == "fail":
        return f"loaded silently (report: {report})"
    if {t.dtype for t in state.values()} != {torch.float32}:
        return f"loaded with dtypes {sorted({str(t.dtype) for t in state.values()})}"
    differs = [k for k, v in base.reference.items() if not torch.equal(state[k], v)]
    if case.expect in ("same", "same-or-fail"):
        if differs or report.cast:
            return f"loaded other weights ({differs}) or casts ({report.cast})"
    elif "cast:" in case.expect:
        exact, name = case.expect.startswith("exact"), case.expect.split(":", 1)[1]
        if [c.split(" ")[0] for c in report.cast] != [name] or len(differs) > (0 if exact else 1):
            return f"cast {report.cast}, changed {differs} (expected only {name})"
    return None


def test_fuzzed_headers_load_exactly_or_fail_typed(bases: list[Base], tmp_path: Path) -> None:
    problems: list[str] = []
    outcomes: Counter[str] = Counter()
    started = time.perf_counter()
    for i in range(CASES):
        rng = random.Random(SEED * 100_003 + i)
        base = rng.choice(bases)
        case = rng.choice(MUTATIONS)(Mutator(rng, base))
        directory = (tmp_path / f"case{i}").resolve()
        _write(case, base, directory)
        kind, result = _load_bounded(directory)
        problem = _judge(case, base, directory, kind, result)
        outcomes[f"{case.expect.split(':')[0]} -> {kind}"] += 1
        if problem:
            problems.append(f"case {i} (seed {SEED}) {case.what}: {problem}")
        if kind == "hung":
            break  # the worker still runs: stop here
        shutil.rmtree(directory)
    elapsed = time.perf_counter() - started
    summary = ", ".join(f"{k}: {n}" for k, n in sorted(outcomes.items()))
    summary += f"; {elapsed:.1f} s"
    logging.getLogger(__name__).info("%d fuzzed checkpoints: %s", CASES, summary)
    assert not problems, f"{len(problems)} of {CASES} cases ({summary}):\n" + "\n".join(
        problems[:25]
    )
    # both ends were reached: harmless changes loaded, disagreeing headers refused
    assert outcomes["fail -> raised"] and outcomes["same -> loaded"], summary
