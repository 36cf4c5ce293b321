"""Building models on the meta device, and turning them into real tensors, once, on the
target device."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

# What modules' ``__init__``/``reset_parameters`` call to give parameters initial values:
# torch.nn.init's functions and the in-place tensor methods they come down to.
_INITIALISERS: frozenset[Callable[..., Any]] = frozenset(
    [
        *(
            getattr(nn.init, name)
            for name in (
                "uniform_",
                "normal_",
                "trunc_normal_",
                "constant_",
                "ones_",
                "zeros_",
                "eye_",
                "dirac_",
                "xavier_uniform_",
                "xavier_normal_",
                "kaiming_uniform_",
                "kaiming_normal_",
                "orthogonal_",
                "sparse_",
            )
        ),
        torch.Tensor.uniform_,
        torch.Tensor.normal_,
        torch.Tensor.fill_,
        torch.Tensor.zero_,
    ]
)


# The factory functions that take a ``device`` argument, and so create tensors on the
# default device when given none: what ``torch.device("meta")`` as a context manager
# redirects (its list, ``torch.utils._device._device_constructors``, is private; a test
# compares the two, so that a factory torch adds is noticed).
_FACTORIES: frozenset[Callable[..., Any]] = frozenset(
    [
        *(
            getattr(torch, name)
            for name in (
                "empty",
                "empty_permuted",
                "empty_strided",
                "empty_quantized",
                "ones",
                "arange",
                "bartlett_window",
                "blackman_window",
                "eye",
                "full",
                "hamming_window",
                "hann_window",
                "kaiser_window",
                "linspace",
                "logspace",
                "rand",
                "randn",
                "randint",
                "randperm",
                "range",
                "sparse_coo_tensor",
                "sparse_compressed_tensor",
                "sparse_csr_tensor",
                "sparse_csc_tensor",
                "sparse_bsr_tensor",
                "sparse_bsc_tensor",
                "tril_indices",
                "triu_indices",
                "zeros",
                "asarray",
                "tensor",
                "as_tensor",
                "scalar_tensor",
            )
            if hasattr(torch, name)
        ),
        torch.fft.fftfreq,
        torch.fft.rfftfreq,
        torch.nested.nested_tensor,
    ]
)

_META = torch.device("meta")


class _BuildOnMeta(TorchFunctionMode):
    """What ``torch.device("meta")`` does as a context manager (factories without a
    ``device`` create meta tensors), and initialising a meta tensor a no-op.

    Skipping is safe: a meta tensor holds no values, so an initialiser can only return it
    unchanged; but torch still runs the op's shape checks and, for some (``normal_``), a
    Python decomposition, which made up much of the time of building a model at every
    load. Models built on meta get their values from a checkpoint or ``materialise_random``.
    One mode, not ``torch.device``'s and a second one: every torch call made while a model
    is built (hundreds at each load) goes through Python once instead of twice. A public
    ``TorchFunctionMode``, pushed on top of the stack: an outer ``torch.device`` context
    stays below it and sees only calls whose device is already set.
    """

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _INITIALISERS:
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        elif func in _FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = _META
        return func(*args, **kwargs)


@contextmanager
def on_meta() -> Iterator[None]:
    """Build modules on the meta device (allocating nothing), without initialising them."""
    with _BuildOnMeta():
        yield


def parameter_slots(model: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """Each distinct parameter or persistent buffer, by its first name, with every place it
    lives in (tied weights live in several)."""
    by_id: dict[int, list[tuple[nn.Module, str, str]]] = defaultdict(list)
    for prefix, module in model.named_modules(remove_duplicate=False):
        tensors = module._parameters.items()
        if module._buffers:
            tensors = [*tensors, *_persistent_buffers(module)]
        for attr, tensor in tensors:
            if tensor is not None:
                name = f"{prefix}.{attr}" if prefix else attr
                by_id[id(tensor)].append((module, attr, name))
    slots: dict[str, list[tuple[nn.Module, str]]] = {}
    for places in by_id.values():
        first = places[0][2]
        slots[first] = list(dict.fromkeys((m, a) for m, a, _ in places))
    return slots


def _persistent_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor | None]]:
    skip = module._non_persistent_buffers_set
    return [(k, v) for k, v in module._buffers.items() if k not in skip]


def current(places: list[tuple[nn.Module, str]]) -> torch.Tensor:
    """The tensor now in the first of ``places``."""
    module, attr = places[0]
    tensor = module._parameters[attr] if attr in module._parameters else module._buffers[attr]
    assert tensor is not None
    return tensor


def assign(places: list[tuple[nn.Module, str]], tensor: torch.Tensor) -> None:
    """Put ``tensor`` in every place; parameters stay leaf ``nn.Parameter``s."""
    module, attr = places[0]
    if attr in module._parameters:
        old = module._parameters[attr]
        value: torch.Tensor = nn.Parameter(
            tensor, requires_grad=bool(old is not None and old.requires_grad)
        )
    else:
        value = tensor
    for module, attr in places:
        if attr in module._parameters:
            module._parameters[attr] = value  # type: ignore[assignment]
        else:
            module._buffers[attr] = value


def init_buffers(model: nn.Module, device: torch.device) -> None:
    """Compute non-persistent buffers (rotary tables, ALiBi slopes) on ``device``."""
    for module in model.modules():
        # Looked up on the class: a module without the hook would otherwise go through
        # nn.Module.__getattr__ and an AttributeError, once per module at every load.
        if callable(getattr(type(module), "init_buffers", None)):
            module.init_buffers(device)  # type: ignore[operator]


def meta_tensors(model: nn.Module) -> Iterator[str]:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            yield name


def initialise(module: nn.Module, names: list[str]) -> None:
    """Initial values for the parameters ``names`` of ``module`` (already allocated).

    The module's own ``reset_parameters`` decides where it covers them all; otherwise
    matrices get N(0, 0.02), biases zeros and 1-D scales ones.
    """
    reset = getattr(module, "reset_parameters", None)
    present = [n for n, p in module._parameters.items() if p is not None]
    if callable(reset) and set(present) <= set(names):
        reset()
        return
    for attr in names:
        p = module._parameters.get(attr)
        if p is None:
            continue
        with torch.no_grad():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
            elif attr == "bias":
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)


def materialise_random(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Give a meta model freshly initialised weights (for training from scratch)."""
    slots = parameter_slots(model)
    model.to_empty(device=device)
    for places in slots.values():  # to_empty gives each place its own tensor: tie again
        if len(places) > 1:
            assign(places, current(places))
    for module in model.modules():
        initialise(module, list(module._parameters))
    model.to(dtype=dtype)
    init_buffers(model, device)
    return model
