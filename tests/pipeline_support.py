"""Shared by the pipeline tests: generated recordings with known fasteners, the z-score
baseline exported as the test detector, calibration folders, and running the CLI.

Why the pipeline tests score with the z-score baseline and not with Diff-Fastener: they need a
detector that is deterministic, separates missing, broken and displaced fasteners from normal
ones on generated strips, and is ready in seconds on two CPU cores. Training Diff-Fastener in a
test is too slow and its result too variable. The baseline is fitted on normal crops cut by the
real fastener finder from defect-free generated strips, exported as an ONNX graph with the
detector's inputs and outputs (:meth:`edge.evaluate.baseline.ZScoreBaseline.export_onnx`) and
run through the real onnxruntime backend, so every part of the pipeline runs as in service.
Measured on these strips (top_k 16, 864 training crops): normal crops score at most 6.9,
broken at least 8.2, missing at least 9.7, displaced at least 14.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edge.evaluate.baseline import ZScoreBaseline
from edge.evaluate.calibrate import fit_threshold
from edge.grabber.geometry import TrackGeometry
from edge.grabber.locate import FastenerFinder
from edge.grabber.record import strip_frames, write_recording
from edge.grabber.stripgen import StripSpec, TrackStrip, generate_strip
from edge.pipeline.grabber_process import model_input
from edge.publisher.thresholds import Thresholds, now_utc
from edge.telemetry.run import RunInfo
from edge.telemetry.simulate import SimulatedTrack

REPO_ROOT = Path(__file__).resolve().parents[1]
VEHICLE = "TIV-test"
CAMERA = "cam0"
CROP_SHAPE = (1, 64, 64)
LINES = 8192  # 16 frames of 512 lines: 32.8 m of track
LINES_PER_FRAME = 512
WIDTH = 728  # even: the FFV1 writer crops odd sizes
START_MILEAGE_M = 12_300.0
# Sleepers every 150 lines (600 mm), none within half a crop of the strip's ends, so no crop
# is padded (a padded crop scores high with any detector that has not seen padding).
SEAT_LINES = tuple(float(line) for line in np.arange(100, LINES - 100, 150))

GEOMETRY = TrackGeometry(
    camera_id=CAMERA,
    mm_per_px=4.0,
    mm_per_line=4.0,
    rail_spacing_tolerance=0.08,
    max_sleeper_skew_deg=4.0,
    pitch_tolerance=0.35,
    sleeper_width_mm=150.0,
    sleeper_width_tolerance=0.5,
    min_seat_edges=2.0,
    fastener_offset_mm=104.0,
    crop_mm=(240.0, 240.0),
)


def strip(seed: int, defect_rate: float = 0.0) -> TrackStrip:
    """A ballasted strip of :data:`LINES` lines with sleepers at :data:`SEAT_LINES`."""
    spec = StripSpec(
        lines=LINES, seed=seed, width_px=WIDTH, seat_lines=SEAT_LINES, defect_rate=defect_rate
    )
    return generate_strip(GEOMETRY, spec)


def finder_crops(image: np.ndarray) -> np.ndarray:
    """Model inputs of every fastener the finder cuts from a strip: ``(n, 1, 64, 64)``."""
    finder = FastenerFinder(GEOMETRY)
    found = []
    for index, frame in enumerate(strip_frames(image, LINES_PER_FRAME)):
        found += finder.push(frame, index)
    found += finder.flush()
    return np.stack([model_input(fastener.crop, CROP_SHAPE) for fastener in found])


def run_info(run_id: str) -> RunInfo:
    return RunInfo(
        vehicle_id=VEHICLE,
        run_id=run_id,
        line_id="TEST-LINE",
        start_km_post=int(START_MILEAGE_M // 1000),
        start_metres=START_MILEAGE_M % 1000,
        direction="increasing",
        mm_per_line=GEOMETRY.mm_per_line,
        lines_per_frame=LINES_PER_FRAME,
        camera_id=CAMERA,
        start_time_utc=datetime(2026, 5, 9, 7, 12, tzinfo=timezone.utc),
    )


def record(path: Path, image: np.ndarray, run_id: str, speed_kmh: float = 36.0) -> Path:
    """``image`` as a recording with simulated NMEA; ``speed_kmh`` sets its recorded pace."""
    track = SimulatedTrack(start_lat=52.09, start_lon=5.12, heading_deg=80.0, speed_kmh=speed_kmh)
    write_recording(path, strip_frames(image, LINES_PER_FRAME), run_info(run_id), track)
    return path


def mileage_of(line: float) -> float:
    return START_MILEAGE_M + line * GEOMETRY.mm_per_line / 1000.0


@dataclass(frozen=True)
class Detector:
    """The exported baseline and a calibration folder holding its geometry and thresholds."""

    model: Path
    calibration: Path
    model_id: str
    threshold: float


def build_detector(root: Path) -> Detector:
    """Fit the baseline on four normal strips, export it, fit the threshold on two others.

    The threshold is :func:`fit_threshold` at a false-alarm rate of 0.002 on 432 held-out
    normal crops (at least 500 would be needed for that rate, so the rate is 1/432 rounded:
    the largest held-out score but one is the threshold).
    """
    train = np.concatenate([finder_crops(strip(seed).image) for seed in (21, 22, 23, 24)])
    baseline = ZScoreBaseline.fit(train, top_k=16)
    model = baseline.export_onnx(root / "engines" / "zscore.onnx")
    held_out = np.concatenate([finder_crops(strip(seed).image) for seed in (31, 32)])
    _, scores = baseline.score(held_out)
    thresholds = fit_threshold(
        scores, 1.0 / len(scores), baseline.model_id, "generated strips 31, 32", VEHICLE, CAMERA
    )
    calibration = root / "calibration"
    write_calibration(calibration, thresholds)
    return Detector(model, calibration, baseline.model_id, thresholds.threshold)


def write_calibration(folder: Path, thresholds: Thresholds) -> None:
    GEOMETRY.save(folder / VEHICLE / f"{CAMERA}.geometry.json")
    thresholds.save(folder / VEHICLE / f"{CAMERA}.thresholds.json")


def low_thresholds(detector: Detector) -> Thresholds:
    """A threshold under every score: every crop is an alarm."""
    return Thresholds(
        model_id=detector.model_id,
        threshold=0.0,
        false_alarm_rate=0.5,
        crops=50,
        min_crops=50,
        scores={"minimum": 0.0, "median": 0.0, "p95": 0.0, "p99": 0.0, "maximum": 0.0},
        data_dir="none: every crop an alarm",
        fitted_at=now_utc(),
        vehicle_id=VEHICLE,
        camera_id=CAMERA,
    )


# Processes --------------------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a child Python that imports this tree's ``edge``, logging at info."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env["PYTHONUNBUFFERED"] = "1"
    env["EDGE_LOG_LEVEL"] = "info"
    env.update(extra)
    return env


def replay_command(*args: str) -> list[str]:
    code = "import sys; from edge.cli import replay_main; sys.exit(replay_main(sys.argv[1:]))"
    return [sys.executable, "-c", code, *args]


def edge_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge", *args]


class Lines:
    """Collects a pipe's lines on a thread; tests wait for the lines they need."""

    def __init__(self, pipe) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe) -> None:
        for line in pipe:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def events(self, name: str) -> list[dict]:
        """The structlog JSON lines of one event name."""
        out = []
        for line in self.snapshot():
            if line.startswith("{") and f'"{name}"' in line:
                event = json.loads(line)
                if event.get("event") == name:
                    out.append(event)
        return out

    def wait_event(self, name: str, timeout_s: float, where=lambda event: True) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for event in self.events(name):
                if where(event):
                    return event
            time.sleep(0.05)
        raise TimeoutError(f"no {name} event within {timeout_s} s")

    def finish(self, timeout_s: float = 10.0) -> list[str]:
        self._thread.join(timeout_s)
        return self.snapshot()


