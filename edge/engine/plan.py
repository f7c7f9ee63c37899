"""``edge build-engine engines/NAME.onnx``: a TensorRT plan for this machine, gated before use.

A plan only runs on the TensorRT version and GPU that built it (research/edge-anchors.md 2.3),
so plans are cached under a key and carry a sidecar that says what they were built for:

- ``engines/NAME-KEY.plan``: the serialized engine; ``KEY`` = :func:`plan_cache_key` of
  TensorRT version, GPU name, compute capability, ONNX SHA-256, precision and max batch;
- ``engines/NAME-KEY.plan.json``: :class:`PlanSidecar`, with the key fields, the plan's size
  and SHA-256, and the gate report;
- ``engines/timing-*.cache``: TensorRT's timing cache, per TensorRT version and GPU.

:func:`check_plan` reads only these files and never deserialises: a plan for another TensorRT
version or GPU, a truncated plan or a file of other bytes is found before TensorRT sees it and
answered with a clear error and a rebuild (never a crash loop).

Building (``build_engine``), step by step:

1. read the graph's metadata (``edge.engine.metadata``) and this machine's identity;
2. if a plan with the current key passes :func:`check_plan`, reuse it (unless ``--force``);
3. parse the ONNX graph and build (``edge.engine.trt_build``): FP16 with normalisation,
   softmax, reductions, pow/sqrt and attention products held in FP32
   (:func:`holds_fp32`), a timing cache, a dynamic-batch profile ``1..max_batch``; INT8 with an
   entropy calibrator over a folder of crops where the TensorRT version still has it;
4. write the plan as a candidate beside the cache entry;
5. gate: run the candidate (in the TensorRT worker process) and ONNX Runtime FP32 on fixed crops
   (real ones from ``--crops``, plus black, saturated and checkerboard ones) and
   :func:`compare_outputs` within :data:`GATE_TOLERANCE`, with no NaN or inf anywhere;
6. install: the candidate replaces the cache entry if it passed; otherwise it is deleted, the
   previous plan (if any) stays untouched and ``EngineRefusedError`` names the worst difference.

This module imports neither torch nor TensorRT; step 3 imports ``edge.engine.trt_build``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import ValidationError

from edge.config import StrictModel
from edge.engine.backends.base import OUTPUT_NAMES, Backend, BackendFailedError, InferenceResult
from edge.engine.metadata import sha256_file, write_json_atomic
from edge.errors import EdgeError, EngineRefusedError, InputUnreadableError, ModelInvalidError
from edge.logs import get_logger

log = get_logger(__name__)

PLAN_FORMAT = "diff-fastener-plan/1"
Precision = Literal["fp32", "fp16", "int8"]


# --------------------------------------------------------------------------------------------
# Cache key and sidecar


def plan_cache_key(
    *,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: str,
    onnx_sha256: str,
    precision: str,
    max_batch: int,
) -> str:
    """The cache key of a plan: 16 hex digits of the SHA-256 of its defining facts.

    A plan is valid only for the TensorRT version and the GPU (name and compute capability)
    that built it, the exact graph bytes, the precision and the optimisation profile (max
    batch). Pure: the same facts always give the same key, and any change gives another.
    """
    facts = {
        "tensorrt_version": tensorrt_version,
        "gpu_name": gpu_name,
        "compute_capability": compute_capability,
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "max_batch": int(max_batch),
    }
    canonical = json.dumps(facts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class MachineIdentity(StrictModel):
    """What a plan depends on in the machine: TensorRT release and GPU model."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str


