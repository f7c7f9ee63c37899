"""TensorRT plan building (step 3 of :mod:`edge.engine.plan`). Imports TensorRT: load lazily.

What each TensorRT release allows (research/edge-anchors.md 2.1, 2.4, 2.5, 2.7):

- 8.5-8.6 (JetPack 5/6) and 10.x: weak typing. FP16 through ``BuilderFlag.FP16``; the layers
  :func:`edge.engine.plan.holds_fp32` picks get ``precision = float32`` and FP32 outputs, with
  ``OBEY_PRECISION_CONSTRAINTS`` so TensorRT may not override them. INT8 adds
  ``BuilderFlag.INT8`` and an ``IInt8EntropyCalibrator2`` (deprecated since 10.1, still there).
  TensorRT 10.0.1 ignored per-layer precision in one case (NVIDIA/TensorRT#3941): the gate
  catches what that lets through.
- 11 and later: weak typing is gone (no FP16/INT8 builder flags, no precision constraints, no
  calibrator); every network is strongly typed and runs in the types written in the graph. An
  FP32 graph gives an FP32 plan; FP16 needs a graph converted to mixed precision beforehand
  (NVIDIA ModelOpt AutoCast, keeping InstanceNormalization, Softmax and the reductions in
  FP32), which ``edge export`` does not write yet. So on TensorRT >= 11 ``fp16`` and ``int8``
  are refused with that explanation and ``fp32`` builds a strongly typed FP32 plan.
- FP32 builds clear TF32, so they are FP32 in fact.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorrt as trt

from edge.engine.backends.tensorrt_worker import machine_identity
from edge.engine.plan import holds_fp32
from edge.errors import EngineRefusedError, ModelInvalidError
from edge.logs import get_logger

log = get_logger(__name__)

__all__ = ["build_serialized_plan", "machine_identity", "tensorrt_major"]


def tensorrt_major() -> int:
    return int(trt.__version__.split(".")[0])


def _operation_name(layer) -> str | None:
    """The operation of an ELEMENTWISE or UNARY layer (``"POW"``, ``"SQRT"``), else None."""
    if layer.type == trt.LayerType.ELEMENTWISE:
        layer.__class__ = trt.IElementWiseLayer  # downcast, as the TensorRT samples do
        return layer.op.name
    if layer.type == trt.LayerType.UNARY:
        layer.__class__ = trt.IUnaryLayer
        return layer.op.name
    return None


def hold_fp32_layers(network) -> int:
    """Pin the layers :func:`holds_fp32` picks to FP32 (compute and float outputs)."""
    held = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if not holds_fp32(layer.name, layer.type.name, _operation_name(layer)):
            continue
        layer.precision = trt.float32
        for output in range(layer.num_outputs):
            if layer.get_output(output).dtype in (trt.float32, trt.float16):
                layer.set_output_type(output, trt.float32)
        held += 1
    return held


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def build_serialized_plan(
    onnx_path: Path,
    *,
    precision: str,
    max_batch: int,
    input_shape: tuple[int, int, int],
    workspace_mib: int,
    timing_cache: Path,
    calibration_batches: list[np.ndarray] | None = None,
    int8_cache: Path | None = None,
    device_index: int = 0,
) -> tuple[bytes, dict]:
    """Parse ``onnx_path`` and build a serialized plan.

    Args:
        precision: ``fp16``, ``fp32`` or ``int8``.
        max_batch: the profile is ``1 .. max_batch`` crops (tuned for ``max_batch``).
        input_shape: ``(C, H, W)`` of a crop.
        timing_cache: read if present, written back after the build.
        calibration_batches: INT8 only: float32 ``(max_batch, C, H, W)`` batches.
        int8_cache: INT8 only: the calibration cache file (read if present, then written).
    Returns:
        ``(plan bytes, {"fp32_layers": n, "notes": [...]})``.
    """
    major = tensorrt_major()
    notes: list[str] = [f"TensorRT {trt.__version__}"]
    strongly_typed = major >= 11
    if strongly_typed and precision != "fp32":
        raise EngineRefusedError(
            f"{onnx_path}: TensorRT {trt.__version__} removed weak typing (FP16/INT8 builder "
            "flags, layer precision constraints, INT8 calibrators), so an FP32 graph builds "
            "an FP32 plan only. An FP16 plan needs the graph converted to mixed precision "
            "first (NVIDIA ModelOpt AutoCast, keeping InstanceNormalization, Softmax and "
            "reductions in FP32), which edge export does not do yet. Build --precision fp32 "
            "here, or use TensorRT 8.6/10.x (JetPack)."
        )

    # Network from the graph.
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    flags = 0
    if major < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelInvalidError(f"{onnx_path}: TensorRT cannot parse the graph: {errors}")

    # Builder config: workspace, dynamic-batch profile, timing cache.
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    input_name = network.get_input(0).name
    profile = builder.create_optimization_profile()
    profile.set_shape(
        input_name, (1, *input_shape), (max_batch, *input_shape), (max_batch, *input_shape)
    )
    config.add_optimization_profile(profile)
    timing_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(timing_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    notes.append(f"timing cache {timing_cache.name} ({len(timing_bytes)} bytes in)")

    # Precision.
    fp32_layers = 0
    calibrator = None
    if not strongly_typed:
        if precision == "fp32":
            config.clear_flag(trt.BuilderFlag.TF32)
        else:
            config.set_flag(trt.BuilderFlag.FP16)
            fp32_layers = hold_fp32_layers(network)
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            notes.append(f"FP16 with {fp32_layers} layers held in FP32")
        if precision == "int8":
            from edge.engine.int8 import CropCalibrator

            if not calibration_batches or int8_cache is None:
                raise EngineRefusedError(f"{onnx_path}: INT8 needs calibration crops")
            config.set_flag(trt.BuilderFlag.INT8)
            calibrator = CropCalibrator(calibration_batches, int8_cache, device_index)
            config.int8_calibrator = calibrator
            config.set_calibration_profile(profile)
            notes.append(f"INT8, entropy calibration cache {int8_cache}")

    # Build, then keep the timing cache.
    plan = builder.build_serialized_network(network, config)
    if calibrator is not None:
        calibrator.free()
    if plan is None:
        raise EngineRefusedError(
            f"{onnx_path}: TensorRT {trt.__version__} could not build a {precision} plan "
            "(see the TensorRT log above)"
        )
    _write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    log.info("plan_built", onnx=str(onnx_path), precision=precision, fp32_layers=fp32_layers)
    return bytes(plan), {"fp32_layers": fp32_layers, "notes": notes}
