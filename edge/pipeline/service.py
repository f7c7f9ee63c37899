"""``edge run --config FILE``: the live inspection service, as systemd runs it.

The config file is JSON (:class:`ServiceConfig`; unknown keys are refused); relative paths in
it are taken from the config file's folder. ``systemd/diff-fastener-edge.json`` is the
vehicle's example.

Behaviour, as the unit expects it (``systemd/diff-fastener-edge.service``):

- READY=1 once the engine passed its self-test inference and every child is up;
  WATCHDOG=1 every half ``$WATCHDOG_USEC`` while every child is healthy; STOPPING=1 on
  SIGTERM, then a drain, exit 0 within ``timing.stop_timeout_s``.
- ``mode: live`` (the default) never blocks the camera: crops the engine cannot take are
  dropped and reported on ``coverage/``; ``mode: replay`` is lossless (a recording as source).
- A child that fails more than ``restarts.max_restarts`` times within ``restarts.window_s``
  ends the service with ExitStatus.SERVICE_FAILED (11): systemd's ``Restart=on-failure`` and
  start limit take over. A user error (corrupt model, missing telemetry, invalid thresholds,
  a ``spool_path`` that cannot be a spool) ends it at once with that error's status.
- When a recording given as source ends, the service exits 0 (a truncated recording or one
  without fasteners is logged, not an error here: a restart would only read it again).

``run_id`` keys the alarm sequence numbers in the spool: keep it across restarts within one
run (alarms left unsent are sent after a restart, and a recording read again raises no alarm
twice), change it for a new run.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from edge.config import ConfigError, StrictModel
from edge.errors import ConfigInvalidError
from edge.grabber.geometry import TrackGeometry
from edge.logs import configure, get_logger
from edge.pipeline.cpus import parse_cpu_list, plan_cpus
from edge.pipeline.notify import SystemdNotifier
from edge.pipeline.settings import (
    EngineSettings,
    GrabberSettings,
    PipelineSettings,
    PublisherSettings,
    RestartLimits,
    Timing,
)
from edge.pipeline.supervisor import Supervisor
from edge.publisher.spool import check_spool
from edge.publisher.thresholds import thresholds_warnings
from edge.records import IDENTIFIER

log = get_logger(__name__)


class ServiceConfig(StrictModel):
    """The service's configuration file."""

    vehicle_id: str = Field(pattern=IDENTIFIER, max_length=128)
    run_id: str = Field(
        pattern=IDENTIFIER, max_length=128, description="keep it across restarts within a run"
    )
    source: str = Field(description="camera index, GStreamer pipeline, or a recording path")
    positions_from: Path | None = Field(
        None,
        description="a recording whose run.json and telemetry place the lines (default: the "
        "source, when it is a recording); live GPS feeds are not implemented",
    )
    geometry: Path = Field(description="calibration/VEHICLE/CAMERA.geometry.json")
    thresholds: Path = Field(description="calibration/VEHICLE/CAMERA.thresholds.json")
    model: Path = Field(description="the .onnx (onnxruntime, tensorrt) or .pt (torch)")
    backend: Literal["onnxruntime", "torch", "tensorrt"] = "onnxruntime"
    device: str | None = Field(None, description="cpu, cuda, cuda:N (default: the backend's)")
    precision: str | None = None
    threads: int | None = Field(
        None, ge=1, description="onnxruntime intra-op threads (default: one per engine core)"
    )
    engine_cpus: tuple[int, ...] | None = Field(
        None,
        min_length=1,
        description="CPU cores of the engine alone, as a list ([6, 7]) or as taskset writes "
        'them ("6-7"); the other processes run on the other cores the service may use '
        "(edge.pipeline.cpus). Default: no pinning",
    )

    @field_validator("engine_cpus", mode="before")
    @classmethod
    def _cpu_list_text(cls, value):
        return parse_cpu_list(value) if isinstance(value, str) else value

    max_batch: int = Field(8, ge=1)
    mode: Literal["live", "replay"] = "live"
    pace: Literal["none", "realtime"] = "none"
    max_in_flight: int = Field(
        64, ge=1, description="crops between grabber and publisher (the queues' bound)"
    )
    publish_endpoint: str = "tcp://*:5560"
    replay_endpoint: str | None = "tcp://*:5561"
    keys_dir: Path | None = Field(None, description="CURVE keys folder (edge.publisher.keys)")
    spool_path: Path = Field(description="SQLite spool (under the StateDirectory)")
    publisher_heartbeat_s: float = Field(1.0, gt=0, description="health/ period")
    sndhwm: int = Field(1000, ge=1)
    linger_ms: int = Field(2000, ge=0)
    heatmap_vmax: float = Field(1.0, gt=0)
    timing: Timing = Timing()
    restarts: RestartLimits = RestartLimits()
    log_level: Literal["debug", "info", "warning", "error"] | None = Field(
        None, description="every process's level (default: $EDGE_LOG_LEVEL, else info)"
    )
    runtime_dir: Path | None = Field(None, description="default: $RUNTIME_DIRECTORY or /tmp")

    def resolved(self, folder: Path) -> ServiceConfig:
        """Relative paths taken from ``folder`` (the config file's)."""
        update = {}
        for name in (
            "positions_from",
            "geometry",
            "thresholds",
            "model",
            "keys_dir",
            "spool_path",
            "runtime_dir",
        ):
            value = getattr(self, name)
            if value is not None and not value.is_absolute():
                update[name] = folder / value
        source = Path(self.source)
        if not source.is_absolute() and (folder / source).exists():
            update["source"] = str(folder / source)
        return self.model_copy(update=update)

    def level(self) -> str:
        """The log level: ``log_level``, else ``$EDGE_LOG_LEVEL`` (the unit's env file), else
        info."""
        return self.log_level or os.environ.get("EDGE_LOG_LEVEL", "info")

    def pipeline_settings(self) -> PipelineSettings:
        return PipelineSettings(
            mode=self.mode,
            grabber=GrabberSettings(
                source=self.source,
                positions_from=self.positions_from,
                geometry=self.geometry,
                mode=self.mode,
                pace=self.pace,
                max_in_flight=self.max_in_flight,
                max_batch=self.max_batch,
            ),
            engine=EngineSettings(
                model=self.model,
                backend=self.backend,
                device=self.device,
                precision=self.precision,
                threads=self.threads,
                max_batch=self.max_batch,
                thresholds=self.thresholds,
                heatmap_vmax=self.heatmap_vmax,
            ),
            publisher=PublisherSettings(
                vehicle_id=self.vehicle_id,
                run_id=self.run_id,
                thresholds=self.thresholds,
                spool_path=self.spool_path,
                publish_endpoint=self.publish_endpoint,
                replay_endpoint=self.replay_endpoint,
                keys_dir=self.keys_dir,
                heartbeat_interval_s=self.publisher_heartbeat_s,
                sndhwm=self.sndhwm,
                linger_ms=self.linger_ms,
            ),
            timing=self.timing,
            restarts=self.restarts,
            log_level=self.level(),
            runtime_dir=self.runtime_dir,
            engine_cpus=self.engine_cpus,
        )


