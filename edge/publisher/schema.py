"""The publisher's messages: JSON Schemas, builders and a validator.

Three topics, each ending with ``/`` so no topic is a prefix of another (a SUB filters by byte
prefix of the first frame):

- ``alarm/``: one crop over its threshold (``alarm.schema.json``). Sequenced per run.
- ``coverage/``: a stretch of track not inspected (``coverage.schema.json``). Sequenced per run,
  with its own numbers.
- ``health/``: the heartbeat (``health.schema.json``), carrying the last sequence numbers so a
  subscriber can tell it missed the tail of a burst. Not sequenced, not spooled.

The schema files ship inside the package (package-data ``**/*.json``); ``common.schema.json``
holds the parts they share (time, GPS, mileage, boxes). The builders here only shape data; the
sequence number comes from the spool (:mod:`edge.publisher.spool`), which calls the builder
inside the transaction that allocates it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

from edge.records import IDENTIFIER, CropTag, GpsFix, Mileage

if TYPE_CHECKING:
    import numpy as np

SCHEMA_VERSION = 1

ALARM_TOPIC = "alarm/"
HEALTH_TOPIC = "health/"
COVERAGE_TOPIC = "coverage/"
TOPICS = (ALARM_TOPIC, HEALTH_TOPIC, COVERAGE_TOPIC)
SEQUENCED_TOPICS = (ALARM_TOPIC, COVERAGE_TOPIC)

_SCHEMA_FILES = {
    ALARM_TOPIC: "alarm.schema.json",
    HEALTH_TOPIC: "health.schema.json",
    COVERAGE_TOPIC: "coverage.schema.json",
}
_IDENTIFIER = re.compile(IDENTIFIER)

CoverageReason = Literal[
    "engine_behind", "process_restart", "camera_stall", "no_rail_found", "telemetry_lost", "other"
]


@dataclass(frozen=True)
class RunInfo:
    """Who is publishing: the vehicle and the run. Both appear in every message and key the
    sequence numbers, so they must be stable across restarts of the publisher within a run."""

    vehicle_id: str
    run_id: str

    def __post_init__(self) -> None:
        for name in ("vehicle_id", "run_id"):
            value = getattr(self, name)
            if not (isinstance(value, str) and 0 < len(value) <= 128 and _IDENTIFIER.match(value)):
                raise ValueError(f"{name} {value!r}: use letters, digits and ._:+- (no '/')")


@dataclass(frozen=True)
class DefectHints:
    """Where the defect lies inside the crop, read off the anomaly map.

    Coordinates are crop pixels; ``region`` is ``(x, y, width, height)`` of the pixels over
    ``pixel_threshold``, or None when no pixel is over it.
    """

    peak_x: int
    peak_y: int
    peak_value: float
    area_fraction: float
    pixel_threshold: float
    region: tuple[int, int, int, int] | None

    @classmethod
    def from_anomaly_map(cls, anomaly_map: np.ndarray, pixel_threshold: float = 0.5) -> DefectHints:
        """Hints from one anomaly map of shape ``(height, width)`` (or ``(1, height, width)``)
        with values in ``[0, 1]``."""
        import numpy as np

        values = np.asarray(anomaly_map, dtype=np.float64)
        if values.ndim == 3 and values.shape[0] == 1:
            values = values[0]
        if values.ndim != 2 or values.size == 0:
            raise ValueError(f"anomaly map of shape {values.shape}: expected (height, width)")
        peak_y, peak_x = np.unravel_index(int(np.argmax(values)), values.shape)
        over = values > pixel_threshold
        region = None
        if over.any():
            rows = np.flatnonzero(over.any(axis=1))
            cols = np.flatnonzero(over.any(axis=0))
            region = (
                int(cols[0]),
                int(rows[0]),
                int(cols[-1] - cols[0] + 1),
                int(rows[-1] - rows[0] + 1),
            )
        return cls(
            peak_x=int(peak_x),
            peak_y=int(peak_y),
            peak_value=float(np.clip(values[peak_y, peak_x], 0.0, 1.0)),
            area_fraction=float(over.mean()),
            pixel_threshold=float(pixel_threshold),
            region=region,
        )

    def to_dict(self) -> dict:
        data: dict[str, Any] = {
            "peak": {"x": self.peak_x, "y": self.peak_y, "value": self.peak_value},
            "area_fraction": self.area_fraction,
            "pixel_threshold": self.pixel_threshold,
        }
        if self.region is not None:
            data["region"] = _box(self.region)
        return data


@dataclass(frozen=True)
class CoverageGap:
    """A stretch of the run that was not inspected.

    Positions are along-track metres from the start of the run; times are UTC epoch seconds of
    when the vehicle was at each end; mileages are None where the run has no mileage reference.
    """

    reason: CoverageReason
    start_along_track_m: float
    end_along_track_m: float
    start_time: float
    end_time: float
    start_mileage: Mileage | None = None
    end_mileage: Mileage | None = None
    crops_dropped: int = 0
    camera_id: str | None = None
    detail: str = ""

    @classmethod
    def from_crops(
        cls,
        first: CropTag,
        last: CropTag,
        reason: CoverageReason,
        crops_dropped: int,
        detail: str = "",
    ) -> CoverageGap:
        """The gap spanned by the first and the last of a series of dropped crops."""
        camera = first.camera_id if first.camera_id == last.camera_id else None
        return cls(
            reason=reason,
            start_along_track_m=first.along_track_m,
            end_along_track_m=last.along_track_m,
            start_time=first.capture_time,
            end_time=last.capture_time,
            start_mileage=first.mileage,
            end_mileage=last.mileage,
            crops_dropped=crops_dropped,
            camera_id=camera,
            detail=detail,
        )


def time_fields(epoch_s: float) -> dict:
    """``{"utc": "2026-05-09T07:12:03.123456Z", "epoch_s": 1778310723.123456}``."""
    epoch_s = _require_finite("time", epoch_s)
    moment = datetime.fromtimestamp(epoch_s, tz=timezone.utc)
    return {"utc": moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "epoch_s": epoch_s}


def build_alarm(
    crop: CropTag,
    image_score: float,
    threshold: float,
    model_id: str,
    run: RunInfo,
    *,
    seq: int,
    raised_time: float,
    has_heatmap: bool = False,
    hints: DefectHints | None = None,
) -> dict:
    """The alarm message for one crop (alarm.schema.json).

    Raises ValueError when the score or threshold is not a finite number, or the score is not
    over the threshold: a NaN score (FP16 overflow in an engine) must never pass for an alarm
    or for a clean crop silently.
    """
    image_score = _require_finite("image_score", image_score)
    threshold = _require_finite("threshold", threshold)
    _require_finite("along_track_m", crop.along_track_m)
    if not image_score > threshold:
        raise ValueError(f"image_score {image_score} is not over threshold {threshold}")
    body = {
        "type": "alarm",
        "schema_version": SCHEMA_VERSION,
        "vehicle_id": run.vehicle_id,
        "run_id": run.run_id,
        "seq": int(seq),
        "capture_time": time_fields(crop.capture_time),
        "raised_time": time_fields(raised_time),
        "along_track_m": float(crop.along_track_m),
        "gps": _gps(crop.gps),
        "mileage": _mileage(crop.mileage),
        "rail": crop.rail,
        "side": crop.side,
        "crop": {
            "crop_id": int(crop.crop_id),
            "camera_id": crop.camera_id,
            "frame_index": int(crop.frame_index),
            "line_index": int(crop.line_index),
            "box": _box(crop.box),
        },
        "image_score": image_score,
        "threshold": threshold,
        "model_id": model_id,
        "has_heatmap": bool(has_heatmap),
    }
    if hints is not None:
        body["hints"] = hints.to_dict()
    return body


def build_coverage(gap: CoverageGap, run: RunInfo, *, seq: int, raised_time: float) -> dict:
    """The coverage-gap message (coverage.schema.json)."""
    if gap.crops_dropped < 0:
        raise ValueError(f"crops_dropped {gap.crops_dropped} is negative")
    return {
        "type": "coverage",
        "schema_version": SCHEMA_VERSION,
        "vehicle_id": run.vehicle_id,
        "run_id": run.run_id,
        "seq": int(seq),
        "raised_time": time_fields(raised_time),
        "reason": gap.reason,
        "detail": gap.detail[:1000],
        "start": _track_point(gap.start_along_track_m, gap.start_time, gap.start_mileage),
        "end": _track_point(gap.end_along_track_m, gap.end_time, gap.end_mileage),
        "crops_dropped": int(gap.crops_dropped),
        "camera_id": gap.camera_id,
    }


def build_health(
    run: RunInfo,
    *,
    sent_time: float,
    uptime_s: float,
    heartbeat_interval_s: float,
    last_seq: int,
    last_coverage_seq: int,
    counters: dict[str, int],
) -> dict:
    """The heartbeat message (health.schema.json)."""
    return {
        "type": "health",
        "schema_version": SCHEMA_VERSION,
        "vehicle_id": run.vehicle_id,
        "run_id": run.run_id,
        "sent_time": time_fields(sent_time),
        "uptime_s": max(0.0, float(uptime_s)),
        "heartbeat_interval_s": float(heartbeat_interval_s),
        "last_seq": int(last_seq),
        "last_coverage_seq": int(last_coverage_seq),
        "counters": {name: int(value) for name, value in counters.items()},
    }


def encode(body: dict) -> bytes:
    """The JSON frame: compact UTF-8, NaN and infinity refused."""
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode("utf-8")


def schema_text(name: str) -> str:
    """The text of one schema file shipped in the package, e.g. ``"alarm.schema.json"``."""
    return resources.files("edge.publisher").joinpath(name).read_text(encoding="utf-8")


def schema(topic: str) -> dict:
    """The JSON Schema of the messages on ``topic`` (``alarm/``, ``health/``, ``coverage/``)."""
    return json.loads(schema_text(_SCHEMA_FILES[topic]))


def validate_message(topic: str, body: dict) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``body`` is a valid message of ``topic``.

    Also checks what the schema cannot say: the body's ``type`` matches the topic.
    """
    _validators()[topic].validate(body)
    if body["type"] != topic.rstrip("/"):
        import jsonschema

        raise jsonschema.ValidationError(f"type {body['type']!r} sent on topic {topic!r}")


