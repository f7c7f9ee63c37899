"""The metadata file beside each exported graph (``engines/NAME.onnx.json``) and file hashes.

The metadata says what the graph is (preset, full model config, model id, input and output
tensors, opset), pins the exact graph bytes by SHA-256 (the TensorRT plan cache key uses it),
and says where the files that belong to this model live (thresholds, INT8 calibration caches).

Imports neither torch nor onnx: the engine process and ``edge build-engine`` read it.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from edge.config import StrictModel
from edge.errors import ModelInvalidError

FORMAT = "diff-fastener-onnx/1"

THRESHOLDS_FOLDER = "calibration"
THRESHOLDS_PATTERN = "calibration/{vehicle}/{camera}.thresholds.json"
"""Alarm thresholds: one file per vehicle and camera; each file records the ``model_id`` it was
fitted for, and a threshold for another model id must not be used."""

INT8_CACHE_PATTERN = "calibration/int8/{model_id}-{onnx_sha12}-trt{trt_major_minor}.cache"
"""TensorRT INT8 entropy-calibration caches: per graph and TensorRT release."""


class TensorSpec(StrictModel):
    """One input or output of the graph. ``shape`` uses ``"batch"`` for the dynamic axis."""

    name: str
    dtype: str
    shape: list[int | str]
    description: str = ""


class FileLocation(StrictModel):
    """Where files that belong to this model live, relative to the deployment root."""

    folder: str
    pattern: str
    keyed_by: str = Field(description="field of the metadata the files are tied to")


class ExportMetadata(StrictModel):
    """Everything a runtime needs to know about an exported graph without opening it."""

    format: str = FORMAT
    model_id: str
    preset: str
    model: dict[str, Any] = Field(description="the full ModelConfig, as stored in the checkpoint")
    image_size: int
    in_channels: int
    opset: int
    onnx_file: str
    onnx_sha256: str
    input: TensorSpec
    outputs: list[TensorSpec]
    thresholds: FileLocation
    int8_calibration_cache: FileLocation
    checkpoint: str = ""
    checkpoint_step: int = 0
    exported_at: str = ""
    exporter: dict[str, str] = Field(default_factory=dict)
    export_check: dict[str, float] = Field(
        default_factory=dict, description="max |ONNX Runtime - torch| on the check crops"
    )


def metadata_path(onnx_path: str | Path) -> Path:
    """``engines/NAME.onnx`` -> ``engines/NAME.onnx.json``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + ".json")


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write JSON through a temporary file and ``os.replace``, so a reader never sees half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def write_metadata(
    onnx_path: str | Path,
    *,
    model_id: str,
    preset: str,
    model: dict[str, Any],
    input_spec: TensorSpec,
    output_specs: list[TensorSpec],
    opset: int,
    exporter: dict[str, str],
    export_check: dict[str, float],
    checkpoint: str = "",
    checkpoint_step: int = 0,
) -> ExportMetadata:
    """Write ``NAME.onnx.json`` beside a graph already written; the one place it is made.

    ``input_spec`` is ``(batch, C, S, S)``: image size and channels are read from it.
    """
    onnx_path = Path(onnx_path)
    metadata = ExportMetadata(
        model_id=model_id,
        preset=preset,
        model=model,
        image_size=int(input_spec.shape[-1]),
        in_channels=int(input_spec.shape[1]),
        opset=opset,
        onnx_file=onnx_path.name,
        onnx_sha256=sha256_file(onnx_path),
        input=input_spec,
        outputs=output_specs,
        thresholds=FileLocation(
            folder=THRESHOLDS_FOLDER, pattern=THRESHOLDS_PATTERN, keyed_by="model_id"
        ),
        int8_calibration_cache=FileLocation(
            folder=THRESHOLDS_FOLDER, pattern=INT8_CACHE_PATTERN, keyed_by="onnx_sha256"
        ),
        checkpoint=checkpoint,
        checkpoint_step=checkpoint_step,
        exported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        exporter=exporter,
        export_check=export_check,
    )
    write_json_atomic(metadata_path(onnx_path), metadata.model_dump(mode="json"))
    return metadata


def read_metadata(onnx_path: str | Path, verify_hash: bool = True) -> ExportMetadata:
    """The metadata of ``onnx_path``, checked against the graph's bytes.

    Raises:
        ModelInvalidError: the metadata file is missing or malformed, or (``verify_hash``) the
            graph's SHA-256 differs from the one recorded (graph replaced or damaged).
    """
    onnx_path = Path(onnx_path)
    path = metadata_path(onnx_path)
    if not path.is_file():
        raise ModelInvalidError(
            f"{path}: no metadata beside {onnx_path.name}; export with `edge export`"
        )
    try:
        metadata = ExportMetadata.model_validate_json(path.read_text(encoding="utf-8"))
    except (ValidationError, OSError, UnicodeDecodeError) as error:
        raise ModelInvalidError(f"{path}: not valid export metadata ({error})") from error
    if metadata.format != FORMAT:
        raise ModelInvalidError(f"{path}: format {metadata.format!r}, expected {FORMAT!r}")
    if verify_hash:
        if not onnx_path.is_file():
            raise ModelInvalidError(f"{onnx_path}: no such ONNX graph")
        actual = sha256_file(onnx_path)
        if actual != metadata.onnx_sha256:
            raise ModelInvalidError(
                f"{onnx_path}: SHA-256 {actual[:12]} differs from {metadata.onnx_sha256[:12]} "
                f"recorded in {path.name} (graph replaced or damaged; export again)"
            )
    return metadata
