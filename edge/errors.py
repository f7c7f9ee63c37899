"""Errors that end a command, each with its own exit status.

A railway engineer scripting ``edge-replay`` over a night's recordings needs to tell "the file
was cut short" from "the model file is corrupt" without parsing text, so every failure a user
can cause has a distinct status. The README lists them.
"""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    OK = 0
    UNEXPECTED = 1
    USAGE = 2
    RECORDING_TRUNCATED = 3
    NO_FASTENERS = 4
    TELEMETRY_MISSING = 5
    MODEL_INVALID = 6
    INPUT_UNREADABLE = 7
    CONFIG_INVALID = 8
    CALIBRATION_REFUSED = 9
    ENGINE_REFUSED = 10
    SERVICE_FAILED = 11


class EdgeError(Exception):
    """An error with a clear message (naming the file at fault) and an exit status."""

    exit_status: ExitStatus = ExitStatus.UNEXPECTED


class UsageError(EdgeError):
    """Options that each parse but do not go together (argparse checks the rest)."""

    exit_status = ExitStatus.USAGE


class InputUnreadableError(EdgeError):
    """A recording, image or data file cannot be opened or is not what it claims to be."""

    exit_status = ExitStatus.INPUT_UNREADABLE


class TelemetryMissingError(EdgeError):
    """A recording has no usable telemetry sidecar."""

    exit_status = ExitStatus.TELEMETRY_MISSING


class ModelInvalidError(EdgeError):
    """A checkpoint, ONNX graph or TensorRT plan is missing, corrupt or of another model."""

    exit_status = ExitStatus.MODEL_INVALID


class ConfigInvalidError(EdgeError):
    """A configuration or calibration file does not match its schema."""

    exit_status = ExitStatus.CONFIG_INVALID


class CalibrationRefusedError(EdgeError):
    """A threshold cannot be fitted (too few crops, or none of them normal)."""

    exit_status = ExitStatus.CALIBRATION_REFUSED


class EngineRefusedError(EdgeError):
    """An engine failed its gate (output mismatch, NaN) and was not installed."""

    exit_status = ExitStatus.ENGINE_REFUSED


class RecordingTruncatedError(EdgeError):
    """A recording ends early (cut short); raised after every complete frame was processed."""

    exit_status = ExitStatus.RECORDING_TRUNCATED


class NoFastenersError(EdgeError):
    """A whole recording was read and not one fastener was found in it."""

    exit_status = ExitStatus.NO_FASTENERS


class ServiceFailedError(EdgeError):
    """The pipeline cannot go on by itself (a child restarted too often); systemd takes over."""

    exit_status = ExitStatus.SERVICE_FAILED
