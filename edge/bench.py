"""``edge bench``: what the product costs, measured side by side in one run.

Every comparison runs both sides in the same process, on the same crops, alternating, with
``repeats`` repetitions; medians are reported and compared as ratios, which survive a busy
machine far better than absolute times. An absolute time means something only on the target
GPU.

Measured:

1. one-step norm-guided inference against iterative DDPM sampling with the same network
   (all ``T`` steps when ``--iterative-steps`` is 0, else that many steps with the per-step cost
   extrapolated to ``T``; the output says which);
2. Sparse-Skip against dense skips, with DACM on and off;
3. ONNX Runtime against PyTorch on this CPU, same weights and threads;
4. the whole pipeline (``edge-replay`` crops per second on a generated recording) against the
   engine alone on the same number of crops, and the pipeline's peak memory (the sum over its
   processes, sampled: resident and anonymous, :class:`TreeMemory`). In two layouts
   (:func:`engine_layouts`): the vehicle's, where the engine has cores of its own
   (``--engine-cpus``) and is timed alone on those same cores, so the ratio is what the
   pipeline itself costs (``pipeline_vs_engine_ratio``); and every process on every core,
   where the ratio also counts the CPU time grabber and publisher take from the engine, which
   they cannot on a vehicle whose model runs on a GPU
   (``pipeline_vs_engine_ratio_shared_cores``). Beside each, the engine's busy share: the
   pipeline's rate over the engine's own rate inside it (crops over its inference time); near
   1, the engine is never left waiting for crops;
5. parameters and GFLOP per crop;
6. crops per second against what a vehicle needs at 80, 160 and 250 km/h (a sleeper every
   0.6 m, four fasteners on each);
7. with ``--device cuda``, instead of 1-4: the engine's crops per second on that GPU with
   PyTorch FP32 and FP16 and ONNX Runtime's CUDA provider, and the GPU's name.

Known limit: the ``--device cuda`` step has only been run on machines without a GPU, where it
refuses with each backend's reason (exit status 8); its figures are yet to be measured.

The weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from edge.argtypes import non_negative_int, positive_int
from edge.errors import UsageError
from edge.logs import configure, get_logger
from edge.model.config import PRESETS, ModelConfig, preset
from edge.model.detector import DiffFastener, to_unit_range
from edge.model.info import model_info
from edge.pipeline.replay import check_recording_file

log = get_logger(__name__)

SLEEPER_PITCH_M = 0.6
FASTENERS_PER_SLEEPER = 4
VEHICLE_SPEEDS_KMH = (80, 160, 250)


def needed_crops_per_s(speed_kmh: float) -> float:
    """Fastener crops per second a vehicle at ``speed_kmh`` produces (both rails)."""
    return speed_kmh / 3.6 / SLEEPER_PITCH_M * FASTENERS_PER_SLEEPER


def median_seconds(work: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``work()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def random_model(config: ModelConfig, seed: int = 0) -> DiffFastener:
    torch.manual_seed(seed)
    return DiffFastener(config).eval()


def onestep_vs_iterative(config: ModelConfig, repeats: int, iterative_steps: int) -> dict:
    """Seconds per crop of one-step inference and of iterative DDPM sampling (batch 1)."""
    from edge import diffusion

    model = random_model(config)
    crop = torch.rand(1, config.in_channels, config.image_size, config.image_size) * 255
    total = config.diffusion.num_timesteps
    steps = iterative_steps or total
    generator = torch.Generator().manual_seed(0)
    x0 = to_unit_range(crop)

    def one_step():
        model(crop)

    def iterative():
        reconstruction, _ = diffusion.ddpm_reconstruction(
            model.denoiser, x0, total - 1, model.alpha_bar, generator, num_steps=steps
        )
        model.segmenter(torch.cat([x0, reconstruction], dim=1))

    with torch.inference_mode():
        onestep_s = median_seconds(one_step, repeats)
        measured_s = median_seconds(iterative, max(1, repeats // 2), warmup=0)
        segment_s = median_seconds(lambda: model.segmenter(torch.cat([x0, x0], 1)), repeats)
    per_step = (measured_s - segment_s) / steps
    iterative_s = per_step * total + segment_s
    return {
        "onestep_s_per_crop": onestep_s,
        "iterative_s_per_crop": iterative_s,
        "iterative_steps_measured": steps,
        "iterative_extrapolated": steps < total,
        "onestep_vs_iterative_speedup": iterative_s / onestep_s,
    }


def skip_and_dacm(config: ModelConfig, repeats: int, batch: int) -> dict:
    """Seconds per crop of one-step inference for sparse/dense skips and DACM on/off."""
    crops = torch.rand(batch, config.in_channels, config.image_size, config.image_size) * 255
    variants = {
        "sparse_dacm": {},
        "dense_dacm": {"skip_stride": 1},
        "sparse_no_dacm": {"dacm": False},
        "dense_no_dacm": {"skip_stride": 1, "dacm": False},
    }
    models = {
        name: random_model(preset(config.preset, denoiser=change) if change else config)
        for name, change in variants.items()
    }
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(crops)
        for _ in range(repeats):  # alternate, so load changes hit every variant alike
            for name, model in models.items():
                started = time.perf_counter()
                model(crops)
                times[name].append((time.perf_counter() - started) / batch)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "s_per_crop": medians,
        "sparse_vs_dense_speedup": medians["dense_dacm"] / medians["sparse_dacm"],
        "sparse_vs_dense_speedup_no_dacm": medians["dense_no_dacm"] / medians["sparse_no_dacm"],
        "dacm_cost": medians["sparse_dacm"] / medians["sparse_no_dacm"],
    }


def ort_vs_torch(config: ModelConfig, repeats: int, batch: int, threads: int) -> dict:
    """Seconds per crop of the same weights in PyTorch and in ONNX Runtime (CPU)."""
    from edge.engine.backends import open_backend
    from edge.engine.export import export_model
    from edge.model.checkpoint import save_checkpoint

    model = random_model(config)
    crops = (
        np.random.default_rng(0)
        .uniform(0, 255, (batch, config.in_channels, config.image_size, config.image_size))
        .astype(np.float32)
    )
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "bench.pt"
        model_id = save_checkpoint(checkpoint, model)
        onnx_path = Path(folder) / "bench.onnx"
        export_model(model, onnx_path, model_id=model_id)
        torch.set_num_threads(threads)
        backends = {
            "torch": open_backend("torch", checkpoint, max_batch=batch),
            "onnxruntime": open_backend("onnxruntime", onnx_path, max_batch=batch, threads=threads),
        }
        times: dict[str, list[float]] = {name: [] for name in backends}
        try:
            for backend in backends.values():
                backend.infer(crops)
            for _ in range(repeats):
                for name, backend in backends.items():
                    started = time.perf_counter()
                    backend.infer(crops)
                    times[name].append((time.perf_counter() - started) / batch)
        finally:
            for backend in backends.values():
                backend.close()
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "s_per_crop": medians,
        "ort_vs_torch_speedup": medians["torch"] / medians["onnxruntime"],
    }


class TreeMemory:
    """Samples the summed memory of a process and its descendants (Linux ``/proc``).

    Two peaks: resident memory (``VmRSS``), which counts every shared library once per process
    and, for pages of files in the page cache, more or fewer of them depending on what the
    cache holds (a fresh install reads higher); and anonymous memory (``RssAnon``): heaps,
    weights and buffers, which no cache state changes.
    """

    def __init__(self, pid: int, interval_s: float = 0.05):
        self.pid, self.interval_s = pid, interval_s
        self.peak_bytes = 0
        self.peak_anon_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            resident = anonymous = 0
            for pid in _descendants(self.pid):
                try:
                    with open(f"/proc/{pid}/status") as status:
                        fields = dict(line.split(":", 1) for line in status if ":" in line)
                    resident += int(fields["VmRSS"].split()[0]) * 1024
                    anonymous += int(fields["RssAnon"].split()[0]) * 1024
                except (OSError, KeyError, IndexError, ValueError):
                    continue  # gone, or a zombie without memory lines
            self.peak_bytes = max(self.peak_bytes, resident)
            self.peak_anon_bytes = max(self.peak_anon_bytes, anonymous)
            self._stop.wait(self.interval_s)


def _descendants(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    stack.extend(int(child) for child in children.read().split())
        except OSError:
            continue
    return found


def bench_recording(source: Path, laps: int, out: Path) -> Path:
    """``source`` recording played ``laps`` times end to end, as one recording with telemetry.

    Real frames, enough crops to time the pipeline past its start-up (the bundled sample holds
    100 fasteners per lap).
    """
    from edge.grabber.record import write_recording
    from edge.grabber.sources import RecordingSource
    from edge.telemetry.run import RunInfo
    from edge.telemetry.simulate import SimulatedTrack

    with RecordingSource(source) as recording:
        frames = [frame.image for frame in recording]
    run = RunInfo.load(source.with_suffix(".json"))
    run = run.model_copy(update={"run_id": "bench"})
    track = SimulatedTrack(start_lat=52.0, start_lon=5.0, heading_deg=90.0, speed_kmh=60.0)
    write_recording(out, [frame for _ in range(laps) for frame in frames], run, track)
    return out


def engine_layouts() -> dict[str, tuple[int, ...] | None]:
    """The two ways the pipeline is timed: ``shared``, every process on every usable core (as
    ``edge-replay`` runs by default), and, with two cores or more, ``engine_pinned``: the engine
    on the upper half of the cores, grabber, publisher and supervisor on the lower half, as on
    the vehicle where the model has a device of its own (:mod:`edge.pipeline.cpus`)."""
    from edge.pipeline.cpus import usable_cpus

    cores = sorted(usable_cpus())
    layouts: dict[str, tuple[int, ...] | None] = {"shared": None}
    if len(cores) >= 2:
        layouts["engine_pinned"] = tuple(cores[len(cores) // 2 :])
    return layouts


def engine_alone_rate(
    onnx_path: Path, config: ModelConfig, crops: int, batch: int, cores: tuple[int, ...] | None
) -> float:
    """Crops per second of the ONNX Runtime engine alone on ``crops`` crops in batches of
    ``batch``: on every core with its default threads, or pinned to ``cores`` with one thread
    each, as the engine runs inside the pipeline with ``--engine-cpus``."""
    from edge.engine.backends import open_backend
    from edge.pipeline.cpus import pin, usable_cpus

    inputs = (
        np.random.default_rng(1)
        .uniform(0, 255, (crops, config.in_channels, *(config.image_size,) * 2))
        .astype(np.float32)
    )
    affinity = usable_cpus()
    options = {} if cores is None else {"threads": len(cores)}
    pin(cores)  # before the session starts its threads: they inherit the cores
    try:
        backend = open_backend("onnxruntime", onnx_path, max_batch=batch, **options)
        try:
            backend.infer(inputs[:batch])
            started = time.perf_counter()
            backend.infer(inputs)
            return crops / (time.perf_counter() - started)
        finally:
            backend.close()
    finally:
        pin(affinity)


def bench_geometry(recording: Path) -> Path:
    """The geometry file of the recording the pipeline replays, from ``calibration/`` under the
    current folder, checked with the recording and its ``run.json`` before any timing starts.

    Raises:
        InputUnreadableError: no such recording (or a folder); TelemetryMissingError: no
        ``run.json``; ConfigInvalidError: ``run.json`` or the geometry file missing or wrong.
    """
    from edge.config import ConfigError
    from edge.errors import ConfigInvalidError
    from edge.grabber.geometry import TrackGeometry
    from edge.telemetry.position import load_run_info

    check_recording_file(recording)
    run = load_run_info(recording)
    geometry = Path("calibration") / run.vehicle_id / f"{run.camera_id}.geometry.json"
    try:
        TrackGeometry.load(geometry)
    except ConfigError as error:
        raise ConfigInvalidError(
            f"{error} (the geometry of {recording}'s vehicle and camera, looked for under "
            "calibration/ in the current folder)"
        ) from error
    return geometry


def pipeline_vs_engine(
    config: ModelConfig, recording: Path, laps: int, batch: int, repeats: int = 3
) -> dict:
    """Crops per second of the whole pipeline (``edge-replay``) and of the engine alone, in
    each layout of :func:`engine_layouts`.

    Both run the same exported model with ONNX Runtime; the engine alone scores as many crops,
    in batches of ``batch``, in this process, on the cores the pipeline's engine had. Pipeline
    and engine alternate ``repeats`` times per layout and the medians are compared.

    Returns:
        ``pipeline_vs_engine_ratio`` of the vehicle's layout (``engine_pinned``; ``shared`` on
        a one-core machine), ``layouts`` with every figure of each, ``peak_rss_mb`` over all.
    """
    from edge.engine.export import export_model
    from edge.evaluate.calibrate import fit_threshold
    from edge.model.checkpoint import save_checkpoint

    geometry = bench_geometry(recording)
    layouts = engine_layouts()
    rates = {name: {"pipeline": [], "engine_in_pipeline": [], "engine": []} for name in layouts}
    peak_bytes = peak_anon_bytes = 0
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        model = random_model(config)
        model_id = save_checkpoint(folder / "bench.pt", model)
        onnx_path = folder / "bench.onnx"
        export_model(model, onnx_path, model_id=model_id)
        # A threshold above every score: the bench times inspection, not alarm images.
        thresholds = fit_threshold(np.zeros(100), 0.01, model_id, "bench")
        thresholds = thresholds.model_copy(update={"threshold": 2.0})
        thresholds.save(folder / "bench.thresholds.json")
        replayed = bench_recording(recording, laps, folder / "bench" / "run.mkv")
        command = [
            sys.executable,
            "-c",
            "import sys; from edge.cli import replay_main; sys.exit(replay_main(sys.argv[1:]))",
            str(replayed),
            "--model",
            str(onnx_path),
            "--geometry",
            str(geometry),
            "--thresholds",
            str(folder / "bench.thresholds.json"),
            "--max-batch",
            str(batch),
            "--json",
        ]
        for _ in range(repeats):  # alternate, so load changes hit every layout alike
            for name, cores in layouts.items():
                pinning = [] if cores is None else ["--engine-cpus", ",".join(map(str, cores))]
                process = subprocess.Popen(
                    command + pinning, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
                )
                with TreeMemory(process.pid) as memory:
                    stdout, _ = process.communicate(timeout=1800)
                if process.returncode != 0:
                    raise RuntimeError(f"edge-replay failed with exit status {process.returncode}")
                summary = json.loads(stdout)
                peak_bytes = max(peak_bytes, memory.peak_bytes)
                peak_anon_bytes = max(peak_anon_bytes, memory.peak_anon_bytes)
                crops = int(summary["crops"])
                rates[name]["pipeline"].append(summary["crops_per_second"])
                rates[name]["engine_in_pipeline"].append(summary["engine_crops_per_second"])
                rates[name]["engine"].append(
                    engine_alone_rate(onnx_path, config, crops, batch, cores)
                )
    figures = {}
    for name, cores in layouts.items():
        pipeline = statistics.median(rates[name]["pipeline"])
        inside = statistics.median(rates[name]["engine_in_pipeline"])
        engine = statistics.median(rates[name]["engine"])
        figures[name] = {
            "engine_cpus": list(cores) if cores is not None else None,
            "pipeline_crops_per_s": pipeline,
            "engine_crops_per_s": engine,
            "engine_in_pipeline_crops_per_s": inside,
            "pipeline_vs_engine_ratio": pipeline / engine,
            "engine_busy_share": pipeline / inside,
        }
    vehicle_layout = "engine_pinned" if "engine_pinned" in figures else "shared"
    return {
        "crops": crops,
        "laps": laps,
        "repeats": repeats,
        "vehicle_layout": vehicle_layout,
        "pipeline_vs_engine_ratio": figures[vehicle_layout]["pipeline_vs_engine_ratio"],
        "layouts": figures,
        "peak_rss_mb": peak_bytes / 2**20,
        "peak_anon_mb": peak_anon_bytes / 2**20,
    }


def gpu_name(device: str) -> str:
    """The GPU's name as its driver gives it (torch, else ``nvidia-smi``), or ``"unknown"``."""
    index = int(device.partition(":")[2] or 0)
    if torch.cuda.is_available() and index < torch.cuda.device_count():
        return torch.cuda.get_device_name(index)
    try:
        names = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return names[index].strip() if index < len(names) else "unknown"


