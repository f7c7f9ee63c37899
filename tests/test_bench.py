"""``edge bench``: the figures it promises, in the JSON keys the README's table quotes.

Speeds are not asserted (this machine is shared and noisy); what is asserted is that each
comparison ran on both sides and that the figures that follow from others agree with them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
KEYS = (
    "onestep_vs_iterative_speedup",
    "sparse_vs_dense_speedup",
    "ort_vs_torch_speedup",
    "pipeline_vs_engine_ratio",
    "crops_per_s",
    "gflop_per_crop",
    "params_m",
    "peak_rss_mb",
)


@pytest.mark.slow
def test_bench_json_has_every_figure_and_they_agree():
    done = subprocess.run(
        [sys.executable, "-m", "edge", "bench", "--preset", "tiny", "--iterative-steps", "5"]
        + ["--repeats", "2", "--laps", "1", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout)
    for key in KEYS:
        assert figures[key] > 0, key
    assert figures["params_m"] == pytest.approx(0.34, abs=0.01)
    iterative = figures["onestep_vs_iterative"]
    assert iterative["iterative_steps_measured"] == 5 and iterative["iterative_extrapolated"]
    assert figures["onestep_vs_iterative_speedup"] == pytest.approx(
        iterative["iterative_s_per_crop"] / iterative["onestep_s_per_crop"]
    )
    assert figures["crops_per_s"] == pytest.approx(
        1 / figures["ort_vs_torch"]["s_per_crop"]["onnxruntime"]
    )
    pipeline = figures["pipeline"]
    assert pipeline["crops"] == 100 and pipeline["repeats"] == 2
    # Two layouts on this machine (two cores or more): the engine on the upper half of the
    # cores, and every process on every core.
    usable = sorted(os.sched_getaffinity(0))
    layouts = pipeline["layouts"]
    assert layouts["engine_pinned"]["engine_cpus"] == usable[len(usable) // 2 :]
    assert layouts["shared"]["engine_cpus"] is None
    assert pipeline["vehicle_layout"] == "engine_pinned"
    for layout in layouts.values():
        assert layout["pipeline_vs_engine_ratio"] == pytest.approx(
            layout["pipeline_crops_per_s"] / layout["engine_crops_per_s"]
        )
        assert layout["engine_busy_share"] == pytest.approx(
            layout["pipeline_crops_per_s"] / layout["engine_in_pipeline_crops_per_s"]
        )
    assert (
        figures["pipeline_vs_engine_ratio"] == layouts["engine_pinned"]["pipeline_vs_engine_ratio"]
    )
    assert (
        figures["pipeline_vs_engine_ratio_shared_cores"]
        == layouts["shared"]["pipeline_vs_engine_ratio"]
    )
    assert 0 < figures["peak_anon_mb"] < figures["peak_rss_mb"]
    needs = figures["vehicle_needs"]["160_kmh"]
    assert needs["crops_per_s_needed"] == pytest.approx(160 / 3.6 / 0.6 * 4)


@pytest.mark.timeout(300)
def test_bench_on_a_gpu_this_machine_lacks_says_why_for_each_backend():
    import onnxruntime

    cuda_here = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if torch.cuda.is_available() or cuda_here:
        pytest.skip("this machine can run CUDA: the refusal cannot happen here")
    done = subprocess.run(
        [sys.executable, "-m", "edge", "bench", "--preset", "tiny", "--device", "cuda"]
        + ["--repeats", "1", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 8 and done.stdout == ""
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("edge bench: bench on cuda: no backend can run here")
    for backend in ("torch_fp32", "torch_fp16", "onnxruntime_fp32"):
        assert f"{backend}: " in message


@pytest.mark.parametrize(
    ("options", "status", "message"),
    [
        (["--device", "gpu"], 2, "argument --device: 'gpu' is not cpu, cuda or cuda:N"),
        (["--laps", "-1"], 2, "argument --laps: -1 is not a whole number of at least 0"),
        (["--iterative-steps", "-5"], 2, "-5 is not a whole number of at least 0"),
        (
            ["--iterative-steps", "100000"],
            2,
            "edge bench: --iterative-steps 100000: the tiny preset samples 1000 steps; "
            "give at most 1000 (0: all)",
        ),
        (["--recording", "/nonexistent/run.mkv"], 7, "/nonexistent/run.mkv: no such recording"),
        (["--recording", "samples/track-demo"], 7, "samples/track-demo: a folder; name the"),
    ],
)
def test_bench_refuses_bad_options_before_timing_anything(options, status, message):
    done = subprocess.run(
        [sys.executable, "-m", "edge", "bench", "--preset", "tiny", "--json", *options],
        cwd=REPO,
        env={**os.environ, "EDGE_LOG_LEVEL": "info"},  # so that a started step would show
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == status and done.stdout == ""
    assert message in done.stderr.strip().splitlines()[-1]
    assert "bench_step" not in done.stderr


def test_bench_names_the_missing_run_json_of_its_recording(tmp_path):
    recording = tmp_path / "run.mkv"
    recording.write_bytes((REPO / "samples" / "track-demo" / "run.mkv").read_bytes())
    done = subprocess.run(
        [sys.executable, "-m", "edge", "bench", "--recording", str(recording), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 5
    assert done.stderr.strip().splitlines()[-1] == (
        f"edge bench: {recording}: run sidecar run.json is missing"
    )
