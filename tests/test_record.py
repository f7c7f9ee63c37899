"""``edge record`` and write_recording: the video, run.json and telemetry they write."""

import json
from datetime import datetime, timezone
from functools import reduce

import cv2
import numpy as np
import pytest

from edge.cli import main
from edge.errors import ExitStatus
from edge.grabber.record import strip_frames, write_recording
from edge.grabber.sources import RecordingSource
from edge.telemetry.csvlog import read_telemetry_csv
from edge.telemetry.geodesy import destination, distance
from edge.telemetry.nmea import read_nmea
from edge.telemetry.position import Positioner
from edge.telemetry.run import RunInfo
from edge.telemetry.simulate import SimulatedTrack

START = datetime(2025, 1, 1, 23, 59, 59, tzinfo=timezone.utc)  # the run crosses UTC midnight


def _run(**changes):
    values = dict(
        vehicle_id="v1",
        run_id="r1",
        line_id="L7",
        start_km_post=40,
        direction="decreasing",
        mm_per_line=5.0,
        lines_per_frame=16,
        start_time_utc=START,
    )
    values.update(changes)
    return RunInfo(**values)


def test_strip_recording_with_simulated_nmea_agrees_with_its_length(tmp_path):
    rng = np.random.default_rng(0)
    strip = rng.integers(0, 65536, (16 * 50 + 7, 24), dtype=np.uint16)
    track = SimulatedTrack(start_lat=-33.9, start_lon=-70.6, heading_deg=135.0, speed_kmh=36.0)
    summary = write_recording(tmp_path / "run.mkv", strip_frames(strip, 16), _run(), track)
    assert (summary.frames, summary.lines, summary.bit_depth) == (50, 800, 16)
    assert summary.along_track_m == pytest.approx(4.0)  # 800 lines * 5 mm
    assert not (tmp_path / "run.partial.mkv").exists()

    read = list(RecordingSource(summary.recording))
    assert len(read) == 50  # the 7 lines short of a frame are dropped
    assert all(np.array_equal(f.image, strip[16 * f.index : 16 * f.index + 16]) for f in read)
    assert RunInfo.load(tmp_path / "run.json") == _run()

    # Every sentence carries a correct checksum (computed here, not by the code under test).
    lines = (tmp_path / "run.nmea").read_bytes().split(b"\r\n")
    assert lines[-1] == b"" and len(lines) > 10
    for line in lines[:-1]:
        body, checksum = line[1:].decode().split("*")
        assert int(checksum, 16) == reduce(lambda a, c: a ^ ord(c), body, 0)
    telemetry = read_nmea(tmp_path / "run.nmea")
    assert not telemetry.skipped and not telemetry.invalidated

    # The last line is 4 m from the first along the heading, reached 0.4 s after the start.
    positioner = Positioner.for_recording(summary.recording)
    first, last = positioner.locate(0), positioner.locate(800)
    assert first.capture_time == pytest.approx(START.timestamp(), abs=1e-6)
    # RMC speed has 0.001 knot resolution: 19.438 kn for 10 m/s, 9 microseconds over 4 m.
    assert last.capture_time == pytest.approx(START.timestamp() + 0.4, abs=1e-4)
    assert distance(first.gps.lat, first.gps.lon, last.gps.lat, last.gps.lon) == pytest.approx(
        4.0, abs=0.01
    )
    expected = destination(-33.9, -70.6, 135.0, 4.0)
    assert (last.gps.lat, last.gps.lon) == pytest.approx(expected, abs=1e-7)
    assert last.mileage.mileage_m == pytest.approx(40000.0 - 4.0)