@lru_cache(maxsize=1)
def _validators() -> dict:
    import jsonschema
    from referencing import Registry, Resource

    names = ["common.schema.json", *_SCHEMA_FILES.values()]
    documents = {name: json.loads(schema_text(name)) for name in names}
    registry = Registry().with_resources(
        (document["$id"], Resource.from_contents(document)) for document in documents.values()
    )
    validators = {}
    for topic, name in _SCHEMA_FILES.items():
        jsonschema.Draft202012Validator.check_schema(documents[name])
        validators[topic] = jsonschema.Draft202012Validator(
            documents[name],
            registry=registry,
            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
        )
    return validators


def _require_finite(name: str, value: Any) -> float:
    """``value`` as a float (numpy and torch scalars accepted); ValueError unless finite."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{name} {value!r} is not a finite number")
    return number


def _optional_number(value: float | None) -> float | None:
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def _gps(fix: GpsFix) -> dict:
    # NaN from an interpolation without fixes means "unknown", which the message says as null.
    return {
        "lat": _optional_number(fix.lat),
        "lon": _optional_number(fix.lon),
        "fix_quality": int(fix.quality),
        "age_s": _optional_number(fix.age_s),
        "dead_reckoned": bool(fix.dead_reckoned),
    }


def _mileage(mileage: Mileage | None) -> dict | None:
    if mileage is None:
        return None
    _require_finite("mileage_m", mileage.mileage_m)
    km_post, metres = mileage.km_post, mileage.metres
    if metres >= 1000.0:  # float rounding just under a kilometre post
        km_post, metres = km_post + 1, metres - 1000.0
    return {
        "line_id": mileage.line_id,
        "mileage_m": float(mileage.mileage_m),
        "km_post": int(km_post),
        "metres": max(0.0, float(metres)),
        "direction": mileage.direction,
    }


def _box(box: tuple[int, int, int, int]) -> dict:
    x, y, width, height = (int(value) for value in box)
    return {"x": x, "y": y, "width": width, "height": height}


def _track_point(along_track_m: float, epoch_s: float, mileage: Mileage | None) -> dict:
    _require_finite("along_track_m", along_track_m)
    return {
        "along_track_m": float(along_track_m),
        "time": time_fields(epoch_s),
        "mileage": _mileage(mileage),
    }
