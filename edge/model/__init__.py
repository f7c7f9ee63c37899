"""Diff-Fastener networks and presets. Nothing here knows about processes, sockets or files."""

from edge.model.config import PRESETS, ModelConfig, preset
from edge.model.detector import DiffFastener

__all__ = ["PRESETS", "DiffFastener", "ModelConfig", "preset"]
