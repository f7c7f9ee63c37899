"""``run.json``: what a railway engineer must know about a recorded run, and the sidecar names.

A recording ``<dir>/<stem>.mkv`` has its sidecars beside it, under the same stem:

- ``<stem>.json``: :class:`RunInfo` (this module);
- ``<stem>.telemetry.csv``: time, encoder count, lat, lon, speed (:mod:`edge.telemetry.csvlog`);
- ``<stem>.nmea``: NMEA 0183 sentences RMC, GGA, VTG, ZDA (:mod:`edge.telemetry.nmea`).

When both telemetry files are present the CSV wins: it carries the wheel encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import AwareDatetime, Field, field_validator, model_validator

from edge.config import StrictModel
from edge.records import Direction


class RunInfo(StrictModel):
    """One recorded run of one camera: vehicle, line, start mileage and line-scan geometry.

    Line ``i`` of the run is line ``i % lines_per_frame`` of frame ``i // lines_per_frame``;
    lines run along the track in the direction of travel, so the line index only ever grows.
    """

    schema_version: Literal[1] = 1
    vehicle_id: str = Field(min_length=1, description="inspection vehicle, as in the fleet list")
    run_id: str = Field(min_length=1, description="unique per vehicle; alarms are keyed by it")
    line_id: str = Field(min_length=1, description="railway line (route) the run is on")
    track_id: str = Field("", description="track of a multi-track line, e.g. '1' or 'down main'")
    start_km_post: int = Field(description="kilometre post at or before the first line")
    start_metres: float = Field(0.0, ge=0.0, description="metres past start_km_post, first line")
    direction: Direction = Field(
        description="'increasing' if mileage grows as the vehicle moves on in this run"
    )
    mm_per_line: float = Field(gt=0.0, description="nominal along-track pitch of one scan line")
    lines_per_frame: int = Field(gt=0, description="scan lines stacked into one frame")
    camera_id: str = Field("cam0", min_length=1, description="camera on the vehicle")
    start_time_utc: AwareDatetime = Field(description="capture time of line 0 (ISO 8601, UTC)")
    encoder_counts_per_line: float | None = Field(
        None, gt=0.0, description="wheel encoder counts between two line triggers"
    )
    mm_per_encoder_count: float | None = Field(
        None, gt=0.0, description="calibrated distance per encoder count (wheel wear changes it)"
    )
    start_encoder_count: int | None = Field(
        None, description="encoder count at line 0; default: the count at start_time_utc"
    )
    gps_antenna_ahead_m: float = Field(
        0.0, description="GPS antenna ahead of the camera's scan line, in the direction of travel"
    )

    @field_validator("start_time_utc")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return value.astimezone(timezone.utc)

    @model_validator(mode="after")
    def _encoder_pair(self) -> RunInfo:
        if (self.encoder_counts_per_line is None) != (self.mm_per_encoder_count is None):
            raise ValueError("encoder_counts_per_line and mm_per_encoder_count go together")
        return self

    @property
    def start_mileage_m(self) -> float:
        """Chainage of line 0 in metres (kilometre post * 1000 + metres)."""
        return 1000.0 * self.start_km_post + self.start_metres

    @property
    def start_time_s(self) -> float:
        """Capture time of line 0 in UTC seconds since the Unix epoch."""
        return self.start_time_utc.timestamp()

    @property
    def has_encoder(self) -> bool:
        return self.encoder_counts_per_line is not None


@dataclass(frozen=True)
class Sidecars:
    """The files that belong to one recording."""

    recording: Path
    run_json: Path
    telemetry_csv: Path
    nmea: Path


def sidecars(recording: str | Path) -> Sidecars:
    """Sidecar paths of ``recording`` (``run.mkv`` -> ``run.json``, ``run.telemetry.csv``, ...)."""
    recording = Path(recording)
    stem = recording.with_suffix("")
    return Sidecars(
        recording=recording,
        run_json=stem.with_name(stem.name + ".json"),
        telemetry_csv=stem.with_name(stem.name + ".telemetry.csv"),
        nmea=stem.with_name(stem.name + ".nmea"),
    )
