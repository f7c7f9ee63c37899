"""NMEA and CSV telemetry, run.json, and the Positioner, against hand-computed values."""

import math
from datetime import datetime, timezone
from functools import reduce

import pytest
from structlog.testing import capture_logs

from edge.config import ConfigError
from edge.errors import ConfigInvalidError, TelemetryMissingError
from edge.telemetry.csvlog import read_telemetry_csv
from edge.telemetry.epochs import GpsEpoch, TelemetryLog
from edge.telemetry.geodesy import EARTH_RADIUS_M
from edge.telemetry.nmea import parse_nmea, read_nmea
from edge.telemetry.position import Positioner
from edge.telemetry.run import RunInfo, sidecars

UTC = timezone.utc


def nmea(body: str) -> str:
    """A sentence with its checksum, computed here independently of the code under test."""
    return f"${body}*{reduce(lambda a, c: a ^ ord(c), body, 0):02X}"


def wrong_checksum(body: str) -> str:
    right = nmea(body)
    return right[:-2] + f"{int(right[-2:], 16) ^ 0x01:02X}"


def utc(*args) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


RMC_GOOD = "GPRMC,120000.00,A,4807.0380,N,01131.0000,E,10.000,84.40,230394,,,A"


# NMEA ------------------------------------------------------------------------------------------


def test_bad_lines_are_counted_by_reason_and_skipped():
    good = nmea(RMC_GOOD)
    lines = [
        good,
        wrong_checksum(RMC_GOOD),
        "$" + RMC_GOOD,  # no checksum at all
        nmea("GPRMC,120001.00,A,4807.0380,N,01131.0000,E,10.000,84.40"),  # cut short
        nmea("GPRMC,120002.00,A,4860.0000,N,01131.0000,E,10.000,84.40,230394,,,A"),  # 60 min
        nmea("GPRMC,120003.00,A,9130.0000,N,01131.0000,E,10.000,84.40,230394,,,A"),  # 91 deg
        nmea("GPRMC,246000.00,A,4807.0380,N,01131.0000,E,10.000,84.40,230394,,,A"),  # 24 h
        nmea("GPRMC,120004.00,A,4807.0380,N,01131.0000,E,10.000,84.40,310294,,,A"),  # 31 Feb
        "garbage from a serial line",
        "",
        nmea("GPGSV,1,1,01,12,40,083,46"),  # known but not used
    ]
    telemetry = parse_nmea(lines)
    assert dict(telemetry.skipped) == {
        "checksum": 1,
        "checksum_missing": 1,
        "field_count": 1,
        "latitude": 2,
        "time": 1,
        "date": 1,
        "framing": 1,
        "other_sentence": 1,
    }
    assert telemetry.lines == 10
    (epoch,) = telemetry.epochs
    assert epoch.time_s == utc(1994, 3, 23, 12, 0, 0)
    assert epoch.lat == pytest.approx(48 + 7.038 / 60, abs=1e-12)
    assert epoch.lon == pytest.approx(11 + 31.0 / 60, abs=1e-12)
    assert epoch.speed_m_s == pytest.approx(10 * 1852 / 3600)
    assert epoch.quality == 1


def test_bad_lines_are_logged_with_counts_as_fields():
    telemetry = parse_nmea([nmea(RMC_GOOD), wrong_checksum(RMC_GOOD)], source="run.nmea")
    with capture_logs() as logs:
        telemetry.log_counts()
    (skipped,) = [entry for entry in logs if entry["event"] == "telemetry_lines_skipped"]
    assert skipped["checksum"] == 1 and skipped["file"] == "run.nmea"


