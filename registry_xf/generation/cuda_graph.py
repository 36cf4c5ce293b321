"""Decoding steps recorded once in a CUDA graph and replayed for every token after.

One decoding step of a small model is hundreds of short kernels, and at batch 1 the GPU
waits on the host to launch each: the step is bound by launches, not by reading the
weights. A CUDA graph records the launches of one step and replays them all at once.
A graph replays the same kernels on the same memory, so the step it records must have
the same shapes every time and read nothing back to the host: the new token and the
slot it is written to sit in buffers the graph reads, the attention mask covers the
whole KV cache (see ``cache_position`` in :meth:`~registry_xf.assemblies.decoder.Decoder.forward`),
and the cache is written in place.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..errors import RegistryXFError
from ..layers.kv_cache import KVCache
from ..layers.positions import RotaryEmbeddings

# A recorded step's cache holds a whole number of these slots, so that calls of other
# lengths reuse it; attention reads the few extra slots, masked.
SLOTS_PER_BLOCK = 128
# The recorded steps a generator keeps (with their caches) for calls of the same shape.
KEPT_STEPS = 4

# Runs before recording: lazy set-up (library handles, workspaces, a compiled graph's
# first call) must happen outside the graph. Each run writes the same keys and values to
# the same slot, so running the step again changes nothing.
WARMUP_RUNS = 2


# A decoding step of fixed shape: (new tokens (batch, 1), the mask over the whole cache,
# the cache, the slot of the new tokens (1,)) -> the next logits (batch, vocab).
Step = Callable[[torch.Tensor, torch.Tensor, KVCache, torch.Tensor], torch.Tensor]


def causal_step(forward: Callable[..., Any]) -> Step:
    """The fixed-shape step of a causal LM's ``forward`` (the model, or its compiled form)."""

    def step(
        tokens: torch.Tensor, mask: torch.Tensor, cache: KVCache, position: torch.Tensor
    ) -> torch.Tensor:
        out = forward(tokens, mask, cache=cache, last_only=True, cache_position=position)
        return out.logits[:, -1]

    return step