class PlanKey(StrictModel):
    """The facts behind :func:`plan_cache_key`."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    onnx_sha256: str
    precision: Precision
    max_batch: int

    @classmethod
    def for_machine(
        cls, machine: MachineIdentity, onnx_sha256: str, precision: str, max_batch: int
    ) -> PlanKey:
        return cls(
            **machine.model_dump(),
            onnx_sha256=onnx_sha256,
            precision=precision,
            max_batch=max_batch,
        )

    def digest(self) -> str:
        return plan_cache_key(**self.model_dump())


class OutputDifference(StrictModel):
    """Worst ``|candidate - reference|`` of one output over the gate crops."""

    output: str
    max_abs: float
    crop: str
    limit: float


class GateReport(StrictModel):
    """What the gate found. ``message`` is what a person reads."""

    passed: bool
    precision: str
    reference: str
    candidate: str
    crops: list[str]
    differences: list[OutputDifference]
    nonfinite: list[str]
    message: str


class PlanSidecar(StrictModel):
    """``NAME-KEY.plan.json``: what the plan beside it was built for, and its bytes' hash."""

    format: str = PLAN_FORMAT
    key: str
    key_fields: PlanKey
    plan_file: str
    plan_bytes: int
    plan_sha256: str
    model_id: str
    onnx_file: str
    input_shape: list[int]
    built_at: str
    build_seconds: float
    fp32_layers: int
    build_notes: list[str] = []
    gate: GateReport | None = None


def plan_path_for(onnx_path: str | Path, key: str) -> Path:
    """``engines/NAME.onnx`` and a key -> ``engines/NAME-KEY.plan``."""
    onnx_path = Path(onnx_path)
    stem = onnx_path.name.removesuffix(".onnx")
    return onnx_path.with_name(f"{stem}-{key}.plan")


def sidecar_path(plan_path: str | Path) -> Path:
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name + ".json")


@dataclass(frozen=True)
class PlanStatus:
    """Result of :func:`check_plan`.

    ``state``: ``ok``; ``missing`` (no plan); ``no_sidecar``; ``corrupt`` (sidecar unreadable,
    plan truncated or of other bytes); ``mismatch`` (built for another TensorRT, GPU, graph,
    precision or batch); ``stale`` (TensorRT refused it here before, :func:`mark_plan_stale`).
    """

    state: str
    reason: str
    plan_path: Path
    sidecar: PlanSidecar | None = None

    @property
    def ok(self) -> bool:
        return self.state == "ok"

    @property
    def needs_rebuild(self) -> bool:
        return self.state != "ok"


class PlanInvalidError(ModelInvalidError):
    """A plan cannot be used on this machine; ``edge build-engine`` must build it again."""

    needs_rebuild = True

    def __init__(self, message: str, status: PlanStatus | None = None):
        super().__init__(message)
        self.status = status


def read_sidecar(plan_path: str | Path) -> PlanSidecar:
    """The sidecar of ``plan_path``; raises :class:`PlanInvalidError` if missing or malformed."""
    path = sidecar_path(plan_path)
    if not path.is_file():
        raise PlanInvalidError(f"{path}: no sidecar beside {Path(plan_path).name}; rebuild")
    try:
        return PlanSidecar.model_validate_json(path.read_text(encoding="utf-8"))
    except (ValidationError, OSError, UnicodeDecodeError) as error:
        raise PlanInvalidError(f"{path}: not a plan sidecar ({error}); rebuild") from error


def _describe_difference(found: PlanKey, expected: PlanKey) -> str:
    labels = {
        "tensorrt_version": "TensorRT",
        "gpu_name": "GPU",
        "compute_capability": "compute capability",
        "onnx_sha256": "ONNX SHA-256",
        "precision": "precision",
        "max_batch": "max batch",
    }
    parts = []
    for field, label in labels.items():
        have, want = getattr(found, field), getattr(expected, field)
        if have != want:
            if field == "onnx_sha256":
                have, want = str(have)[:12], str(want)[:12]
            parts.append(f"{label} {have!r} (here {want!r})")
    return ", ".join(parts) or "key fields edited"