def device_speed(config: ModelConfig, device: str, repeats: int, batch: int) -> dict:
    """Crops per second of the engine on a CUDA ``device``: PyTorch FP32 and FP16 (autocast)
    and ONNX Runtime's CUDA provider, batches of ``batch``, alternating, medians.

    Each figure includes the copies to and from the GPU and the backend's checks, as the
    engine process pays them. A backend that cannot run here gets its reason instead of a
    figure.

    Raises:
        BackendUnavailableError: none of them can run here.
    """
    from edge.engine.backends import BackendUnavailableError, open_backend
    from edge.engine.export import export_model
    from edge.model.checkpoint import save_checkpoint

    model = random_model(config)
    crops = (
        np.random.default_rng(0)
        .uniform(0, 255, (batch, config.in_channels, config.image_size, config.image_size))
        .astype(np.float32)
    )
    variants = {
        "torch_fp32": ("torch", "bench.pt", "fp32"),
        "torch_fp16": ("torch", "bench.pt", "fp16"),
        "onnxruntime_fp32": ("onnxruntime", "bench.onnx", None),
    }
    backends, unavailable = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        model_id = save_checkpoint(Path(folder) / "bench.pt", model)
        export_model(model, Path(folder) / "bench.onnx", model_id=model_id)
        try:
            for name, (backend, file, precision) in variants.items():
                try:
                    backends[name] = open_backend(
                        backend,
                        Path(folder) / file,
                        device=device,
                        precision=precision,
                        max_batch=batch,
                    )
                except BackendUnavailableError as error:
                    unavailable[name] = str(error)
            if not backends:
                raise BackendUnavailableError(
                    f"bench on {device}: no backend can run here: "
                    + "; ".join(f"{name}: {reason}" for name, reason in unavailable.items())
                )
            times: dict[str, list[float]] = {name: [] for name in backends}
            for backend in backends.values():
                for _ in range(3):  # kernels chosen, memory pools grown
                    backend.infer(crops)
            for _ in range(repeats):
                for name, backend in backends.items():
                    started = time.perf_counter()
                    backend.infer(crops)
                    times[name].append(time.perf_counter() - started)
        finally:
            for backend in backends.values():
                backend.close()
    return {
        "device": device,
        "gpu": gpu_name(device),
        "crops_per_s": {name: batch / statistics.median(values) for name, values in times.items()},
        "unavailable": unavailable,
    }


