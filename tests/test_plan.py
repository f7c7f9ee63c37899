"""Plan cache keys, the plan check (corrupt, truncated, foreign plans), the gate and install,
gate crops and INT8 batches: everything of ``edge build-engine`` that runs without a GPU."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil

import cv2
import numpy as np
import onnx
import pytest
from engine_helpers import artifacts, needs_tensorrt_gpu, random_crops

from edge.cli import main as edge_main
from edge.engine.backends import open_backend
from edge.engine.backends.base import check_outputs
from edge.engine.backends.tensorrt_backend import TensorRTBackend
from edge.engine.metadata import metadata_path
from edge.engine.plan import (
    GATE_TOLERANCE,
    MachineIdentity,
    PlanInvalidError,
    PlanKey,
    PlanSidecar,
    calibration_batches,
    candidate_path_for,
    check_plan,
    compare_outputs,
    gate_crops,
    generated_gate_crops,
    holds_fp32,
    install_plan,
    load_crop_folder,
    mark_plan_stale,
    plan_cache_key,
    plan_path_for,
    read_sidecar,
    run_gate,
    sidecar_path,
    write_plan,
)
from edge.errors import EngineRefusedError, ExitStatus, InputUnreadableError

pytestmark = pytest.mark.timeout(240)

ORIN = MachineIdentity(tensorrt_version="10.3.0", gpu_name="Orin (nvgpu)", compute_capability="8.7")
KEY_FACTS = {
    "tensorrt_version": "10.3.0",
    "gpu_name": "Orin (nvgpu)",
    "compute_capability": "8.7",
    "onnx_sha256": "ab" * 32,
    "precision": "fp16",
    "max_batch": 8,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return artifacts(tmp_path_factory, "tiny")


@pytest.fixture(scope="module")
def tiny_perturbed(tmp_path_factory):
    """The same network, with every weight moved by a further N(0, 0.1)."""
    return artifacts(tmp_path_factory, "tiny", seed=8, std=0.1)


# -- cache key ------------------------------------------------------------------------------


def test_plan_cache_key_is_a_pure_function_of_its_facts():
    key = plan_cache_key(**KEY_FACTS)
    assert len(key) == 16 and int(key, 16) >= 0
    assert plan_cache_key(**dict(KEY_FACTS)) == key
    changed = {
        "tensorrt_version": "10.3.1",
        "gpu_name": "NVIDIA H200",
        "compute_capability": "9.0",
        "onnx_sha256": "cd" * 32,
        "precision": "int8",
        "max_batch": 4,
    }
    keys = {key}
    for field, value in changed.items():
        other = plan_cache_key(**{**KEY_FACTS, field: value})
        assert other != key, f"{field} does not change the key"
        keys.add(other)
    assert len(keys) == 1 + len(changed)
    assert PlanKey(**KEY_FACTS).digest() == key


def test_plan_path_is_named_by_graph_and_key(tmp_path):
    assert plan_path_for(tmp_path / "edge.onnx", "0123abcd0123abcd") == (
        tmp_path / "edge-0123abcd0123abcd.plan"
    )
    assert candidate_path_for(tmp_path / "edge-k.plan") == tmp_path / "edge-k.candidate.plan"


# -- plan check: real files -----------------------------------------------------------------


def _fake_plan(folder, key: PlanKey, size: int = 4096):
    """Plan bytes (random: a real plan needs TensorRT) and a correct sidecar, on disk."""
    plan = np.random.default_rng(1).bytes(size)
    path = plan_path_for(folder / "tiny.onnx", key.digest())
    sidecar = PlanSidecar(
        key=key.digest(),
        key_fields=key,
        plan_file=path.name,
        plan_bytes=len(plan),
        plan_sha256=hashlib.sha256(plan).hexdigest(),
        model_id="c0ffee000000",
        onnx_file="tiny.onnx",
        input_shape=[1, 32, 32],
        built_at="2026-01-01T00:00:00+00:00",
        build_seconds=1.0,
        fp32_layers=12,
    )
    write_plan(path, plan, sidecar)
    return path, plan


def test_check_plan_accepts_a_plan_that_matches(tmp_path):
    key = PlanKey(**KEY_FACTS)
    path, _ = _fake_plan(tmp_path, key)
    status = check_plan(path, key)
    assert status.ok and not status.needs_rebuild
    assert status.sidecar.key == key.digest()


def test_random_bytes_in_place_of_the_plan_are_corrupt(tmp_path):
    key = PlanKey(**KEY_FACTS)
    path, plan = _fake_plan(tmp_path, key)
    path.write_bytes(np.random.default_rng(2).bytes(len(plan)))
    status = check_plan(path, key)
    assert (status.state, status.needs_rebuild) == ("corrupt", True)
    assert "SHA-256" in status.reason and "rebuild" in status.reason


def test_truncated_plan_is_corrupt(tmp_path):
    key = PlanKey(**KEY_FACTS)
    path, plan = _fake_plan(tmp_path, key)
    path.write_bytes(plan[:1000])
    status = check_plan(path, key)
    assert status.state == "corrupt"
    assert "1000 bytes" in status.reason and "4096" in status.reason


def test_plan_built_for_another_gpu_is_found_before_deserialising(tmp_path):
    built_on_orin = PlanKey(**KEY_FACTS)
    path, _ = _fake_plan(tmp_path, built_on_orin)
    here = PlanKey(**{**KEY_FACTS, "gpu_name": "NVIDIA H200", "compute_capability": "9.0"})
    status = check_plan(path, here)
    assert (status.state, status.needs_rebuild) == ("mismatch", True)
    assert "GPU 'Orin (nvgpu)' (here 'NVIDIA H200')" in status.reason
    assert "compute capability '8.7' (here '9.0')" in status.reason

    # The TensorRT backend resolves a plan the same way, with no TensorRT involved: the worker
    # reports this machine, and the plan is refused with a rebuild before it is loaded.
    h200 = MachineIdentity(
        tensorrt_version="10.3.0", gpu_name="NVIDIA H200", compute_capability="9.0"
    )
    with pytest.raises(PlanInvalidError, match="rebuild") as caught:
        TensorRTBackend._resolve_plan(path, h200, None, 8)
    assert caught.value.needs_rebuild and caught.value.status.state == "mismatch"
    other_trt = h200.model_copy(update={"gpu_name": "Orin (nvgpu)", "compute_capability": "8.7"})
    other_trt = other_trt.model_copy(update={"tensorrt_version": "10.7.0"})
    with pytest.raises(PlanInvalidError, match="TensorRT '10.3.0' \\(here '10.7.0'\\)"):
        TensorRTBackend._resolve_plan(path, other_trt, None, 8)
    # On the machine that built it, the same files resolve.
    resolved, sidecar = TensorRTBackend._resolve_plan(path, ORIN, None, 8)
    assert resolved == path and sidecar.key == built_on_orin.digest()


def test_missing_or_edited_sidecar_means_rebuild(tmp_path):
    key = PlanKey(**KEY_FACTS)
    path, _ = _fake_plan(tmp_path, key)
    sidecar = json.loads(sidecar_path(path).read_text())
    sidecar["key_fields"]["gpu_name"] = "NVIDIA H200"  # edited without its key
    sidecar_path(path).write_text(json.dumps(sidecar))
    assert check_plan(path, key).state == "corrupt"
    sidecar_path(path).write_text("{not json")
    assert check_plan(path, key).state == "corrupt"
    sidecar_path(path).unlink()
    status = check_plan(path, key)
    assert status.state == "no_sidecar" and status.needs_rebuild
    path.unlink()
    assert check_plan(path, key).state == "missing"
    with pytest.raises(PlanInvalidError, match="no sidecar"):
        read_sidecar(path)


def test_a_plan_tensorrt_refused_is_set_aside_for_a_rebuild(tmp_path):
    key = PlanKey(**KEY_FACTS)
    path, _ = _fake_plan(tmp_path, key)
    assert check_plan(path, key).ok
    mark_plan_stale(path, "deserialize_cuda_engine returned None")
    status = check_plan(path, key)
    assert (status.state, status.needs_rebuild) == ("stale", True)
    assert "refused to load it here" in status.reason
    assert path.is_file()  # kept for a post-mortem; the next build replaces it


# -- the gate, with real backends -------------------------------------------------------------


@pytest.fixture(scope="module")
def crop_folder(tmp_path_factory):
    """Real image files: 8-bit and 16-bit grey PNGs, a colour PNG, a .npy; 48 px, resized."""
    folder = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(21)
    cv2.imwrite(str(folder / "a_grey8.png"), rng.integers(0, 256, (48, 48), dtype=np.uint8))
    cv2.imwrite(str(folder / "b_grey16.png"), rng.integers(0, 65536, (48, 48), dtype=np.uint16))
    cv2.imwrite(str(folder / "c_colour.png"), rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    np.save(folder / "d_crop.npy", rng.uniform(0, 255, (1, 32, 32)).astype(np.float32))
    (folder / "notes.txt").write_text("not a crop")
    return folder


def test_gate_refuses_a_perturbed_model_and_keeps_the_previous_plan(
    tiny, tiny_perturbed, crop_folder, tmp_path
):
    crops, names = gate_crops(1, 32, crop_folder)
    with (
        open_backend("onnxruntime", tiny.onnx, threads=1) as reference,
        open_backend("torch", tiny_perturbed.checkpoint) as candidate,
    ):
        report = run_gate(reference, candidate, crops, names, "fp16")
    assert not report.passed
    assert report.crops == [
        "a_grey8.png",
        "b_grey16.png",
        "c_colour.png",
        "d_crop.npy",
        "black",
        "saturated",
        "checkerboard",
    ]
    worst_map = next(d for d in report.differences if d.output == "anomaly_map")
    assert worst_map.max_abs > GATE_TOLERANCE["fp16"].anomaly_map
    assert worst_map.crop in names

    # Install step with real files: a previous plan is in place, the candidate is refused.
    key = PlanKey(**KEY_FACTS)
    previous, previous_bytes = _fake_plan(tmp_path, key)
    previous_sidecar = sidecar_path(previous).read_text()
    candidate = candidate_path_for(previous)
    candidate_sidecar = read_sidecar(previous).model_copy(update={"plan_file": candidate.name})
    write_plan(candidate, b"candidate plan bytes", candidate_sidecar)
    with pytest.raises(EngineRefusedError) as caught:
        install_plan(candidate, previous, report)
    message = str(caught.value)
    assert "worst difference" in message and f"anomaly_map {worst_map.max_abs:.3g}" in message
    assert "previous plan" in message and "kept" in message
    assert caught.value.exit_status == ExitStatus.ENGINE_REFUSED
    assert previous.read_bytes() == previous_bytes
    assert sidecar_path(previous).read_text() == previous_sidecar
    assert not candidate.exists() and not sidecar_path(candidate).exists()


def test_gate_passes_the_same_model_and_installs_the_candidate(tiny, tmp_path):
    crops, names = gate_crops(1, 32)
    crops = np.concatenate([random_crops(2, (1, 32, 32), seed=22), crops])
    names = ["noise-1", "noise-2", *names]
    with (
        open_backend("onnxruntime", tiny.onnx, threads=1) as reference,
        open_backend("torch", tiny.checkpoint) as candidate,
    ):
        report = run_gate(reference, candidate, crops, names, "fp32")
    assert report.passed, report.message
    assert all(d.max_abs <= 1e-4 for d in report.differences if d.output != "reconstruction")

    key = PlanKey(**KEY_FACTS)
    target = plan_path_for(tmp_path / "tiny.onnx", key.digest())
    candidate = candidate_path_for(target)
    _, candidate_bytes = _fake_plan(tmp_path, key)  # a plan at target, then a new candidate
    new_sidecar = read_sidecar(target).model_copy(
        update={"plan_bytes": 11, "plan_sha256": hashlib.sha256(b"new plan!!!").hexdigest()}
    )
    write_plan(candidate, b"new plan!!!", new_sidecar)
    assert install_plan(candidate, target, report) == target
    assert target.read_bytes() == b"new plan!!!" != candidate_bytes
    installed = read_sidecar(target)
    assert installed.gate.passed and installed.plan_file == target.name
    assert check_plan(target, key).ok
    assert not candidate.exists()


def test_gate_accepts_the_fp16_path_within_its_tolerance(tiny, crop_folder):
    """Torch autocast FP16 on the CPU: the FP16 arithmetic the tolerance was set from."""
    crops, names = gate_crops(1, 32, crop_folder)
    with (
        open_backend("onnxruntime", tiny.onnx, threads=1) as reference,
        open_backend("torch", tiny.checkpoint, precision="fp16") as candidate,
    ):
        report = run_gate(reference, candidate, crops, names, "fp16")
    assert report.passed, report.message
    worst = {d.output: d.max_abs for d in report.differences}
    assert 0 < worst["anomaly_map"] <= GATE_TOLERANCE["fp16"].anomaly_map / 5
    assert 0 < worst["image_score"] <= GATE_TOLERANCE["fp16"].image_score / 5


def test_gate_refuses_nan_whatever_the_differences(tiny):
    crops, names = gate_crops(1, 32)
    with open_backend("onnxruntime", tiny.onnx, threads=1) as backend:
        reference = backend.infer(crops)
    broken_map = reference.anomaly_map.copy()
    broken_map[2, 0, 4, 4] = np.nan
    candidate = check_outputs(broken_map, reference.image_score, reference.reconstruction)
    report = compare_outputs(reference, candidate, names, GATE_TOLERANCE["fp16"])
    assert not report.passed
    assert report.nonfinite == ["candidate crop 'checkerboard': anomaly_map: 1 NaN, 0 inf"]
    assert "NaN/inf" in report.message
    identical = compare_outputs(reference, reference, names, GATE_TOLERANCE["fp16"])
    assert identical.passed and all(d.max_abs == 0 for d in identical.differences)
    with pytest.raises(ValueError, match="crop names"):
        compare_outputs(reference, reference, names[:2], GATE_TOLERANCE["fp16"])


# -- gate crops and INT8 batches ------------------------------------------------------------


def test_crop_folder_is_read_scaled_and_resized(crop_folder):
    crops, names = load_crop_folder(crop_folder, channels=1, size=32)
    assert names == ["a_grey8.png", "b_grey16.png", "c_colour.png", "d_crop.npy"]
    assert crops.shape == (4, 1, 32, 32) and crops.dtype == np.float32
    assert crops.min() >= 0.0 and crops.max() <= 255.0
    grey16 = cv2.imread(str(crop_folder / "b_grey16.png"), cv2.IMREAD_UNCHANGED)
    expected = cv2.resize(
        grey16.astype(np.float32) * (255 / 65535), (32, 32), interpolation=cv2.INTER_AREA
    )
    np.testing.assert_allclose(crops[1, 0], expected, rtol=1e-5)
    np.testing.assert_array_equal(crops[3], np.load(crop_folder / "d_crop.npy"))
    colour, _ = load_crop_folder(crop_folder, channels=3, size=32, limit=1)
    assert colour.shape == (1, 3, 32, 32)
    assert np.array_equal(colour[0, 0], colour[0, 2])  # grey replicated to three channels


def test_crop_folder_errors_name_the_file(tmp_path):
    with pytest.raises(InputUnreadableError, match="no such folder"):
        load_crop_folder(tmp_path / "nowhere", 1, 32)
    with pytest.raises(InputUnreadableError, match="no crops"):
        load_crop_folder(tmp_path, 1, 32)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputUnreadableError, match="bad.png"):
        load_crop_folder(tmp_path, 1, 32)


def test_generated_gate_crops():
    crops, names = generated_gate_crops(1, 32)
    assert names == ["black", "saturated", "checkerboard"]
    assert (crops[0] == 0).all() and (crops[1] == 255).all()
    board = crops[2, 0]
    assert board[0, 0] == 0 and board[0, 8] == 255 and board[8, 8] == 0 and board[7, 7] == 0
    assert (board == 255).mean() == 0.5


def test_calibration_batches_are_whole():
    crops = random_crops(10, (1, 32, 32))
    batches = calibration_batches(crops, 4)
    assert [b.shape for b in batches] == [(4, 1, 32, 32)] * 2
    assert all(b.flags.c_contiguous for b in batches)
    np.testing.assert_array_equal(batches[1], crops[4:8])
    with pytest.raises(InputUnreadableError, match="at least 4"):
        calibration_batches(crops[:3], 4)


# -- FP32 islands ----------------------------------------------------------------------------

# The TensorRT layer type the ONNX parser makes of each op of this graph (with the operation
# for ELEMENTWISE and UNARY); ops not listed become layers holds_fp32 leaves alone.
ONNX_TO_TENSORRT_LAYER = {
    "InstanceNormalization": ("NORMALIZATION", None),
    "Softmax": ("SOFTMAX", None),
    "ReduceMean": ("REDUCE", None),
    "ReduceMax": ("REDUCE", None),
    "TopK": ("TOPK", None),
    "MatMul": ("MATRIX_MULTIPLY", None),
    "Conv": ("CONVOLUTION", None),
    "Gemm": ("MATRIX_MULTIPLY", None),
    "Pow": ("ELEMENTWISE", "POW"),
    "Mul": ("ELEMENTWISE", "PROD"),
    "Sqrt": ("UNARY", "SQRT"),
    "Erf": ("UNARY", "ERF"),
}


def test_fp32_islands_cover_norms_softmax_and_attention_of_the_graph(tiny):
    nodes = onnx.load(str(tiny.onnx)).graph.node
    held = {}
    for node in nodes:
        if node.op_type in ONNX_TO_TENSORRT_LAYER:
            layer_type, operation = ONNX_TO_TENSORRT_LAYER[node.op_type]
            held[node.name] = (node.op_type, holds_fp32(node.name, layer_type, operation))
    by_op: dict[str, set[bool]] = {}
    for op_type, decision in held.values():
        by_op.setdefault(op_type, set()).add(decision)
    for op_type in ("InstanceNormalization", "Softmax", "ReduceMean", "TopK", "Pow", "Sqrt"):
        assert by_op[op_type] == {True}, op_type
    for op_type in ("Conv", "Erf", "Mul"):
        assert by_op[op_type] == {False}, op_type
    # Two products per attention block (q.k^T and weights.v): tiny has 4 attention blocks.
    attention = [name for name, (op, kept) in held.items() if op == "MatMul" and kept]
    assert len(attention) == 8
    assert not any(kept for op, kept in held.values() if op == "Gemm")
    assert holds_fp32("InstanceNormalization_TRT_plugin_3", "PLUGIN_V2")


# -- build-engine on a machine without TensorRT -----------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT present")
def test_build_engine_without_tensorrt_says_what_is_missing(tiny, tmp_path, capsys):
    onnx_path = tmp_path / "tiny.onnx"
    shutil.copy(tiny.onnx, onnx_path)
    shutil.copy(metadata_path(tiny.onnx), metadata_path(onnx_path))
    status = edge_main(["build-engine", str(onnx_path)])
    assert status == ExitStatus.CONFIG_INVALID
    assert "TensorRT" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.plan"))


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_tensorrt_gpu
def test_build_engine_caches_gates_and_rebuilds_a_corrupt_plan(tiny, tmp_path):
    from edge.engine.plan import build_engine

    onnx_path = tmp_path / "tiny.onnx"
    shutil.copy(tiny.onnx, onnx_path)
    shutil.copy(metadata_path(tiny.onnx), metadata_path(onnx_path))
    plan = build_engine(onnx_path, precision="fp16", max_batch=4)
    sidecar = read_sidecar(plan)
    assert sidecar.gate.passed and sidecar.fp32_layers > 0
    assert build_engine(onnx_path, precision="fp16", max_batch=4) == plan  # cached
    built_at = plan.stat().st_mtime_ns
    plan.write_bytes(plan.read_bytes()[:100])  # truncated: rebuilt, not loaded
    assert build_engine(onnx_path, precision="fp16", max_batch=4) == plan
    assert plan.stat().st_mtime_ns != built_at and check_plan(plan, sidecar.key_fields).ok