def test_cli_records_stills_with_encoder_csv_and_a_tunnel(tmp_path, capsys):
    stills = tmp_path / "stills"
    stills.mkdir()
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (16, 32), dtype=np.uint8) for _ in range(12)]
    for k, image in enumerate(images):
        cv2.imwrite(str(stills / f"f{k}.png"), image)
    out = tmp_path / "out" / "run.mkv"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run.nmea").write_text("stale\n")
    status = main(
        ["record", str(out), "--stills", str(stills), "--vehicle-id", "v9", "--line-id", "L1"]
        + ["--start-km-post", "7", "--start-metres", "100", "--direction", "increasing"]
        + ["--mm-per-line", "500", "--start-time-utc", "2025-03-09T10:00:00Z"]
        + ["--encoder-counts-per-line", "5", "--mm-per-encoder-count", "100"]
        + ["--start-lat", "52.0", "--start-lon", "5.0", "--heading-deg", "0", "--speed-kmh", "72"]
        + ["--tunnel", "20:60", "--telemetry-format", "csv", "--force"]
    )
    assert status == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["frames"] == 12 and summary["lines"] == 192
    assert summary["along_track_m"] == pytest.approx(96.0)
    assert not (tmp_path / "out" / "run.nmea").exists()  # the stale sidecar would mislead
    run = RunInfo.load(tmp_path / "out" / "run.json")
    assert run.run_id == "v9-20250309T100000Z" and run.lines_per_frame == 16

    read = list(RecordingSource(out))
    assert all(np.array_equal(f.image, images[f.index]) for f in read) and len(read) == 12
    csv = read_telemetry_csv(tmp_path / "out" / "run.telemetry.csv")
    assert not csv.skipped
    assert any(e.encoder_count is not None and not e.has_fix for e in csv.epochs)

    positioner = Positioner.for_recording(out)
    assert positioner.mode == "encoder"
    # Line 80: count 400, 40 m along (0.5 m per line); 2 s after the start at 20 m/s.
    inside = positioner.locate(80)
    assert inside.along_track_m == pytest.approx(40.0)
    assert inside.capture_time == pytest.approx(run.start_time_s + 2.0, abs=0.01)
    assert inside.gps.dead_reckoned and inside.gps.age_s > 0.9
    assert distance(52.0, 5.0, inside.gps.lat, inside.gps.lon) == pytest.approx(40.0, abs=0.5)
    assert inside.mileage.mileage_m == pytest.approx(7140.0)
    outside = positioner.locate(140)  # 70 m, past the tunnel
    assert not outside.gps.dead_reckoned and outside.gps.quality == 1


def test_cli_copies_a_telemetry_file_and_refuses_an_empty_one(tmp_path, capsys):
    strip = np.zeros((64, 32), np.uint8)
    cv2.imwrite(str(tmp_path / "strip.png"), strip)
    nmea = tmp_path / "gps.nmea"
    body = "GPRMC,235959.00,A,5200.0000,N,00500.0000,E,1.0,0.0,010125,,,A"
    checksum = reduce(lambda a, c: a ^ ord(c), body, 0)
    nmea.write_text(f"${body}*{checksum:02X}\r\n")
    common = ["--strip", str(tmp_path / "strip.png"), "--vehicle-id", "v1", "--line-id", "L1"]
    common += ["--start-km-post", "1", "--direction", "increasing", "--mm-per-line", "1"]
    common += ["--lines-per-frame", "16", "--start-time-utc", START.isoformat()]
    status = main(["record", str(tmp_path / "a.mkv"), *common, "--telemetry", str(nmea)])
    assert status == 0, capsys.readouterr().err
    assert (tmp_path / "a.nmea").read_bytes() == nmea.read_bytes()

    (tmp_path / "junk.nmea").write_text("no sentence here\n")
    status = main(
        ["record", str(tmp_path / "b.mkv"), *common, "--telemetry", str(tmp_path / "junk.nmea")]
    )
    assert status == ExitStatus.TELEMETRY_MISSING
    assert "junk.nmea" in capsys.readouterr().err

    status = main(["record", str(tmp_path / "c.mkv"), *common])
    assert status == ExitStatus.USAGE
    assert "--telemetry" in capsys.readouterr().err


def test_odd_frame_size_is_refused_and_leaves_no_file(tmp_path):
    frames = [np.zeros((16, 31), np.uint8)]
    track = SimulatedTrack(start_lat=0.0, start_lon=0.0, heading_deg=0.0, speed_kmh=10.0)
    with pytest.raises(ValueError, match="even"):
        write_recording(tmp_path / "run.mkv", frames, _run(), track)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="frame 1"):
        mixed = [np.zeros((16, 32), np.uint8), np.zeros((16, 32), np.uint16)]
        write_recording(tmp_path / "run.mkv", mixed, _run(), track)
    assert list(tmp_path.iterdir()) == []


