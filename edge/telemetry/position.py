"""Where and when a scan line was captured: along-track distance, time, GPS and mileage.

A :class:`Positioner` answers, for a line index of a run (or an along-track distance):

1. ``along_track_m``: with a wheel encoder (the run has ``encoder_counts_per_line`` and
   ``mm_per_encoder_count`` and the CSV has encoder counts) line ``i`` is encoder count
   ``c0 + i * encoder_counts_per_line`` and lies ``(count - c0) * mm_per_encoder_count`` from
   line 0; otherwise ``i * mm_per_line``. The encoder's calibrated mm per count is preferred
   over the nominal mm per line because wheel wear changes the true pitch.
2. ``capture_time`` (UTC seconds): with the encoder, the logged (time, count) pairs are
   interpolated at the line's count; otherwise the distance travelled, integrated from the GPS
   speed (trapezoid rule, zero at the run's ``start_time_utc``), is inverted. While the vehicle
   stands still the first instant a distance was reached is taken. Beyond the telemetry the
   last speed (or count rate) is carried on.
3. ``gps``: the fix interpolated linearly in time between the two valid fixes around the
   capture time, if they are at most ``max_fix_gap_s`` apart; ``age_s`` is the time to the
   nearer one and ``quality`` is the nearer one's. Otherwise (a tunnel, or before the first or
   after the last fix) the position is dead-reckoned from distance: between two fixes it is
   placed on the chord between them at the fraction of the along-track distance covered;
   beyond the last (or before the first) fix it is carried along that fix's course. Such fixes
   have ``dead_reckoned=True`` and quality 6 ("estimated", NMEA 0183). The GPS position is of
   the antenna, so it is looked up where the antenna was over the scanned line
   (``gps_antenna_ahead_m`` earlier along the track).
4. ``mileage``: the run's start chainage plus or minus ``along_track_m`` by its direction.
   Known limit: nominal chainage; a "broken" kilometre (not 1000 m long) or a realigned line
   shifts it, and a correction table against the railway's anchors is not applied here.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.config import ConfigError
from edge.errors import ConfigInvalidError, TelemetryMissingError
from edge.logs import get_logger
from edge.records import GpsFix, Mileage
from edge.telemetry.csvlog import read_telemetry_csv
from edge.telemetry.epochs import QUALITY_DEAD_RECKONING, TelemetryLog
from edge.telemetry.geodesy import bearing, destination
from edge.telemetry.nmea import read_nmea
from edge.telemetry.run import RunInfo, sidecars

log = get_logger(__name__)


@dataclass(frozen=True)
class Position:
    """One scan line placed on the line: what a :class:`~edge.records.CropTag` needs."""

    line_index: float
    along_track_m: float
    capture_time: float
    gps: GpsFix
    mileage: Mileage


def _interp(x: float, xp: np.ndarray, fp: np.ndarray) -> float:
    """Linear interpolation in increasing ``xp`` that extrapolates along the end segments."""
    if len(xp) == 1:
        return float(fp[0])
    if x < xp[0]:
        return float(fp[0] + (x - xp[0]) * (fp[1] - fp[0]) / (xp[1] - xp[0]))
    if x > xp[-1]:
        return float(fp[-1] + (x - xp[-1]) * (fp[-1] - fp[-2]) / (xp[-1] - xp[-2]))
    return float(np.interp(x, xp, fp))


def _first_increasing(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep the points where ``xs`` rises above every earlier value (first arrival at each)."""
    keep = np.concatenate([[True], xs[1:] > np.maximum.accumulate(xs)[:-1]])
    return xs[keep], ys[keep]


