"""``edge export CHECKPOINT --out engines/NAME.onnx``: the whole detector as one ONNX graph.

The graph is ``DiffFastener.forward`` traced as is: input normalisation, both one-step
denoising passes (one batch of two), the norm-guided blend, the segmentation pass and the top-k
image score, with the fixed inference noise as constants. A runtime only resizes crops to the
input size; it reimplements nothing. One input ``crops`` float32 ``(batch, C, H, W)`` in pixel
units ``[0, 255]``; outputs ``anomaly_map`` ``(batch, 1, H, W)``, ``image_score`` ``(batch,)``
and ``reconstruction`` ``(batch, C, H, W)``; the batch axis is dynamic.

Steps:

1. trace the model at opset 17 (the highest TensorRT 8.5/8.6 parse, so JetPack 5 and 6 both
   take the graph) with a dynamic batch axis;
2. write the static crop size into the declared output shapes and the model id, preset and
   format into the graph's ``metadata_props``;
3. ``onnx.checker`` with full shape inference;
4. check: ONNX Runtime on the written graph against torch on seeded crops, at another batch
   size than the one traced; refused over 1e-3 (anomaly map) or 1e-4 (image score);
5. write the graph, then the metadata file beside it (``edge.engine.metadata``).

Known limits:

- The graph comes from torch's TorchScript-based exporter (``dynamo=False``), which torch
  deprecated in 2.9 in favour of the ``torch.export`` one. That one emits opset 18+ and needs
  onnxscript; TensorRT 8.5/8.6 on JetPack do not parse opset 18 and TensorRT 10.7 failed on the
  opset-21 ``GroupNormalization`` (NVIDIA/TensorRT#4336). When torch removes the old exporter,
  switch to ``dynamo=True`` and run tests/test_export.py (its TensorRT op list) again.
- GroupNorm exports as Reshape + InstanceNormalization + Reshape + Mul + Add (no
  ``GroupNormalization`` op below opset 18); TensorRT maps InstanceNormalization to its
  normalisation layer, which the plan build keeps in FP32.
- The timestep reaches the graph as a float (``ones(batch) * t``); the ``alpha_bar`` look-up
  casts it to int64 for a Gather, which TensorRT 8.x runs as int32.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from edge.engine.backends.base import OUTPUT_NAMES
from edge.engine.metadata import (
    FORMAT,
    ExportMetadata,
    TensorSpec,
    metadata_path,
    write_metadata,
)
from edge.errors import EdgeError, ModelInvalidError, UsageError, check_output_file
from edge.logs import get_logger
from edge.model.checkpoint import load_checkpoint
from edge.model.detector import DiffFastener

log = get_logger(__name__)

DEFAULT_OPSET = 17
MIN_OPSET = 17
MAX_OPSET = 20
INPUT_NAME = "crops"
TRACE_BATCH = 2
CHECK_BATCH = 3
CHECK_TOLERANCE = {"anomaly_map": 1e-3, "image_score": 1e-4}
"""Export check: ONNX Runtime FP32 vs torch FP32 of the same weights. Measured differences on
this project's presets are about 1e-6 (map) and 2e-7 (score); these limits catch a broken graph
(a wrong op, a lost constant), not rounding."""


def _tensor_specs(channels: int, size: int) -> tuple[TensorSpec, list[TensorSpec]]:
    crops = TensorSpec(
        name=INPUT_NAME,
        dtype="float32",
        shape=["batch", channels, size, size],
        description="crops in pixel units [0, 255]; normalisation is inside the graph",
    )
    outputs = [
        TensorSpec(
            name="anomaly_map",
            dtype="float32",
            shape=["batch", 1, size, size],
            description="per-pixel anomaly probability in [0, 1]",
        ),
        TensorSpec(
            name="image_score",
            dtype="float32",
            shape=["batch"],
            description="mean of the top-k anomaly map values",
        ),
        TensorSpec(
            name="reconstruction",
            dtype="float32",
            shape=["batch", channels, size, size],
            description="norm-guided one-step reconstruction in pixel units [0, 255]",
        ),
    ]
    return crops, outputs


def _set_shape(value_info: onnx.ValueInfoProto, shape: list[int | str]) -> None:
    dims = value_info.type.tensor_type.shape.dim
    del dims[:]
    for size in shape:
        dim = dims.add()
        if isinstance(size, str):
            dim.dim_param = size
        else:
            dim.dim_value = size


def check_crops(channels: int, size: int, batch: int = CHECK_BATCH) -> np.ndarray:
    """Seeded crops for the export check: uniform noise, a ramp and a black crop.

    Returns:
        float32 ``(batch, channels, size, size)`` in ``[0, 255]``.
    """
    rng = np.random.default_rng(20250905)
    crops = rng.uniform(0.0, 255.0, (batch, channels, size, size)).astype(np.float32)
    if batch > 1:
        crops[1] = np.linspace(0.0, 255.0, size, dtype=np.float32)[None, None, :]
    if batch > 2:
        crops[2] = 0.0
    return crops


def _trace(model: DiffFastener, path: Path, opset: int) -> None:
    config = model.config
    example = torch.from_numpy(check_crops(config.in_channels, config.image_size, TRACE_BATCH))
    dynamic = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated; see the module docstring.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )


def _compare_with_torch(model: DiffFastener, onnx_path: Path) -> dict[str, float]:
    """Max |ONNX Runtime - torch| per output on :func:`check_crops`."""
    import onnxruntime as ort

    config = model.config
    crops = check_crops(config.in_channels, config.image_size)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ort_outputs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: crops})
    with torch.inference_mode():
        torch_outputs = [output.numpy() for output in model(torch.from_numpy(crops))]
    return {
        name: float(np.max(np.abs(ort_output - torch_output)))
        for name, ort_output, torch_output in zip(OUTPUT_NAMES, ort_outputs, torch_outputs)
    }


def check_out(out: str | Path, checkpoint: str | Path | None = None) -> Path:
    """``out`` as a :class:`Path` if the graph may be written there; checked before any work.

    Raises:
        UsageError: ``out`` is the checkpoint itself (same resolved path), or does not end in
            ``.onnx`` (the backends and ``edge build-engine`` tell a graph by that suffix).
        ConfigInvalidError: ``out`` (or its metadata file) cannot be written.
    """
    out = Path(out)
    if checkpoint and out.resolve() == Path(checkpoint).resolve():
        raise UsageError(
            f"--out {out}: the checkpoint being exported; the graph would overwrite it "
            "(give engines/NAME.onnx)"
        )
    out = check_output_file(out, "--out")
    if out.suffix != ".onnx":
        raise UsageError(f"--out {out}: not a .onnx file; the graph is written as NAME.onnx")
    check_output_file(metadata_path(out))
    return out


def export_model(
    model: DiffFastener,
    out: str | Path,
    *,
    model_id: str,
    opset: int = DEFAULT_OPSET,
    checkpoint: str = "",
    checkpoint_step: int = 0,
) -> ExportMetadata:
    """Export ``model`` to ``out`` and write ``out.json`` beside it (steps in the module doc).

    Args:
        model: the detector (any device; it is exported from the CPU in FP32).
        out: the ``.onnx`` path.
        model_id: the checkpoint's model id, recorded in the graph and the metadata.
        opset: ONNX opset, 17 to 20.
    Returns:
        the metadata written.
    Raises:
        UsageError: ``out`` is the checkpoint or no ``.onnx`` path (:func:`check_out`).
        ConfigInvalidError: ``out`` (or its metadata file) cannot be written; checked first.
        ModelInvalidError: the exported graph fails ``onnx.checker`` or the export check.
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be {MIN_OPSET}..{MAX_OPSET}, got {opset}")
    out = check_out(out, checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").float().eval()
    config = model.config
    channels, size = config.in_channels, config.image_size
    crops_spec, output_specs = _tensor_specs(channels, size)
    temporary = out.with_name(out.name + ".tmp")

    try:
        # 1. Trace.
        _trace(model, temporary, opset)

        # 2. Declared shapes and graph metadata.
        graph = onnx.load(str(temporary))
        _set_shape(graph.graph.input[0], crops_spec.shape)
        by_name = {spec.name: spec for spec in output_specs}
        for output in graph.graph.output:
            _set_shape(output, by_name[output.name].shape)
        onnx.helper.set_model_props(
            graph, {"model_id": model_id, "preset": config.preset, "format": FORMAT}
        )
        graph.doc_string = "Diff-Fastener detector: crops [0, 255] -> anomaly_map, image_score"

        # 3. Checker, with strict shape inference.
        try:
            onnx.checker.check_model(graph, full_check=True)
        except onnx.checker.ValidationError as error:
            raise ModelInvalidError(
                f"{out}: exported graph fails onnx.checker ({error})"
            ) from error
        onnx.save(graph, str(temporary))

        # 4. ONNX Runtime against torch.
        differences = _compare_with_torch(model, temporary)
        for name, limit in CHECK_TOLERANCE.items():
            if not differences[name] <= limit:
                raise ModelInvalidError(
                    f"{out}: ONNX Runtime differs from torch by {differences[name]:.3g} on {name} "
                    f"(limit {limit:g}); the graph was not written"
                )

        # 5. Graph, then metadata.
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)  # a refused or failed export leaves no .tmp
    metadata = write_metadata(
        out,
        model_id=model_id,
        preset=config.preset,
        model=config.model_dump(mode="json"),
        input_spec=crops_spec,
        output_specs=output_specs,
        opset=opset,
        exporter={"torch": torch.__version__, "onnx": onnx.__version__},
        export_check={f"{name}_max_abs": value for name, value in differences.items()},
        checkpoint=str(checkpoint),
        checkpoint_step=checkpoint_step,
    )
    log.info(
        "onnx_exported",
        path=str(out),
        model_id=model_id,
        preset=config.preset,
        opset=opset,
        nodes=len(graph.graph.node),
        onnx_sha256=metadata.onnx_sha256,
        anomaly_map_max_abs=differences["anomaly_map"],
        image_score_max_abs=differences["image_score"],
    )
    return metadata


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, opset: int = DEFAULT_OPSET
) -> ExportMetadata:
    """Load a checkpoint and :func:`export_model` it; ``out`` is checked before the loading."""
    check_out(out, checkpoint)
    model, payload = load_checkpoint(checkpoint)
    return export_model(
        model,
        out,
        model_id=payload["model_id"],
        opset=opset,
        checkpoint=str(checkpoint),
        checkpoint_step=int(payload.get("step", 0)),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="checkpoint written by `edge train`")
    parser.add_argument(
        "--out", type=Path, required=True, help="the .onnx to write (engines/NAME.onnx)"
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        choices=range(MIN_OPSET, MAX_OPSET + 1),
        help="ONNX opset (default 17: TensorRT 8.5/8.6 on JetPack parse up to 17)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        metadata = export_checkpoint(args.checkpoint, args.out, opset=args.opset)
    except EdgeError as error:
        print(f"edge export: {error}", file=sys.stderr)
        return int(error.exit_status)
    summary = {
        "onnx": str(args.out),
        "metadata": str(metadata_path(args.out)),
        "model_id": metadata.model_id,
        "preset": metadata.preset,
        "opset": metadata.opset,
        "onnx_sha256": metadata.onnx_sha256,
        **metadata.export_check,
    }
    print(json.dumps(summary))
    return 0
