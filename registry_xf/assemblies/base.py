"""What every assembly shares: the record of what it was built from travels with it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..types import MAX_PARAMETERS

if TYPE_CHECKING:  # annotations only: these live on floors above the assemblies
    from confection import Config

    from ..loading.sources import Origin
    from ..loading.weights import LoadReport
    from ..pipelines.poolers import Pooler
    from ..tokenizers.hf_tokenizer import HFTokenizer


@dataclass(frozen=True)
class ModelRecord:
    """What a model carries beside its modules, set once where it is built or loaded.

    ``config`` is the config the model was built from (not interpolated); ``tokenizer``
    and ``pooler`` are what its config names (or None); ``load_report`` is what loading
    the weights found (None for a model built without weights); ``converter`` names the
    HF converter a saved model was exported with; ``origin`` says where it came from;
    ``parallel`` holds the ranks a tensor-parallel model is sharded over (None: whole).
    """

    config: Config | None = None
    tokenizer: HFTokenizer | Any | None = None
    pooler: Pooler | None = None
    load_report: LoadReport | None = None
    converter: str | None = None
    origin: Origin | None = None
    parallel: Any = None


class Assembly(nn.Module):
    """Base of registered model assemblies.

    ``record`` holds what the model was built from and what comes with it; ``config``,
    ``tokenizer``, ``pooler`` and ``load_report`` read it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.record = ModelRecord()

    @property
    def config(self) -> Config | None:
        return self.record.config

    @property
    def tokenizer(self) -> HFTokenizer | Any | None:
        return self.record.tokenizer

    @property
    def pooler(self) -> Pooler | None:
        return self.record.pooler

    @property
    def load_report(self) -> LoadReport | None:
        return self.record.load_report

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.parameters() if p.is_floating_point()).dtype


def within_size_bound(model: nn.Module) -> nn.Module:
    """``model``, unless it has more parameters than any real model (``MAX_PARAMETERS``).

    Counted where models are built, on the meta device: it costs nothing there, and a
    config with sizes that are each plausible but together absurd is refused before a
    single byte of weights is allocated.
    """
    # Without torch's function dispatch: the build's device mode would otherwise route
    # each ``numel`` through Python (a tenth of building a small model).
    with torch._C.DisableTorchFunction():
        count = sum(p.numel() for p in model.parameters())
    if count > MAX_PARAMETERS:
        raise ValueError(
            f"the model would have {count:,} parameters, more than the {MAX_PARAMETERS:,} "
            "registry_xf builds; check its sizes (layers, widths, vocabulary)"
        )
    return model