_RUN_FLAGS = ["--vehicle-id", "v1", "--line-id", "L1", "--start-km-post", "1"]
_RUN_FLAGS += ["--direction", "increasing", "--mm-per-line", "1", "--lines-per-frame", "16"]
_TRACK_FLAGS = ["--start-lat", "52", "--start-lon", "5"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            _TRACK_FLAGS,
            "--vehicle-id, --line-id, --start-km-post, --direction, --mm-per-line,"
            " --lines-per-frame are needed without --run-info",
        ),
        (
            ["--run-id", "r1", "--start-km-post", "1", *_TRACK_FLAGS],
            "--vehicle-id, --line-id, --direction, --mm-per-line, --lines-per-frame"
            " are needed without --run-info",
        ),
        (
            [*_RUN_FLAGS, *_TRACK_FLAGS, "--speed-kmh", "-5"],
            "--speed-kmh -5: must be over 0 and at most 500",
        ),
        (
            [*_RUN_FLAGS, *_TRACK_FLAGS, "--start-lat", "95"],
            "--start-lat 95: must be from -90 to 90",
        ),
        (
            [*_RUN_FLAGS, *_TRACK_FLAGS, "--heading-deg", "360", "--speed-kmh", "600"],
            "--heading-deg 360: must be at least 0 and under 360;"
            " --speed-kmh 600: must be over 0 and at most 500",
        ),
        (
            [*_RUN_FLAGS, *_TRACK_FLAGS, "--gps-rate-hz", "0"],
            "--gps-rate-hz 0: must divide 100: 1, 2, 4, 5, 10, 20, 25, 50 or 100",
        ),
        (
            [*_RUN_FLAGS, *_TRACK_FLAGS, "--start-time-utc", "yesterday"],
            "--start-time-utc 'yesterday': need an ISO 8601 time with its zone,"
            " e.g. 2025-03-09T10:00:00Z",
        ),
        (
            [*_RUN_FLAGS, *_TRACK_FLAGS, "--start-time-utc", "2025-03-09T10:00:00"],
            "--start-time-utc '2025-03-09T10:00:00': need an ISO 8601 time with its zone,"
            " e.g. 2025-03-09T10:00:00Z",
        ),
        ([*_RUN_FLAGS, *_TRACK_FLAGS, "--mm-per-line", "-2"], "--mm-per-line -2: must be over 0"),
        (
            [*_RUN_FLAGS, *_TRACK_FLAGS, "--encoder-counts-per-line", "4"],
            "--encoder-counts-per-line and --mm-per-encoder-count go together",
        ),
        (
            [*_RUN_FLAGS, *_TRACK_FLAGS, "--tunnel", "5-10"],
            "--tunnel '5-10': need START_M:END_M in along-track metres, e.g. 20:60",
        ),
        (
            [*_RUN_FLAGS, *_TRACK_FLAGS, "--tunnel", "20:60", "--tunnel", "10:5"],
            "--tunnel '10:5': the start must be before the end",
        ),
    ],
)
def test_cli_names_the_flag_of_a_missing_or_wrong_value(tmp_path, capsys, flags, message):
    cv2.imwrite(str(tmp_path / "strip.png"), np.zeros((32, 16), np.uint8))
    out = tmp_path / "run.mkv"
    status = main(["record", str(out), "--strip", str(tmp_path / "strip.png"), *flags])
    assert status == ExitStatus.USAGE
    printed = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("{")]
    assert printed == [f"edge record: {message}"]
    assert list(tmp_path.iterdir()) == [tmp_path / "strip.png"]


def test_simulated_track_refuses_a_tunnel_ending_before_it_starts():
    with pytest.raises(ValueError, match=r"tunnel \(10, 5\): the start must be before the end"):
        SimulatedTrack(start_lat=0, start_lon=0, heading_deg=0, speed_kmh=10, tunnels=((10, 5),))


def test_cli_refuses_to_replace_a_recording_or_its_sidecars_without_force(tmp_path, capsys):
    cv2.imwrite(str(tmp_path / "strip.png"), np.full((32, 16), 7, np.uint8))
    flags = ["--strip", str(tmp_path / "strip.png"), *_RUN_FLAGS, *_TRACK_FLAGS]
    out = tmp_path / "run.mkv"
    assert main(["record", str(out), *flags]) == 0
    capsys.readouterr()
    written = {path: path.read_bytes() for path in tmp_path.iterdir()}
    sidecars = [tmp_path / "run.json", tmp_path / "run.nmea"]
    assert sorted(written) == sorted([out, tmp_path / "strip.png", *sidecars])

    def refused(recording, stale) -> None:
        assert main(["record", str(recording), *flags]) == ExitStatus.USAGE
        printed = [line for line in capsys.readouterr().err.splitlines() if line[:1] != "{"]
        assert printed == [
            f"edge record: {', '.join(map(str, stale))}: already there; give another "
            "recording name, or --force to replace"
        ]

    refused(out, [out, *sidecars])
    # A sidecar alone (the recording deleted, its telemetry kept) is refused as well.
    (tmp_path / "other.telemetry.csv").write_text("epochs of another run\n")
    refused(tmp_path / "other.mkv", [tmp_path / "other.telemetry.csv"])
    assert {path: path.read_bytes() for path in written} == written

    assert main(["record", str(out), *flags, "--force", "--start-lat", "53"]) == 0
    assert (tmp_path / "run.nmea").read_bytes() != written[tmp_path / "run.nmea"]