class DecodingGraph:
    """One decoding ``step`` for a batch whose ``mask`` (batch, the cache's max_length) the
    generator updates in place.

    Call it with each step's new tokens (batch,) and the slot they go to; it returns the
    next logits (batch, vocab). On a CUDA device the first call records the step and every
    call replays it; the logits are then the graph's own output buffer, overwritten by the
    next call. Elsewhere (``record=False``) the same fixed-shape step runs as it is: the
    same numbers, without the gain.
    """

    def __init__(self, step: Step, cache: KVCache, mask: torch.Tensor, *, record: bool):
        if record and mask.device.type != "cuda":
            raise RegistryXFError(f"a CUDA graph needs a CUDA device; the step is on {mask.device}")
        self.step = step
        self.cache = cache
        self.mask = mask
        self.record = record
        self.token = torch.zeros((mask.shape[0], 1), dtype=torch.long, device=mask.device)
        self.position = torch.zeros(1, dtype=torch.long, device=mask.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def __call__(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        self.token.copy_(tokens[:, None])
        self.position.fill_(position)
        if not self.record:
            return self.run()
        if self.graph is None:
            self.logits = self.capture()
        assert self.graph is not None and self.logits is not None
        self.graph.replay()
        return self.logits

    def run(self) -> torch.Tensor:
        """The step itself, from the buffers: the logits of the new tokens."""
        with torch.inference_mode():
            return self.step(self.token, self.mask, self.cache, self.position)

    def capture(self) -> torch.Tensor:
        """Warm up on a side stream, then record the step; its output buffer is returned."""
        with torch.cuda.device(self.mask.device):  # the model's GPU, not the current one
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    self.run()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (other calls) may use the GPU meanwhile; only
            # this thread must not do what a recording forbids
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                logits = self.run()
        return logits


class RecordedSteps:
    """A generator's decoding steps for its latest batch shapes, each with its KV cache
    and attention mask, so that a call of a shape seen before records nothing.

    A step is kept per (batch size, cache length rounded up to whole blocks of
    ``SLOTS_PER_BLOCK`` slots, at most the model's positions); the ``KEPT_STEPS`` used
    last are kept, their caches with them. A call borrows its step for as long as it
    runs: calls that overlap (two streams read in turn, or threads) never share one.
    """

    def __init__(self, model: Any, forward: Callable[..., Any]):
        self.model = model
        self.forward = forward
        self.steps: OrderedDict[tuple, DecodingGraph] = OrderedDict()
        self.busy: set[int] = set()  # ids of the steps lent out
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def borrow(self, batch: int, length: int) -> Iterator[DecodingGraph]:
        """A step for ``batch`` sequences of up to ``length`` tokens, its cache emptied and
        its mask zeroed, for the duration of one call. If the kept step of that shape is
        lent out, the call gets one of its own, not kept."""
        device = self.model.device
        slots = -(-length // SLOTS_PER_BLOCK) * SLOTS_PER_BLOCK
        limit = getattr(self.model, "max_positions", None)
        if limit is not None:
            slots = max(min(slots, limit), length)
        key = (batch, slots, device)
        with self.lock:
            step = self.steps.get(key)
            if step is None or id(step) in self.busy:
                step = self._new(batch, slots, device)
                if key not in self.steps:
                    self.steps[key] = step
            else:
                step.cache.reset()
                step.mask.zero_()
            self.steps.move_to_end(key)
            while len(self.steps) > KEPT_STEPS:
                self.steps.popitem(last=False)
            self.busy.add(id(step))
        try:
            yield step
        finally:
            with self.lock:
                self.busy.discard(id(step))

    def _new(self, batch: int, slots: int, device: torch.device) -> DecodingGraph:
        cache = self.model.new_cache(batch, slots)
        mask = torch.zeros((batch, slots), dtype=torch.long, device=device)
        record = device.type == "cuda"
        return DecodingGraph(causal_step(self.forward), cache, mask, record=record)


def check_recordable(model: torch.nn.Module) -> None:
    """Refuse, before any work, a model whose decoding step cannot have a fixed shape."""
    for name, module in model.named_modules():
        if isinstance(module, RotaryEmbeddings) and module.scaling is not None:
            if module.scaling["type"] == "dynamic":
                raise RegistryXFError(
                    f"cuda_graphs=True: {name} uses dynamic RoPE scaling, whose frequencies "
                    "follow the longest position of each step; a recorded step needs fixed "
                    "ones"
                )


def start_copy_to_host(*tensors: torch.Tensor) -> Callable[[], tuple[torch.Tensor, ...]]:
    """Start copying ``tensors`` to the host; the function returned waits for these
    copies alone, not for the work given to the device after them, and returns them.
    Tensors already on the host are returned as they are."""
    if not tensors or tensors[0].device.type != "cuda":
        return lambda: tensors
    copies = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors)
    for copy, tensor in zip(copies, tensors, strict=True):
        copy.copy_(tensor, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(tensors[0].device))

    def wait() -> tuple[torch.Tensor, ...]:
        copied.synchronize()
        return copies

    return wait


def launch_then_read(
    graph: DecodingGraph,
    tokens: torch.Tensor,
    active: torch.Tensor,
    finished: torch.Tensor,
    position: int,
    launch: bool,
) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Launch the next step (if ``launch``) before reading this one's results back, so
    that the device computes it while the host hands them out: (the next logits, or
    None; ``tokens``, ``active`` and ``finished`` on the host). If every sequence turns
    out to be done, the launched step's result is simply dropped."""
    results = start_copy_to_host(tokens, active, finished)
    logits = graph(tokens, position) if launch else None
    tokens, active, finished = results()
    return logits, (tokens, active, finished)
