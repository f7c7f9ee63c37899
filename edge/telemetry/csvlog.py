"""``run.telemetry.csv``: the vehicle logger's telemetry, one row per sample.

Columns (header required, order free):

============== ====================================================================
time_utc       ISO 8601 with a UTC offset, e.g. ``2025-01-01T23:59:59.900Z``
encoder_count  wheel encoder count at that instant (integer; may be empty)
lat            decimal degrees, south negative (empty when there is no fix)
lon            decimal degrees, west negative (empty when there is no fix)
speed_kmh      speed over ground in km/h (empty when unknown)
fix_quality    optional column: GGA fix quality; without it a row with lat/lon counts as 1
============== ====================================================================

Bad rows are skipped and counted by reason, never fatal; an unknown column or a missing
required one is fatal (:class:`~edge.errors.TelemetryMissingError` names the file), because
then no row can be trusted.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from edge.errors import TelemetryMissingError
from edge.telemetry.epochs import GpsEpoch, TelemetryLog
from edge.telemetry.nmea import MAX_SPEED_KMH

REQUIRED = ("time_utc", "encoder_count", "lat", "lon", "speed_kmh")
OPTIONAL = ("fix_quality",)


class _Bad(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _float(text: str, reason: str, low: float, high: float) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError as error:
        raise _Bad(reason) from error
    if not (math.isfinite(value) and low <= value <= high):
        raise _Bad(reason)
    return value


def _time(text: str) -> float:
    try:
        instant = datetime.fromisoformat(text.strip())
    except ValueError as error:
        raise _Bad("time") from error
    if instant.tzinfo is None:  # a local time without offset cannot be placed on the UTC line
        raise _Bad("time")
    return instant.timestamp()


def _row(row: dict[str, str]) -> GpsEpoch:
    time_s = _time(row["time_utc"] or "")
    count_text = (row["encoder_count"] or "").strip()
    try:
        encoder_count = int(count_text) if count_text else None
    except ValueError as error:
        raise _Bad("encoder_count") from error
    lat = _float(row["lat"] or "", "latitude", -90.0, 90.0)
    lon = _float(row["lon"] or "", "longitude", -180.0, 180.0)
    if (lat is None) != (lon is None):
        raise _Bad("position")
    speed_kmh = _float(row["speed_kmh"] or "", "speed", 0.0, MAX_SPEED_KMH)
    quality_text = (row.get("fix_quality") or "").strip()
    if quality_text:
        if not quality_text.isdigit() or int(quality_text) > 8:
            raise _Bad("quality")
        quality = int(quality_text)
    else:
        quality = 0 if lat is None else 1
    if quality == 0:
        lat = lon = None
    return GpsEpoch(
        time_s=time_s,
        lat=lat,
        lon=lon,
        quality=quality,
        speed_m_s=None if speed_kmh is None else speed_kmh / 3.6,
        encoder_count=encoder_count,
    )


def read_telemetry_csv(path: str | Path) -> TelemetryLog:
    """Epochs of a telemetry CSV, sorted by time; bad rows counted by reason.

    Raises:
        TelemetryMissingError: the header lacks a required column or has an unknown one.
        OSError: the file cannot be read.
    """
    path = Path(path)
    skipped: Counter[str] = Counter()
    epochs = []
    rows = 0
    with path.open("r", encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        missing = [name for name in REQUIRED if name not in header]
        unknown = [name for name in header if name not in REQUIRED + OPTIONAL]
        if missing or unknown:
            raise TelemetryMissingError(
                f"{path}: telemetry CSV header must have {', '.join(REQUIRED)} "
                f"(missing: {missing}, unknown: {unknown})"
            )
        reader.fieldnames = header
        for row in reader:
            rows += 1
            if None in row or any(value is None for value in row.values()):
                skipped["field_count"] += 1
                continue
            try:
                epochs.append(_row(row))
            except _Bad as bad:
                skipped[bad.reason] += 1
    epochs.sort(key=lambda epoch: epoch.time_s)
    return TelemetryLog(path, epochs, rows, skipped)


def write_telemetry_csv(epochs: Iterable[GpsEpoch], path: str | Path) -> int:
    """Write epochs in the format above (lat/lon to 1e-8 degree, ~1 mm); returns rows."""
    rows = 0
    with Path(path).open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(REQUIRED + OPTIONAL)
        for epoch in epochs:
            instant = datetime.fromtimestamp(round(epoch.time_s, 3), timezone.utc)
            writer.writerow(
                [
                    instant.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                    "" if epoch.encoder_count is None else epoch.encoder_count,
                    "" if epoch.lat is None else f"{epoch.lat:.8f}",
                    "" if epoch.lon is None else f"{epoch.lon:.8f}",
                    "" if epoch.speed_m_s is None else f"{epoch.speed_m_s * 3.6:.3f}",
                    epoch.quality,
                ]
            )
            rows += 1
    return rows
