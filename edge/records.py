"""The records that travel between the processes: where a crop was cut, and where on the line.

Plain dataclasses with JSON round-trips, no heavy imports: the grabber makes them, the engine
passes them through with a score, the publisher turns them into alarm messages.

Conventions used across the project:
- ``rail`` is ``"left"`` or ``"right"`` looking in the direction of increasing mileage.
- ``side`` is ``"field"`` (outside the track) or ``"gauge"`` (between the rails).
- ``along_track_m`` is the distance from the start of the run, always increasing.
- ``mileage_m`` is the line's chainage in metres (kilometre post * 1000 + metres); it increases
  or decreases with ``along_track_m`` according to the run's direction.
- Times are UTC seconds since the Unix epoch (float).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

IDENTIFIER = r"^[A-Za-z0-9][A-Za-z0-9._:+-]*$"
"""What a vehicle, run or camera id may be (at most 128 characters): it goes into topics, file
names and spool keys, so no spaces, slashes or leading dot."""

Rail = Literal["left", "right"]
Side = Literal["field", "gauge"]
Direction = Literal["increasing", "decreasing"]


@dataclass(frozen=True)
class GpsFix:
    """GPS position interpolated to a crop's capture time.

    ``quality`` is the GGA fix quality (0 invalid, 1 GPS, 2 DGPS, 4 RTK fixed, 5 RTK float);
    ``age_s`` is the time from the nearest valid fix used; ``dead_reckoned`` is true where no
    fix was valid nearby (a tunnel) and the position was carried forward from distance.
    """

    lat: float | None
    lon: float | None
    quality: int = 0
    age_s: float | None = None
    dead_reckoned: bool = False


@dataclass(frozen=True)
class Mileage:
    """Position on the line in the railway's own reference (kilometre post and metres)."""

    line_id: str
    mileage_m: float
    direction: Direction

    @property
    def km_post(self) -> int:
        return int(self.mileage_m // 1000)

    @property
    def metres(self) -> float:
        return self.mileage_m - 1000 * self.km_post


@dataclass(frozen=True)
class CropTag:
    """Where and when one fastener crop was cut.

    ``box`` is ``(x, y, width, height)`` in pixels of the frame the crop centre lies in.
    ``crop_id`` numbers crops of a run in the order the grabber cut them.
    """

    crop_id: int
    frame_index: int
    box: tuple[int, int, int, int]
    line_index: int
    along_track_m: float
    capture_time: float
    rail: Rail
    side: Side
    camera_id: str = "cam0"
    gps: GpsFix = field(default_factory=lambda: GpsFix(None, None))
    mileage: Mileage | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["box"] = list(self.box)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> CropTag:
        data = dict(data)
        data["box"] = tuple(data["box"])
        data["gps"] = GpsFix(**data["gps"])
        if data.get("mileage") is not None:
            data["mileage"] = Mileage(**data["mileage"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str | bytes) -> CropTag:
        return cls.from_dict(json.loads(text))