def auto_laps(crops_per_s: float, seconds: float = 4.0, crops_per_lap: int = 100) -> int:
    """Laps of the bundled sample (100 fasteners each) for about ``seconds`` of pipeline at
    ``crops_per_s``, between 3 and 30."""
    return int(min(30, max(3, math.ceil(seconds * crops_per_s / crops_per_lap))))


def device_name(text: str) -> str:
    """An argparse type: ``cpu``, ``cuda`` or ``cuda:N``."""
    kind, _, index = text.partition(":")
    if text == "cpu" or (kind == "cuda" and (not _ or index.isdigit())):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not cpu, cuda or cuda:N")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="tiny", help="model size (default: tiny)"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=5, help="runs of each side; medians (default: 5)"
    )
    parser.add_argument(
        "--batch", type=positive_int, default=8, help="crops per inference (default: 8)"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=2,
        help="torch and ONNX Runtime threads of the engine-alone figures (default: 2)",
    )
    parser.add_argument(
        "--iterative-steps",
        type=non_negative_int,
        default=0,
        help="iterative sampling steps actually run (0: all T; else extrapolated to T)",
    )
    parser.add_argument("--skip-pipeline", action="store_true", help="leave out edge-replay")
    parser.add_argument(
        "--recording",
        default="samples/track-demo/run.mkv",
        help="recording the pipeline replays (played --laps times)",
    )
    parser.add_argument(
        "--laps",
        type=non_negative_int,
        default=0,
        help="times the recording is played (0: enough for about 4 s of pipeline at the "
        "engine's speed, at least 3, so the first frames before the first batch weigh little)",
    )
    parser.add_argument(
        "--device",
        type=device_name,
        default="cpu",
        help="cpu: every comparison on this CPU; cuda or cuda:N: only the engine's crops per "
        "second on that GPU (torch FP32 and FP16, ONNX Runtime CUDA)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def run_bench(args: argparse.Namespace) -> dict:
    config = preset(args.preset)
    total_steps = config.diffusion.num_timesteps
    if args.iterative_steps > total_steps:
        raise UsageError(
            f"--iterative-steps {args.iterative_steps}: the {args.preset} preset samples "
            f"{total_steps} steps; give at most {total_steps} (0: all)"
        )
    if args.device == "cpu" and not args.skip_pipeline:
        bench_geometry(Path(args.recording))
    torch.set_num_threads(args.threads)
    info = model_info(config)
    figures: dict = {
        "preset": args.preset,
        "threads": args.threads,
        "batch": args.batch,
        "repeats": args.repeats,
        "params_m": info["params_m"],
        "gflop_per_crop": info["gflop_per_crop"],
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__},
    }
    if args.device != "cpu":
        log.info("bench_step", step="device", device=args.device)
        figures["on_device"] = device_speed(config, args.device, args.repeats, args.batch)
        return figures
    steps = [
        (
            "onestep_vs_iterative",
            lambda: onestep_vs_iterative(config, args.repeats, args.iterative_steps),
        ),
        ("skips", lambda: skip_and_dacm(config, args.repeats, args.batch)),
        ("ort_vs_torch", lambda: ort_vs_torch(config, args.repeats, args.batch, args.threads)),
    ]
    for name, step in steps:
        log.info("bench_step", step=name)
        figures[name] = step()
    figures["onestep_vs_iterative_speedup"] = figures["onestep_vs_iterative"][
        "onestep_vs_iterative_speedup"
    ]
    figures["sparse_vs_dense_speedup"] = figures["skips"]["sparse_vs_dense_speedup"]
    figures["ort_vs_torch_speedup"] = figures["ort_vs_torch"]["ort_vs_torch_speedup"]
    engine_s = figures["ort_vs_torch"]["s_per_crop"]["onnxruntime"]
    figures["crops_per_s"] = 1.0 / engine_s
    figures["pipeline_vs_engine_ratio"] = None
    figures["pipeline_vs_engine_ratio_shared_cores"] = None
    figures["pipeline"] = figures["peak_rss_mb"] = figures["peak_anon_mb"] = None
    if not args.skip_pipeline:
        log.info("bench_step", step="pipeline")
        pipeline = pipeline_vs_engine(
            config,
            Path(args.recording),
            args.laps or auto_laps(figures["crops_per_s"]),
            args.batch,
            args.repeats,
        )
        figures["pipeline"] = pipeline
        figures["pipeline_vs_engine_ratio"] = pipeline["pipeline_vs_engine_ratio"]
        figures["pipeline_vs_engine_ratio_shared_cores"] = pipeline["layouts"]["shared"][
            "pipeline_vs_engine_ratio"
        ]
        figures["peak_rss_mb"] = pipeline["peak_rss_mb"]
        figures["peak_anon_mb"] = pipeline["peak_anon_mb"]
    figures["vehicle_needs"] = {
        f"{speed}_kmh": {
            "crops_per_s_needed": needed_crops_per_s(speed),
            "share_met": figures["crops_per_s"] / needed_crops_per_s(speed),
        }
        for speed in VEHICLE_SPEEDS_KMH
    }
    return figures


def run(args: argparse.Namespace) -> int:
    configure("bench", os.environ.get("EDGE_LOG_LEVEL", "warning"))
    figures = run_bench(args)
    if args.json:
        print(json.dumps(figures))
    else:
        print(json.dumps(figures, indent=2))
    return 0
