"""Safetensors checkpoint files: single or sharded, opened safely.

Never unpickles: only ``.safetensors`` files are read. A shard index may only name files
inside the model's directory; a shard that is a symbolic link must resolve inside that
directory too, or, for a snapshot of the Hugging Face cache, inside the cache's ``blobs``.
"""

from __future__ import annotations

import ctypes
import io
import json
import math
import mmap
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# The stored dtypes that ``Checkpoint`` reads itself on the CPU (others: safetensors).
_STORED_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Every dtype string safetensors writes, by kind. Only "float" tensors become weights
# (cast to the model's dtype); the others are named in errors. Formats that need scales
# stored beside them (8-, 6- and 4-bit floats) cannot be loaded as plain weights.
DTYPE_KINDS = {
    **dict.fromkeys(("F64", "F32", "F16", "BF16"), "float"),
    **dict.fromkeys(
        ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F6_E2M3", "F6_E3M2", "F4"),
        "low-precision float",
    ),
    **dict.fromkeys(("I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8"), "integer"),
    "BOOL": "bool",
    "C64": "complex",
}
FLOAT_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_HUGE_PAGE = 2 << 20
_ALIGNMENT = 64  # of each tensor in memory shared by several


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint given as a file, a directory or an index file."""
    path = Path(path)
    if path.is_file() and path.name.endswith(".index.json"):
        return _shards_from_index(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"{path}: only .safetensors checkpoints are read (never pickles); "
                "convert .bin/.pt files with safetensors first"
            )
        return [path]
    if path.is_dir():
        if (path / SINGLE_NAME).is_file():
            return [path / SINGLE_NAME]
        if (path / INDEX_NAME).is_file():
            return _shards_from_index(path / INDEX_NAME)
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (
            f" It has {', '.join(sorted(pickles))}, which are pickles and never loaded: "
            "save the model with safetensors."
            if pickles
            else ""
        )
        raise CheckpointError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME} found.{hint}")
    raise CheckpointError(f"{path}: no such file or directory")


def _shards_from_index(index_path: Path) -> list[Path]:
    try:
        index = json.loads(index_path.read_text(encoding="utf8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid shard index ({e})") from None
    root = index_path.parent.resolve()
    blobs = _hub_cache_blobs(root)
    files: dict[Path, Path] = {}  # resolved -> as named (errors and reports show the name)
    for name in dict.fromkeys(map(str, weight_map.values())):
        lexical = Path(os.path.normpath(root / name))
        try:
            shard = lexical.resolve()
        except (OSError, ValueError, RuntimeError) as e:  # NUL bytes, link loops
            raise CheckpointError(f"{index_path}: shard {name!r} cannot be opened ({e})") from None
        if (
            Path(name).is_absolute()
            or not lexical.is_relative_to(root)
            or not (shard.is_relative_to(root) or (blobs and shard.is_relative_to(blobs)))
        ):
            raise CheckpointError(
                f"{index_path}: shard {name!r} lies outside the model directory {root}"
                + (f" and the cache's {blobs}" if blobs else "")
                + "; refused"
            )
        if lexical.suffix != ".safetensors":
            raise CheckpointError(f"{index_path}: shard {name!r} is not a .safetensors file")
        if not shard.is_file():
            raise CheckpointError(f"{index_path}: shard {name!r} is missing")
        files.setdefault(shard, lexical)
    return list(files.values())


def _hub_cache_blobs(snapshot: Path) -> Path | None:
    """The ``blobs`` folder whose files the snapshot's links may name, where ``snapshot``
    is ``models--org--name/snapshots/<commit>`` in a Hugging Face cache (the files of a
    snapshot are relative links to ``../../blobs/<hash>``); None elsewhere.

    ``snapshot`` is resolved, and so is the result."""
    repo = snapshot.parent.parent
    blobs = repo / "blobs"
    if snapshot.parent.name != "snapshots" or not repo.name.startswith("models--"):
        return None
    return blobs.resolve() if blobs.is_dir() else None


@dataclass(frozen=True)
class TensorEntry:
    """What a file's header says of one tensor, read before any of its data."""

    name: str
    file: Path
    dtype: str  # as safetensors writes it: "F32", "BF16", "I64", ...
    shape: tuple[int, ...]

    @property
    def kind(self) -> str:
        """ "float", "integer", "bool", "complex", "low-precision float" or "unknown"."""
        return DTYPE_KINDS.get(self.dtype, "unknown")

    @property
    def nbytes(self) -> int:
        dtype = FLOAT_DTYPES.get(self.dtype)
        return math.prod(self.shape) * (dtype.itemsize if dtype is not None else 1)


