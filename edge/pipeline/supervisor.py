"""The supervisor: starts grabber, engine and publisher, relays acknowledgements, restarts what
dies or stalls, drains on SIGTERM, and talks to systemd.

Start (each child with the ``spawn`` method, after the ``ctl`` ROUTER is bound; nothing here
has touched CUDA or created a zmq Context before a spawn could copy it; with ``engine_cpus``
each process is first pinned to its cores, :mod:`edge.pipeline.cpus`):

1. the engine: it opens the backend and runs its self-test; its ``ready`` names the model id,
   the crop shape and the threshold;
2. the publisher, with that model id (it refuses a thresholds file of another model);
3. the grabber, with that crop shape;
4. READY=1 to systemd.

Run (one loop on ``time.monotonic``):

- Acknowledgements: the publisher acknowledges every crop once it is decided (and, if an
  alarm, spooled); the supervisor records it and passes the ids to the grabber, which frees
  them from its window. The run of a recording is complete when the grabber reported the end
  of the source and every crop id up to its last is acknowledged.
- Restarts: a child that exits, or whose heartbeat is older than ``stall_timeout_s`` (killed
  first), is started again, at most ``max_restarts`` times per child within ``window_s``;
  one more and the supervisor raises :class:`~edge.errors.ServiceFailedError`
  (ExitStatus.SERVICE_FAILED) so systemd's restart policy takes over. When a new engine or
  publisher is ready, the grabber resends every crop not yet acknowledged (crops in flight
  when the engine died are processed again; the publisher drops the ones it already alarmed
  on). A new publisher sends what the old one spooled and did not send, and gets the coverage
  gaps not yet acknowledged again. A new grabber on a recording reads it again from the
  start and skips every crop id below the acknowledged watermark.
- A child that reports ``fatal`` (a user error: corrupt model, missing telemetry) is not
  restarted: the run ends with that child's exit status and message.
- Watchdog: WATCHDOG=1 every half ``$WATCHDOG_USEC``, only while every child is ready, alive
  and has a heartbeat younger than ``unhealthy_after_s``.

Stop (SIGTERM or SIGINT): STOPPING=1; the grabber stops reading (``finish``); crops in
flight are finished until 60 % of ``stop_timeout_s`` has passed; then grabber and engine,
then the publisher (which sends what is unsent, with a bounded linger) are told to stop;
what is still running at ``stop_timeout_s`` is killed. Alarms are in the spool before they
are acknowledged, so a kill loses no alarm, only crops not yet scored.

Known limits: the supervisor itself is not supervised here (systemd restarts it, and its
children notice their parent is gone and exit); a grabber restarted on a live camera loses
the crops it held (a ``process_restart`` coverage gap says where).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from edge.errors import EdgeError, ExitStatus, ServiceFailedError
from edge.logs import get_logger
from edge.pipeline import wire
from edge.pipeline.child import main as child_main
from edge.pipeline.cpus import pin, plan_cpus, usable_cpus
from edge.pipeline.notify import SystemdNotifier
from edge.pipeline.settings import PipelineSettings

log = get_logger(__name__)

CHILDREN = ("engine", "publisher", "grabber")
_FATAL_STATUSES = {int(status) for status in ExitStatus} - {0, 1, int(ExitStatus.SERVICE_FAILED)}


class ChildFailedError(EdgeError):
    """A child reported an error a restart cannot mend; carries the child's exit status."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = ExitStatus(exit_status)


class Watermark:
    """Crop ids acknowledged so far: every id below :attr:`low`, plus :attr:`above`."""

    def __init__(self, low: int = 0) -> None:
        self.low = low
        self.above: set[int] = set()

    def add(self, crop_id: int) -> bool:
        """Record one id; True if it was not acknowledged before."""
        if crop_id < self.low or crop_id in self.above:
            return False
        self.above.add(crop_id)
        while self.low in self.above:
            self.above.discard(self.low)
            self.low += 1
        return True