def check_plan(plan_path: str | Path, expected: PlanKey) -> PlanStatus:
    """Whether ``plan_path`` can be deserialised here, from its files alone.

    Reads the sidecar and the plan's bytes; never calls TensorRT, so a foreign or damaged plan
    cannot crash the process that checks it.
    """
    plan_path = Path(plan_path)
    if not plan_path.is_file():
        return PlanStatus("missing", f"{plan_path}: no plan; build one", plan_path)
    stale = stale_sidecar_path(plan_path)
    if not sidecar_path(plan_path).is_file() and stale.is_file():
        return PlanStatus(
            "stale",
            f"{plan_path}: TensorRT refused to load it here although its sidecar matched "
            f"(set aside as {stale.name}); rebuild",
            plan_path,
        )
    if not sidecar_path(plan_path).is_file():
        return PlanStatus(
            "no_sidecar",
            f"{plan_path}: no sidecar {sidecar_path(plan_path).name}, so what it was built for "
            "is unknown; rebuild",
            plan_path,
        )
    try:
        sidecar = read_sidecar(plan_path)
    except PlanInvalidError as error:
        return PlanStatus("corrupt", str(error), plan_path)
    if sidecar.format != PLAN_FORMAT or sidecar.key != sidecar.key_fields.digest():
        return PlanStatus(
            "corrupt",
            f"{sidecar_path(plan_path)}: key {sidecar.key} does not match its own fields "
            "(edited or damaged); rebuild",
            plan_path,
            sidecar,
        )
    if sidecar.key != expected.digest():
        return PlanStatus(
            "mismatch",
            f"{plan_path}: built for {_describe_difference(sidecar.key_fields, expected)}; "
            "a plan runs only on the TensorRT version and GPU that built it; rebuild",
            plan_path,
            sidecar,
        )
    size = plan_path.stat().st_size
    if size != sidecar.plan_bytes:
        return PlanStatus(
            "corrupt",
            f"{plan_path}: {size} bytes, the sidecar records {sidecar.plan_bytes} "
            "(truncated or replaced); rebuild",
            plan_path,
            sidecar,
        )
    digest = sha256_file(plan_path)
    if digest != sidecar.plan_sha256:
        return PlanStatus(
            "corrupt",
            f"{plan_path}: SHA-256 {digest[:12]} differs from {sidecar.plan_sha256[:12]} in the "
            "sidecar (damaged or replaced); rebuild",
            plan_path,
            sidecar,
        )
    return PlanStatus("ok", f"{plan_path}: matches this machine", plan_path, sidecar)


def stale_sidecar_path(plan_path: str | Path) -> Path:
    path = sidecar_path(plan_path)
    return path.with_name(path.name + ".stale")


def mark_plan_stale(plan_path: str | Path, reason: str) -> None:
    """Set a plan aside after TensorRT refused to load it although :func:`check_plan` passed.

    That happens when something outside the key changed under the plan (a driver or CUDA
    update with the same TensorRT version, a damaged GPU). The sidecar is renamed to
    ``*.plan.json.stale``, so the next :func:`check_plan` answers ``stale`` and the next
    ``edge build-engine`` rebuilds instead of reusing it: a failed start is never retried
    with the same plan.
    """
    path = sidecar_path(plan_path)
    if path.is_file():
        os.replace(path, stale_sidecar_path(plan_path))
    log.error("plan_marked_stale", plan=str(plan_path), reason=reason)


def require_plan(plan_path: str | Path, expected: PlanKey) -> PlanSidecar:
    """The sidecar of a plan that :func:`check_plan` accepts; else :class:`PlanInvalidError`."""
    status = check_plan(plan_path, expected)
    if not status.ok:
        log.warning("plan_unusable", state=status.state, reason=status.reason)
        raise PlanInvalidError(status.reason, status)
    return status.sidecar


def write_plan(plan_path: str | Path, plan: bytes, sidecar: PlanSidecar) -> None:
    """Write a plan and its sidecar, each atomically (plan first).

    A crash between the two leaves a plan whose bytes do not match its sidecar, which
    :func:`check_plan` reports as corrupt: a rebuild, never a wrong plan.
    """
    plan_path = Path(plan_path)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = plan_path.with_name(plan_path.name + ".tmp")
    temporary.write_bytes(plan)
    os.replace(temporary, plan_path)
    write_json_atomic(sidecar_path(plan_path), sidecar.model_dump(mode="json"))


# --------------------------------------------------------------------------------------------
# FP32 islands in an FP16 build


FP32_LAYER_TYPES = frozenset({"NORMALIZATION", "SOFTMAX", "REDUCE", "TOPK"})
"""TensorRT layer types held in FP32: normalisation (GroupNorm exports as InstanceNormalization;
its variance squares activations, which overflow FP16 above about 256), softmax, reductions
(CBAM pooling, the top-k mean of the score) and top-k."""


