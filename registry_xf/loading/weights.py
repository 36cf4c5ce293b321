"""Weight sources: safetensors checkpoints, in our layout or in HF's through a converter.

Loading is strict and planned before it starts: every expected tensor is found, and the
dtype and shape its file's header gives are checked (each part of a fused matrix on its
own) first, so a bad checkpoint fails with one report and no half-loaded model. Then each
tensor is read once, straight onto the target device, and cast there.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..converters.base import HFConverter, KeyRule
from ..errors import LoadError
from ..parallel.shards import ShardedLayout
from ..registry import registry
from ..types import PathLike, dtype_name
from .checkpoint import FLOAT_DTYPES, Checkpoint, TensorEntry, open_checkpoint
from .layout import copy_to_fuse_automatically, separate_where_fusing_copies
from .materialise import assign, current, init_buffers, initialise, parameter_slots
from .sliced import read_shard

logger = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What loading found. Any ``missing``, ``unexpected``, ``mismatched`` or
    ``wrong_dtype`` key is an error; ``cast`` lists tensors stored in another floating
    dtype than the model's, converted on load."""

    files: list[Path] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    wrong_dtype: list[str] = field(default_factory=list)
    cast: list[str] = field(default_factory=list)
    # [hyper] values the loader changed: separate projections where fusing would copy
    layout: dict[str, Any] = field(default_factory=dict)
    # what the CPU packing step did (see ``layers.packed_linear.pack_for_cpu``)
    packing: str = "not run"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.wrong_dtype)

    def __str__(self) -> str:
        where = ", ".join(str(f) for f in self.files)
        lines = [f"load report for {where}: {len(self.loaded)} tensors loaded"]
        if self.layout:
            settings = ", ".join(f"hyper.{k} = {v!r}" for k, v in self.layout.items())
            lines.append(f"  layout: {settings} (views of the files; fusing would copy them)")
        if self.ok:  # a failed load never reaches the packing step
            lines.append(f"  packing for the CPU: {self.packing}")
        for title, items, hint in (
            ("missing (the model needs them, the checkpoint lacks them)", self.missing, ""),
            (
                "unexpected (in the checkpoint, not in the model)",
                self.unexpected,
                "allow them with allow_unexpected=[regex, ...] if they are deliberate",
            ),
            ("shape mismatch", self.mismatched, "the config does not describe this checkpoint"),
            (
                "wrong dtype (stored as something other than the model's weights can be)",
                self.wrong_dtype,
                "the file is damaged or not a checkpoint of this model",
            ),
            ("cast to the model's floating dtype (stored in another)", self.cast, ""),
            ("skipped (task heads and buffers the encoder does not use)", self.skipped, ""),
            ("initialised with fresh values (allowed missing)", self.initialised, ""),
        ):
            if items:
                lines.append(f"  {title}: {len(items)}")
                lines += [f"    {item}" for item in items[:20]]
                if len(items) > 20:
                    lines.append(f"    ... and {len(items) - 20} more")
                if hint:
                    lines.append(f"    ({hint})")
        return "\n".join(lines)


