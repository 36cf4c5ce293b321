"""Assemblies: whole models made of registered layers."""

from .base import Assembly
from .encoder import Encoder
from .outputs import ModelOutput

__all__ = ["Assembly", "Encoder", "ModelOutput"]