@dataclass(frozen=True)
class _Stored:
    """Where the bytes of one tensor lie in its file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # from the beginning of the file
    nbytes: int


class _Header:
    """A file's parsed header, and the entries of it already checked (by name).

    Kept by the header's bytes and the file's size (``_read_header``): a warm load of the
    same file parses and checks its header once, and a file whose header changed in any
    byte, however quickly after, is read afresh. Shared: only read it.
    """

    __slots__ = ("accepted", "data_start", "header", "located", "shapes")

    def __init__(self, header: dict[str, Any], data_start: int):
        self.header = header
        self.data_start = data_start
        self.located: dict[str, _Stored] = {}
        self.shapes: dict[str, tuple[int, ...]] | None | bool = False  # False: not yet
        # The tensor names safetensors listed when it opened a file with this header and
        # size (and so accepted it); None until it has.
        self.accepted: list[str] | None = None


_HEADERS: OrderedDict[tuple[bytes, int], _Header] = OrderedDict()
_HEADERS_KEPT = 64  # files
_HEADER_BYTES_KEPT = 1 << 20  # larger headers are parsed at every read
_ALL_HEADER_BYTES_KEPT = 16 << 20
_headers_lock = threading.Lock()


def _read_header(handle: io.FileIO, size: int) -> _Header:
    """The header of the open file ``handle`` (``size`` bytes long), read from its start.

    ValueError where it is not a safetensors header (a length out of bounds, a truncated
    file, not a JSON object). The bytes are always read; only parsing them is saved."""
    handle.seek(0)
    length = int.from_bytes(handle.read(8), "little")
    if not 0 < length <= _MAX_HEADER_BYTES:
        raise ValueError(f"header length {length}")
    raw = handle.read(length)
    key = (raw, size)
    with _headers_lock:
        found = _HEADERS.get(key)
        if found is not None:
            _HEADERS.move_to_end(key)
            return found
    if len(raw) != length:
        raise ValueError(f"the file ends inside its {length}-byte header")
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("header is not an object")
    found = _Header(header, 8 + length)
    if length <= _HEADER_BYTES_KEPT:
        with _headers_lock:
            _HEADERS[key] = found
            kept = sum(len(text) for text, _ in _HEADERS)
            while len(_HEADERS) > _HEADERS_KEPT or kept > _ALL_HEADER_BYTES_KEPT:
                (dropped, _), _ = _HEADERS.popitem(last=False)
                kept -= len(dropped)
    return found


class _RawFile:
    """A checkpoint file read without safetensors: its header, and one private memory map
    of the whole file (made on first use) that tensors are views of."""

    def __init__(self, file: Path, handle: io.FileIO):
        self.file = file
        self.handle = handle
        self.size = os.fstat(handle.fileno()).st_size
        try:
            parsed = _read_header(handle, self.size)
        except ValueError as e:
            raise CheckpointError(
                f"{file}: not a readable safetensors file (truncated or corrupt?): {e}"
            ) from None
        self.header: dict[str, Any] = parsed.header
        self.data_start = parsed.data_start
        self._located = parsed.located
        self._storage: torch.UntypedStorage | None = None

    def locate(self, name: str) -> _Stored | None:
        """Where tensor ``name`` lies; None for a dtype not read directly."""
        found = self._located.get(name)
        if found is not None:
            return found
        entry = self.header.get(name)
        dtype = _STORED_DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
        if entry is None or dtype is None:
            return None
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (
            isinstance(shape, list)
            and all(isinstance(n, int) and n >= 0 for n in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0]
            and offsets[1] - offsets[0] == math.prod(shape) * dtype.itemsize
            and self.data_start + offsets[1] <= self.size
        ):
            raise CheckpointError(f"{self.file}: tensor {name!r} has an invalid header entry")
        found = _Stored(dtype, tuple(shape), self.data_start + offsets[0], offsets[1] - offsets[0])
        self._located[name] = found
        return found

    def view(self, stored: _Stored) -> torch.Tensor | None:
        """The tensor as a view of the file's memory map; None where it is not aligned."""
        itemsize = stored.dtype.itemsize
        if stored.start % itemsize:
            return None
        if self._storage is None:
            self._storage = torch.UntypedStorage.from_file(
                str(self.file), shared=False, nbytes=self.size
            )
        tensor = torch.empty(0, dtype=stored.dtype, device="cpu")
        return tensor.set_(self._storage, stored.start // itemsize, stored.shape)

    def read_into(self, stored: _Stored, into: memoryview) -> None:
        """Copy the tensor's bytes into ``into``."""
        self.handle.seek(stored.start)
        done = 0
        while done < stored.nbytes:
            n = self.handle.readinto(into[done : stored.nbytes])
            if not n:
                raise CheckpointError(f"{self.file}: ended before its tensor data (truncated?)")
            done += n


@dataclass(frozen=True)
class _Concatenation:
    """Tensors to read one after the other into one new tensor."""

    parts: list[tuple[_RawFile, _Stored]]
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


def _mapped_whole(layout: _Concatenation) -> torch.Tensor | None:
    """The concatenation as a view of its file's memory map, where the parts lie back to
    back in one file in the order asked for (HF's gate and up projections do): no copy,
    and pages are read only when touched. None otherwise."""
    if not _lies_in_order(layout):
        return None
    raw, first = layout.parts[0]
    return raw.view(_Stored(layout.dtype, layout.shape, first.start, layout.nbytes))


def _lies_in_order(layout: _Concatenation) -> bool:
    raw, first = layout.parts[0]
    end = first.start
    for part_file, stored in layout.parts:
        if part_file is not raw or stored.start != end:
            return False
        end += stored.nbytes
    return first.start % first.dtype.itemsize == 0


def _empty_bytes(nbytes: int) -> torch.Tensor:
    """``nbytes`` of uninitialised CPU memory, asking Linux for 2 MiB pages where it is
    fresh.

    Fresh memory is otherwise mapped 4 KiB at a time as it is first written, and for a
    small model those page faults cost more than reading the data (2,600 faults, 6 ms,
    for MiniLM's fused projections; 1 ms on huge pages). The memory comes from torch's
    allocator, so that memory freed by an earlier model (a warm load) is reused as it is,
    already mapped, instead of new pages being zeroed and mapped again (about 1 ms of a
    warm MiniLM load); the advice only changes how pages not mapped yet will be.
    """
    memory = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes >= 2 * _HUGE_PAGE and _madvise is not None:
        start = -(-memory.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (memory.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            _madvise(start, end - start, mmap.MADV_HUGEPAGE)  # advice: failure is harmless
    return memory


def _libc_madvise() -> Any:
    """libc's ``madvise`` where Linux offers huge pages to it; None elsewhere."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _libc_madvise()


class Checkpoint:
    """Open safetensors files as one mapping of names to lazily read tensors.

    On the CPU, tensors are read without safetensors' Python overhead per tensor (which
    was a tenth of loading a small model): views of a private memory map of each file, as
    safetensors makes them, or (``read_concatenated``) copied by plain reads. safetensors
    still opens and checks every file, and reads whatever these paths do not cover.
    """

    def __init__(
        self,
        handles: dict[str, Any],
        files: list[Path],
        device: torch.device,
        stack: ExitStack,
    ):
        self._handles = handles  # tensor name -> (handle, file)
        self.files = files
        self.device = device
        self._stack = stack  # closes the files opened for raw reads with the checkpoint
        self._raw: dict[Path, _RawFile] = {}
        # Files store tensors little-endian; other hosts leave everything to safetensors.
        self.on_cpu = device.type == "cpu"
        self._direct = self.on_cpu and sys.byteorder == "little"

    def keys(self) -> list[str]:
        return list(self._handles)

    def get(self, name: str) -> torch.Tensor:
        handle, file = self._handles[name]
        if self._direct:  # host_view's work, inline: this is asked for every tensor
            raw = self._raw_file(file)
            stored = raw.locate(name)
            tensor = raw.view(stored) if stored is not None else None
            if tensor is not None:
                return tensor
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r}: {e}") from None

    def host_view(self, name: str) -> torch.Tensor | None:
        """Tensor ``name`` as a CPU view of its file's memory map, whatever the target
        device (to be copied once, straight into its place there); None where the host
        or the stored dtype or alignment does not allow it."""
        if sys.byteorder != "little":
            return None
        raw = self._raw_file(self._handles[name][1])
        stored = raw.locate(name)
        return raw.view(stored) if stored is not None else None

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Entries ``[start, stop)`` of dimension ``dim`` of tensor ``name``: only their
        bytes are read from the file (a rank's shard of a tensor-parallel model). On the
        CPU, a view of the file's memory map where it allows one: the caller copies it
        once, into its place."""
        if self._direct:
            view = self.host_view(name)
            if view is not None:
                return view.narrow(dim, start, stop - start)
        handle, file = self._handles[name]
        try:
            found = handle.get_slice(name)
            index = (slice(None),) * dim + (slice(start, stop),)
            return found[index]
        except Exception as e:
            raise CheckpointError(
                f"{file}: cannot read entries {start}:{stop} of dimension {dim} of tensor "
                f"{name!r}: {e}"
            ) from None

    def stored_dtype(self, name: str) -> torch.dtype | None:
        """Tensor ``name``'s dtype in torch's terms (None for one torch has no plain
        dtype for), from its file's header."""
        return _STORED_DTYPES.get(self.entry(name).dtype)

    def entry(self, name: str) -> TensorEntry:
        """Tensor ``name``'s dtype and shape from its file's header (no data is read)."""
        handle, file = self._handles[name]
        if self._direct:  # the header safetensors has already checked, read as JSON
            stored = self._raw_file(file).header.get(name)
            if type(stored) is dict:
                dtype, shape = stored.get("dtype"), stored.get("shape")
                if type(dtype) is str and type(shape) is list:
                    return TensorEntry(name, file, dtype, tuple(shape))
        found = handle.get_slice(name)
        return TensorEntry(name, file, found.get_dtype(), tuple(found.get_shape()))

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape

    def dtype_of(self, name: str) -> str:
        return self.entry(name).dtype

    def metadata(self) -> dict[str, str]:
        meta: dict[str, str] = {}
        for handle, _ in self._handles.values():
            meta.update(handle.metadata() or {})
            break
        return meta

    def read_concatenated(
        self, groups: Sequence[Sequence[str]], dtype: torch.dtype | None = None
    ) -> list[torch.Tensor | None]:
        """Per group of names, its tensors concatenated on their first dimension (as
        ``KeyRule.join`` makes them): a view of the file where the parts lie back to back
        in order, otherwise read from the files straight into new CPU memory.

        Joining with torch copies with its intra-op threads, and on a busy machine waiting
        for those threads costs far more than the copy (50x for MiniLM's fused
        query/key/value matrices). All groups share one allocation (see ``_empty_bytes``).
        None for a group a plain read cannot make (another device, a cast to ``dtype``,
        parts that differ in dtype or trailing shape): join those instead.
        """
        layouts = [self._concatenation(names, dtype) for names in groups]
        in_place = [_mapped_whole(layout) if layout is not None else None for layout in layouts]
        starts, total = [], 0
        for layout, mapped in zip(layouts, in_place, strict=True):
            starts.append(total)
            if layout is not None and mapped is None:
                total += -(-layout.nbytes // _ALIGNMENT) * _ALIGNMENT
        memory = _empty_bytes(total)
        view = memoryview(memory.numpy())
        joined: list[torch.Tensor | None] = []
        for layout, mapped, start in zip(layouts, in_place, starts, strict=True):
            if layout is None or mapped is not None:
                joined.append(mapped)
                continue
            offset = start
            for raw, stored in layout.parts:
                raw.read_into(stored, view[offset:])
                offset += stored.nbytes
            tensor = memory[start : start + layout.nbytes].view(layout.dtype)
            joined.append(tensor.view(layout.shape))
        return joined

    def joins_in_place(self, names: Sequence[str], dtype: torch.dtype | None = None) -> bool:
        """Whether ``read_concatenated`` makes this group a view of its file (no copy)."""
        layout = self._concatenation(names, dtype)
        return layout is not None and _lies_in_order(layout)

    def loaded_bytes(self, dtype: torch.dtype | None = None) -> int:
        """The bytes all tensors take once loaded (floating ones cast to ``dtype``)."""
        total = 0
        for file in self.files:
            for name, entry in self._raw_file(file).header.items():
                if name == "__metadata__":
                    continue
                stored = _STORED_DTYPES.get(entry.get("dtype"))
                numel = math.prod(entry.get("shape") or ())
                if dtype is not None and (stored is None or stored.is_floating_point):
                    total += numel * dtype.itemsize
                else:
                    total += numel * (stored.itemsize if stored is not None else 4)
        return total

    def _concatenation(
        self, names: Sequence[str], dtype: torch.dtype | None
    ) -> _Concatenation | None:
        if not self._direct:
            return None
        parts = []
        for name in names:
            raw = self._raw_file(self._handles[name][1])
            stored = raw.locate(name)
            if stored is None or not stored.shape:
                return None
            parts.append((raw, stored))
        first = parts[0][1]
        if any(s.dtype != first.dtype or s.shape[1:] != first.shape[1:] for _, s in parts):
            return None
        if dtype is not None and first.dtype.is_floating_point and dtype != first.dtype:
            return None
        rows = sum(s.shape[0] for _, s in parts)
        return _Concatenation(
            parts, first.dtype, (rows, *first.shape[1:]), sum(s.nbytes for _, s in parts)
        )

    def _raw_file(self, file: Path) -> _RawFile:
        if file not in self._raw:
            handle = self._stack.enter_context(open(file, "rb", buffering=0))  # noqa: SIM115
            self._raw[file] = _RawFile(file, handle)
        return self._raw[file]


def _unknown_dtype(file: Path) -> str | None:
    """Which tensor of ``file`` has a dtype that safetensors does not define, if one does
    (safetensors itself only says the header is invalid)."""
    try:
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length)) if 0 < length <= _MAX_HEADER_BYTES else None
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    for name, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) and name != "__metadata__" else None
        if dtype is not None and (not isinstance(dtype, str) or dtype not in DTYPE_KINDS):
            return (
                f"tensor {name!r} has dtype {dtype!r}, which is not a safetensors dtype "
                f"(known: {', '.join(DTYPE_KINDS)})"
            )
    return None