class Positioner:
    """Line index (or along-track distance) -> :class:`Position`, for one run.

    Args:
        run: the run's ``run.json``.
        telemetry: epochs of its NMEA or CSV telemetry.
        recording: the recording's name, for messages.
        max_fix_gap_s: two fixes further apart than this are not interpolated between; the
            stretch between them is dead-reckoned (a 10 Hz receiver losing a few epochs stays
            interpolated, a tunnel does not).

    Raises:
        TelemetryMissingError: the telemetry has neither speed nor encoder counts to time the
            lines by.
    """

    def __init__(
        self,
        run: RunInfo,
        telemetry: TelemetryLog,
        recording: str | Path = "<recording>",
        max_fix_gap_s: float = 2.0,
    ):
        self.run = run
        self.recording = str(recording)
        self.max_fix_gap_s = max_fix_gap_s
        epochs = sorted(telemetry.epochs, key=lambda epoch: epoch.time_s)
        counted = [(e.time_s, e.encoder_count) for e in epochs if e.encoder_count is not None]
        self.mode = "encoder" if run.has_encoder and len(counted) >= 2 else "speed"
        if run.has_encoder and self.mode != "encoder":
            log.warning("telemetry_without_encoder", recording=self.recording)
        # Step 1 and 2: the distance <-> time map.
        if self.mode == "encoder":
            times, counts = np.array(counted, dtype=np.float64).T
            self._count, self._count_time = _first_increasing(counts, times)
            backwards = int(np.sum(np.diff(counts) < 0))
            if backwards:
                log.warning("encoder_count_backwards", recording=self.recording, rows=backwards)
            if run.start_encoder_count is not None:
                self._count0 = float(run.start_encoder_count)
            else:
                self._count0 = _interp(run.start_time_s, self._count_time, self._count)
            self.metres_per_line = run.encoder_counts_per_line * run.mm_per_encoder_count / 1000.0
        else:
            timed = [(e.time_s, e.speed_m_s) for e in epochs if e.speed_m_s is not None]
            if not timed:
                raise TelemetryMissingError(
                    f"{self.recording}: telemetry {telemetry.source} has no speed and no "
                    "encoder count, so the lines cannot be timed"
                )
            self._speed_time, self._speed = np.array(timed, dtype=np.float64).T
            steps = np.diff(self._speed_time) * (self._speed[1:] + self._speed[:-1]) / 2.0
            self._travelled = np.concatenate([[0.0], np.cumsum(steps)])
            self._travelled0 = 0.0  # distance_at_time subtracts it; zero it at line 0 next
            self._travelled0 = self.distance_at_time(run.start_time_s)
            self._arrival, self._arrival_time = _first_increasing(self._travelled, self._speed_time)
            self.metres_per_line = run.mm_per_line / 1000.0
        # Step 3: the valid fixes.
        fixes = [e for e in epochs if e.has_fix]
        self._fix_time = [e.time_s for e in fixes]
        self._fixes = fixes
        self._courses = [e.course_deg for e in fixes]
        for k in range(1, len(fixes)):
            if self._courses[k] is None:
                a, b = fixes[k - 1], fixes[k]
                self._courses[k] = bearing(a.lat, a.lon, b.lat, b.lon)
        if len(fixes) > 1 and self._courses[0] is None:
            self._courses[0] = self._courses[1]
        if epochs and not epochs[0].time_s - 60.0 <= run.start_time_s <= epochs[-1].time_s + 60.0:
            log.warning(
                "telemetry_far_from_run_start",
                recording=self.recording,
                offset_s=round(epochs[0].time_s - run.start_time_s, 3),
            )
        log.info(
            "positioner_ready",
            recording=self.recording,
            mode=self.mode,
            epochs=len(epochs),
            fixes=len(fixes),
            metres_per_line=self.metres_per_line,
        )

    @classmethod
    def for_recording(cls, recording: str | Path, max_fix_gap_s: float = 2.0) -> Positioner:
        """The positioner of a recording, from its sidecars (:func:`edge.telemetry.run.sidecars`).

        Raises:
            TelemetryMissingError: ``run.json`` or both telemetry files are missing, or the
                telemetry has nothing usable; the message names the recording.
            ConfigInvalidError: ``run.json`` does not match :class:`RunInfo`.
        """
        run = load_run_info(recording)
        return cls(run, load_telemetry(recording, run), recording, max_fix_gap_s)

    # Step 1 and 2 ------------------------------------------------------------------------

    def along_track_m(self, line_index: float) -> float:
        """Distance of a line from line 0, in metres."""
        return line_index * self.metres_per_line

    def line_index(self, along_track_m: float) -> float:
        """The (fractional) line index at an along-track distance."""
        return along_track_m / self.metres_per_line

    def distance_at_time(self, time_s: float) -> float:
        """Along-track metres of the scan line at UTC ``time_s`` (negative before line 0)."""
        if self.mode == "encoder":
            count = _interp(time_s, self._count_time, self._count)
            return (count - self._count0) * self.run.mm_per_encoder_count / 1000.0
        t, s, v = self._speed_time, self._travelled, self._speed
        if time_s <= t[0]:
            travelled = s[0] - v[0] * (t[0] - time_s)
        elif time_s >= t[-1]:
            travelled = s[-1] + v[-1] * (time_s - t[-1])
        else:
            travelled = float(np.interp(time_s, t, s))
        return travelled - self._travelled0

    def capture_time(self, along_track_m: float) -> float:
        """UTC seconds at which the scan line ``along_track_m`` from line 0 was captured."""
        if self.mode == "encoder":
            count = self._count0 + along_track_m * 1000.0 / self.run.mm_per_encoder_count
            return _interp(count, self._count, self._count_time)
        travelled = along_track_m + self._travelled0
        s, t = self._arrival, self._arrival_time
        if s[0] <= travelled <= s[-1]:
            return float(np.interp(travelled, s, t))
        # Beyond the telemetry: carry the first (or last) speed on.
        speed, anchor_s, anchor_t = (
            (self._speed[0], s[0], t[0]) if travelled < s[0] else (self._speed[-1], s[-1], t[-1])
        )
        return float(anchor_t + (travelled - anchor_s) / speed) if speed > 0 else float(anchor_t)

    # Step 3 and 4 ------------------------------------------------------------------------

    def gps_at(self, time_s: float, along_track_m: float) -> GpsFix:
        """The antenna's position at ``time_s``, when it was ``along_track_m`` from line 0."""
        fixes, times = self._fixes, self._fix_time
        if not fixes:
            return GpsFix(None, None)
        k = bisect.bisect_right(times, time_s)
        before = fixes[k - 1] if k > 0 else None
        after = fixes[k] if k < len(fixes) else None
        if before is not None and before.time_s == time_s:
            return GpsFix(before.lat, before.lon, before.quality, 0.0)
        ages = [abs(time_s - f.time_s) for f in (before, after) if f is not None]
        both = before is not None and after is not None
        if both and after.time_s - before.time_s <= self.max_fix_gap_s:
            w = (time_s - before.time_s) / (after.time_s - before.time_s)
            nearer = before if w <= 0.5 else after
            return GpsFix(
                before.lat + w * (after.lat - before.lat),
                before.lon + w * (after.lon - before.lon),
                nearer.quality,
                min(ages),
            )
        if both:
            d_before = self.distance_at_time(before.time_s)
            d_after = self.distance_at_time(after.time_s)
            span = d_after - d_before
            w = min(1.0, max(0.0, (along_track_m - d_before) / span)) if span > 0 else 0.5
            lat = before.lat + w * (after.lat - before.lat)
            lon = before.lon + w * (after.lon - before.lon)
        else:
            anchor = before if before is not None else after
            course = self._courses[k - 1 if before is not None else k]
            lat, lon = anchor.lat, anchor.lon
            if course is not None:
                ahead = along_track_m - self.distance_at_time(anchor.time_s)
                lat, lon = destination(anchor.lat, anchor.lon, course, ahead)
        return GpsFix(lat, lon, QUALITY_DEAD_RECKONING, min(ages), dead_reckoned=True)

    def mileage(self, along_track_m: float) -> Mileage:
        """Chainage of the scan line ``along_track_m`` from line 0, by the run's direction."""
        sign = 1.0 if self.run.direction == "increasing" else -1.0
        return Mileage(
            self.run.line_id, self.run.start_mileage_m + sign * along_track_m, self.run.direction
        )

    def locate_along_track(self, along_track_m: float) -> Position:
        """Time, GPS and mileage of the scan line ``along_track_m`` from line 0."""
        capture_time = self.capture_time(along_track_m)
        antenna_m = along_track_m - self.run.gps_antenna_ahead_m
        antenna_time = capture_time if antenna_m == along_track_m else self.capture_time(antenna_m)
        return Position(
            line_index=self.line_index(along_track_m),
            along_track_m=along_track_m,
            capture_time=capture_time,
            gps=self.gps_at(antenna_time, antenna_m),
            mileage=self.mileage(along_track_m),
        )

    def locate(self, line_index: float) -> Position:
        """Time, GPS and mileage of scan line ``line_index`` (0 = first line of the run)."""
        if not (line_index >= 0 and math.isfinite(line_index)):
            raise ValueError(f"line index must be finite and not negative, got {line_index}")
        position = self.locate_along_track(self.along_track_m(line_index))
        return Position(
            line_index,
            position.along_track_m,
            position.capture_time,
            position.gps,
            position.mileage,
        )


