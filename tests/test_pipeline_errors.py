"""What ``edge-replay`` says and returns when the input is not what it should be.

Each case runs the real command (real processes) and checks the exit status of edge/errors.py
and that the message on stderr names the file at fault.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pipeline_support import (
    GEOMETRY,
    LINES_PER_FRAME,
    WIDTH,
    artifacts,
    match_alarms,
    record,
    replay_command,
    start,
)

from edge.errors import ExitStatus
from edge.grabber.sources import RecordingSource
from edge.grabber.stripgen import _ballast

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return artifacts(tmp_path_factory)


def _copy_recording(shared, folder: Path, telemetry: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("run.mkv", "run.json", *(("run.nmea",) if telemetry else ())):
        shutil.copyfile(shared.defects.with_name(name), folder / name)
    return folder / "run.mkv"


def _replay(shared, recording: Path, *extra: str) -> tuple[int, list[str], list[str]]:
    command = replay_command(
        str(recording),
        "--model",
        str(shared.detector.model),
        "--calibration",
        str(shared.detector.calibration),
        *extra,
    )
    process, stdout, stderr = start(command)
    status = process.wait(80)
    return status, stdout.finish(), stderr.finish()


def _message(stderr: list[str]) -> str:
    """The one plain-text line the command ends with (everything else is JSON logs)."""
    lines = [line for line in stderr if line.startswith("edge-replay: ")]
    assert len(lines) == 1, stderr[-10:]
    return lines[0]


@pytest.mark.slow
def test_a_recording_without_fasteners_ends_with_status_4(shared, tmp_path):
    """Plain ballast (no rail, no sleeper) over four frames."""
    rng = np.random.default_rng(5)
    ballast = _ballast((4 * LINES_PER_FRAME, WIDTH), GEOMETRY, rng)
    image = np.clip(np.rint(ballast), 0, 255).astype(np.uint8)
    recording = record(tmp_path / "ballast" / "run.mkv", image, "ballast-1")
    status, stdout, stderr = _replay(shared, recording, "--json")
    assert status == ExitStatus.NO_FASTENERS == 4
    message = _message(stderr)
    assert str(recording) in message and "no fastener found in 4 frames" in message
    summary = json.loads(stdout[-1])
    assert summary["frames"] == 4 and summary["crops"] == 0 and summary["alarms"] == []
    assert summary["exit_status"] == 4


@pytest.mark.slow
def test_a_truncated_recording_is_processed_to_its_last_complete_frame_then_status_3(
    shared, tmp_path
):
    recording = _copy_recording(shared, tmp_path / "cut")
    data = recording.read_bytes()
    recording.write_bytes(data[: int(len(data) * 0.7)])
    readable = RecordingSource(recording)
    complete = sum(1 for _ in readable.frames())
    assert readable.truncated and 0 < complete < 16
    status, stdout, stderr = _replay(shared, recording, "--json")
    assert status == ExitStatus.RECORDING_TRUNCATED == 3
    message = _message(stderr)
    assert str(recording) in message and "cut short" in message
    summary = json.loads(stdout[-1])
    assert summary["truncated"] is True and summary["frames"] == complete
    # The alarms are those of the full recording up to where it was cut (less the finder's
    # margin at the new end), none invented.
    end_m = 12_300.0 + complete * LINES_PER_FRAME * GEOMETRY.mm_per_line / 1000
    expected = [d for d in shared.truth if d["mileage_m"] < end_m - 0.5]
    alarms = [
        {"rail": a["rail"], "side": a["side"], "mileage": {"mileage_m": a["mileage_m"]}}
        for a in summary["alarms"]
    ]
    matched = match_alarms(expected, alarms)
    assert matched["missed"] == []
    assert all(a["mileage"]["mileage_m"] < end_m for a in matched["extra"])
    assert len(summary["alarms"]) >= len(expected) > 0


@pytest.mark.slow
def test_a_missing_telemetry_sidecar_ends_with_status_5(shared, tmp_path):
    recording = _copy_recording(shared, tmp_path / "no-nmea", telemetry=False)
    status, _, stderr = _replay(shared, recording)
    assert status == ExitStatus.TELEMETRY_MISSING == 5
    message = _message(stderr)
    assert str(recording) in message and "run.nmea" in message


@pytest.mark.slow
@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        (
            "lines_per_frame",
            LINES_PER_FRAME // 2,
            "{recording}: its frames have {lines} lines, {run_json} says lines_per_frame {value}: "
            "every fastener would be placed at the wrong mileage (is this the run's recording?)",
        ),
        (
            "mm_per_line",
            GEOMETRY.mm_per_line * 10,
            "{run_json} says mm_per_line {value:g}, {geometry} says {pitch:g}: one of them is "
            "wrong, and with it every mileage or every crop (they may differ by 2 % at most)",
        ),
    ],
)
def test_a_run_json_that_disagrees_with_the_frames_or_geometry_ends_with_status_8(
    shared, tmp_path, key, value, problem
):
    recording = _copy_recording(shared, tmp_path / key)
    run_json = recording.with_suffix(".json")
    run = json.loads(run_json.read_text())
    run[key] = value
    run_json.write_text(json.dumps(run))
    status, _, stderr = _replay(shared, recording)
    assert status == ExitStatus.CONFIG_INVALID == 8
    geometry = shared.detector.calibration / "TIV-test" / "cam0.geometry.json"
    message = problem.format(
        recording=recording,
        run_json=run_json,
        geometry=geometry,
        lines=LINES_PER_FRAME,
        pitch=GEOMETRY.mm_per_line,
        value=value,
    )
    assert _message(stderr) == f"edge-replay: {message}"


@pytest.mark.slow
def test_a_corrupt_model_file_ends_with_status_6(shared, tmp_path):
    model = tmp_path / "engines" / "broken.onnx"
    model.parent.mkdir()
    model.write_bytes(np.random.default_rng(1).bytes(4096))
    status, _, stderr = _replay(shared, shared.defects, "--model", str(model))
    assert status == ExitStatus.MODEL_INVALID == 6
    message = _message(stderr)
    assert str(model) in message and "cannot load" in message


def test_a_missing_thresholds_file_ends_with_status_8_before_anything_starts(shared, tmp_path):
    calibration = tmp_path / "calibration"
    shutil.copytree(shared.detector.calibration, calibration)
    (calibration / "TIV-test" / "cam0.thresholds.json").unlink()
    status, _, stderr = _replay(shared, shared.defects, "--calibration", str(calibration))
    assert status == ExitStatus.CONFIG_INVALID == 8
    message = _message(stderr)
    assert str(calibration / "TIV-test" / "cam0.thresholds.json") in message
    assert not any('"child_started"' in line for line in stderr)


@pytest.mark.parametrize(
    ("option", "status", "problem"),
    [
        ("--thresholds", ExitStatus.CONFIG_INVALID, "a folder, not a thresholds file"),
        ("--model", ExitStatus.MODEL_INVALID, "a folder; name the model in it"),
        ("--report", ExitStatus.CONFIG_INVALID, "a file, not a folder (--report names"),
        ("--spool", ExitStatus.CONFIG_INVALID, "cannot open the spool ("),
    ],
)
def test_a_folder_for_a_file_or_a_file_for_a_folder_is_named_before_anything_starts(
    shared, tmp_path, option, status, problem
):
    wrong = tmp_path / "wrong"
    if option == "--report":
        wrong.write_text("notes\n")
    else:
        wrong.mkdir()
    status_seen, stdout, stderr = _replay(shared, shared.defects, option, str(wrong), "--json")
    assert status_seen == status
    message = _message(stderr)
    assert message.startswith(f"edge-replay: {wrong}: {problem}")
    assert not any('"child_started"' in line for line in stderr)
    # --json: stdout is one JSON document even when there is no summary.
    assert [json.loads(line) for line in stdout] == [
        {
            "recording": str(shared.defects),
            "exit_status": int(status),
            "error": message.removeprefix("edge-replay: "),
        }
    ]


@pytest.mark.slow
def test_a_publish_port_in_use_ends_with_status_8_naming_it(shared, tmp_path):
    import zmq

    context = zmq.Context()
    taken = context.socket(zmq.PUB)
    taken.setsockopt(zmq.LINGER, 0)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        endpoint = f"tcp://127.0.0.1:{port}"
        status, _, stderr = _replay(shared, shared.defects, "--publish", endpoint)
    finally:
        taken.close()
        context.term()
    # A user error, reported once: not a publisher restarted until the restart limit.
    assert status == ExitStatus.CONFIG_INVALID == 8
    assert f"publish endpoint {endpoint}: cannot bind" in _message(stderr)
    assert not any('"child_restarting"' in line for line in stderr)


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_a_heatmap_scale_that_is_no_positive_number_is_a_usage_error(shared, value):
    status, _, stderr = _replay(shared, shared.defects, "--heatmap-vmax", value)
    assert status == ExitStatus.USAGE
    assert f"argument --heatmap-vmax: {value} is not a number over 0" in stderr[-1]
