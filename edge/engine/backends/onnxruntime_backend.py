"""ONNX Runtime backend: the exported graph on the CPU, or on a CUDA GPU where the installed
onnxruntime has the CUDA execution provider (the ``onnxruntime-gpu`` wheel).

The graph is FP32; ONNX Runtime FP32 on the CPU is the reference every TensorRT plan is
gated against (:mod:`edge.engine.plan`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge.engine.backends.base import OUTPUT_NAMES, Backend, BackendUnavailableError
from edge.errors import ModelInvalidError
from edge.logs import get_logger

log = get_logger(__name__)


def providers_for(device: str, available: list[str]) -> list:
    """Execution providers for ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``).

    Raises:
        BackendUnavailableError: CUDA asked for and ``CUDAExecutionProvider`` is not available.
    """
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" or device.startswith("cuda:"):
        if "CUDAExecutionProvider" not in available:
            raise BackendUnavailableError(
                f"onnxruntime {ort.__version__}: {device} requested, but this build has no "
                f"CUDAExecutionProvider (only {', '.join(available)}); install onnxruntime-gpu "
                "on a machine with CUDA"
            )
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    raise BackendUnavailableError(f"onnxruntime: device {device!r} is neither cpu nor cuda[:N]")


class OnnxRuntimeBackend(Backend):
    """An exported graph (``edge export``) in an ONNX Runtime session.

    Args:
        model_path: the ``.onnx`` file.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        precision: ``"fp32"`` only (the graph is FP32).
        max_batch: crops per session run.
        threads: intra-op threads (default: ONNX Runtime's choice, one per core).
        spin_wait: let idle intra-op threads spin for work (ONNX Runtime's default). Fastest
            when the session has the CPU to itself; in the pipeline, where the grabber and the
            publisher share the cores, spinning threads take the cores those processes need
            (measured on 2 cores, edge preset: 50-55 crops/s spinning, 58-61 without).
    """

    name = "onnxruntime"

    def __init__(
        self,
        model_path: str | Path,
        device: str = "cpu",
        precision: str | None = None,
        max_batch: int = 8,
        threads: int | None = None,
        spin_wait: bool = True,
    ):
        precision = precision or "fp32"
        if precision != "fp32":
            raise BackendUnavailableError(
                f"onnxruntime: precision {precision!r} is not offered; the exported graph is "
                "fp32 (FP16 runs through the tensorrt or torch backend)"
            )
        model_path = Path(model_path)
        if model_path.is_dir():
            raise ModelInvalidError(f"{model_path}: a folder, not an ONNX graph file (.onnx)")
        if not model_path.is_file():
            raise ModelInvalidError(f"{model_path}: no such ONNX graph")
        providers = providers_for(device, ort.get_available_providers())
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", str(int(spin_wait)))
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as error:  # ORT raises several types (Fail, InvalidGraph, ...)
            raise ModelInvalidError(
                f"{model_path}: ONNX Runtime cannot load it ({type(error).__name__}: {error})"
            ) from error
        if device != "cpu" and "CUDAExecutionProvider" not in session.get_providers():
            raise BackendUnavailableError(
                f"onnxruntime: {device} requested, but the session fell back to "
                f"{session.get_providers()} (CUDA or cuDNN libraries missing?)"
            )
        inputs, outputs = session.get_inputs(), session.get_outputs()
        output_names = tuple(output.name for output in outputs)
        if len(inputs) != 1 or output_names != OUTPUT_NAMES:
            raise ModelInvalidError(
                f"{model_path}: expected one input and outputs {OUTPUT_NAMES}, got "
                f"{[i.name for i in inputs]} -> {output_names}"
            )
        shape = inputs[0].shape
        if len(shape) != 4 or not all(isinstance(size, int) for size in shape[1:]):
            raise ModelInvalidError(f"{model_path}: input shape {shape} is not (batch, C, H, W)")
        custom = session.get_modelmeta().custom_metadata_map
        super().__init__(
            device=device if device != "cuda" else "cuda:0",
            precision=precision,
            max_batch=max_batch,
            crop_shape=tuple(shape[1:]),
            model_id=custom.get("model_id"),
        )
        self._session = session
        self._input_name = inputs[0].name
        log.info(
            "backend_opened",
            backend=self.name,
            device=self.device,
            precision=self.precision,
            providers=session.get_providers(),
            model_id=self.model_id,
        )

    def _infer_batch(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(self._session.run(list(OUTPUT_NAMES), {self._input_name: crops}))

    def close(self) -> None:
        self._session = None