@dataclass
class SafetensorsWeights:
    """A safetensors checkpoint (file, directory or shard index) to load into a model."""

    path: Path
    converter: HFConverter | None = None
    allow_unexpected: Sequence[str] = ()
    allow_missing: Sequence[str] = ()

    def load_into(
        self,
        model: nn.Module,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        hyper: Mapping[str, Any] | None = None,
        copy_to_fuse: bool | None = True,
        sharding: ShardedLayout | None = None,
    ) -> LoadReport:
        """Fill ``model`` (built on meta) with the checkpoint's weights on ``device``.

        ``dtype`` None keeps the stored floating dtype; where the checkpoint mixes several,
        the model gets the one that most of its floating-point bytes are stored in, and the
        tensors stored otherwise are cast to it and listed in ``LoadReport.cast`` (so that a
        float16 tensor in a float32 checkpoint cannot break the first forward pass). A
        given ``dtype`` casts every floating tensor. ``hyper`` (the config's ``[hyper]``
        values) is what converters' reorderings need.

        Every tensor's dtype and shape are checked against the model before anything is
        read, each part of a fused matrix on its own (its rows against the config's split,
        its dtype against the others'); integer, boolean, complex and 8-bit float tensors in
        floating-point places are errors.
        ``copy_to_fuse`` False gives fused projections whose parts the files store apart
        separate ones instead (views of the files; see ``layout``); None decides by the
        model's size, as ``load`` asks. The report's ``layout`` names the ``[hyper]``
        values that changed.
        ``sharding`` (a tensor-parallel rank's) names the parameters this rank holds a part
        of: only that part is read from the files; parameters it holds none of are not
        read at all.
        """
        device = torch.device(device)
        allow_unexpected = [re.compile(p) for p in self.allow_unexpected]
        allow_missing = [re.compile(p) for p in self.allow_missing]
        with open_checkpoint(self.path, device) as ckpt:
            layout = self._choose_layout(model, ckpt, dtype, hyper, copy_to_fuse)
            slots = parameter_slots(model)
            report = LoadReport(files=ckpt.files, layout=layout)
            file_keys = ckpt.keys()
            stripped = (
                self.converter.strip_prefix(file_keys)
                if self.converter
                else {k: k for k in file_keys}
            )
            by_name = {v: k for k, v in stripped.items()}
            plan: list[tuple[str, KeyRule | None, list[str]]] = []
            floating: list[TensorEntry] = []
            used: set[str] = set()
            for ours in sharding.dropped if sharding is not None else ():
                _, names = self._names(ours, hyper)
                used.update(by_name[n] for n in names if n in by_name)
            for ours, places in slots.items():
                rule, names = self._names(ours, hyper)
                absent = [n for n in names if n not in by_name]
                if absent:
                    if not any(p.search(ours) for p in allow_missing):
                        report.missing.append(
                            ours if names == [ours] else f"{ours} (from {', '.join(absent)})"
                        )
                    continue
                files = [by_name[n] for n in names]
                used.update(files)
                entries = [ckpt.entry(f) for f in files]
                slot = current(places)
                shard = sharding.of(places) if sharding is not None else None
                expected = shard.full_shape if shard is not None else tuple(slot.shape)
                wrong = _dtype_problems(ours, slot.dtype, entries)
                mismatched = _shape_problems(
                    ours, rule, entries, expected, model, shard.split if shard else None
                )
                report.wrong_dtype += wrong
                report.mismatched += mismatched
                if wrong or mismatched:
                    continue
                plan.append((ours, rule, files))
                floating += [e for e in entries if e.kind == "float"]
            for key in file_keys:
                if key in used:
                    continue
                name = stripped[key]
                if self.converter is not None and self.converter.is_ignored(name):
                    report.skipped.append(key)
                elif any(p.search(key) or p.search(name) for p in allow_unexpected):
                    report.skipped.append(key)
                else:
                    report.unexpected.append(key)
            if not report.ok:
                raise LoadError(str(report))
            if dtype is None:
                dtype = _model_dtype(floating, report)
            fused = [
                (ours, files)
                for ours, rule, files in plan
                if _read_in_place(rule, files) and sharding is None
            ]
            read = ckpt.read_concatenated([files for _, files in fused], dtype)
            joined = {ours: tensor for (ours, _), tensor in zip(fused, read, strict=True)}
            # parts are copied to another device as they are joined; on the CPU, nothing moves
            onto = None if device.type == "cpu" else device
            for ours, rule, files in plan:
                tensor = joined.get(ours)
                shard = sharding.of(slots[ours]) if sharding is not None else None
                if shard is not None:
                    tensor = read_shard(ckpt, rule, files, shard, hyper, dtype)
                elif tensor is None:
                    parts = _parts_to_join(ckpt, files)
                    tensor = (rule or _IDENTITY).join(parts, dtype, hyper, onto)
                    if sharding is not None and _shares_memory(tensor, parts):
                        tensor = tensor.clone()  # replicated: a copy, not a view of a file
                assign(slots[ours], tensor.contiguous())
                report.loaded.append(ours)
        _materialise_allowed_missing(model, slots, report, device, dtype)
        init_buffers(model, device)
        if report.skipped:
            logger.info("skipped %d checkpoint tensors: %s", len(report.skipped), report.skipped)
        return report

    def _choose_layout(
        self,
        model: nn.Module,
        ckpt: Checkpoint,
        dtype: torch.dtype | None,
        hyper: Mapping[str, Any] | None,
        copy_to_fuse: bool | None,
    ) -> dict[str, Any]:
        if copy_to_fuse is None and self.converter is not None:
            copy_to_fuse = copy_to_fuse_automatically(ckpt.device, lambda: ckpt.loaded_bytes(dtype))
        if copy_to_fuse or self.converter is None:
            return {}
        stripped = self.converter.strip_prefix(ckpt.keys())
        by_name = {v: k for k, v in stripped.items()}

        def copies(ours: str) -> bool:
            rule, names = self._names(ours, hyper)
            files = [by_name[n] for n in names if n in by_name]
            if len(files) != len(names) or not _read_in_place(rule, files):
                return False
            return not ckpt.joins_in_place(files, dtype)

        return separate_where_fusing_copies(model, hyper, copies)

    def _names(
        self, ours: str, hyper: Mapping[str, Any] | None
    ) -> tuple[KeyRule | None, list[str]]:
        if self.converter is None:
            return None, [ours]
        found = self.converter.hf_names(ours, hyper)
        if found is None:
            return None, [f"<no rule in {self.converter.name} for {ours}>"]
        return found


