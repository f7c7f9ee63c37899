"""PyTorch backend: the reference and the fallback. Runs a checkpoint on the CPU or a CUDA GPU.

FP16 is autocast mixed precision (``torch.autocast``): convolutions and matrix products run in
FP16, while GroupNorm (``GroupNorm32``), the attention softmax and the diffusion maths stay in
FP32 (the model casts them, and autocast keeps normalisation in FP32). That is the split the
TensorRT build asks for. Casting the whole module with ``.half()`` does not work: the time
embedding is computed in FP32 by design (``edge.model.layers.timestep_embedding``).

Known limit: FP16 on the CPU is correct but slow (about 40x slower than FP32 for the ``edge``
preset on an AVX2 CPU); it exists for tests, not for use.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from edge.engine.backends.base import Backend, BackendUnavailableError
from edge.logs import get_logger
from edge.model.checkpoint import load_checkpoint

log = get_logger(__name__)


def parse_device(device: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> a device that exists here.

    Raises:
        BackendUnavailableError: a CUDA device was asked for and this torch has none.
    """
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise BackendUnavailableError(f"torch: not a device: {device!r} ({error})") from error
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"torch: {device} requested, but torch {torch.__version__} sees no CUDA device "
                "(CPU-only build, no NVIDIA driver, or no GPU visible to this process)"
            )
        index = parsed.index if parsed.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise BackendUnavailableError(
                f"torch: {device} requested, but only {torch.cuda.device_count()} CUDA devices"
            )
        parsed = torch.device("cuda", index)
    elif parsed.type != "cpu":
        raise BackendUnavailableError(f"torch: device {device!r} is neither cpu nor cuda")
    return parsed


class TorchBackend(Backend):
    """The detector of a checkpoint in PyTorch eager mode, under ``torch.inference_mode``.

    Args:
        model_path: a checkpoint written by ``edge.model.checkpoint.save_checkpoint``.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        precision: ``"fp32"`` (default) or ``"fp16"`` (autocast mixed precision).
        max_batch: crops per forward pass.
    """

    name = "torch"

    def __init__(
        self,
        model_path: str | Path,
        device: str = "cpu",
        precision: str | None = None,
        max_batch: int = 8,
    ):
        precision = precision or "fp32"
        if precision not in ("fp32", "fp16"):
            raise BackendUnavailableError(
                f"torch: precision {precision!r} is not offered; use fp32 or fp16"
            )
        torch_device = parse_device(device)
        model, payload = load_checkpoint(model_path)
        config = model.config
        super().__init__(
            device=str(torch_device),
            precision=precision,
            max_batch=max_batch,
            crop_shape=(config.in_channels, config.image_size, config.image_size),
            model_id=payload.get("model_id"),
        )
        self._model = model.to(torch_device)
        self._torch_device = torch_device
        log.info(
            "backend_opened",
            backend=self.name,
            device=self.device,
            precision=self.precision,
            model_id=self.model_id,
            preset=config.preset,
        )

    def _autocast(self):
        if self.precision == "fp16":
            return torch.autocast(self._torch_device.type, dtype=torch.float16)
        return nullcontext()

    def _infer_batch(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        batch = torch.from_numpy(crops).to(self._torch_device)
        with torch.inference_mode(), self._autocast():
            outputs = self._model(batch)
        return tuple(output.float().cpu().numpy() for output in outputs)

    def close(self) -> None:
        self._model = None
        if self._torch_device.type == "cuda":
            torch.cuda.empty_cache()
