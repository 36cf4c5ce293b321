"""What every assembly shares: its config, tokenizer and load report travel with it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Assembly(nn.Module):
    """Base of registered model assemblies.

    ``config`` is the filled config the model was built from (set by ``build``/``load``),
    ``tokenizer`` the tokenizer its config names (or None), ``load_report`` what loading
    the weights found.
    """

    def __init__(self) -> None:
        super().__init__()
        self.config: Any = None
        self.tokenizer: Any = None
        self.load_report: Any = None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.parameters() if p.is_floating_point()).dtype