def test_empty_hemisphere_makes_the_fix_invalid_but_keeps_the_time():
    lines = [
        nmea("GPRMC,120000.00,A,4807.0380,,01131.0000,E,10.0,84.4,230394,,,A"),
        nmea("GPGGA,120001.00,4807.0380,N,01131.0000,,1,08,0.9,545.4,M,46.9,M,,"),
    ]
    telemetry = parse_nmea(lines)
    assert telemetry.invalidated["hemisphere_missing"] == 2
    assert not telemetry.skipped
    first, second = telemetry.epochs
    assert first.time_s == utc(1994, 3, 23, 12, 0, 0)
    assert second.time_s == utc(1994, 3, 23, 12, 0, 1)  # the GGA is still dated
    for epoch in (first, second):
        assert epoch.lat is None and epoch.lon is None and epoch.quality == 0
        assert not epoch.has_fix


def test_sentences_of_one_instant_that_disagree_make_the_fix_invalid():
    telemetry = parse_nmea(
        [
            nmea("GPRMC,120000.00,V,4807.0380,N,01131.0000,E,10.0,84.4,230394,,,N"),
            nmea("GPGGA,120000.00,4807.0380,N,01131.0000,E,1,08,0.9,545.4,M,46.9,M,,"),
        ]
    )
    (epoch,) = telemetry.epochs
    assert not epoch.has_fix and epoch.lat is None and epoch.speed_m_s is None


def test_southern_and_western_coordinates_are_negative():
    telemetry = parse_nmea(
        [
            nmea("GPRMC,120000.00,A,3354.5000,S,07036.7500,W,0.0,,010125,,,D"),
            nmea("GPGGA,120001.00,0012.0000,S,00030.0000,W,2,08,0.9,10.0,M,0.0,M,,"),
        ]
    )
    santiago, near_null_island = telemetry.epochs
    assert santiago.lat == pytest.approx(-33.908333333333333, abs=1e-12)
    assert santiago.lon == pytest.approx(-70.6125, abs=1e-12)
    assert santiago.quality == 2  # mode D: differential
    assert near_null_island.lat == pytest.approx(-0.2, abs=1e-12)
    assert near_null_island.lon == pytest.approx(-0.5, abs=1e-12)


def test_three_digit_degree_fields():
    telemetry = parse_nmea(
        [
            # latitude written with three degree digits, longitude beyond 100 degrees
            nmea("GPRMC,120000.00,A,04807.0380,N,12311.1234,E,0.0,,230394,,,A"),
            nmea("GPGGA,120001.00,00130.0000,N,17959.9999,W,1,08,0.9,10.0,M,0.0,M,,"),
        ]
    )
    first, second = telemetry.epochs
    assert first.lat == pytest.approx(48.1173, abs=1e-12)
    assert first.lon == pytest.approx(123.18539, abs=1e-12)
    assert second.lat == pytest.approx(1.5, abs=1e-12)
    assert second.lon == pytest.approx(-(179 + 59.9999 / 60), abs=1e-12)


def test_gga_before_midnight_followed_by_next_day_rmc_gets_the_earlier_date():
    telemetry = parse_nmea(
        [
            nmea("GPGGA,235959.00,5200.0000,N,00500.0000,E,1,08,0.9,1.0,M,0.0,M,,"),
            nmea("GPRMC,000000.00,A,5200.0100,N,00500.0000,E,1.0,0.0,020125,,,A"),
            nmea("GPGGA,000000.00,5200.0100,N,00500.0000,E,1,08,0.9,1.0,M,0.0,M,,"),
        ]
    )
    before, after = telemetry.epochs
    assert before.time_s == utc(2025, 1, 1, 23, 59, 59)
    assert after.time_s == utc(2025, 1, 2, 0, 0, 0)
    assert after.speed_m_s == pytest.approx(1852 / 3600)  # RMC and GGA merged into one epoch


def test_gga_after_midnight_following_last_rmc_of_the_day_gets_the_next_date():
    telemetry = parse_nmea(
        [
            nmea("GPRMC,235959.90,A,5200.0000,N,00500.0000,E,1.0,0.0,311224,,,A"),
            nmea("GPGGA,000000.10,5200.0100,N,00500.0000,E,1,08,0.9,1.0,M,0.0,M,,"),
        ]
    )
    rmc, gga = telemetry.epochs
    assert rmc.time_s == pytest.approx(utc(2024, 12, 31, 23, 59, 59) + 0.9)
    assert gga.time_s == pytest.approx(utc(2025, 1, 1, 0, 0, 0) + 0.1)