def load_run_info(recording: str | Path) -> RunInfo:
    """The ``run.json`` beside a recording.

    Raises:
        TelemetryMissingError: it is missing (the message names the recording).
        ConfigInvalidError: it does not match :class:`RunInfo` (the message names the file).
    """
    path = sidecars(recording).run_json
    if not path.is_file():
        raise TelemetryMissingError(f"{recording}: run sidecar {path.name} is missing")
    try:
        return RunInfo.load(path)
    except ConfigError as error:
        raise ConfigInvalidError(str(error)) from error


def load_telemetry(recording: str | Path, run: RunInfo) -> TelemetryLog:
    """The telemetry beside a recording: ``<stem>.telemetry.csv`` if present, else ``<stem>.nmea``.

    GGA sentences of a file without any RMC or ZDA are dated from the run's start time. The
    counts of bad lines are logged.

    Raises:
        TelemetryMissingError: neither file is there or readable, or no epoch in it has a fix,
            a speed or an encoder count; the message names the recording.
    """
    paths = sidecars(recording)
    for path in (paths.telemetry_csv, paths.nmea):
        if path.is_dir():
            raise TelemetryMissingError(f"{recording}: {path} is a folder, not a telemetry file")
    try:
        if paths.telemetry_csv.is_file():
            telemetry = read_telemetry_csv(paths.telemetry_csv)
        elif paths.nmea.is_file():
            telemetry = read_nmea(paths.nmea, date_hint=run.start_time_utc)
        else:
            raise TelemetryMissingError(
                f"{recording}: no telemetry beside it "
                f"(expected {paths.telemetry_csv.name} or {paths.nmea.name})"
            )
    except OSError as error:
        raise TelemetryMissingError(
            f"{recording}: telemetry cannot be read ({error.filename}: {error.strerror})"
        ) from error
    telemetry.log_counts()
    usable = [
        e
        for e in telemetry.epochs
        if e.has_fix or e.speed_m_s is not None or e.encoder_count is not None
    ]
    if not usable:
        skipped = f"; lines skipped: {dict(telemetry.skipped)}" if telemetry.skipped else ""
        raise TelemetryMissingError(
            f"{recording}: telemetry {telemetry.source.name} has no usable epoch: "
            f"{len(telemetry.epochs)} epochs in {telemetry.lines} lines, none with a GPS fix, "
            f"a speed or an encoder count{skipped}"
        )
    return telemetry
