"""A plausible GPS track for a recording made from stills or a strip (``edge record``).

The vehicle runs at constant speed along a great circle leaving ``(start_lat, start_lon)`` on
``heading_deg``; line 0 is scanned at the run's ``start_time_utc`` at the start position, so the
fix at time ``t`` lies ``speed * (t - start)`` metres along, which is exactly where the
recording's line ``along_track_mm / mm_per_line`` is. Fixes are missing (receiver status void)
over the along-track ranges given as ``tunnels``. Epochs start one period before line 0 and end
one period after the last line, so every line lies between two epochs.
"""

from __future__ import annotations

import math

from pydantic import Field, field_validator

from edge.config import StrictModel
from edge.telemetry.epochs import GpsEpoch
from edge.telemetry.geodesy import bearing, destination
from edge.telemetry.run import RunInfo


class SimulatedTrack(StrictModel):
    """Where and how fast the simulated vehicle runs, and how its receiver reports."""

    start_lat: float = Field(ge=-90.0, le=90.0, description="decimal degrees, south negative")
    start_lon: float = Field(ge=-180.0, le=180.0, description="decimal degrees, west negative")
    heading_deg: float = Field(ge=0.0, lt=360.0, description="true course at the start")
    speed_kmh: float = Field(gt=0.0, le=500.0)
    rate_hz: float = Field(10.0, description="epochs per second; 100 / rate_hz must be whole")
    tunnels: tuple[tuple[float, float], ...] = Field(
        (), description="along-track ranges (start_m, end_m) without a fix"
    )
    quality: int = Field(1, ge=1, le=5, description="GGA fix quality outside tunnels")

    @field_validator("rate_hz")
    @classmethod
    def _centisecond_period(cls, value: float) -> float:
        # NMEA times are written to 10 ms; a period that is not whole centiseconds would drift.
        if value <= 0 or abs(100.0 / value - round(100.0 / value)) > 1e-9:
            raise ValueError("must divide 100: 1, 2, 4, 5, 10, 20, 25, 50 or 100")
        return value

    @field_validator("tunnels")
    @classmethod
    def _tunnel_order(cls, value: tuple[tuple[float, float], ...]) -> tuple:
        for start_m, end_m in value:
            if not start_m < end_m:
                raise ValueError(
                    f"tunnel ({start_m:g}, {end_m:g}): the start must be before the end"
                )
        return value

    @property
    def speed_m_s(self) -> float:
        return self.speed_kmh / 3.6


def simulate_epochs(track: SimulatedTrack, run: RunInfo, lines: int) -> list[GpsEpoch]:
    """Epochs covering a recording of ``lines`` scan lines (encoder counts when the run has an
    encoder: ``start_encoder_count`` plus distance over ``mm_per_encoder_count``)."""
    period_cs = round(100.0 / track.rate_hz)
    length_m = lines * run.mm_per_line / 1000.0
    start_cs = math.floor(run.start_time_s * 100.0 / period_cs) * period_cs - period_cs
    end_cs = run.start_time_s * 100.0 + 100.0 * length_m / track.speed_m_s + period_cs
    start_count = run.start_encoder_count or 0
    epochs = []
    for centiseconds in range(start_cs, math.ceil(end_cs) + period_cs, period_cs):
        time_s = centiseconds / 100.0
        along_m = track.speed_m_s * (time_s - run.start_time_s)
        lat, lon = destination(track.start_lat, track.start_lon, track.heading_deg, along_m)
        # The course here on the great circle: from the start towards this point, continued.
        if along_m > 1.0:
            course = (bearing(lat, lon, track.start_lat, track.start_lon) + 180.0) % 360.0
        elif along_m < -1.0:
            course = bearing(lat, lon, track.start_lat, track.start_lon)
        else:
            course = track.heading_deg
        in_tunnel = any(a <= along_m <= b for a, b in track.tunnels)
        encoder_count = None
        if run.mm_per_encoder_count is not None:
            encoder_count = start_count + math.floor(along_m * 1000.0 / run.mm_per_encoder_count)
        epochs.append(
            GpsEpoch(
                time_s=time_s,
                lat=None if in_tunnel else lat,
                lon=None if in_tunnel else lon,
                quality=0 if in_tunnel else track.quality,
                speed_m_s=None if in_tunnel else track.speed_m_s,
                course_deg=None if in_tunnel else course,
                encoder_count=encoder_count,
            )
        )
    return epochs