def test_gga_without_any_dated_sentence_uses_the_hint_or_is_skipped():
    lines = [nmea("GPGGA,000001.00,5200.0000,N,00500.0000,E,1,08,0.9,1.0,M,0.0,M,,")]
    assert parse_nmea(lines).skipped["undated"] == 1
    hinted = parse_nmea(lines, date_hint=datetime(2025, 3, 9, 23, 59, 50, tzinfo=UTC))
    assert hinted.epochs[0].time_s == utc(2025, 3, 10, 0, 0, 1)


def test_vtg_speed_fills_an_epoch_without_rmc_speed(tmp_path):
    path = tmp_path / "run.nmea"
    path.write_text(
        "\r\n".join(
            [
                nmea("GPZDA,101500.00,09,03,2025,00,00"),
                nmea("GPGGA,101500.00,5200.0000,N,00500.0000,E,4,12,0.6,1.0,M,0.0,M,,"),
                nmea("GPVTG,270.0,T,,M,38.877,N,72.0,K,R"),
            ]
        )
        + "\r\n"
    )
    (epoch,) = read_nmea(path).epochs
    assert epoch.time_s == utc(2025, 3, 9, 10, 15, 0)
    assert epoch.quality == 4
    assert epoch.speed_m_s == pytest.approx(20.0)
    assert epoch.course_deg == 270.0


# CSV -------------------------------------------------------------------------------------------


def test_csv_rows_are_read_and_bad_rows_counted(tmp_path):
    path = tmp_path / "run.telemetry.csv"
    path.write_text(
        "time_utc,encoder_count,lat,lon,speed_kmh\n"
        "2025-01-01T23:59:59.900Z,100,-33.5,-70.25,72.0\n"
        "2025-01-01T23:59:59.950,101,-33.5,-70.25,72.0\n"  # no UTC offset
        "2025-01-02T00:00:00.000+00:00,200,,,36.0\n"  # no fix, speed and count kept
        "2025-01-02T00:00:00.100Z,300,95.0,1.0,36.0\n"  # latitude out of range
        "2025-01-02T00:00:00.200Z,400,-33.5\n"  # short row
    )
    telemetry = read_telemetry_csv(path)
    assert dict(telemetry.skipped) == {"time": 1, "latitude": 1, "field_count": 1}
    first, second = telemetry.epochs
    assert first.time_s == pytest.approx(utc(2025, 1, 1, 23, 59, 59) + 0.9)
    assert (first.lat, first.lon, first.quality, first.encoder_count) == (-33.5, -70.25, 1, 100)
    assert first.speed_m_s == pytest.approx(20.0)
    assert second.lat is None and second.quality == 0 and second.encoder_count == 200


def test_csv_with_an_unknown_column_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "run.telemetry.csv"
    path.write_text("time_utc,encoder_count,lat,lon,speed_kmh,speeed\n")
    with pytest.raises(TelemetryMissingError, match="run.telemetry.csv"):
        read_telemetry_csv(path)


# run.json --------------------------------------------------------------------------------------


def _run(**changes):
    values = dict(
        vehicle_id="v1",
        run_id="r1",
        line_id="L7",
        start_km_post=12,
        start_metres=250.0,
        direction="increasing",
        mm_per_line=2.0,
        lines_per_frame=64,
        start_time_utc=datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC),
    )
    values.update(changes)
    return RunInfo(**values)


def test_run_json_round_trips_and_rejects_a_misspelt_key(tmp_path):
    run = _run(start_time_utc="2025-01-01T13:00:00+01:00")
    assert run.start_time_utc == datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert run.start_mileage_m == 12250.0
    path = tmp_path / "run.json"
    run.save(path)
    assert RunInfo.load(path) == run
    path.write_text(run.to_json().replace('"line_id"', '"lineid"'))
    with pytest.raises(ConfigError, match="lineid"):
        RunInfo.load(path)
    with pytest.raises(ValueError, match="go together"):
        _run(encoder_counts_per_line=1.0)