def start(command: list[str], **extra_env: str) -> tuple[subprocess.Popen, Lines, Lines]:
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=child_env(**extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return process, Lines(process.stdout), Lines(process.stderr)


# Artifacts made once per test session ----------------------------------------------------

DEFECT_SEED = 41
DEFECTS_SPEED_KMH = 18.0  # 32.8 m in 6.6 s when paced with --realtime
LONG_COPIES = 7  # 7 x 216 crops
LONG_SPEED_KMH = 120.0


@dataclass(frozen=True)
class Artifacts:
    """Everything the pipeline tests share (see :func:`artifacts`).

    ``truth`` lists the defective fasteners of ``defects``: ``rail``, ``side``, ``state``,
    ``mileage_m``; ``low_calibration`` holds a threshold under every score.
    """

    detector: Detector
    defects: Path
    truth: list[dict]
    long: Path
    low_calibration: Path
    normal_crops_in_defects: int


def artifacts(tmp_path_factory) -> Artifacts:
    """Build (once per session, under pytest's base temporary folder) the detector, the
    recording with known defects and the long recording."""
    root = tmp_path_factory.getbasetemp() / "pipeline-artifacts"
    done = root / "done.json"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        detector = build_detector(root)
        defects = strip(DEFECT_SEED, defect_rate=0.1)
        record(root / "defects" / "run.mkv", defects.image, "defects-1", DEFECTS_SPEED_KMH)
        truth = [
            {
                "rail": f.rail,
                "side": f.side,
                "state": f.state,
                "mileage_m": mileage_of(f.line),
            }
            for f in defects.fasteners
            if f.state != "normal"
        ]
        long_image = np.concatenate([strip(51).image] * LONG_COPIES)
        record(root / "long" / "run.mkv", long_image, "long-1", LONG_SPEED_KMH)
        write_calibration(root / "low-calibration", low_thresholds(detector))
        done.write_text(
            json.dumps(
                {
                    "detector": {
                        "model": str(detector.model),
                        "calibration": str(detector.calibration),
                        "model_id": detector.model_id,
                        "threshold": detector.threshold,
                    },
                    "truth": truth,
                    "normal": len(defects.fasteners) - len(truth),
                }
            )
        )
    saved = json.loads(done.read_text())
    detector = Detector(
        model=Path(saved["detector"]["model"]),
        calibration=Path(saved["detector"]["calibration"]),
        model_id=saved["detector"]["model_id"],
        threshold=saved["detector"]["threshold"],
    )
    return Artifacts(
        detector=detector,
        defects=root / "defects" / "run.mkv",
        truth=saved["truth"],
        long=root / "long" / "run.mkv",
        low_calibration=root / "low-calibration",
        normal_crops_in_defects=saved["normal"],
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (and its neighbour too)."""
    import socket

    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no two free neighbouring ports")


def match_alarms(truth: list[dict], alarms: list[dict], tolerance_m: float = 1.0) -> dict:
    """Pair expected defects with alarm bodies of the same rail and side within
    ``tolerance_m`` of mileage, one to one; what is left over on either side."""
    unmatched = list(range(len(alarms)))
    missed = []
    errors = []
    for defect in truth:
        candidates = [
            (abs(alarms[i]["mileage"]["mileage_m"] - defect["mileage_m"]), i)
            for i in unmatched
            if alarms[i]["rail"] == defect["rail"] and alarms[i]["side"] == defect["side"]
        ]
        candidates = [c for c in candidates if c[0] <= tolerance_m]
        if not candidates:
            missed.append(defect)
            continue
        error, index = min(candidates)
        errors.append(error)
        unmatched.remove(index)
    return {
        "missed": missed,
        "extra": [alarms[i] for i in unmatched],
        "max_error_m": max(errors, default=0.0),
    }
