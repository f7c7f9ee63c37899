"""INT8 entropy calibration for TensorRT 8.6/10.x. Imports TensorRT and pycuda: load lazily.

``IInt8EntropyCalibrator2`` (the calibrator DLA requires) fed from a folder of crops, batched
by :func:`edge.engine.plan.calibration_batches`. The cache it writes lets later builds skip
calibration; it belongs to one graph and TensorRT release (``calibration/int8/``, pattern in
``edge.engine.metadata.INT8_CACHE_PATTERN``) and must be deleted when the crops change.

Known limits: deprecated since TensorRT 10.1 in favour of explicit quantization (Q/DQ nodes)
and removed in 11 (research/edge-anchors.md 2.4, 2.5); :mod:`edge.engine.trt_build` refuses
INT8 there. Not run on this project's CI (no GPU).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pycuda.driver as cuda
import tensorrt as trt

from edge.logs import get_logger

log = get_logger(__name__)


class CropCalibrator(trt.IInt8EntropyCalibrator2):
    """Hands TensorRT one batch of crops per ``get_batch`` from one device buffer.

    Args:
        batches: float32 ``(batch, C, H, W)`` arrays, all the same shape.
        cache_path: the calibration cache, read if present and written after calibration.
        device_index: CUDA device; the device's primary context (the one TensorRT uses) is
            pushed for the calibrator's lifetime.
    """

    def __init__(self, batches: list[np.ndarray], cache_path: Path, device_index: int = 0):
        trt.IInt8EntropyCalibrator2.__init__(self)
        cuda.init()
        self._context = cuda.Device(device_index).retain_primary_context()
        self._context.push()
        self._batches = batches
        self._next = 0
        self._cache_path = Path(cache_path)
        self._device = cuda.mem_alloc(batches[0].nbytes)  # once, reused for every batch

    def get_batch_size(self) -> int:
        return int(self._batches[0].shape[0])

    def get_batch(self, names):
        if self._next >= len(self._batches):
            return None
        cuda.memcpy_htod(self._device, self._batches[self._next])
        self._next += 1
        return [int(self._device)]

    def read_calibration_cache(self):
        if self._cache_path.is_file():
            log.info("int8_cache_read", path=str(self._cache_path))
            return self._cache_path.read_bytes()
        return None

    def write_calibration_cache(self, cache) -> None:
        self._cache_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._cache_path.with_name(self._cache_path.name + ".tmp")
        temporary.write_bytes(bytes(cache))
        os.replace(temporary, self._cache_path)
        log.info("int8_cache_written", path=str(self._cache_path), batches=self._next)

    def free(self) -> None:
        self._device.free()
        self._context.pop()
        self._context.detach()
