#!/usr/bin/env python3
"""GPU checks of the engine (issue 4, point 4), as one prepared script. Prints JSON.

Run from the repository root on a machine with an NVIDIA GPU::

    PYTHONUNBUFFERED=1 python scripts/gpu_check.py --presets tiny,edge --out gpu_check.json

For each preset, with randomly initialised and perturbed weights (every layer contributes; the
tests do the same):

1. ``export``: checkpoint and ONNX graph, on the CPU.
2. ``tensorrt``: with TensorRT and pycuda present, ``edge build-engine`` (FP16, then FP32) with
   its gate against ONNX Runtime FP32 on the CPU; the plan's agreement, crops/s, a NaN crop as a
   model error, a crop alone vs in a batch, and the corrupt-plan path (truncated copy -> rebuild).
3. ``onnxruntime``: CUDA provider vs CPU, agreement and crops/s.
4. ``torch``: CUDA FP16 (autocast) vs CUDA FP32 vs CPU FP32, agreement and crops/s.

Each check runs in its own try/except and reports its error; none stops the others. TensorRT
runs before torch touches CUDA, and in its own spawned worker process. Agreement is
``max |a - b|`` over all crops and pixels of the anomaly map, image score and reconstruction;
speed is crops/s over ``--repeats`` batches of ``--batch`` crops after one warm-up batch.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def check(results: dict, name: str, function, *args, **kwargs) -> None:
    """Run one check; store its result or its error under ``name``, never raise."""
    started = time.monotonic()
    try:
        results[name] = {"ok": True, **function(*args, **kwargs)}
    except BaseException as error:  # noqa: BLE001 - every failure is reported, none stops us
        if isinstance(error, KeyboardInterrupt):
            raise
        results[name] = {
            "ok": False,
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(limit=6),
        }
    results[name]["seconds"] = round(time.monotonic() - started, 2)
    print(json.dumps({name: results[name]}), flush=True)


def differences(a, b) -> dict[str, float]:
    return {
        f"{name}_max_abs": float(np.max(np.abs(getattr(a, name) - getattr(b, name))))
        for name in ("anomaly_map", "image_score", "reconstruction")
    }


def crops_per_second(backend, crops, repeats: int, synchronize=None) -> float:
    backend.infer(crops)  # warm-up (cuDNN autotuning, lazy allocation)
    if synchronize:
        synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        backend.infer(crops)
    if synchronize:
        synchronize()
    return round(crops.shape[0] * repeats / (time.perf_counter() - started), 2)


def environment() -> dict:
    facts = {"python": sys.version.split()[0], "machine": platform.machine()}
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,driver_version,memory.total,compute_cap"
        facts["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
    import onnxruntime

    facts["onnxruntime"] = onnxruntime.__version__
    facts["onnxruntime_providers"] = onnxruntime.get_available_providers()
    for module in ("tensorrt", "pycuda"):
        try:
            facts[module] = __import__(module).__version__
        except Exception as error:  # noqa: BLE001
            facts[module] = f"absent ({type(error).__name__}: {error})"
    return facts


def export(preset_name: str, folder: Path) -> dict:
    import torch

    from edge.engine.export import export_checkpoint
    from edge.model import DiffFastener, preset
    from edge.model.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = DiffFastener(preset(preset_name)).eval()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    checkpoint = folder / f"{preset_name}.pt"
    save_checkpoint(checkpoint, model)
    metadata = export_checkpoint(checkpoint, folder / f"{preset_name}.onnx")
    return {
        "checkpoint": str(checkpoint),
        "onnx": str(folder / f"{preset_name}.onnx"),
        "model_id": metadata.model_id,
        **metadata.export_check,
    }


def crops_for(onnx_path: Path, batch: int) -> np.ndarray:
    from edge.engine.metadata import read_metadata
    from edge.engine.plan import generated_gate_crops

    metadata = read_metadata(onnx_path)
    shape = (metadata.in_channels, metadata.image_size, metadata.image_size)
    rng = np.random.default_rng(3)
    crops = rng.uniform(0, 255, (batch, *shape)).astype(np.float32)
    generated, _ = generated_gate_crops(*shape[:2])
    crops[: min(3, batch)] = generated[: min(3, batch)]
    return crops


def tensorrt(onnx_path: Path, precision: str, batch: int, repeats: int) -> dict:
    from edge.engine.backends import open_backend
    from edge.engine.plan import build_engine, check_plan, read_sidecar

    started = time.monotonic()
    plan = build_engine(onnx_path, precision=precision, max_batch=batch, force=True)
    build_seconds = time.monotonic() - started
    sidecar = read_sidecar(plan)
    crops = crops_for(onnx_path, batch)
    result = {
        "plan": plan.name,
        "build_seconds": round(build_seconds, 1),
        "fp32_layers": sidecar.fp32_layers,
        "build_notes": sidecar.build_notes,
        "gate": sidecar.gate.model_dump() if sidecar.gate else None,
        "key_fields": sidecar.key_fields.model_dump(),
    }
    with (
        open_backend("tensorrt", plan, max_batch=batch) as engine,
        open_backend("onnxruntime", onnx_path, device="cpu", max_batch=batch) as reference,
    ):
        got, expected = engine.infer(crops), reference.infer(crops)
        result["vs_onnxruntime_cpu_fp32"] = differences(got, expected)
        result["all_ok"] = bool(got.ok.all())
        alone = engine.infer(crops[-1:])
        result["alone_vs_batch_score"] = float(abs(alone.image_score[0] - got.image_score[-1]))
        poisoned = crops.copy()
        poisoned[1, 0, 2, 2] = np.nan
        flagged = engine.infer(poisoned)
        result["nan_crop_flagged"] = flagged.ok.tolist()
        result["crops_per_s"] = crops_per_second(engine, crops, repeats)
        result["onnxruntime_cpu_crops_per_s"] = crops_per_second(reference, crops, 1)

    # Corrupt-plan path: a truncated plan is found from its sidecar, then rebuilt.
    plan.write_bytes(plan.read_bytes()[:1000])
    result["truncated_state"] = check_plan(plan, sidecar.key_fields).state
    rebuilt = build_engine(onnx_path, precision=precision, max_batch=batch)
    result["rebuilt_ok"] = check_plan(rebuilt, sidecar.key_fields).ok
    return result


def onnxruntime_cuda(onnx_path: Path, batch: int, repeats: int) -> dict:
    from edge.engine.backends import open_backend

    crops = crops_for(onnx_path, batch)
    with (
        open_backend("onnxruntime", onnx_path, device="cuda:0", max_batch=batch) as gpu,
        open_backend("onnxruntime", onnx_path, device="cpu", max_batch=batch) as cpu,
    ):
        result = {"cuda_vs_cpu": differences(gpu.infer(crops), cpu.infer(crops))}
        result["cuda_crops_per_s"] = crops_per_second(gpu, crops, repeats)
        result["cpu_crops_per_s"] = crops_per_second(cpu, crops, 1)
    return result


def torch_cuda(checkpoint: Path, onnx_path: Path, batch: int, repeats: int) -> dict:
    import torch

    from edge.engine.backends import open_backend

    crops = crops_for(onnx_path, batch)
    sync = torch.cuda.synchronize
    with (
        open_backend("torch", checkpoint, device="cuda", max_batch=batch) as fp32,
        open_backend("torch", checkpoint, device="cuda", precision="fp16", max_batch=batch) as fp16,
        open_backend("torch", checkpoint, device="cpu", max_batch=batch) as cpu,
    ):
        r32, r16, rcpu = fp32.infer(crops), fp16.infer(crops), cpu.infer(crops)
        result = {
            "device_name": torch.cuda.get_device_name(0),
            "fp16_vs_fp32": differences(r16, r32),
            "cuda_fp32_vs_cpu_fp32": differences(r32, rcpu),
            "fp16_all_ok": bool(r16.ok.all()),
            "fp32_crops_per_s": crops_per_second(fp32, crops, repeats, sync),
            "fp16_crops_per_s": crops_per_second(fp16, crops, repeats, sync),
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,edge")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--trt-precisions", default="fp16,fp32")
    parser.add_argument("--work", type=Path, default=None, help="folder for artifacts")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    check(results, "environment", environment)
    for preset_name in args.presets.split(","):
        folder = work / preset_name
        folder.mkdir(parents=True, exist_ok=True)
        check(results, f"{preset_name}/export", export, preset_name, folder)
        if not results[f"{preset_name}/export"]["ok"]:
            continue
        onnx_path = folder / f"{preset_name}.onnx"
        checkpoint = folder / f"{preset_name}.pt"
        for precision in args.trt_precisions.split(","):
            check(
                results,
                f"{preset_name}/tensorrt_{precision}",
                tensorrt,
                onnx_path,
                precision,
                args.batch,
                args.repeats,
            )
        check(
            results,
            f"{preset_name}/onnxruntime_cuda",
            onnxruntime_cuda,
            onnx_path,
            args.batch,
            args.repeats,
        )
        check(
            results,
            f"{preset_name}/torch_cuda",
            torch_cuda,
            checkpoint,
            onnx_path,
            args.batch,
            args.repeats,
        )
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if all(entry.get("ok") for entry in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