@dataclass
class Child:
    """What the supervisor knows of one child process."""

    name: str
    process: multiprocessing.process.BaseProcess | None = None
    generation: int = -1
    started: float = 0.0
    last_beat: float = 0.0
    ready: bool = False
    info: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    fatal: dict | None = None
    stopping: bool = False
    restart_times: list[float] = field(default_factory=list)
    restarts: int = 0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.exitcode is None


@dataclass
class RunOutcome:
    """What one run did. ``scores`` holds one acknowledgement per crop (``keep_scores``)."""

    source: str = ""
    frames: int = 0
    crops: int = 0
    alarms: int = 0
    coverage_gaps: int = 0
    crops_dropped: int = 0
    truncated: bool = False
    finished_early: bool = False
    stopped_by: str | None = None
    seconds: float = 0.0
    model_id: str = ""
    threshold: float = 0.0
    backend: dict = field(default_factory=dict)
    restarts: dict = field(default_factory=dict)
    engine_crops: int = 0
    engine_infer_s: float = 0.0
    publish_address: str = ""
    replay_address: str | None = None
    scores: list[dict] = field(default_factory=list)


class Supervisor:
    """Runs one pipeline (see the module docstring).

    Args:
        settings: the run's settings.
        notifier: systemd notifications (default: from the environment; inert without it).
        on_alarm: called with each new alarm's acknowledgement (a dict: ``id``, ``seq``,
            ``score``, ``rail``, ``side``, ``mileage``, ``along_track_m``, ...).
        on_progress: called about five times a second with ``(frames, crops, alarms, total)``
            where ``total`` is the recording's claimed frame count, or None.
        keep_scores: keep every crop's acknowledgement in :attr:`RunOutcome.scores` (replays;
            a live service would grow without bound).
    """

    def __init__(
        self,
        settings: PipelineSettings,
        *,
        notifier: SystemdNotifier | None = None,
        on_alarm: Callable[[dict], None] | None = None,
        on_progress: Callable[[int, int, int, int | None], None] | None = None,
        keep_scores: bool = False,
    ) -> None:
        self.settings = settings
        self.notifier = notifier or SystemdNotifier()
        self.on_alarm = on_alarm
        self.on_progress = on_progress
        self.keep_scores = keep_scores
        self.children = {name: Child(name) for name in CHILDREN}
        self.outcome = RunOutcome()
        self.source_is_file = Path(settings.grabber.source).is_file()
        self.acked = Watermark(0)  # crop ids settled: scored, or dropped into a gap
        self.scored = 0
        self.alarm_seqs: set[int] = set()
        self.eos: dict | None = None
        self.gaps: dict[int, dict] = {}  # gap id -> gap, until the publisher acknowledges it
        self.gap_ids = 0
        self.last_acked: dict | None = None
        self.crop_shape: tuple[int, int, int] | None = None
        self.model_id = ""
        self.max_alarm_crop_id = -1
        self.stop_signal: str | None = None
        self.draining = False
        self.drain_until = 0.0
        self.stop_until = 0.0
        self.run_started = 0.0
        self.done_at: float | None = None
        self._engine_totals: dict[int, dict] = {}
        self._next_watchdog = 0.0
        self._next_progress = 0.0
        self._next_counters = 0.0
        self._withheld_logged = 0.0
        self._context: zmq.Context | None = None
        self._router: zmq.Socket | None = None
        self._folder: Path | None = None
        self._mp = multiprocessing.get_context("spawn")
        self._cpus: dict[str, tuple[int, ...]] | None = None

    # The public interface.

    def request_stop(self, signum: int | None = None, _frame=None) -> None:
        """Drain and stop (the SIGTERM and SIGINT handler)."""
        self.stop_signal = signal.Signals(signum).name if signum else "request"

    def run(self) -> RunOutcome:
        """Start, run until the source is done (or a stop), stop; the outcome.

        Raises:
            ChildFailedError: a child reported an error of the user's (its exit status).
            ServiceFailedError: a child failed more often than the restart limits allow.
        """
        self._cpus = plan_cpus(self.settings.engine_cpus)
        previous = self._install_signals()
        affinity = usable_cpus()
        try:
            if self._cpus is not None:
                pin(self._cpus["supervisor"])
                log.info("cpus_pinned", **{name: list(cores) for name, cores in self._cpus.items()})
            self._open()
            try:
                self._start()
                self._loop()
            except EdgeError as error:
                log.error("pipeline_failed", status=int(error.exit_status), message=str(error))
                self._shutdown(failed=True)  # in order: the publisher sends what it has
                raise
            self._shutdown()
            return self._finish_outcome()
        finally:
            self._teardown()
            if self._cpus is not None:
                pin(affinity)
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    # Start.

    def _install_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {
            signum: signal.signal(signum, self.request_stop)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }

    def _open(self) -> None:
        self._folder = wire.make_run_folder(self.settings.runtime_dir)
        self._context = zmq.Context()
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted child takes its name
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.setsockopt(zmq.RCVHWM, 0)
        self._router.setsockopt(zmq.SNDHWM, 0)
        self._router.bind(wire.endpoint(self._folder, wire.CTL))
        log.info("supervisor_started", folder=str(self._folder), mode=self.settings.mode)

    def _start(self) -> None:
        self.notifier.status("starting the engine (self-test)")
        for name in CHILDREN:
            child = self.children[name]
            self._spawn(child)
            while not child.ready:
                self._turn()
                if self.stop_signal and not self.draining:
                    self.outcome.stopped_by = self.stop_signal
                    return
        self.run_started = time.monotonic()
        engine = self.children["engine"].info
        self.notifier.ready(
            f"inspecting with {engine['backend']['backend']} on {engine['backend']['device']}"
        )
        log.info("pipeline_ready", **engine["backend"])

    def _child_settings(self, name: str) -> str:
        settings, timing = self.settings, self.settings.timing
        beat = timing.heartbeat_interval_s
        cpus = self._cpus[name] if self._cpus is not None else None
        if name == "engine":
            update: dict = {"heartbeat_interval_s": beat, "cpus": cpus}
            return settings.engine.model_copy(update=update).to_json()
        if name == "publisher":
            return settings.publisher.model_copy(
                update={"model_id": self.model_id, "child_heartbeat_s": beat, "cpus": cpus}
            ).to_json()
        update = {
            "cpus": cpus,
            "heartbeat_interval_s": beat,
            "crop_shape": self.crop_shape,
            "skip_below": self.acked.low if self.source_is_file else 0,
        }
        if not self.source_is_file:
            grabber = self.children["grabber"]
            cut_before = grabber.stats.get("crops", 0) + grabber.info.get("first_crop_id", 0)
            update["first_crop_id"] = max(self.max_alarm_crop_id + 1, self.acked.low, cut_before)
            if grabber.generation >= 0 and self.last_acked is not None:
                update["restart_gap_from"] = self.last_acked
        return settings.grabber.model_copy(update=update).to_json()

    def _spawn(self, child: Child) -> None:
        child.generation += 1
        settings_json = self._child_settings(child.name)
        process = self._mp.Process(
            target=child_main,
            args=(
                child.name,
                settings_json,
                str(self._folder),
                child.generation,
                self.settings.log_level,
            ),
            name=f"edge-{child.name}",
        )
        process.start()
        now = time.monotonic()
        child.process, child.started, child.last_beat = process, now, now
        child.ready, child.fatal, child.stopping, child.stats = False, None, False, {}
        if child.name == "grabber":
            child.info = {"first_crop_id": _first_crop_id(settings_json)}
        log.info("child_started", child=child.name, pid=process.pid, generation=child.generation)

    # The loop.

    def _loop(self) -> None:
        while True:
            if self.stop_signal and not self.draining:
                self._begin_drain()
            if self._complete():
                self.done_at = time.monotonic()
                log.info(
                    "run_complete",
                    crops=self.scored,
                    alarms=len(self.alarm_seqs),
                    seconds=round(self.done_at - self.run_started, 3),
                )
                return
            if self.draining and not self.children["grabber"].ready:
                return  # stopped while starting: nothing in flight
            if self.draining and time.monotonic() >= self.drain_until:
                log.warning("drain_timeout", unacknowledged=self._unacknowledged())
                return
            self._turn()

    def _turn(self, timeout_s: float = 0.1) -> None:
        """One turn: messages, children's health, watchdog, progress, counters."""
        if self._router.poll(int(timeout_s * 1000)):
            self._drain_router()
        now = time.monotonic()
        for child in self.children.values():
            self._check(child, now)
        self._watchdog(now)
        if self.on_progress is not None and now >= self._next_progress:
            self._next_progress = now + 0.2
            grabber = self.children["grabber"]
            self.on_progress(
                grabber.stats.get("frames", 0),
                self.scored,
                len(self.alarm_seqs),
                grabber.info.get("frames_estimate"),
            )
        if now >= self._next_counters and self.children["publisher"].ready:
            self._next_counters = now + 1.0
            self._send_counters()

    def _send_counters(self) -> None:
        """The pipeline's counters, for the publisher's ``health/`` heartbeats."""
        counters = {
            "frames": self.children["grabber"].stats.get("frames", 0),
            "crops_inspected": self.scored,
            "child_restarts": sum(child.restarts for child in self.children.values()),
        }
        self._send("publisher", {"type": "counters", "counters": counters})

    def _drain_router(self) -> None:
        while True:
            try:
                _, payload = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._on_message(json.loads(payload))

    def _on_message(self, message: dict) -> None:
        child = self.children.get(message.get("name", ""))
        if child is None or message.get("generation") != child.generation:
            return  # a late word from a child already replaced
        child.last_beat = time.monotonic()
        kind = message["type"]
        if kind == "heartbeat":
            child.stats = message
            if child.name == "engine":
                self._engine_totals[child.generation] = message
        elif kind == "ready":
            self._on_ready(child, message)
        elif kind == "fatal":
            child.fatal = message
        elif kind == "ack":
            self._on_acks(message["crops"])
        elif kind == "gap":
            self._on_gap(message["gap"], message.get("crop_ids"))
        elif kind == "gap_ack":
            self.gaps.pop(message["id"], None)
        elif kind == "eos":
            self.eos = message
            self.outcome.truncated = bool(message["truncated"])
            self.outcome.finished_early = bool(message["finished_early"])
            log.info("source_ended", **{k: message[k] for k in ("frames", "crops", "truncated")})
        elif kind == "stopped":
            child.stats = {**child.stats, **message}
            if child.name == "engine":
                self._engine_totals[child.generation] = message

    def _on_ready(self, child: Child, message: dict) -> None:
        child.ready = True
        child.info = {**child.info, **message}
        log.info("child_ready", child=child.name, generation=child.generation, pid=message["pid"])
        if child.name == "engine":
            self.model_id = message["model_id"]
            self.crop_shape = tuple(message["crop_shape"])
            self.outcome.model_id = self.model_id
            self.outcome.threshold = message["threshold"]
            self.outcome.backend = message["backend"]
        elif child.name == "publisher":
            self.max_alarm_crop_id = message.get("max_alarm_crop_id", -1)
            self.outcome.publish_address = message["publish"]
            self.outcome.replay_address = message["replay"]
            for gap_id, gap in self.gaps.items():
                self._send("publisher", {"type": "gap", "id": gap_id, "gap": gap})
        elif child.name == "grabber":
            self.outcome.source = message["source"]
        if child.generation > 0 and child.name in ("engine", "publisher"):
            self._send("grabber", {"type": "resend"})

    def _on_acks(self, crops: list[dict]) -> None:
        ids = []
        for ack in crops:
            ids.append(ack["id"])
            if not self.acked.add(ack["id"]):
                continue
            self.scored += 1
            self.last_acked = {
                "along_track_m": ack["along_track_m"],
                "capture_time": ack["capture_time"],
                "mileage": ack["mileage"],
            }
            if self.keep_scores:
                self.outcome.scores.append(ack)
            seq = ack.get("seq")
            if seq is not None and seq not in self.alarm_seqs:
                self.alarm_seqs.add(seq)
                if self.on_alarm is not None:
                    self.on_alarm(ack)
        self._send("grabber", {"type": "ack", "crop_ids": ids})

    def _on_gap(self, gap: dict, crop_ids: list[int] | None) -> None:
        if crop_ids is not None:  # dropped, never to be acknowledged: settled by the gap
            for crop_id in range(crop_ids[0], crop_ids[1] + 1):
                self.acked.add(crop_id)
        self.gap_ids += 1
        self.gaps[self.gap_ids] = gap
        self.outcome.coverage_gaps += 1
        self.outcome.crops_dropped += int(gap.get("crops_dropped", 0))
        if self.children["publisher"].ready:
            self._send("publisher", {"type": "gap", "id": self.gap_ids, "gap": gap})

    def _send(self, name: str, message: dict) -> None:
        child = self.children[name]
        if not child.alive:
            return
        try:
            self._router.send_multipart(
                [name.encode(), json.dumps(message, separators=(",", ":")).encode()],
                zmq.NOBLOCK,
            )
        except zmq.ZMQError as error:  # not connected yet (EHOSTUNREACH): it resyncs on ready
            log.debug("ctl_send_failed", child=name, kind=message["type"], error=str(error))

    def _complete(self) -> bool:
        if self.eos is None or self.gaps:
            return False
        if not self.source_is_file and not self.draining:
            return False
        return self.acked.low >= self.eos["first_crop_id"] + self.eos["crops"]

    def _unacknowledged(self) -> int:
        if self.eos is None:
            return -1
        return self.eos["first_crop_id"] + self.eos["crops"] - self.acked.low

    # Health and restarts.

    def _check(self, child: Child, now: float) -> None:
        if child.process is None or child.stopping:
            return
        if child.fatal is not None:
            raise ChildFailedError(child.fatal["message"], child.fatal["status"])
        exitcode = child.process.exitcode
        if exitcode is not None:
            if exitcode in _FATAL_STATUSES:
                self._await_fatal(child, exitcode)
            self._restart(child, f"exited with status {exitcode}")
        elif child.ready and now - child.last_beat > self.settings.timing.stall_timeout_s:
            self._restart(child, f"no heartbeat for {now - child.last_beat:.1f} s (stalled)")
        elif not child.ready and now - child.started > self.settings.timing.start_timeout_s:
            self._restart(child, f"not ready within {self.settings.timing.start_timeout_s} s")
        elif (
            child.name == "grabber"
            and not self.source_is_file
            and self.eos is not None
            and not self.draining
        ):
            self._restart(child, "the camera stream ended")

    def _await_fatal(self, child: Child, exitcode: int) -> None:
        """A child that exits with a user-error status sent (or is sending) why: wait for it."""
        deadline = time.monotonic() + 2.0
        while child.fatal is None and time.monotonic() < deadline:
            if self._router.poll(50):
                self._drain_router()
        if child.fatal is not None:
            raise ChildFailedError(child.fatal["message"], child.fatal["status"])
        raise ChildFailedError(f"the {child.name} exited with status {exitcode}", exitcode)

    def _restart(self, child: Child, reason: str) -> None:
        limits = self.settings.restarts
        now = time.monotonic()
        child.restart_times = [t for t in child.restart_times if now - t < limits.window_s]
        if len(child.restart_times) >= limits.max_restarts:
            self._kill(child)
            raise ServiceFailedError(
                f"the {child.name} failed {len(child.restart_times) + 1} times within "
                f"{limits.window_s:g} s (last: {reason}); giving up so systemd can take over"
            )
        child.restart_times.append(now)
        child.restarts += 1
        log.warning(
            "child_restarting",
            child=child.name,
            reason=reason,
            generation=child.generation + 1,
            restarts_in_window=len(child.restart_times),
        )
        self._kill(child)
        if child.name == "grabber":
            self.eos = None
        self._spawn(child)

    def _kill(self, child: Child) -> None:
        if child.process is None:
            return
        if child.process.exitcode is None:
            child.process.kill()
        child.process.join(5.0)

    def _healthy(self, child: Child, now: float) -> bool:
        return (
            child.ready
            and child.alive
            and now - child.last_beat < self.settings.timing.unhealthy_after_s
        )

    def _watchdog(self, now: float) -> None:
        interval = self.notifier.watchdog_interval_s
        if interval is None or now < self._next_watchdog or not self.run_started:
            return
        unhealthy = [c.name for c in self.children.values() if not self._healthy(c, now)]
        if unhealthy:
            if now - self._withheld_logged > 1.0:
                self._withheld_logged = now
                log.warning("watchdog_withheld", unhealthy=",".join(unhealthy))
            return
        self.notifier.watchdog()
        self._next_watchdog = now + interval

    # Stop.

    def _begin_drain(self) -> None:
        self.draining = True
        self.outcome.stopped_by = self.stop_signal
        now = time.monotonic()
        timeout = self.settings.timing.stop_timeout_s
        self.drain_until = now + 0.6 * timeout
        self.stop_until = now + timeout
        self.notifier.stopping(f"draining after {self.stop_signal}")
        log.info("drain_started", signal=self.stop_signal, stop_timeout_s=timeout)
        self._send("grabber", {"type": "finish"})

    def _shutdown(self, failed: bool = False) -> None:
        """Stop grabber and engine, then the publisher; kill what outlives the stop timeout."""
        if not self.draining:
            if not failed:
                serve_until = time.monotonic() + self.settings.serve_after_s
                while time.monotonic() < serve_until and not self.stop_signal:
                    self._turn()
            self.notifier.stopping("failed" if failed else "the source is done")
            self.stop_until = time.monotonic() + self.settings.timing.stop_timeout_s
        for group in (("grabber", "engine"), ("publisher",)):
            if group == ("publisher",) and self.children["publisher"].ready:
                self._send_counters()  # so that its last heartbeat holds the final counts
            for name in group:
                self.children[name].stopping = True
                self._send(name, {"type": "stop"})
            while time.monotonic() < self.stop_until and any(
                self.children[name].alive for name in group
            ):
                if self._router.poll(50):
                    self._drain_router()
        for child in self.children.values():
            if child.alive:
                log.warning("child_killed_at_stop", child=child.name)
            self._kill(child)

    def _finish_outcome(self) -> RunOutcome:
        outcome = self.outcome
        grabber = self.children["grabber"]
        if self.eos is not None:
            outcome.frames = self.eos["frames"]
        else:
            outcome.frames = grabber.stats.get("frames", 0)
        outcome.crops = self.scored
        outcome.alarms = len(self.alarm_seqs)
        end = self.done_at or time.monotonic()
        outcome.seconds = end - self.run_started if self.run_started else 0.0
        outcome.restarts = {name: child.restarts for name, child in self.children.items()}
        outcome.engine_crops = sum(s.get("crops", 0) for s in self._engine_totals.values())
        outcome.engine_infer_s = sum(s.get("infer_s", 0.0) for s in self._engine_totals.values())
        return outcome

    def _teardown(self) -> None:
        for child in self.children.values():
            self._kill(child)
        if self._router is not None:
            self._router.close(linger=0)
        if self._context is not None:
            self._context.destroy(linger=0)
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
        log.info("supervisor_stopped", pid=os.getpid())


def _first_crop_id(settings_json: str) -> int:
    return int(json.loads(settings_json)["first_crop_id"])
