"""Backends behind one interface, chosen by name, each imported only when chosen.

>>> backend = open_backend("onnxruntime", "engines/edge.onnx")      # doctest: +SKIP
>>> result = backend.infer(crops)   # crops: float32 (N, C, H, W) in [0, 255]
>>> anomaly_map, image_score, reconstruction = result; result.ok

=============  ======================================  =======================  =============
name           model file                              devices                  precisions
=============  ======================================  =======================  =============
torch          checkpoint (``.pt``)                    ``cpu``, ``cuda[:N]``    fp32, fp16
onnxruntime    exported graph (``.onnx``)              ``cpu``, ``cuda[:N]``    fp32
tensorrt       plan (``.plan``) or the ``.onnx`` whose ``cuda[:N]``             as built
               plan is in the cache
=============  ======================================  =======================  =============
"""

from __future__ import annotations

import importlib
from pathlib import Path

from edge.engine.backends.base import (
    OUTPUT_NAMES,
    Backend,
    BackendFailedError,
    BackendUnavailableError,
    CropError,
    InferenceResult,
)
from edge.errors import ConfigInvalidError

# name -> (module, class). Modules are imported by open_backend only.
BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("edge.engine.backends.torch_backend", "TorchBackend"),
    "onnxruntime": ("edge.engine.backends.onnxruntime_backend", "OnnxRuntimeBackend"),
    "tensorrt": ("edge.engine.backends.tensorrt_backend", "TensorRTBackend"),
}

DEFAULT_MAX_BATCH = 8


def open_backend(
    name: str,
    model_path: str | Path,
    device: str | None = None,
    precision: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    **options,
) -> Backend:
    """Open the backend called ``name`` on ``model_path``.

    Args:
        name: one of :data:`BACKENDS`.
        model_path: a checkpoint (torch), an ``.onnx`` graph (onnxruntime, tensorrt) or a
            ``.plan`` (tensorrt).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; None takes the backend's default
            (``"cpu"``, or ``"cuda:0"`` for TensorRT, which runs on CUDA only).
        precision: ``"fp32"`` / ``"fp16"`` / ``"int8"``; None takes the backend's default
            (fp32, or for TensorRT the precision the plan was built with).
        max_batch: crops per runtime call; larger batches are split.
        options: backend-specific (``threads`` and ``spin_wait`` for onnxruntime, ``timeout_s``
            for tensorrt).
    Raises:
        ConfigInvalidError: unknown name.
        BackendUnavailableError: the backend's runtime, GPU or provider is missing here.
        ModelInvalidError: the model file is missing, corrupt or for another machine.
    """
    if name not in BACKENDS:
        raise ConfigInvalidError(
            f"unknown backend {name!r}; choose one of {', '.join(sorted(BACKENDS))}"
        )
    module_name, class_name = BACKENDS[name]
    backend_class = getattr(importlib.import_module(module_name), class_name)
    if device is not None:
        options["device"] = device
    return backend_class(model_path, precision=precision, max_batch=max_batch, **options)


__all__ = [
    "BACKENDS",
    "OUTPUT_NAMES",
    "Backend",
    "BackendFailedError",
    "BackendUnavailableError",
    "CropError",
    "InferenceResult",
    "open_backend",
]