# Positioner ------------------------------------------------------------------------------------


T0 = utc(2025, 1, 1, 12, 0, 0)


def _epochs(with_fix=lambda k: True, speeds=None, counts=None, n=11):
    """Fixes at T0 + k s moving north-east in straight lines of latitude and longitude."""
    return [
        GpsEpoch(
            time_s=T0 + k,
            lat=50.0 + 0.0002 * k if with_fix(k) else None,
            lon=8.0 + 0.0001 * k if with_fix(k) else None,
            quality=1 if with_fix(k) else 0,
            speed_m_s=None if speeds is None else speeds[k],
            course_deg=0.0 if with_fix(k) else None,
            encoder_count=None if counts is None else counts[k],
        )
        for k in range(n)
    ]


def _log(epochs):
    return TelemetryLog(sidecars("run.mkv").nmea, epochs)


@pytest.mark.parametrize("direction, mileage_m", [("increasing", 12260.0), ("decreasing", 12240.0)])
def test_mileage_and_time_from_gps_speed(direction, mileage_m):
    # 20 m/s throughout; the run starts 0.5 s after the first epoch.
    run = _run(direction=direction, start_time_utc=datetime(2025, 1, 1, 12, 0, 0, 500_000, UTC))
    positioner = Positioner(run, _log(_epochs(speeds=[20.0] * 11)))
    position = positioner.locate(5000)  # 5000 lines * 2 mm = 10 m
    assert position.along_track_m == pytest.approx(10.0)
    assert position.capture_time == pytest.approx(T0 + 1.0)  # 0.5 s + 10 m / 20 m/s
    assert position.mileage.mileage_m == pytest.approx(mileage_m)
    assert position.mileage.km_post == 12
    assert position.mileage.metres == pytest.approx(mileage_m - 12000)
    assert position.mileage.direction == direction and position.mileage.line_id == "L7"
    assert position.gps.lat == pytest.approx(50.0002) and position.gps.age_s == pytest.approx(0)


def test_gps_interpolated_between_fixes_with_age_and_quality():
    run = _run(start_time_utc=datetime(2025, 1, 1, 12, 0, 0, 500_000, UTC))
    epochs = _epochs(speeds=[20.0] * 11)
    epochs[2] = GpsEpoch(T0 + 2, 50.0004, 8.0002, 4, 20.0, 0.0)  # RTK fixed
    positioner = Positioner(run, _log(epochs))
    gps = positioner.locate(7500).gps  # 15 m: 0.5 + 0.75 s -> T0 + 1.25
    assert gps.lat == pytest.approx(50.0002 + 0.25 * 0.0002, abs=1e-12)
    assert gps.lon == pytest.approx(8.0001 + 0.25 * 0.0001, abs=1e-12)
    assert gps.age_s == pytest.approx(0.25) and gps.quality == 1 and not gps.dead_reckoned
    later = positioner.locate(10500).gps  # 21 m: T0 + 1.55, nearer the RTK fix
    assert later.age_s == pytest.approx(0.45) and later.quality == 4
    # The antenna 20 m ahead of the camera passed the same spot 1 s earlier.
    ahead = Positioner(run.model_copy(update={"gps_antenna_ahead_m": 20.0}), _log(epochs))
    assert ahead.locate(7500).gps.lat == pytest.approx(50.0 + 0.25 * 0.0002, abs=1e-12)


