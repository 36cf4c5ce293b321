"""Corpus embedding on Ray Data: one model per actor, token-budget batches inside each batch.

``embed_dataset(ds, source)`` adds an embedding column to a ``ray.data.Dataset``. Ray
spreads the rows over a pool of actors; each loads the model once and hands every batch it
receives to an ``Embedder``, which sorts it by length and cuts it into batches of about
``batch_tokens`` padded tokens, so a batch of 256 rows is not padded to its longest text.
Ray schedules, retries and streams; nothing here does its work over again.

Ray is optional (``pip install registry-xf[ray]``) and imported only when these functions
run: the rest of registry_xf works without it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError, MissingExtraError, RegistryXFError
from ..loading.sources import DEFAULT_MODEL
from .quantization import check_precision

if TYPE_CHECKING:
    import ray.data

RAY_EXTRA = "registry-xf[ray]"
LOOPBACK = "127.0.0.1"

logger = logging.getLogger(__name__)


def import_ray() -> ModuleType:
    """The ``ray`` module with Ray Data, or a MissingExtraError naming the extra."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is the part we use; ray[data] installs it)
    except ImportError as e:
        raise MissingExtraError(
            f"corpus embedding on Ray Data needs Ray Data, which is not installed ({e}): "
            f"pip install '{RAY_EXTRA}'"
        ) from None
    return ray


class RayEmbedder:
    """A callable class for ``Dataset.map_batches``: embeds ``column`` of each batch.

    Ray Data builds one per actor, so the model is loaded once per actor, in ``__init__``,
    from ``source`` (anything ``registry_xf.load`` takes; on a cluster, a path must exist on
    every node, or use a Hub id or an installed model package). Batches come as dicts of
    NumPy arrays and go back with ``output_column`` added: an (n, width) array, float32
    unless ``precision`` says otherwise. ``threads`` sets torch's CPU threads: an actor
    reserves that many of Ray's CPUs, and torch would otherwise start one thread per core
    of the machine in every actor, so that actors sharing a machine slow each other down.

    int8/uint8 ``precision`` needs ``ranges`` (from ``quantization_ranges`` of a
    calibration sample): each batch would otherwise be quantised over its own range, and
    the bytes of two batches would not compare.
    """

    def __init__(
        self,
        source: str | Path = DEFAULT_MODEL,
        *,
        column: str = "text",
        output_column: str = "embedding",
        id_column: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        revision: str | None = None,
        prompt: str | None = None,
        prompt_name: str | None = None,
        truncate_dim: int | None = None,
        precision: str = "float32",
        ranges: np.ndarray | None = None,
        normalize: bool | None = None,
        batch_tokens: int = 2048,
        max_batch_size: int = 256,
        threads: int | None = None,
    ):
        import torch

        from ..loading.load import load
        from .embedder import Embedder

        check_embedding_settings(column, output_column, precision, ranges)
        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        model = load(source, device=device, dtype=dtype, revision=revision, head=False)
        self.embedder = Embedder(
            model,
            normalize=normalize,
            truncate_dim=truncate_dim,
            batch_tokens=batch_tokens,
            max_batch_size=max_batch_size,
        )
        self.prompt = self.embedder.resolve_prompt(prompt, prompt_name)  # checked here, once
        self.column = column
        self.output_column = output_column
        self.id_column = id_column
        self.precision = precision
        self.ranges = ranges

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = self._texts(batch)
        vectors = self.embedder.embed(
            texts, prompt=self.prompt, precision=self.precision, ranges=self.ranges
        )
        return {**batch, self.output_column: vectors}

    def _texts(self, batch: Mapping[str, np.ndarray]) -> list[str]:
        """The batch's texts; a missing column, a clash or a value that is not a text is
        an InputError that names the column and the row."""
        if self.column not in batch:
            raise InputError(
                f"column={self.column!r}: the dataset has no such column; it has "
                + ", ".join(repr(name) for name in batch)
            )
        if self.output_column in batch:
            raise InputError(
                f"output_column={self.output_column!r}: the dataset already has a column of "
                "that name; choose another output_column"
            )
        texts = batch[self.column]
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(
                    f"column {self.column!r}, {self._row(batch, i)}: expected a text (str), "
                    f"found {type(text).__name__} {_short_repr(text)}"
                )
        return [str(text) for text in texts]  # np.str_ to str

    def _row(self, batch: Mapping[str, np.ndarray], i: int) -> str:
        if self.id_column is not None and self.id_column in batch:
            value = batch[self.id_column][i]
            value = value.item() if isinstance(value, np.generic) else value  # np.int64(3): 3
            return f"row {self.id_column}={_short_repr(value)}"
        return f"row {i} of a batch of {len(batch[self.column])}"


