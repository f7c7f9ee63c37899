"""Backends: torch and ONNX Runtime agree, batching, model errors, selection by name, and the
TensorRT worker process (spawned, torch-free) on a machine without TensorRT."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from engine_helpers import artifacts, needs_tensorrt_gpu, random_crops

from edge.engine.backends import BackendUnavailableError, open_backend
from edge.engine.backends.base import check_outputs
from edge.engine.plan import GATE_TOLERANCE
from edge.errors import ConfigInvalidError, ModelInvalidError

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[1]
# Issue 4: torch and ONNX Runtime on the CPU agree within these.
MAP_TOLERANCE = 1e-4
SCORE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return artifacts(tmp_path_factory, "tiny")


@pytest.fixture(scope="module")
def tiny_backends(tiny):
    backends = {
        "torch": open_backend("torch", tiny.checkpoint),
        "onnxruntime": open_backend("onnxruntime", tiny.onnx, threads=1),
    }
    yield backends
    for backend in backends.values():
        backend.close()


@pytest.mark.parametrize(
    "preset_name, count", [("tiny", 4), pytest.param("edge", 2, marks=pytest.mark.slow)]
)
def test_torch_and_onnxruntime_agree_on_cpu(preset_name, count, tmp_path_factory):
    made = artifacts(tmp_path_factory, preset_name)
    crops = random_crops(count, made.crop_shape)
    crops[-1] = 0.0  # a black crop too
    with (
        open_backend("torch", made.checkpoint) as reference,
        open_backend("onnxruntime", made.onnx, threads=1) as onnx_backend,
    ):
        expected = reference.infer(crops)
        got = onnx_backend.infer(crops)
    assert expected.ok.all() and got.ok.all()
    # The comparison is not trivially zero: maps vary within and scores between crops.
    assert float(expected.anomaly_map.std()) > 0.01
    assert float(np.ptp(expected.image_score)) > 1e-3
    assert np.abs(got.anomaly_map - expected.anomaly_map).max() <= MAP_TOLERANCE
    assert np.abs(got.image_score - expected.image_score).max() <= SCORE_TOLERANCE
    # Reconstructions are in pixel units; float32 rounding of values up to 255.
    assert np.abs(got.reconstruction - expected.reconstruction).max() <= 5e-3
    assert got.anomaly_map.shape == (count, 1, *made.crop_shape[1:])
    assert got.image_score.shape == (count,)
    assert got.reconstruction.shape == (count, *made.crop_shape)


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_crop_alone_scores_as_in_a_batch_of_8(name, tiny_backends):
    backend = tiny_backends[name]
    crops = random_crops(8, backend.crop_shape, seed=11)
    in_batch = backend.infer(crops)
    alone = backend.infer(crops[5:6])
    assert abs(float(alone.image_score[0]) - float(in_batch.image_score[5])) <= 1e-6
    assert np.abs(alone.anomaly_map[0] - in_batch.anomaly_map[5]).max() <= 1e-6


def test_batches_over_max_batch_are_split(tiny):
    crops = random_crops(8, (1, 32, 32), seed=12)
    with (
        open_backend("onnxruntime", tiny.onnx, max_batch=8, threads=1) as whole,
        open_backend("onnxruntime", tiny.onnx, max_batch=3, threads=1) as split,
    ):
        expected, got = whole.infer(crops), split.infer(crops)
    assert split.max_batch == 3 and len(got) == 8
    np.testing.assert_allclose(got.image_score, expected.image_score, atol=1e-6)
    np.testing.assert_allclose(got.anomaly_map, expected.anomaly_map, atol=1e-6)


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_nan_or_inf_pixels_are_model_errors(name, tiny_backends):
    backend = tiny_backends[name]
    errors_before = backend.model_errors
    crops = random_crops(4, backend.crop_shape, seed=13)
    clean = backend.infer(crops)
    crops[1, 0, 5, 7] = np.nan
    crops[3, 0, 0, 0] = np.inf
    result = backend.infer(crops)

    assert result.ok.tolist() == [True, False, True, False]
    assert [error.index for error in result.errors] == [1, 3]
    assert "NaN" in result.errors[0].reason
    assert np.isnan(result.image_score[[1, 3]]).all()
    assert result.model_errors == 2
    assert backend.model_errors == errors_before + 2
    # The other crops of the batch are untouched by their neighbours' NaN.
    np.testing.assert_allclose(result.image_score[[0, 2]], clean.image_score[[0, 2]], atol=1e-6)
    anomaly_map, image_score, reconstruction = result
    assert anomaly_map is result.anomaly_map and image_score is result.image_score


def test_check_outputs_flags_inf_in_an_output_only():
    anomaly_map = np.full((3, 1, 4, 4), 0.5, np.float32)
    anomaly_map[2, 0, 1, 1] = np.inf
    result = check_outputs(
        anomaly_map, np.array([0.5, 0.6, 0.7], np.float32), np.ones((3, 1, 4, 4))
    )
    assert result.ok.tolist() == [True, True, False]
    assert result.errors[0].reason == "anomaly_map: 0 NaN, 1 inf"
    assert result.image_score[:2].tolist() == pytest.approx([0.5, 0.6])
    assert np.isnan(result.image_score[2])


def test_backends_report_name_device_precision(tiny_backends):
    assert tiny_backends["torch"].describe() == {
        "backend": "torch",
        "device": "cpu",
        "precision": "fp32",
        "max_batch": 8,
        "model_id": tiny_backends["torch"].model_id,
    }
    onnx_backend = tiny_backends["onnxruntime"]
    assert (onnx_backend.name, onnx_backend.device, onnx_backend.precision) == (
        "onnxruntime",
        "cpu",
        "fp32",
    )
    # Both name the same weights: the id travels from checkpoint to graph.
    assert onnx_backend.model_id == tiny_backends["torch"].model_id is not None


def test_crops_of_wrong_type_or_shape_are_refused(tiny_backends):
    backend = tiny_backends["onnxruntime"]
    with pytest.raises(ValueError, match="float32"):
        backend.infer(np.zeros((1, 1, 32, 32), np.uint16))
    with pytest.raises(ValueError, match=r"\(batch, 1, 32, 32\)"):
        backend.infer(np.zeros((1, 1, 64, 64), np.float32))
    empty = backend.infer(np.zeros((0, 1, 32, 32), np.float32))
    assert len(empty) == 0 and empty.anomaly_map.shape == (0, 1, 32, 32)


def test_torch_fp16_runs_and_stays_within_the_fp16_gate(tiny):
    crops = random_crops(3, (1, 32, 32), seed=14)
    with (
        open_backend("torch", tiny.checkpoint) as fp32,
        open_backend("torch", tiny.checkpoint, precision="fp16") as fp16,
    ):
        assert fp16.precision == "fp16"
        reference, half = fp32.infer(crops), fp16.infer(crops)
    map_diff = np.abs(half.anomaly_map - reference.anomaly_map).max()
    score_diff = np.abs(half.image_score - reference.image_score).max()
    assert 0 < map_diff <= GATE_TOLERANCE["fp16"].anomaly_map
    assert 0 < score_diff <= GATE_TOLERANCE["fp16"].image_score


def test_backend_selection_by_name(tiny):
    with pytest.raises(ConfigInvalidError, match="onnxruntime, tensorrt, torch"):
        open_backend("tensorflow", tiny.onnx)
    with pytest.raises(BackendUnavailableError, match="fp32"):
        open_backend("onnxruntime", tiny.onnx, precision="fp16")
    with pytest.raises(BackendUnavailableError, match="int8"):
        open_backend("torch", tiny.checkpoint, precision="int8")


def test_damaged_model_files_are_model_errors(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelInvalidError, match="junk.onnx"):
        open_backend("onnxruntime", junk)
    with pytest.raises(ModelInvalidError, match="no such"):
        open_backend("onnxruntime", tmp_path / "missing.onnx")
    with pytest.raises(ModelInvalidError, match="junk.pt"):
        open_backend("torch", junk.with_suffix(".pt").write_bytes(b"x") and junk.with_suffix(".pt"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_torch_cuda_without_cuda_says_so(tiny):
    with pytest.raises(BackendUnavailableError, match="no CUDA device"):
        open_backend("torch", tiny.checkpoint, device="cuda")


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA provider present"
)
def test_onnxruntime_cuda_without_provider_says_so(tiny):
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
        open_backend("onnxruntime", tiny.onnx, device="cuda:0")


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here"
)
def test_tensorrt_without_tensorrt_says_what_is_missing(tiny):
    with pytest.raises(BackendUnavailableError) as caught:
        open_backend("tensorrt", tiny.onnx)
    message = str(caught.value)
    assert "TensorRT" in message and "not installed" in message and "NVIDIA GPU" in message
    if importlib.util.find_spec("pycuda") is None:
        assert "pycuda" in message


def test_engine_modules_a_tensorrt_process_imports_load_no_torch():
    code = (
        "import sys, edge.engine.plan, edge.engine.backends.tensorrt_backend, "
        "edge.engine.backends.tensorrt_worker; print('torch' in sys.modules)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.stdout.strip() == "False", completed.stderr


PARENT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch  # the parent holds torch, as the engine process may
    from edge.engine.backends.tensorrt_backend import start_worker

    if __name__ == "__main__":
        process, conn = start_worker(0)
        message = conn.recv()
        if message[0] == "hello":
            conn.send(("close",))
        process.join(30)
        facts = message[1] if message[0] == "hello" else message[3]
        print(json.dumps({"kind": message[0], "text": str(message[1:3]), "facts": facts,
                          "exitcode": process.exitcode, "parent_torch": "torch" in sys.modules}))
    """
)