def test_tunnel_is_dead_reckoned_by_encoder_distance_and_flagged():
    # 1 count per line, 2 mm per count: 10000 counts/s is 20 m/s; the vehicle runs at 10 m/s
    # in the tunnel (T0+2 .. T0+8, no fix), so distance and time fractions differ.
    counts = [0, 10000, 20000, 25000, 30000, 35000, 40000, 45000, 55000, 65000, 75000]
    run = _run(
        direction="decreasing",
        encoder_counts_per_line=1.0,
        mm_per_encoder_count=2.0,
        start_encoder_count=0,
    )
    epochs = _epochs(with_fix=lambda k: not 3 <= k <= 7, counts=counts)
    positioner = Positioner(run, _log(epochs))
    assert positioner.mode == "encoder"

    inside = positioner.locate(30000)  # count 30000: T0 + 4 s, 60 m
    assert inside.capture_time == pytest.approx(T0 + 4.0)
    assert inside.along_track_m == pytest.approx(60.0)
    assert inside.mileage.mileage_m == pytest.approx(12250.0 - 60.0)
    fraction = (60.0 - 40.0) / (110.0 - 40.0)  # last fix at 40 m, next at 110 m
    assert inside.gps.lat == pytest.approx(50.0004 + fraction * (50.0016 - 50.0004), abs=1e-12)
    assert inside.gps.lon == pytest.approx(8.0002 + fraction * (8.0008 - 8.0002), abs=1e-12)
    assert inside.gps.dead_reckoned and inside.gps.quality == 6
    assert inside.gps.age_s == pytest.approx(2.0)

    outside = positioner.locate(15000)  # T0 + 1.5 s, between two fixes 1 s apart
    assert not outside.gps.dead_reckoned
    assert outside.gps.lat == pytest.approx(50.0003, abs=1e-12)

    beyond = positioner.locate(77500)  # 5 m past the last fix, carried on its course (north)
    assert beyond.capture_time == pytest.approx(T0 + 10.25)
    assert beyond.gps.dead_reckoned
    assert beyond.gps.lat == pytest.approx(50.002 + math.degrees(5.0 / EARTH_RADIUS_M), abs=1e-9)
    assert beyond.gps.lon == pytest.approx(8.001, abs=1e-9)


def test_telemetry_missing_names_the_recording(tmp_path):
    recording = tmp_path / "run.mkv"
    with pytest.raises(TelemetryMissingError, match="run.mkv"):
        Positioner.for_recording(recording)
    _run().save(tmp_path / "run.json")
    with pytest.raises(TelemetryMissingError, match="run.mkv"):
        Positioner.for_recording(recording)
    (tmp_path / "run.nmea").write_text("$GPRMC,bad*00\r\n")
    with pytest.raises(TelemetryMissingError, match="run.mkv"):
        Positioner.for_recording(recording)
    (tmp_path / "run.json").write_text('{"vehicle_id": "v1"}')
    with pytest.raises(ConfigInvalidError, match="run.json"):
        Positioner.for_recording(recording)


def test_telemetry_without_a_fix_or_in_a_folder_says_so_naming_the_file(tmp_path):
    recording = tmp_path / "run.mkv"
    _run().save(tmp_path / "run.json")
    void = [nmea(f"GPRMC,12000{k}.00,V,,,,,,,230394,,,N") for k in range(3)]
    (tmp_path / "run.nmea").write_text("\r\n".join(void) + "\r\n")
    with pytest.raises(TelemetryMissingError) as caught:
        Positioner.for_recording(recording)
    assert str(caught.value) == (
        f"{recording}: telemetry run.nmea has no usable epoch: 3 epochs in 3 lines, none with a "
        "GPS fix, a speed or an encoder count"
    )
    (tmp_path / "run.nmea").write_text("\r\n".join([*void, "garbage"]) + "\r\n")
    with pytest.raises(TelemetryMissingError, match="4 lines, .*; lines skipped: {'framing': 1}$"):
        Positioner.for_recording(recording)
    (tmp_path / "run.nmea").unlink()
    (tmp_path / "run.nmea").mkdir()
    with pytest.raises(TelemetryMissingError) as caught:
        Positioner.for_recording(recording)
    assert str(caught.value) == (
        f"{recording}: {tmp_path / 'run.nmea'} is a folder, not a telemetry file"
    )