def holds_fp32(layer_name: str, layer_type: str, operation: str | None = None) -> bool:
    """Whether a TensorRT layer is held in FP32 in an FP16/INT8 build.

    Args:
        layer_name: the layer's name; the ONNX parser names layers after their ONNX nodes
            (``/denoiser/middle_attention/MatMul``).
        layer_type: ``trt.LayerType`` name (``"NORMALIZATION"``, ``"MATRIX_MULTIPLY"``, ...).
        operation: for ELEMENTWISE and UNARY layers, the operation name (``"POW"``, ``"SQRT"``).
    """
    if layer_type in FP32_LAYER_TYPES:
        return True
    if layer_type.startswith("PLUGIN") and "InstanceNormalization" in layer_name:
        return True  # TensorRT 8.5 runs InstanceNormalization as a plugin
    if layer_type == "ELEMENTWISE" and operation == "POW":
        return True
    if layer_type == "UNARY" and operation == "SQRT":
        return True
    # Attention logits q.k^T overflow FP16 before the softmax sees them (NVIDIA/TensorRT#1500).
    return layer_type == "MATRIX_MULTIPLY" and "attention" in layer_name


# --------------------------------------------------------------------------------------------
# Gate crops


IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg", ".npy")


def _to_model_crop(image: np.ndarray, channels: int, size: int, source: Path) -> np.ndarray:
    """An image as read from disk -> float32 ``(channels, size, size)`` in ``[0, 255]``."""
    import cv2

    if image.dtype == np.uint16:
        image = image.astype(np.float32) * (255.0 / 65535.0)
    elif image.dtype == np.uint8 or np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32)
    else:
        raise InputUnreadableError(f"{source}: pixel type {image.dtype} is not 8/16-bit or float")
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[2] not in (1, 3):
        image = np.transpose(image, (1, 2, 0))  # a (C, H, W) .npy
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2 and channels == 3:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and channels == 1:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif image.ndim == 3 and channels == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image.shape[0] != size or image.shape[1] != size:
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    if image.ndim == 2:
        image = image[:, :, None]
    return np.ascontiguousarray(np.transpose(image, (2, 0, 1)), dtype=np.float32)


def load_crop_folder(
    folder: str | Path, channels: int, size: int, limit: int | None = None
) -> tuple[np.ndarray, list[str]]:
    """Crops from a folder of images (PNG, TIFF, BMP, JPEG; 8 or 16 bit) or ``.npy`` arrays.

    Files are taken in name order, up to ``limit``. 16-bit images are scaled by 255 / 65535,
    colour is converted to the model's channels, and crops are resized to ``size``.

    Returns:
        ``(crops, names)``: float32 ``(n, channels, size, size)`` in ``[0, 255]`` and the names.
    Raises:
        InputUnreadableError: no such folder, no image in it, or an unreadable file.
    """
    import cv2

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputUnreadableError(f"{folder}: a file, not a folder of crops")
    if not folder.is_dir():
        raise InputUnreadableError(f"{folder}: no such folder of crops")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if limit is not None:
        files = files[:limit]
    if not files:
        raise InputUnreadableError(f"{folder}: no crops ({', '.join(IMAGE_SUFFIXES)})")
    crops = []
    for path in files:
        if path.suffix.lower() == ".npy":
            try:
                image = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as error:
                raise InputUnreadableError(f"{path}: not a numpy array ({error})") from error
        else:
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if image is None:
                raise InputUnreadableError(f"{path}: not a readable image")
        crops.append(_to_model_crop(image, channels, size, path))
    return np.stack(crops), [path.name for path in files]