def stored_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Each tensor's shape as the headers of a checkpoint's files give them, read as JSON
    without opening the files through safetensors (a tenth of the cost, for checks made
    before loading). None where a header cannot be read: loading then says what is wrong.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        for file in checkpoint_files(path):
            with open(file, "rb", buffering=0) as handle:
                parsed = _read_header(handle, os.fstat(handle.fileno()).st_size)
            if parsed.shapes is False:
                parsed.shapes = _shapes(parsed.header)
            if parsed.shapes is None:
                return None
            shapes.update(parsed.shapes)  # type: ignore[arg-type]
    except (OSError, ValueError, CheckpointError):
        return None
    return shapes


def _shapes(header: dict[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """Each tensor's shape in one file's header; None where one is not a shape."""
    shapes = {}
    for name, entry in header.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if name != "__metadata__" and isinstance(shape, list):
            if not all(isinstance(n, int) and n >= 0 for n in shape):
                return None
            shapes[name] = tuple(shape)
    return shapes


class _SafetensorsOnDemand:
    """safetensors' reader of a file whose header (the same bytes, the same file size) it
    has already opened and accepted: opened again only where a tensor is read through it
    (a dtype or device the direct path does not cover, a slice)."""

    def __init__(self, file: Path, device: str, stack: ExitStack):
        self._file = file
        self._device = device
        self._stack = stack
        self._handle: Any = None

    def _opened(self) -> Any:
        if self._handle is None:
            try:
                self._handle = self._stack.enter_context(
                    safe_open(str(self._file), framework="pt", device=self._device)
                )
            except Exception as e:
                raise CheckpointError(
                    f"{self._file}: not a readable safetensors file (truncated or corrupt?): "
                    f"{_unknown_dtype(self._file) or e}"
                ) from None
        return self._handle

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._opened().get_tensor(name)

    def get_slice(self, name: str) -> Any:
        return self._opened().get_slice(name)

    def metadata(self) -> dict[str, str] | None:
        return self._opened().metadata()


def _header_of(file: Path, stack: ExitStack) -> tuple[_Header, io.FileIO] | None:
    """The file's header and an open handle on it; None where it cannot be read (then
    safetensors, or the first read, says why)."""
    try:
        handle = stack.enter_context(open(file, "rb", buffering=0))  # noqa: SIM115
        return _read_header(handle, os.fstat(handle.fileno()).st_size), handle
    except (OSError, ValueError):
        return None


@contextmanager
def open_checkpoint(path: Path, device: torch.device | str = "cpu") -> Iterator[Checkpoint]:
    """Open every file of a checkpoint, reading tensors straight onto ``device``.

    safetensors opens and checks each file's header; one it has accepted before (the same
    header bytes, the same file size: a warm load) is not opened again unless a tensor
    must be read through it."""
    files = checkpoint_files(path)
    with ExitStack() as stack:
        handles: dict[str, Any] = {}
        raw: dict[Path, _RawFile] = {}
        for file in files:
            found = _header_of(file, stack)
            if found is not None and found[0].accepted is not None:
                handle: Any = _SafetensorsOnDemand(file, str(device), stack)
                names = list(found[0].accepted)
            else:
                try:
                    handle = stack.enter_context(
                        safe_open(str(file), framework="pt", device=str(device))
                    )
                    names = list(handle.keys())
                except Exception as e:
                    raise CheckpointError(
                        f"{file}: not a readable safetensors file (truncated or corrupt?): "
                        f"{_unknown_dtype(file) or e}"
                    ) from None
                if found is not None:
                    _remember_accepted(file, found[0], names, stack)
            if found is not None:
                raw[file] = _RawFile(file, found[1])
            for name in names:
                if name in handles:
                    raise CheckpointError(
                        f"{file}: tensor {name!r} also appears in {handles[name][1]}"
                    )
                handles[name] = (handle, file)
        checkpoint = Checkpoint(handles, files, torch.device(device), stack)
        checkpoint._raw.update(raw)
        yield checkpoint


def _remember_accepted(file: Path, before: _Header, names: list[str], stack: ExitStack) -> None:
    """Note that safetensors accepted ``file``'s header, where the file read the same just
    before and just after safetensors opened it, and the names agree with it."""
    after = _header_of(file, stack)
    if (
        after is not None
        and after[0] is before
        and set(names) == before.header.keys() - {"__metadata__"}
    ):
        before.accepted = names