def load_config(path: Path) -> ServiceConfig:
    """Read and resolve a config file; :class:`ConfigInvalidError` names a bad one, and
    ``engine_cpus`` naming cores this machine does not let the service use."""
    try:
        config = ServiceConfig.load(path).resolved(Path(path).resolve().parent)
    except ConfigError as error:
        raise ConfigInvalidError(str(error)) from error
    try:
        plan_cpus(config.engine_cpus)
    except ConfigInvalidError as error:
        raise ConfigInvalidError(f"{path}: {error}") from error
    return config


def thresholds_warnings_at_start(config: ServiceConfig) -> list[str]:
    """:func:`thresholds_warnings` for the service: its camera is the one its geometry file
    names. Raises :class:`ConfigInvalidError` naming a geometry file that cannot be read."""
    try:
        camera_id = TrackGeometry.load(config.geometry).camera_id
    except ConfigError as error:
        raise ConfigInvalidError(str(error)) from error
    return thresholds_warnings(config.thresholds, config.vehicle_id, camera_id)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="the service's JSON config")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    configure("supervisor", config.level())
    log.info("service_starting", config=str(args.config), mode=config.mode, source=config.source)
    for warning in thresholds_warnings_at_start(config):
        log.warning("thresholds_warning", warning=warning)
    check_spool(config.spool_path, f"spool_path in {args.config}")
    notifier = SystemdNotifier()
    try:
        outcome = Supervisor(config.pipeline_settings(), notifier=notifier).run()
    finally:
        notifier.close()
    log.info(
        "service_stopped",
        stopped_by=outcome.stopped_by,
        frames=outcome.frames,
        crops=outcome.crops,
        alarms=outcome.alarms,
        coverage_gaps=outcome.coverage_gaps,
        crops_dropped=outcome.crops_dropped,
        truncated=outcome.truncated,
        restarts=sum(outcome.restarts.values()),
    )
    if outcome.truncated:
        log.warning("recording_truncated", source=config.source)
    if outcome.crops == 0 and not outcome.stopped_by:
        log.warning("no_fasteners", source=config.source, frames=outcome.frames)
    return 0
