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
        ge=0.0,
        allow_inf_nan=False,
        strict=True,  # a number: "0.8" or true in the file is a mistake, not a threshold
        description="alarm when image_score > threshold",
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


def thresholds_warnings(
    path: str | Path, vehicle_id: str, camera_id: str | None = None
) -> list[str]:
    """What makes a thresholds file's false-alarm rate not hold where it is used:

    - it names another vehicle, or another camera than ``camera_id`` (None: not checked): the
      rate was measured on another camera's crops (``edge calibrate`` fits one for this
      camera). A file that names neither is taken as this camera's;
    - its threshold lies outside the scores it was fitted on (edited by hand): above the
      highest, it raises fewer alarms than the rate says, down to none; below the lowest, an
      alarm on every crop like those.

    Warnings, not refusals: trying a sister camera's threshold on a new camera's first run, or
    a threshold set by hand, is a fair thing to do, as long as it is said.

    Raises:
        ConfigInvalidError: the file cannot be read or does not match its schema.
    """
    path = Path(path)
    fitted = load_thresholds(path)
    warnings = []
    other_vehicle = fitted.vehicle_id not in ("", vehicle_id)
    other_camera = camera_id is not None and fitted.camera_id not in ("", camera_id)
    if other_vehicle or other_camera:
        here = f"vehicle {vehicle_id}" + (f", camera {camera_id}" if camera_id else "")
        warnings.append(
            f"{path} was fitted for vehicle {fitted.vehicle_id or vehicle_id}, camera "
            f"{fitted.camera_id or camera_id}; it is used on {here}: its false-alarm rate does "
            "not carry over"
        )
    scores, threshold = fitted.scores, fitted.threshold
    if threshold > scores.maximum:
        warnings.append(
            f"{path}: threshold {threshold:.4g} is above every score it was fitted on "
            f"({scores.minimum:.4g} to {scores.maximum:.4g}): set by hand, it raises fewer alarms "
            "than its stated false-alarm rate implies, possibly none"
        )
    elif threshold < scores.minimum:
        warnings.append(
            f"{path}: threshold {threshold:.4g} is below every score it was fitted on "
            f"({scores.minimum:.4g} to {scores.maximum:.4g}): set by hand, it raises an alarm on "
            "nearly every crop"
        )
    return warnings
