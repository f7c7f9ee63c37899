"""Shared by the engine tests: checkpoints with perturbed weights and their exported graphs.

A freshly initialised detector has zero-initialised layers (``zero_module``: the last
convolution of every residual branch, the attention projections, the noise head, DACM's gamma),
so the noise prediction is exactly zero and many comparisons would pass trivially. Here every
parameter gets seeded N(0, std) noise on top of its initial value, so every layer contributes.

Artifacts are built once per test session, under pytest's session base temporary folder.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from edge.engine.export import export_checkpoint
from edge.model import DiffFastener, preset
from edge.model.checkpoint import save_checkpoint

WEIGHT_STD = 0.02


def _missing_for_tensorrt() -> list[str]:
    missing = [
        f"{module} (not installed)"
        for module in ("tensorrt", "pycuda")
        if importlib.util.find_spec(module) is None
    ]
    if shutil.which("nvidia-smi") is None:
        missing.append("an NVIDIA GPU (no nvidia-smi)")
    return missing


needs_tensorrt_gpu = pytest.mark.skipif(
    bool(_missing_for_tensorrt()),
    reason="needs TensorRT, pycuda and an NVIDIA GPU; missing here: "
    + ", ".join(_missing_for_tensorrt()),
)


def perturbed_model(preset_name: str, seed: int = 7, std: float = WEIGHT_STD) -> DiffFastener:
    """The preset's detector, initialised from seed 0, every parameter plus N(0, std)."""
    torch.manual_seed(0)
    model = DiffFastener(preset(preset_name)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * std)
    return model


@dataclass(frozen=True)
class Artifacts:
    checkpoint: Path
    onnx: Path
    model_id: str
    crop_shape: tuple[int, int, int]


def artifacts(
    tmp_path_factory, preset_name: str, seed: int = 7, std: float = WEIGHT_STD
) -> Artifacts:
    """Checkpoint and exported graph of :func:`perturbed_model`, made once per session."""
    root = tmp_path_factory.getbasetemp() / "engine-artifacts" / f"{preset_name}-{seed}-{std}"
    checkpoint, onnx_path = root / "model.pt", root / f"{preset_name}.onnx"
    model = None
    if not (root / "done").exists():
        root.mkdir(parents=True, exist_ok=True)
        model = perturbed_model(preset_name, seed, std)
        save_checkpoint(checkpoint, model)
        export_checkpoint(checkpoint, onnx_path)
        (root / "done").write_text("ok")
    config = preset(preset_name)
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return Artifacts(
        checkpoint=checkpoint,
        onnx=onnx_path,
        model_id=payload["model_id"],
        crop_shape=(config.in_channels, config.image_size, config.image_size),
    )


def random_crops(count: int, crop_shape: tuple[int, int, int], seed: int = 3) -> np.ndarray:
    """Seeded uniform crops, float32 ``(count, C, H, W)`` in ``[0, 255]``."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 255.0, (count, *crop_shape)).astype(np.float32)
