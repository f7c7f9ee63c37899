"""``edge record``: make a recorded run (FFV1 grey ``.mkv`` plus sidecars) from stills or a strip.

What is written, for ``<dir>/<stem>.mkv``:

- ``<stem>.mkv``: Matroska, FFV1 lossless, grey 8-bit (GRAY8) or 16-bit (GRAY16LE) as the
  input is, one frame per ``lines_per_frame`` scan lines, lines along the track top to bottom.
  It is written as ``<stem>.partial.mkv`` and renamed when complete, so a failed run never
  leaves a file that looks like a finished recording.
- ``<stem>.json``: the :class:`~edge.telemetry.run.RunInfo`.
- ``<stem>.nmea`` or ``<stem>.telemetry.csv``: telemetry, copied from a given file (checked
  first) or simulated (:mod:`edge.telemetry.simulate`) to agree with the recording's length
  (lines * ``mm_per_line``). A stale sidecar of the other telemetry format is removed, since
  the CSV would otherwise win over new NMEA.

``edge record`` refuses (exit status 2), before reading a frame, to replace a recording or any
of its sidecars that exists, naming them; ``--force`` replaces them.

Known limit: OpenCV's FFmpeg writer silently crops odd frame sizes to even ones (measured with
OpenCV 5.1), so odd widths or ``lines_per_frame`` are refused rather than written wrong. A
frame of another bit depth than the writer's aborts libavutil, so every frame is checked first.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ValidationError

from edge.config import ConfigError
from edge.errors import (
    EdgeError,
    ExitStatus,
    TelemetryMissingError,
    UsageError,
    check_output_file,
)
from edge.grabber.sources import StillsSource, read_image
from edge.logs import get_logger
from edge.telemetry.csvlog import read_telemetry_csv, write_telemetry_csv
from edge.telemetry.nmea import read_nmea, write_nmea
from edge.telemetry.run import RunInfo, sidecars
from edge.telemetry.simulate import SimulatedTrack, simulate_epochs

log = get_logger(__name__)

TelemetryFormat = Literal["nmea", "csv"]


@dataclass(frozen=True)
class RecordingSummary:
    """What :func:`write_recording` wrote. ``frame_shape`` is ``(lines, pixels)``."""

    recording: Path
    run_json: Path
    telemetry: Path
    frames: int
    lines: int
    frame_shape: tuple[int, int]
    bit_depth: int
    along_track_m: float

    def to_json(self) -> str:
        data = asdict(self)
        for key in ("recording", "run_json", "telemetry"):
            data[key] = str(data[key])
        return json.dumps(data)


def strip_frames(strip: str | Path | np.ndarray, lines_per_frame: int) -> Iterator[np.ndarray]:
    """Cut a long strip ``(lines, pixels)`` (along the track top to bottom) into frames.

    A remainder shorter than a frame is dropped (and logged), never padded with made-up
    lines. A file is read grey, keeping 16 bits.
    """
    image = read_image(strip) if not isinstance(strip, np.ndarray) else strip
    frames, remainder = divmod(image.shape[0], lines_per_frame)
    if frames == 0:
        raise ValueError(
            f"strip of {image.shape[0]} lines is shorter than one frame ({lines_per_frame})"
        )
    if remainder:
        log.warning("strip_remainder_dropped", lines=remainder, lines_per_frame=lines_per_frame)
    for k in range(frames):
        yield image[k * lines_per_frame : (k + 1) * lines_per_frame]


def _check_frame(image: np.ndarray, first: np.ndarray | None, index: int, run: RunInfo) -> None:
    if image.ndim != 2 or image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"frame {index}: need a grey uint8/uint16 (lines, pixels) array")
    if first is not None and (image.shape != first.shape or image.dtype != first.dtype):
        raise ValueError(
            f"frame {index} is {image.shape} {image.dtype}, frame 0 was {first.shape} {first.dtype}"
        )
    if image.shape[0] != run.lines_per_frame:
        raise ValueError(
            f"frame {index} has {image.shape[0]} lines, run says {run.lines_per_frame}"
        )
    if image.shape[0] % 2 or image.shape[1] % 2:
        raise ValueError(f"frame size {image.shape} must be even (FFmpeg writer crops odd sizes)")


def _write_video(path: Path, frames: Iterable[np.ndarray], run: RunInfo, fps: float) -> tuple:
    """Write the FFV1 file; returns (frames, frame shape, bit depth)."""
    writer = None
    first = None
    count = 0
    try:
        for image in frames:
            _check_frame(image, first, count, run)
            if writer is None:
                first = image
                depth = cv2.CV_16U if image.dtype == np.uint16 else cv2.CV_8U
                params = [cv2.VIDEOWRITER_PROP_DEPTH, depth, cv2.VIDEOWRITER_PROP_IS_COLOR, 0]
                size = (image.shape[1], image.shape[0])
                fourcc = cv2.VideoWriter_fourcc(*"FFV1")
                writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, fourcc, fps, size, params)
                if not writer.isOpened():
                    raise OSError(f"{path}: OpenCV cannot open an FFV1 writer here")
            writer.write(np.ascontiguousarray(image))
            count += 1
    finally:
        if writer is not None:
            writer.release()
    if first is None:
        raise ValueError("no frames to record")
    return count, first.shape, 16 if first.dtype == np.uint16 else 8


def _copy_telemetry(source: Path, run: RunInfo, targets) -> Path:
    """Check a telemetry file, then copy it beside the recording unchanged."""
    is_csv = source.suffix.lower() == ".csv"
    try:
        telemetry = read_telemetry_csv(source) if is_csv else read_nmea(source, run.start_time_utc)
    except OSError as error:
        raise TelemetryMissingError(f"{source}: cannot read ({error.strerror})") from error
    telemetry.log_counts()
    if not telemetry.epochs:
        raise TelemetryMissingError(f"{source}: no usable telemetry in {telemetry.lines} lines")
    target = targets.telemetry_csv if is_csv else targets.nmea
    shutil.copyfile(source, target)
    return target


def existing_outputs(recording: str | Path) -> list[Path]:
    """The files of ``recording`` that writing it would replace: the ``.mkv`` and every
    sidecar (:func:`edge.telemetry.run.sidecars`) that exists, in that order."""
    paths = sidecars(recording)
    candidates = (paths.recording, paths.run_json, paths.nmea, paths.telemetry_csv)
    return [path for path in candidates if path.exists()]


def write_recording(
    recording: str | Path,
    frames: Iterable[np.ndarray],
    run: RunInfo,
    telemetry: str | Path | SimulatedTrack,
    telemetry_format: TelemetryFormat = "nmea",
    frame_rate_hz: float | None = None,
) -> RecordingSummary:
    """Write ``recording`` (``.mkv``), its ``run.json`` and its telemetry, replacing any that
    exist (``edge record`` refuses to without ``--force``; see :func:`existing_outputs`).

    Args:
        recording: the ``.mkv`` path; the folder is created.
        frames: grey ``(lines_per_frame, pixels)`` arrays, ``uint8`` or ``uint16``, all alike,
            even-sized, in capture order.
        run: the run's facts; ``lines_per_frame`` must match the frames.
        telemetry: an NMEA (or ``.csv``) file to copy, or a :class:`SimulatedTrack` to write as
            ``telemetry_format``.
        frame_rate_hz: the container's nominal frame rate; by default the simulated vehicle's
            (speed / frame length), else 10. Only presentation times depend on it.

    Raises:
        ValueError: frames that cannot be recorded as they are (sizes, depths, none at all).
        TelemetryMissingError: a telemetry file to copy that is unreadable or has no epoch.
        InputUnreadableError: from the frame source, for an unreadable image.
    """
    recording = Path(recording)
    if recording.suffix.lower() != ".mkv":
        raise ValueError(f"{recording}: a recording is a Matroska .mkv file")
    recording.parent.mkdir(parents=True, exist_ok=True)
    paths = sidecars(recording)
    frame_m = run.lines_per_frame * run.mm_per_line / 1000.0
    if frame_rate_hz is None:
        simulated = isinstance(telemetry, SimulatedTrack)
        frame_rate_hz = telemetry.speed_m_s / frame_m if simulated else 10.0
    # 1. The video, under a partial name until it is complete.
    partial = recording.with_name(recording.stem + ".partial.mkv")
    try:
        count, shape, bit_depth = _write_video(partial, frames, run, frame_rate_hz)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(recording)
    lines = count * run.lines_per_frame
    # 2. The sidecars: run.json, then the telemetry, removing a stale one of the other format.
    run.save(paths.run_json)
    if isinstance(telemetry, SimulatedTrack):
        epochs = simulate_epochs(telemetry, run, lines)
        if telemetry_format == "csv":
            target = paths.telemetry_csv
            write_telemetry_csv(epochs, target)
        else:
            target = paths.nmea
            write_nmea(epochs, target)
    else:
        target = _copy_telemetry(Path(telemetry), run, paths)
    for stale in (paths.telemetry_csv, paths.nmea):
        if stale != target and stale.exists():
            stale.unlink()
            log.info("stale_telemetry_removed", file=str(stale))
    summary = RecordingSummary(
        recording,
        paths.run_json,
        target,
        count,
        lines,
        shape,
        bit_depth,
        lines * run.mm_per_line / 1000.0,
    )
    log.info(
        "recording_written",
        file=str(recording),
        frames=count,
        lines=lines,
        bit_depth=bit_depth,
        along_track_m=summary.along_track_m,
        telemetry=str(target),
    )
    return summary


# The command -------------------------------------------------------------------------------

_RUN_FLAGS = {
    "vehicle_id": str,
    "run_id": str,
    "line_id": str,
    "track_id": str,
    "start_km_post": int,
    "start_metres": float,
    "direction": str,
    "mm_per_line": float,
    "lines_per_frame": int,
    "camera_id": str,
    "start_time_utc": str,
    "encoder_counts_per_line": float,
    "mm_per_encoder_count": float,
    "start_encoder_count": int,
    "gps_antenna_ahead_m": float,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recording", type=Path, help="the .mkv to write; sidecars go beside it")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing recording and its sidecars (.json, .nmea, .telemetry.csv); "
        "without it they are left as they are and the command fails",
    )
    frames = parser.add_mutually_exclusive_group(required=True)
    frames.add_argument("--stills", type=Path, help="folder of images, one frame each")
    frames.add_argument("--strip", type=Path, help="one long image, lines along track top-down")
    run = parser.add_argument_group("run.json (over --run-info's values, if given)")
    run.add_argument("--run-info", type=Path, help="a run.json to start from")
    for name, kind in _RUN_FLAGS.items():
        run.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=None,
            choices=("increasing", "decreasing") if name == "direction" else None,
            help=RunInfo.model_fields[name].description,
        )
    gps = parser.add_argument_group("telemetry: copy a file, or simulate a GPS track")
    gps.add_argument("--telemetry", type=Path, help="NMEA file (or .csv) to copy")
    gps.add_argument("--start-lat", type=float, help="decimal degrees, south negative")
    gps.add_argument("--start-lon", type=float, help="decimal degrees, west negative")
    gps.add_argument("--heading-deg", type=float, default=0.0, help="true course")
    gps.add_argument("--speed-kmh", type=float, default=80.0)
    gps.add_argument("--gps-rate-hz", type=float, default=10.0)
    gps.add_argument(
        "--tunnel",
        action="append",
        default=[],
        metavar="START_M:END_M",
        help="along-track metres without a fix (repeatable)",
    )
    gps.add_argument("--telemetry-format", choices=("nmea", "csv"), default="nmea")
    parser.add_argument("--frame-rate-hz", type=float, help="nominal container frame rate")


# Flags of the simulated track whose names are not the field's own.
_TRACK_FLAGS = {"rate_hz": "--gps-rate-hz", "tunnels": "--tunnel"}


def _flag(field: str) -> str:
    return _TRACK_FLAGS.get(field, "--" + field.replace("_", "-"))


def _shown(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def _allowed(model: type[BaseModel], field: str) -> str:
    """The bounds of a numeric field in words (``from -90 to 90``); '' if it has none."""
    bounds = {}
    for constraint in model.model_fields[field].metadata:
        for kind in ("gt", "ge", "lt", "le"):
            if getattr(constraint, kind, None) is not None:
                bounds[kind] = f"{getattr(constraint, kind):g}"
    if "ge" in bounds and "le" in bounds:
        return f"from {bounds['ge']} to {bounds['le']}"
    words = {"gt": "over", "ge": "at least", "lt": "under", "le": "at most"}
    return " and ".join(f"{words[kind]} {bound}" for kind, bound in bounds.items())


def _fields_as_flags(text: str, model: type[BaseModel]) -> str:
    """``text`` with each field name of ``model`` written as its flag."""
    fields = model.model_fields
    return re.sub(r"\b\w+\b", lambda word: _flag(word[0]) if word[0] in fields else word[0], text)


def _flag_problems(error: ValidationError, model: type[BaseModel]) -> str:
    """pydantic's complaints about values that came from flags, as ``--flag VALUE: must be
    ...``, one after another on one line, in the words of the command line."""
    problems = []
    for problem in error.errors(include_url=False):
        reason = str(problem.get("ctx", {}).get("error", "")) or problem["msg"]
        if not problem["loc"]:  # a rule across fields: name them as flags
            problems.append(_fields_as_flags(reason, model))
            continue
        field = str(problem["loc"][0])
        allowed = _allowed(model, field)
        reason = f"must be {allowed}" if allowed else reason[:1].lower() + reason[1:]
        problems.append(f"{_flag(field)} {_shown(problem['input'])}: {reason}")
    return "; ".join(problems)


def _start_time(text: str) -> datetime:
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        stamp = None
    if stamp is None or stamp.tzinfo is None:
        raise ValueError(
            f"--start-time-utc {text!r}: need an ISO 8601 time with its zone, "
            "e.g. 2025-03-09T10:00:00Z"
        )
    return stamp


def _run_info(args: argparse.Namespace, lines_per_frame: int | None) -> RunInfo:
    values = RunInfo.load(args.run_info).model_dump() if args.run_info else {}
    values.update({k: getattr(args, k) for k in _RUN_FLAGS if getattr(args, k) is not None})
    if args.start_time_utc is not None:
        values["start_time_utc"] = _start_time(args.start_time_utc)
    if values.get("lines_per_frame") is None and lines_per_frame is not None:
        values["lines_per_frame"] = lines_per_frame
    values.setdefault("start_time_utc", datetime.now(timezone.utc).replace(microsecond=0))
    values.setdefault("camera_id", "cam0")
    if "run_id" not in values and "vehicle_id" in values:
        stamp = values["start_time_utc"].astimezone(timezone.utc)
        values["run_id"] = f"{values['vehicle_id']}-{stamp:%Y%m%dT%H%M%SZ}"
    # 1. Flags a run.json would have given: all named at once, not one pydantic error each.
    missing = [
        _flag(name)
        for name, field in RunInfo.model_fields.items()
        if field.is_required() and values.get(name) is None
    ]
    if "--vehicle-id" in missing and "--run-id" in missing:
        missing.remove("--run-id")  # made from --vehicle-id and the start time
    if missing:
        raise ValueError(f"{', '.join(missing)} are needed without --run-info")
    # 2. Values out of range, named as the flags that gave them.
    try:
        return RunInfo.model_validate(values)
    except ValidationError as error:
        raise ValueError(_flag_problems(error, RunInfo)) from error


def _tunnel(text: str) -> tuple[float, float]:
    """``--tunnel START_M:END_M`` as ``(start_m, end_m)``, the start before the end."""
    start_m, colon, end_m = text.partition(":")
    try:
        tunnel = (float(start_m), float(end_m))
    except ValueError:
        tunnel = None
    if tunnel is None or not colon:
        raise ValueError(f"--tunnel {text!r}: need START_M:END_M in along-track metres, e.g. 20:60")
    if not tunnel[0] < tunnel[1]:
        raise ValueError(f"--tunnel {text!r}: the start must be before the end")
    return tunnel


def _simulated_track(args: argparse.Namespace) -> SimulatedTrack:
    tunnels = tuple(_tunnel(text) for text in args.tunnel)
    try:
        return SimulatedTrack(
            start_lat=args.start_lat,
            start_lon=args.start_lon,
            heading_deg=args.heading_deg,
            speed_kmh=args.speed_kmh,
            rate_hz=args.gps_rate_hz,
            tunnels=tunnels,
        )
    except ValidationError as error:
        raise ValueError(_flag_problems(error, SimulatedTrack)) from error


def _check_recording(recording: Path, force: bool) -> None:
    """Refuses, before any frame is read, a recording that is no ``.mkv``, cannot be written,
    or would replace files of an earlier recording without ``--force``."""
    if recording.suffix.lower() != ".mkv":
        raise ValueError(f"{recording}: a recording is a Matroska .mkv file")
    check_output_file(recording)
    existing = existing_outputs(recording)
    if existing and not force:
        raise UsageError(
            f"{', '.join(map(str, existing))}: already there; give another recording name, "
            "or --force to replace"
        )


def _record(args: argparse.Namespace) -> RecordingSummary:
    _check_recording(args.recording, args.force)
    stills = StillsSource(args.stills) if args.stills else None
    run = _run_info(args, stills.frame_shape[0] if stills else None)
    if args.telemetry is not None:
        telemetry: Path | SimulatedTrack = args.telemetry
    elif args.start_lat is None or args.start_lon is None:
        raise ValueError("give --telemetry FILE, or --start-lat and --start-lon to simulate one")
    else:
        telemetry = _simulated_track(args)
    if stills is not None:
        frames: Iterable[np.ndarray] = (frame.image for frame in stills)
    else:
        frames = strip_frames(args.strip, run.lines_per_frame)
    return write_recording(
        args.recording, frames, run, telemetry, args.telemetry_format, args.frame_rate_hz
    )


def _failed(error: Exception, status: ExitStatus) -> int:
    log.error("record_failed", error=str(error), exit_status=int(status))
    print(f"edge record: {error}", file=sys.stderr)
    return int(status)


def run(args: argparse.Namespace) -> int:
    try:
        summary = _record(args)
    except EdgeError as error:
        return _failed(error, error.exit_status)
    except ConfigError as error:
        return _failed(error, ExitStatus.CONFIG_INVALID)
    except ValueError as error:  # a flag with a wrong value, named by _flag_problems
        return _failed(error, ExitStatus.USAGE)
    print(summary.to_json())
    return int(ExitStatus.OK)