def check_embedding_settings(
    column: str, output_column: str, precision: str, ranges: np.ndarray | None
) -> None:
    """Settings that would fail in every actor, refused before any starts."""
    if not isinstance(column, str) or not isinstance(output_column, str):
        raise InputError(
            f"column={column!r}, output_column={output_column!r}: expected column names (str)"
        )
    if column == output_column:
        raise InputError(f"output_column={output_column!r} is the text column: choose another name")
    check_precision(precision)
    if precision in ("int8", "uint8") and ranges is None:
        raise InputError(
            f"precision={precision!r} over a dataset needs ranges=: each batch would "
            "otherwise be quantised over its own range; compute them once with "
            "registry_xf.pipelines.quantization.quantization_ranges(sample_embeddings)"
        )


def embed_dataset(
    ds: ray.data.Dataset,
    source: str | Path = DEFAULT_MODEL,
    *,
    column: str = "text",
    output_column: str = "embedding",
    concurrency: int | tuple[int, int] | None = None,
    batch_size: int = 256,
    device: str | None = None,
    dtype: str | None = None,
    num_gpus: float | None = None,
    num_cpus: float | None = None,
    actor_start_timeout_s: int = 600,
    **settings: Any,
) -> ray.data.Dataset:
    """A new Dataset: ``ds`` with ``output_column``, the embedding of ``column``, in order.

    Placement: with GPUs in the cluster (and ``device`` not "cpu"), each actor takes
    ``num_gpus`` (default 1) and runs on "cuda"; ``concurrency`` defaults to the number of
    GPUs over ``num_gpus``. Otherwise actors run on CPU, each with ``num_cpus`` (default 1)
    of Ray's CPUs and as many torch threads, and ``concurrency`` defaults to the cluster's
    CPUs over ``num_cpus``. ``concurrency`` may be a (min, max) pair for an autoscaling pool.
    ``batch_size`` rows go to an actor at a time; inside it the ``Embedder`` batches by
    tokens (``batch_tokens``).

    ``settings`` go to ``RayEmbedder``: ``prompt``, ``prompt_name``, ``truncate_dim``,
    ``precision``, ``ranges``, ``normalize``, ``batch_tokens``, ``max_batch_size``,
    ``revision``, ``id_column`` (named in errors). The output keeps the input's order (the
    new Dataset's own context preserves order; ``ds`` is not changed). A row that is not a
    text fails the job with an InputError naming the column and the row (Ray raises it as a
    subclass of both its RayTaskError and InputError). Actors that cannot start within
    ``actor_start_timeout_s`` (a request for GPUs the cluster lacks, say) fail the job
    instead of waiting for ever. Ray is started (``ray.init()``) if it is not.
    """
    ray = import_ray()
    unknown = sorted(set(settings) - _EMBEDDER_SETTINGS)
    if unknown:
        raise InputError(
            f"embed_dataset() got unknown settings {', '.join(unknown)}; expected some of "
            + ", ".join(sorted(_EMBEDDER_SETTINGS))
        )
    check_embedding_settings(
        column, output_column, settings.get("precision", "float32"), settings.get("ranges")
    )
    _check_positive("batch_size", batch_size)
    _check_positive("actor_start_timeout_s", actor_start_timeout_s)
    if not ray.is_initialized():
        ray.init()
    resources = ray.cluster_resources()
    placement = actor_placement(
        resources, device=device, num_gpus=num_gpus, num_cpus=num_cpus, concurrency=concurrency
    )
    if placement.num_gpus and not resources.get("GPU"):
        logger.warning(
            "the actors ask for GPUs and the Ray cluster has none now: they wait for some "
            "(an autoscaling cluster) for up to %s s",
            actor_start_timeout_s,
        )
    logger.info(
        "embedding %r on %s actor(s) (%s), %s CPU and %s GPU each",
        column,
        placement.concurrency,
        placement.device or "cpu",
        placement.num_cpus,
        placement.num_gpus,
    )
    size = placement.concurrency
    compute = (
        ray.data.ActorPoolStrategy(min_size=size[0], max_size=size[1])
        if isinstance(size, tuple)
        else ray.data.ActorPoolStrategy(size=size)
    )
    kwargs = dict(
        settings,
        source=str(source),
        column=column,
        output_column=output_column,
        device=placement.device,
        dtype=dtype,
        threads=placement.threads,
    )
    mapped = ds.map_batches(
        RayEmbedder,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        batch_format="numpy",
        compute=compute,
        num_cpus=placement.num_cpus,
        num_gpus=placement.num_gpus or None,
    )
    # A context of its own: ``ds`` and the Datasets made from it share theirs.
    out = ray.data.Dataset.copy(mapped, _deep_copy=True)
    context = out.context
    context.execution_options.preserve_order = True
    context.wait_for_min_actors_s = int(actor_start_timeout_s)
    # The actor's own error (an InputError naming the row), not Ray Data's UserCodeException
    # that keeps only its text: ``except InputError`` works on the driver.
    context.raise_original_map_exception = True
    return out