_IDENTITY = KeyRule("", ("",))


def _parts_to_join(ckpt: Checkpoint, files: Sequence[str]) -> list[torch.Tensor]:
    """The stored parts of one of our tensors, as ``KeyRule.join`` copies them into it.

    Several parts bound for another device are CPU views of the files, so that each is
    copied once, straight into its slice on that device (not loaded there, then copied
    again into the joined tensor).
    """
    if len(files) > 1 and not ckpt.on_cpu:
        views = [ckpt.host_view(f) for f in files]
        if all(v is not None for v in views):
            return views  # type: ignore[return-value]
    return [ckpt.get(f) for f in files]


def _shares_memory(tensor: torch.Tensor, parts: Sequence[torch.Tensor]) -> bool:
    address = tensor.untyped_storage().data_ptr()
    return any(p.untyped_storage().data_ptr() == address for p in parts)


def _expected_kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "float"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "integer"


def _dtype_problems(ours: str, expected: torch.dtype, entries: list[TensorEntry]) -> list[str]:
    """Where a stored dtype cannot become the model's tensor (an integer in a weight's place
    would otherwise crash in torch, or be converted silently as a part of a fused matrix)."""
    kind = _expected_kind(expected)
    problems = []
    for e in entries:
        if e.kind == kind:
            continue
        wanted = f"a floating-point tensor ({', '.join(FLOAT_DTYPES)})" if kind == "float" else kind
        why = {
            "low-precision float": "a quantised format whose scales registry_xf does not read",
            "unknown": "a dtype registry_xf does not know",
        }.get(e.kind, e.kind)
        problems.append(
            f"{ours}: {e.name} in {e.file} is stored as {e.dtype} ({why}); "
            f"the model expects {wanted}"
        )
    return problems


def _shape_problems(
    ours: str,
    rule: KeyRule | None,
    entries: list[TensorEntry],
    expected: tuple[int, ...],
    model: nn.Module,
    split: tuple[int, ...] | None = None,
) -> list[str]:
    """Where the stored shapes do not make the model's tensor. The parts of a fused matrix
    are checked one by one, against the rows the config gives each (the owning module's
    ``split``, as export writes them), so that parts cannot trade rows or broadcast."""
    if len(entries) == 1 or rule is None:
        found = _joined_shape(rule, [entries[0].shape])
        if found == expected:
            return []
        names = ", ".join(e.name for e in entries)
        where = f" (from {names})" if names != ours else ""
        return [f"{ours}: model expects {list(expected)}, checkpoint has {list(found)}{where}"]
    joined = tuple(reversed(expected)) if rule.transpose else expected
    sizes = _part_sizes(model, ours, len(entries), joined, rule.dim, split)
    if sizes is None:  # the config gives no split: parts agree, and sum to the model's rows
        shapes = [e.shape for e in entries]
        d = rule.dim
        if (
            d < len(joined)
            and all(
                len(s) == len(joined) and s[:d] + s[d + 1 :] == joined[:d] + joined[d + 1 :]
                for s in shapes
            )
            and sum(s[d] for s in shapes) == joined[d]
        ):
            return []
        found = " + ".join(str(list(s)) for s in shapes)
        names = ", ".join(e.name for e in entries)
        return [f"{ours}: model expects {list(expected)}, checkpoint has {found} (from {names})"]
    problems = []
    for e, size in zip(entries, sizes, strict=True):
        part = joined[: rule.dim] + (size,) + joined[rule.dim + 1 :]
        if e.shape != part:
            problems.append(
                f"{ours}: part {e.name} in {e.file} has shape {list(e.shape)}, expected "
                f"{list(part)} (the model's {list(expected)} is made of parts of "
                f"{list(sizes)} on dimension {rule.dim})"
            )
    return problems