def generated_gate_crops(channels: int, size: int) -> tuple[np.ndarray, list[str]]:
    """Crops that stress FP16: all black, saturated (255) and an 8-px 0/255 checkerboard.

    Returns:
        ``(crops, names)``: float32 ``(3, channels, size, size)``.
    """
    rows, cols = np.mgrid[0:size, 0:size]
    checkerboard = (((rows // 8) + (cols // 8)) % 2 * 255.0).astype(np.float32)
    crops = np.stack(
        [
            np.zeros((channels, size, size), np.float32),
            np.full((channels, size, size), 255.0, np.float32),
            np.broadcast_to(checkerboard, (channels, size, size)),
        ]
    )
    return np.ascontiguousarray(crops), ["black", "saturated", "checkerboard"]


def gate_crops(
    channels: int, size: int, folder: str | Path | None = None, limit: int = 16
) -> tuple[np.ndarray, list[str]]:
    """Real crops from ``folder`` (up to ``limit``) followed by :func:`generated_gate_crops`."""
    generated, names = generated_gate_crops(channels, size)
    if folder is None:
        return generated, names
    real, real_names = load_crop_folder(folder, channels, size, limit)
    return np.concatenate([real, generated]), real_names + names


def calibration_batches(crops: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Whole batches for the INT8 calibrator (a partial last batch is left out).

    Args:
        crops: float32 ``(n, C, H, W)``.
    Returns:
        ``n // batch_size`` C-contiguous float32 arrays ``(batch_size, C, H, W)``.
    Raises:
        InputUnreadableError: fewer crops than one batch.
    """
    count = crops.shape[0] // batch_size
    if count == 0:
        raise InputUnreadableError(
            f"INT8 calibration needs at least {batch_size} crops, got {crops.shape[0]}"
        )
    return [
        np.ascontiguousarray(crops[i * batch_size : (i + 1) * batch_size], dtype=np.float32)
        for i in range(count)
    ]


# --------------------------------------------------------------------------------------------
# The gate


class GateTolerance(StrictModel):
    """Largest ``|candidate - ONNX Runtime FP32|`` accepted per output, over all gate crops."""

    anomaly_map: float
    image_score: float
    reconstruction: float


GATE_TOLERANCE: dict[str, GateTolerance] = {
    "fp32": GateTolerance(anomaly_map=5e-3, image_score=1e-3, reconstruction=1.0),
    "fp16": GateTolerance(anomaly_map=0.05, image_score=0.01, reconstruction=8.0),
    "int8": GateTolerance(anomaly_map=0.15, image_score=0.05, reconstruction=24.0),
}
"""Gate tolerances per plan precision.

FP16: measured on this project's ``tiny`` and ``edge`` presets (random weights, perturbed so no
layer is zero) on noise, black, saturated and checkerboard crops, torch autocast FP16 (FP16
convolutions and matrix products, FP32 normalisation and softmax: the split the plan build
asks for) differs from ONNX Runtime FP32 by at most 2.0e-3 on the anomaly map, 2.9e-4 on the
image score and 0.37 (of 255) on the reconstruction with weights perturbed by N(0, 0.02), and
3.1e-3, 2.2e-4 and 1.2 with N(0, 0.1). The limits leave 7-30x headroom for TensorRT's other
kernels and accumulation orders. What they are for: an overflowing layer gives NaN/inf
(refused outright) or saturates the sigmoid, moving map values by tenths; a model whose
weights differ (N(0, 0.1) against N(0, 0.02)) moves the score by 0.06 to 0.17 and the map by
0.57 to 0.62. The image score limit, 0.01, is 1 % of its range: an alarm decision changes only
for a crop whose score lies within 0.01 of its threshold. Known limit: these figures come
from random weights; a trained network has larger activations, so confirm them with
scripts/gpu_check.py and the first trained checkpoint before relying on them.

FP32 (TF32 off): only kernel order differs; limits 5-10x under FP16's.
INT8: not measured here (no TensorRT); looser limits, so that a plan that still ranks crops
like the reference passes and one that does not is refused. Tighten them from the figures of
the first INT8 build on the vehicle.
"""


def _crop_nonfinite(label: str, result: InferenceResult, names: list[str]) -> list[str]:
    return [f"{label} crop {names[e.index]!r}: {e.reason}" for e in result.errors]


def compare_outputs(
    reference: InferenceResult,
    candidate: InferenceResult,
    names: list[str],
    tolerance: GateTolerance,
    *,
    precision: str = "fp16",
    reference_label: str = "onnxruntime fp32",
    candidate_label: str = "candidate",
) -> GateReport:
    """The gate's decision over two backends' outputs on the same crops. Pure.

    Args:
        reference, candidate: results on the same crops, ``(n, ...)`` each.
        names: one name per crop, for the message.
        tolerance: the largest difference accepted per output.
    Returns:
        a :class:`GateReport`: passed only if neither result holds NaN or inf and, for every
        output, ``max |candidate - reference|`` over all crops and pixels is within the limit.
    """
    if len(reference) != len(candidate) or len(names) != len(reference):
        raise ValueError(
            f"{len(reference)} reference and {len(candidate)} candidate results for "
            f"{len(names)} crop names"
        )
    nonfinite = _crop_nonfinite(reference_label, reference, names)
    nonfinite += _crop_nonfinite(candidate_label, candidate, names)
    both_ok = reference.ok & candidate.ok
    differences = []
    for output in OUTPUT_NAMES:
        ref, cand = getattr(reference, output), getattr(candidate, output)
        if ref.shape != cand.shape:
            raise ValueError(f"{output}: shapes {ref.shape} and {cand.shape} differ")
        limit = getattr(tolerance, output)
        per_crop = np.abs(cand.astype(np.float64) - ref.astype(np.float64))
        per_crop = per_crop.reshape(len(names), -1).max(axis=1)
        per_crop = np.where(both_ok, per_crop, -np.inf)
        worst = int(np.argmax(per_crop))
        max_abs = float(per_crop[worst]) if both_ok.any() else float("nan")
        crop = names[worst] if both_ok.any() else ""
        differences.append(OutputDifference(output=output, max_abs=max_abs, crop=crop, limit=limit))
    over = [d for d in differences if not d.max_abs <= d.limit and both_ok.any()]
    passed = not nonfinite and not over and bool(both_ok.all())
    summary = "; ".join(
        f"{d.output} {d.max_abs:.3g} on crop {d.crop!r} (limit {d.limit:g})" for d in differences
    )
    if passed:
        message = (
            f"gate passed on {len(names)} crops, worst |{candidate_label} - {reference_label}|: "
            f"{summary}"
        )
    else:
        reasons = []
        if nonfinite:
            reasons.append("NaN/inf in " + "; ".join(nonfinite))
        if over:
            worst_over = max(over, key=lambda d: d.max_abs / d.limit)
            reasons.append(
                f"worst difference {worst_over.output} {worst_over.max_abs:.4g} on crop "
                f"{worst_over.crop!r} (limit {worst_over.limit:g})"
            )
        message = (
            f"{candidate_label} refused against {reference_label} on {len(names)} crops: "
            + "; ".join(reasons)
            + f" [all outputs: {summary}]"
        )
    return GateReport(
        passed=passed,
        precision=precision,
        reference=reference_label,
        candidate=candidate_label,
        crops=list(names),
        differences=differences,
        nonfinite=nonfinite,
        message=message,
    )


def run_gate(
    reference: Backend,
    candidate: Backend,
    crops: np.ndarray,
    names: list[str],
    precision: str,
    tolerance: GateTolerance | None = None,
) -> GateReport:
    """Run both backends on ``crops`` ``(n, C, H, W)`` and :func:`compare_outputs`."""
    tolerance = tolerance or GATE_TOLERANCE[precision]
    report = compare_outputs(
        reference.infer(crops),
        candidate.infer(crops),
        names,
        tolerance,
        precision=precision,
        reference_label=f"{reference.name} {reference.precision} {reference.device}",
        candidate_label=f"{candidate.name} {candidate.precision} {candidate.device}",
    )
    log.info(
        "gate_result",
        passed=report.passed,
        crops=len(names),
        **{f"{d.output}_max_abs": d.max_abs for d in report.differences},
    )
    return report


def candidate_path_for(plan_path: str | Path) -> Path:
    """Where a new plan waits for its gate: ``NAME-KEY.candidate.plan``."""
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name.removesuffix(".plan") + ".candidate.plan")


def install_plan(candidate: str | Path, target: str | Path, report: GateReport) -> Path:
    """Install a gated candidate plan at ``target``, or refuse it.

    Passed: the candidate's sidecar gets the gate report, and the candidate and its sidecar
    replace ``target`` and its sidecar. Refused: the candidate and its sidecar are deleted,
    ``target`` (the previous plan, if any) is left untouched, and ``EngineRefusedError`` says
    why, with the worst difference.
    """
    candidate, target = Path(candidate), Path(target)
    if not report.passed:
        candidate.unlink(missing_ok=True)
        sidecar_path(candidate).unlink(missing_ok=True)
        kept = f"previous plan {target.name} kept" if target.exists() else "no plan installed"
        log.error("plan_refused", candidate=str(candidate), message=report.message)
        raise EngineRefusedError(f"{candidate}: {report.message}; {kept}")
    sidecar = read_sidecar(candidate).model_copy(update={"gate": report, "plan_file": target.name})
    write_json_atomic(sidecar_path(candidate), sidecar.model_dump(mode="json"))
    os.replace(candidate, target)
    os.replace(sidecar_path(candidate), sidecar_path(target))
    stale_sidecar_path(target).unlink(missing_ok=True)
    log.info("plan_installed", plan=str(target), key=sidecar.key)
    return target


# --------------------------------------------------------------------------------------------
# Building (needs TensorRT and a GPU)


def timing_cache_path(engines_folder: Path, machine: MachineIdentity) -> Path:
    """``engines/timing-trt10.3.0-nvidia-orin-sm87.cache``: one per TensorRT version and GPU."""
    gpu = "".join(ch if ch.isalnum() else "-" for ch in machine.gpu_name.lower()).strip("-")
    cc = machine.compute_capability.replace(".", "")
    return engines_folder / f"timing-trt{machine.tensorrt_version}-{gpu}-sm{cc}.cache"


def int8_cache_path(calibration_folder: Path, model_id: str, onnx_sha256: str, trt: str) -> Path:
    """The INT8 calibration cache (``edge.engine.metadata.INT8_CACHE_PATTERN``)."""
    major_minor = ".".join(trt.split(".")[:2])
    return calibration_folder / "int8" / f"{model_id}-{onnx_sha256[:12]}-trt{major_minor}.cache"


def build_engine(
    onnx_path: str | Path,
    *,
    precision: str = "fp16",
    max_batch: int = 8,
    device_index: int = 0,
    crops_folder: str | Path | None = None,
    calibration_crops: str | Path | None = None,
    calibration_folder: str | Path = "calibration",
    workspace_mib: int = 2048,
    force: bool = False,
) -> Path:
    """Build, gate and install the plan of ``onnx_path`` for this machine (module doc, steps).

    Returns:
        the installed plan (or the cached one, when it is still valid and not ``force``).
    Raises:
        BackendUnavailableError: TensorRT or pycuda missing, or no GPU.
        ModelInvalidError: the graph or its metadata is invalid, or TensorRT cannot parse it.
        EngineRefusedError: the build failed or the gate refused the plan.
    """
    from edge.engine.backends.tensorrt_backend import TensorRTBackend, require_tensorrt
    from edge.engine.metadata import read_metadata

    # 1. Graph metadata and machine identity.
    onnx_path = Path(onnx_path)
    metadata = read_metadata(onnx_path)
    require_tensorrt()
    from edge.engine import trt_build

    machine = MachineIdentity(**trt_build.machine_identity(device_index))
    key = PlanKey.for_machine(machine, metadata.onnx_sha256, precision, max_batch)
    plan_path = plan_path_for(onnx_path, key.digest())

    # 2. A valid cached plan is reused.
    status = check_plan(plan_path, key)
    if status.ok and not force:
        log.info("plan_cached", plan=str(plan_path), key=key.digest())
        return plan_path
    log.info("plan_build", plan=str(plan_path), reason=status.reason, **machine.model_dump())

    # 3. Build.
    shape = (metadata.in_channels, metadata.image_size, metadata.image_size)
    int8_cache = None
    calibration = None
    if precision == "int8":
        if calibration_crops is None:
            raise EngineRefusedError(f"{onnx_path}: INT8 needs --calibration-crops DIR")
        crops, _ = load_crop_folder(calibration_crops, shape[0], shape[1])
        calibration = calibration_batches(crops, max_batch)
        int8_cache = int8_cache_path(
            Path(calibration_folder),
            metadata.model_id,
            metadata.onnx_sha256,
            machine.tensorrt_version,
        )
    started = time.monotonic()
    plan, build_info = trt_build.build_serialized_plan(
        onnx_path,
        precision=precision,
        max_batch=max_batch,
        input_shape=shape,
        workspace_mib=workspace_mib,
        timing_cache=timing_cache_path(onnx_path.parent, machine),
        calibration_batches=calibration,
        int8_cache=int8_cache,
        device_index=device_index,
    )
    build_seconds = time.monotonic() - started

    # 4. Candidate beside the cache entry.
    candidate = candidate_path_for(plan_path)
    sidecar = PlanSidecar(
        key=key.digest(),
        key_fields=key,
        plan_file=candidate.name,
        plan_bytes=len(plan),
        plan_sha256=hashlib.sha256(plan).hexdigest(),
        model_id=metadata.model_id,
        onnx_file=onnx_path.name,
        input_shape=list(shape),
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        build_seconds=round(build_seconds, 1),
        fp32_layers=build_info["fp32_layers"],
        build_notes=build_info["notes"],
    )
    write_plan(candidate, plan, sidecar)

    # 5. Gate against ONNX Runtime FP32 on the CPU.
    from edge.engine.backends.onnxruntime_backend import OnnxRuntimeBackend

    crops, names = gate_crops(shape[0], shape[1], crops_folder)
    try:
        with (
            OnnxRuntimeBackend(onnx_path, device="cpu", max_batch=max_batch) as reference,
            TensorRTBackend(
                candidate, device=f"cuda:{device_index}", max_batch=max_batch
            ) as tensorrt,
        ):
            report = run_gate(reference, tensorrt, crops, names, precision)
    except (ModelInvalidError, BackendFailedError) as error:
        candidate.unlink(missing_ok=True)
        sidecar_path(candidate).unlink(missing_ok=True)
        stale_sidecar_path(candidate).unlink(missing_ok=True)
        raise EngineRefusedError(f"{candidate}: the new plan does not run ({error})") from error

    # 6. Install or refuse.
    return install_plan(candidate, plan_path, report)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("onnx", type=Path, help="graph written by `edge export`")
    parser.add_argument("--precision", choices=("fp16", "fp32", "int8"), default="fp16")
    parser.add_argument("--max-batch", type=int, default=8, help="largest batch of the plan")
    parser.add_argument("--device", type=int, default=0, help="CUDA device index")
    parser.add_argument(
        "--crops", type=Path, default=None, help="folder of real crops for the gate (up to 16)"
    )
    parser.add_argument(
        "--calibration-crops", type=Path, default=None, help="folder of crops for INT8"
    )
    parser.add_argument(
        "--calibration-dir",
        type=Path,
        default=Path("calibration"),
        help="where INT8 calibration caches are written (calibration/int8/)",
    )
    parser.add_argument("--workspace-mib", type=int, default=2048)
    parser.add_argument("--force", action="store_true", help="rebuild even if a valid plan exists")


def run(args: argparse.Namespace) -> int:
    try:
        plan = build_engine(
            args.onnx,
            precision=args.precision,
            max_batch=args.max_batch,
            device_index=args.device,
            crops_folder=args.crops,
            calibration_crops=args.calibration_crops,
            calibration_folder=args.calibration_dir,
            workspace_mib=args.workspace_mib,
            force=args.force,
        )
    except EdgeError as error:
        print(f"edge build-engine: {error}", file=sys.stderr)
        return int(error.exit_status)
    sidecar = read_sidecar(plan)
    print(
        json.dumps(
            {
                "plan": str(plan),
                "key": sidecar.key,
                **sidecar.key_fields.model_dump(),
                "gate": sidecar.gate.message if sidecar.gate else None,
            }
        )
    )
    return 0