_EMBEDDER_SETTINGS = frozenset(
    {
        "prompt",
        "prompt_name",
        "truncate_dim",
        "precision",
        "ranges",
        "normalize",
        "batch_tokens",
        "max_batch_size",
        "revision",
        "id_column",
    }
)


@dataclass(frozen=True)
class Placement:
    """Where the actors run and what each reserves."""

    device: str | None  # None: the CPU
    num_cpus: float
    num_gpus: float
    concurrency: int | tuple[int, int]  # a pool of this size, or (min, max)
    threads: int  # torch's CPU threads in each actor


def actor_placement(
    resources: Mapping[str, float],
    *,
    device: str | None = None,
    num_gpus: float | None = None,
    num_cpus: float | None = None,
    concurrency: int | tuple[int, int] | None = None,
) -> Placement:
    """Device, resources per actor and pool size for a cluster's ``resources``
    (``ray.cluster_resources()``): GPU actors where GPUs exist, else one CPU actor per
    ``num_cpus`` CPUs."""
    gpus = float(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 0))
    for name, value, least in (("num_gpus", num_gpus, 0), ("num_cpus", num_cpus, 1e-9)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or value < least
        ):
            raise InputError(f"{name}={value!r}: expected a number {'>=' if least == 0 else '>'} 0")
    if device is not None:
        on_gpu = str(device).startswith("cuda")
    elif num_gpus is not None:
        on_gpu = num_gpus > 0
    else:
        on_gpu = gpus > 0
    if on_gpu and num_gpus == 0:
        raise InputError(f"num_gpus=0 with device={device!r}: a GPU actor needs num_gpus > 0")
    if not on_gpu and num_gpus:
        raise InputError(f"num_gpus={num_gpus} with device={device!r}: GPU actors run on cuda")
    per_gpu = (1.0 if num_gpus is None else float(num_gpus)) if on_gpu else 0.0
    per_cpu = 1.0 if num_cpus is None else float(num_cpus)
    if concurrency is None:
        if on_gpu:
            concurrency = max(1, int(gpus // per_gpu)) if gpus else 1
        else:
            concurrency = max(1, int(cpus // per_cpu)) if cpus else 1
    else:
        concurrency = _check_concurrency(concurrency)
    # an actor on a GPU still tokenizes on its CPU; on CPU its threads are its reservation
    threads = max(1, int(per_cpu))
    return Placement(
        device=("cuda" if device is None else str(device)) if on_gpu else device,
        num_cpus=per_cpu,
        num_gpus=per_gpu,
        concurrency=concurrency,
        threads=threads,
    )


def _check_concurrency(concurrency: Any) -> int | tuple[int, int]:
    if isinstance(concurrency, tuple) and len(concurrency) == 2:
        low, high = concurrency
        if all(_is_count(n) for n in concurrency) and low <= high:
            return int(low), int(high)
    elif _is_count(concurrency):
        return int(concurrency)
    raise InputError(
        f"concurrency={concurrency!r}: expected a number of actors >= 1, or a (min, max) pair"
    )


def _is_count(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name}={value!r}: expected an integer >= 1")


def start_local_ray(num_cpus: int | None = None, **init_options: Any) -> None:
    """Start a Ray instance for this machine alone: reachable on 127.0.0.1 only, without
    the dashboard.

    Ray's own ``ray.init()`` listens on every interface and swaps 127.0.0.1 for the
    machine's network address; a one-machine job needs neither. ``init_options`` go to
    ``ray.init`` (``num_gpus``, ``object_store_memory``...).
    """
    ray = import_ray()
    constants = ray._private.ray_constants
    saved = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    # With this off, Ray keeps 127.0.0.1 as the node's address instead of looking up the
    # machine's; its servers then listen on the loopback interface alone.
    constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address=LOOPBACK,
            **init_options,
        )
    finally:
        if saved is not None:
            constants.ENABLE_RAY_CLUSTER = saved


def registry_error(error: BaseException) -> RegistryXFError | None:
    """The registry_xf error at the root of an error that Ray raised (a failed task wraps
    the actor's exception, which Ray Data may wrap again), or None."""
    found: RegistryXFError | None = None
    current: BaseException | None = error
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, RegistryXFError):
            found = current  # the innermost is the actor's own, with its plain message
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    return found


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