def test_tensorrt_worker_is_spawned_without_torch(tmp_path):
    """A real spawned worker, started from a script that imported torch first."""
    script = tmp_path / "engine_parent.py"
    script.write_text(PARENT_SCRIPT)
    completed = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["parent_torch"] is True
    assert report["facts"]["torch_imported"] is False
    assert report["exitcode"] == 0
    if importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("pycuda") is None:
        assert report["kind"] == "error"
        assert "No module named" in report["text"]
    else:
        assert report["kind"] == "hello" and report["facts"]["gpu_name"]


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_tensorrt_gpu
def test_tensorrt_plan_runs_and_matches_onnxruntime(tiny, tmp_path):
    import shutil

    from edge.engine.metadata import metadata_path
    from edge.engine.plan import build_engine

    onnx_path = tmp_path / "tiny.onnx"
    shutil.copy(tiny.onnx, onnx_path)
    shutil.copy(metadata_path(tiny.onnx), metadata_path(onnx_path))
    plan = build_engine(onnx_path, precision="fp16", max_batch=4)
    crops = random_crops(6, (1, 32, 32), seed=15)
    with (
        open_backend("tensorrt", plan, max_batch=4) as engine,
        open_backend("onnxruntime", onnx_path) as reference,
    ):
        assert (engine.name, engine.precision) == ("tensorrt", "fp16")
        got, expected = engine.infer(crops), reference.infer(crops)
        alone = engine.infer(crops[5:6])
    assert got.ok.all()
    assert np.abs(got.image_score - expected.image_score).max() <= 0.01
    assert abs(float(alone.image_score[0]) - float(got.image_score[5])) <= 1e-3
