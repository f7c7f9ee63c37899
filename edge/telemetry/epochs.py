"""One telemetry epoch (a GPS fix with speed, and the encoder count where logged).

Both telemetry formats (NMEA and the CSV) are read into a :class:`TelemetryLog` of
:class:`GpsEpoch`, sorted by time; :class:`edge.telemetry.position.Positioner` works on that.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from edge.logs import get_logger

log = get_logger(__name__)

# GGA fix quality 6 is "estimated (dead reckoning)" in NMEA 0183 2.3.
QUALITY_DEAD_RECKONING = 6


@dataclass(frozen=True)
class GpsEpoch:
    """What the receiver (or the vehicle logger) said at one instant.

    ``time_s`` is UTC seconds since the Unix epoch. ``lat``/``lon`` are decimal degrees, south
    and west negative, ``None`` when the epoch has no valid fix. ``quality`` is the GGA fix
    quality (0 = no fix). ``speed_m_s`` and ``course_deg`` (true, clockwise from north) are
    ``None`` when not given. ``encoder_count`` is the wheel encoder at that instant (CSV only).
    """

    time_s: float
    lat: float | None
    lon: float | None
    quality: int
    speed_m_s: float | None = None
    course_deg: float | None = None
    encoder_count: int | None = None

    @property
    def has_fix(self) -> bool:
        return self.lat is not None and self.lon is not None and self.quality > 0


@dataclass
class TelemetryLog:
    """Epochs read from one telemetry file, and what was wrong with the rest of it.

    ``skipped`` counts lines dropped whole, by reason; ``invalidated`` counts lines kept for
    their time but whose position was made invalid (an empty hemisphere field).
    """

    source: Path
    epochs: list[GpsEpoch]
    lines: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    invalidated: Counter[str] = field(default_factory=Counter)

    def log_counts(self) -> None:
        """One log line with the counts; one more per kind of trouble, each reason a field."""
        log.info(
            "telemetry_read",
            file=str(self.source),
            lines=self.lines,
            epochs=len(self.epochs),
            fixes=sum(epoch.has_fix for epoch in self.epochs),
        )
        if self.skipped:
            log.warning("telemetry_lines_skipped", file=str(self.source), **dict(self.skipped))
        if self.invalidated:
            log.warning(
                "telemetry_fixes_invalidated", file=str(self.source), **dict(self.invalidated)
            )
