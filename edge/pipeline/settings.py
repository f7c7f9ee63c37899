"""Settings of the pipeline and of each of its processes (typed, unknown keys refused).

:class:`PipelineSettings` is what the supervisor runs; ``edge-replay`` builds it from its
options and ``edge run`` from a :class:`~edge.pipeline.service.ServiceConfig` file. Each child
gets its own part (:class:`GrabberSettings`, :class:`EngineSettings`,
:class:`PublisherSettings`) as JSON text, so nothing but a string crosses ``spawn``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from edge.config import StrictModel

Mode = Literal["replay", "live"]

LOCAL_ENDPOINT = "local"
"""A publish endpoint that is an ipc socket in the run's folder: for replays nobody listens to."""


_CPUS = Field(
    None, description="CPU cores this process runs on, set by the supervisor (edge.pipeline.cpus)"
)


class Timing(StrictModel):
    """How the supervisor watches its children. All times are ``time.monotonic`` seconds."""

    heartbeat_interval_s: float = Field(
        0.5, gt=0, description="each child sends a heartbeat at least this often"
    )
    unhealthy_after_s: float = Field(
        3.0, gt=0, description="a heartbeat older than this withholds systemd's WATCHDOG=1"
    )
    stall_timeout_s: float = Field(
        20.0,
        gt=0,
        description="a heartbeat older than this is a stall: the child is killed and restarted "
        "(must exceed the longest inference of one batch)",
    )
    start_timeout_s: float = Field(
        180.0, gt=0, description="a child must be ready (engine: self-test done) within this"
    )
    stop_timeout_s: float = Field(
        20.0,
        gt=0,
        description="on SIGTERM: drain and exit within this (keep it under TimeoutStopSec)",
    )

    @model_validator(mode="after")
    def _ordered(self) -> Timing:
        if not self.heartbeat_interval_s < self.unhealthy_after_s <= self.stall_timeout_s:
            raise ValueError("need heartbeat_interval_s < unhealthy_after_s <= stall_timeout_s")
        return self


class RestartLimits(StrictModel):
    """A child is restarted at most ``max_restarts`` times within ``window_s``; one more
    failure ends the service with ExitStatus.SERVICE_FAILED (systemd's policy takes over)."""

    max_restarts: int = Field(5, ge=0)
    window_s: float = Field(300.0, gt=0)


class GrabberSettings(StrictModel):
    """The grabber process: source -> fastener finder -> positioner -> crops with tags."""

    source: str = Field(description="recording path, camera index or GStreamer pipeline")
    positions_from: Path | None = Field(
        None,
        description="recording whose sidecars (run.json, telemetry) place the lines; default: "
        "the source when it is a recording",
    )
    geometry: Path = Field(description="the camera's geometry file")
    mode: Mode = "replay"
    pace: Literal["none", "realtime"] = Field(
        "none", description="realtime: a recording is read at the pace it was recorded"
    )
    crop_shape: tuple[int, int, int] = Field((1, 64, 64), description="(C, H, W) the model takes")
    max_in_flight: int = Field(
        64, ge=1, description="crops sent and not yet acknowledged by the publisher, at most"
    )
    max_batch: int = Field(8, ge=1, description="crops per message to the engine, at most")
    first_crop_id: int = Field(
        0,
        ge=0,
        description="id of the first crop cut; 0 for a recording (ids are then the same every "
        "time it is read), above every id of the run so far for a camera",
    )
    skip_below: int = Field(0, ge=0, description="crop ids below this were acknowledged before")
    restart_gap_from: dict | None = Field(
        None,
        description="after a restart on a live camera: the last acknowledged crop's position, "
        "from which a process_restart coverage gap runs to the first new crop",
    )
    cpus: tuple[int, ...] | None = _CPUS
    heartbeat_interval_s: float = 0.5


class EngineSettings(StrictModel):
    """The engine process: batches crops and scores them with a backend."""

    model: Path
    backend: str = "onnxruntime"
    device: str | None = None
    precision: str | None = None
    max_batch: int = Field(8, ge=1)
    threads: int | None = Field(None, ge=1, description="onnxruntime intra-op threads")
    thresholds: Path = Field(description="decides which crops get images (alarms)")
    report_images: bool = Field(
        False, description="also send each alarm's crop and reconstruction (for reports)"
    )
    heatmap_vmax: float = Field(1.0, gt=0, description="anomaly-map value drawn full red")
    cpus: tuple[int, ...] | None = _CPUS
    heartbeat_interval_s: float = 0.5


class PublisherSettings(StrictModel):
    """The publisher process: threshold, spool, ZeroMQ. ``model_id`` is set by the supervisor
    from the engine's ready message."""

    vehicle_id: str
    run_id: str
    model_id: str = ""
    thresholds: Path
    spool_path: Path
    publish_endpoint: str = Field(
        "tcp://*:5560", description=f"XPUB bind endpoint; {LOCAL_ENDPOINT!r}: the run folder"
    )
    replay_endpoint: str | None = "tcp://*:5561"
    keys_dir: Path | None = None
    heartbeat_interval_s: float = Field(1.0, gt=0, description="health/ heartbeat period")
    sndhwm: int = Field(1000, ge=1)
    linger_ms: int = Field(2000, ge=0)
    startup_hold_s: float = Field(1.0, ge=0)
    wait_for_subscriber_s: float = Field(
        0.0, ge=0, description="before ready: wait this long for a first subscription"
    )
    report_dir: Path | None = Field(None, description="where each alarm's PNGs are written")
    cpus: tuple[int, ...] | None = _CPUS
    child_heartbeat_s: float = 0.5


class PipelineSettings(StrictModel):
    """Everything the supervisor needs for one run."""

    mode: Mode = "replay"
    grabber: GrabberSettings
    engine: EngineSettings
    publisher: PublisherSettings
    timing: Timing = Timing()
    restarts: RestartLimits = RestartLimits()
    log_level: str = "info"
    runtime_dir: Path | None = Field(None, description="base folder of the ipc sockets")
    serve_after_s: float = Field(
        0.0,
        ge=0,
        description="after a recording is done, keep the publisher (heartbeats, replays) up "
        "this long so subscribers can fetch what they missed",
    )
    engine_cpus: tuple[int, ...] | None = Field(
        None,
        min_length=1,
        description="CPU cores of the engine alone; grabber, publisher and supervisor run on "
        "the other usable cores (edge.pipeline.cpus). None: every process on every core",
    )

    @model_validator(mode="after")
    def _consistent(self) -> PipelineSettings:
        if self.grabber.mode != self.mode:
            raise ValueError(f"grabber.mode {self.grabber.mode} differs from mode {self.mode}")
        return self
