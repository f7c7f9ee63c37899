"""Errors that end a command, each with its own exit status.

A railway engineer scripting ``edge-replay`` over a night's recordings needs to tell "the file
was cut short" from "the model file is corrupt" without parsing text, so every failure a user
can cause has a distinct status. The README lists them.
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path


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


def check_output_file(path: str | Path, option: str | None = None) -> Path:
    """``path`` as a :class:`Path` if a file can be written there; checked before the work
    starts, so a mistyped ``--out`` fails at once and not after minutes of scoring.

    Makes no folder and leaves no file behind. ``option`` (``"--out"``) names the flag in the
    message.

    Raises:
        ConfigInvalidError: ``path`` is a folder, or a file cannot be made or written there.
    """
    path = Path(path)
    try:
        if path.is_dir():
            named_by = f" ({option} names the file to write)" if option else ""
            raise ConfigInvalidError(f"{path}: a folder, not a file{named_by}")
        if path.exists():
            with path.open("ab"):  # opens for writing without changing a byte
                pass
        else:
            _check_can_create(path, path.parent)
    except OSError as error:  # e.g. a parent folder this user may not enter
        raise ConfigInvalidError(f"{path}: cannot be written ({error.strerror})") from error
    return path


def check_output_folder(path: str | Path, option: str | None = None) -> Path:
    """``path`` as a :class:`Path` if it is a folder, or one can be made there, to write into.

    Raises:
        ConfigInvalidError: ``path`` is a file, or the folder cannot be made or written.
    """
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            named_by = f" ({option} names the folder to write into)" if option else ""
            raise ConfigInvalidError(f"{path}: a file, not a folder{named_by}")
        _check_can_create(path, path)
    except OSError as error:
        raise ConfigInvalidError(f"{path}: cannot be written ({error.strerror})") from error
    return path


def _check_can_create(path: Path, folder: Path) -> None:
    """Raises :class:`ConfigInvalidError` naming ``path`` unless ``folder``, or its nearest
    existing parent, takes a new file (tried with a temporary file: permission bits say
    nothing when running as root, and nothing about /proc or a read-only mount)."""
    import tempfile

    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigInvalidError(f"{path}: cannot be written, {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ConfigInvalidError(
            f"{path}: cannot be written (no file can be made in {existing}: {error.strerror})"
        ) from error
