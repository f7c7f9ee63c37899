"""Alarm thresholds: the calibration file that turns image scores into alarms.

One file per vehicle and camera, ``calibration/<vehicle>/<camera>.thresholds.json``, written by
``edge calibrate`` and read by the publisher. It names the model it was fitted for (scores of
another model mean nothing against it), the false-alarm rate it targets, and how many normal
crops it was fitted on, so a reader can judge how far to trust it.

A crop is an alarm when its image score is strictly greater than ``threshold``.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from pydantic import AwareDatetime, Field

from edge.config import ConfigError, StrictModel
from edge.errors import ConfigInvalidError


class ScoreSummary(StrictModel):
    """Image scores of the normal crops a threshold was fitted on."""

    minimum: float
    median: float
    p95: float
    p99: float
    maximum: float


class Thresholds(StrictModel):
    """The alarm threshold of one camera for one model."""

    schema_version: int = 1
    model_id: str = Field(description="the model whose scores this threshold applies to")
    threshold: float = Field(
        ge=0.0, allow_inf_nan=False, description="alarm when image_score > threshold"
    )
    false_alarm_rate: float = Field(gt=0.0, lt=1.0, description="target, per normal crop")
    crops: int = Field(ge=1, description="normal crops the threshold was fitted on")
    min_crops: int = Field(ge=1, description="fewest crops accepted for this false-alarm rate")
    scores: ScoreSummary
    data_dir: str = Field(description="folder of the normal crops")
    fitted_at: AwareDatetime
    vehicle_id: str = ""
    camera_id: str = ""
    note: str = ""

    def is_alarm(self, image_score: float) -> bool:
        return image_score > self.threshold


def thresholds_path(calibration_dir: str | Path, vehicle_id: str, camera_id: str) -> Path:
    """Where the thresholds of a vehicle's camera live."""
    return Path(calibration_dir) / vehicle_id / f"{camera_id}.thresholds.json"


def load_thresholds(path: str | Path, model_id: str | None = None) -> Thresholds:
    """Read a thresholds file; refuse it if it was fitted for another model than ``model_id``."""
    path = Path(path)
    try:
        thresholds = Thresholds.load(path)
    except ConfigError as error:
        raise ConfigInvalidError(str(error)) from error
    if model_id is not None and thresholds.model_id != model_id:
        raise ConfigInvalidError(
            f"{path}: fitted for model {thresholds.model_id}, not for the model in use "
            f"({model_id}); run edge calibrate for this model"
        )
    return thresholds


def now_utc() -> datetime:
    from datetime import timezone

    return datetime.now(timezone.utc)