def _part_sizes(
    model: nn.Module,
    ours: str,
    n: int,
    joined: tuple[int, ...],
    dim: int,
    split: tuple[int, ...] | None = None,
) -> tuple[int, ...] | None:
    """The size on ``dim`` of each of the ``n`` parts of our fused tensor: ``split``, else
    its module's (query/key/value or gate/up widths), else equal parts; None if neither
    fits. A sharded module's own ``split`` is its part's: its shard gives the whole's."""
    if dim >= len(joined):
        return None
    if split is None:
        try:
            owner = model.get_submodule(ours.rsplit(".", 2)[0]) if ours.count(".") >= 2 else model
        except AttributeError:
            owner = model
        split = getattr(owner, "split", None)
    if (
        isinstance(split, (tuple, list))
        and len(split) == n
        and all(isinstance(s, int) for s in split)
        and sum(split) == joined[dim]
    ):
        return tuple(split)
    if joined[dim] % n == 0:
        return (joined[dim] // n,) * n
    return None


def _model_dtype(floating: list[TensorEntry], report: LoadReport) -> torch.dtype | None:
    """The one floating dtype of a model loaded "as stored": the dtype most of the
    checkpoint's floating-point bytes have (the wider on a tie). Tensors stored in another
    are listed in ``report.cast`` and logged."""
    if not floating:
        return None
    total: Counter[str] = Counter()
    for e in floating:
        total[e.dtype] += e.nbytes
    chosen = max(total, key=lambda d: (total[d], FLOAT_DTYPES[d].itemsize, d))
    dtype = FLOAT_DTYPES[chosen]
    report.cast += [
        f"{e.name} in {e.file}: {e.dtype} -> {dtype_name(dtype)}"
        for e in floating
        if e.dtype != chosen
    ]
    if report.cast:
        logger.warning(
            "the checkpoint mixes floating dtypes; %d tensor(s) cast to %s, the dtype of "
            "most of its bytes: %s",
            len(report.cast),
            dtype_name(dtype),
            ", ".join(report.cast[:5]) + (" ..." if len(report.cast) > 5 else ""),
        )
    return dtype


def _read_in_place(rule: KeyRule | None, files: list[str]) -> bool:
    """Whether our tensor is HF tensors concatenated on the first dimension as they are,
    which the checkpoint reads straight into place (the rest is joined with torch)."""
    return (
        rule is not None
        and len(files) > 1
        and rule.dim == 0
        and rule.to_ours is None
        and not rule.transpose
    )


def _joined_shape(rule: KeyRule | None, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    if rule is None or len(shapes) == 1:
        shape = shapes[0]
    else:
        shape = list(shapes[0])
        shape[rule.dim] = sum(s[rule.dim] for s in shapes)
        shape = tuple(shape)
    if rule is not None and rule.transpose:
        shape = tuple(reversed(shape))
    return tuple(shape)


def _materialise_allowed_missing(
    model: nn.Module,
    slots: dict[str, list[tuple[nn.Module, str]]],
    report: LoadReport,
    device: torch.device,
    dtype: torch.dtype | None,
) -> None:
    """Parameters the caller allowed to be missing get fresh initial values."""
    loaded = set(report.loaded)
    missing: dict[nn.Module, list[str]] = {}
    for name, places in slots.items():
        if name in loaded:
            continue
        old = current(places)
        assign(places, torch.empty(old.shape, device=device, dtype=dtype or torch.float32))
        missing.setdefault(places[0][0], []).append(places[0][1])
        report.initialised.append(name)
    for module, names in missing.items():
        initialise(module, names)
    if report.initialised:
        logger.warning("initialised (allowed missing): %s", ", ".join(report.initialised))


@registry.loaders.register("registry_xf.Safetensors.v1")
def safetensors_weights(
    path: PathLike,
    converter: HFConverter | None = None,
    allow_unexpected: list[str] = [],  # noqa: B006 - configs give lists
    allow_missing: list[str] = [],  # noqa: B006
) -> SafetensorsWeights:
    """Weights from safetensors: a file, a directory, or a sharded index.

    Without ``converter`` the names are ours (as written by ``registry_xf.save``); with one,
    they are HF's. ``allow_unexpected``/``allow_missing`` are regular expressions of names
    that may be absent from either side without an error.
    """
    return SafetensorsWeights(path, converter, tuple(allow_unexpected), tuple(allow_missing))
