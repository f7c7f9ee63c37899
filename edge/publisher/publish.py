"""The publisher: spool every alarm first, then publish it on ZeroMQ; serve replays; heartbeat.

Sockets (all bound by the publisher; subscribers connect):

- ``publish_endpoint``: an XPUB socket (a PUB that also sees subscriptions). Multipart
  messages ``[topic, json]`` or ``[topic, json, png]``; topics ``alarm/``, ``coverage/``,
  ``health/``. Any plain SUB socket can read it.
- ``replay_endpoint``: a ROUTER serving spooled messages by sequence number
  (:mod:`edge.publisher.replay` documents the request and reply frames).

How alarms become lossless over PUB/SUB, which drops silently (late joiners, the high-water
mark, close with messages queued):

1. :meth:`Publisher.publish_alarm` commits the alarm to the spool (which allocates its
   per-run sequence number) and only then returns the number. From here nothing is lost.
2. The I/O thread sends every message the spool marks unsent, in sequence order, and marks it
   sent (sent means handed to the PUB socket, not received by anyone). At start that includes
   what an earlier, killed publisher spooled but never sent; with such a backlog, sending
   waits up to ``startup_hold_s`` for a first subscription, so a subscriber that reconnects
   after the restart gets the backlog live rather than by replay (best effort: with several
   subscribers only the first is waited for).
3. Heartbeats on ``health/`` every ``heartbeat_interval_s`` carry the last sequence numbers, so
   a subscriber that lost the tail of a burst learns of it within one interval.
4. A subscriber fetches every number it did not see from the replay endpoint and drops
   duplicates by (vehicle, run, seq): :mod:`edge.publisher.subscriber` does all of this.

``SNDHWM`` (default 1000 messages per subscriber) sizes memory, not correctness: a subscriber
that stops reading costs at most that many queued messages (about 30 MB with heatmaps), after
which the PUB drops its messages and the subscriber fills the hole from the replay endpoint.
Never XPUB_NODROP: a frozen subscriber at the depot must not stall the vehicle. ``LINGER`` is
bounded (default 2 s) and only applies to copies of messages the spool already holds.

Threading: the caller's thread spools (so the returned number means "committed"); one I/O
thread owns the sockets. Public methods may be called from any thread (a lock serialises them).
Not guaranteed: delivery to a subscriber that never asks for a replay.
"""

from __future__ import annotations

import contextvars
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import zmq
from pydantic import Field

from edge.config import StrictModel
from edge.errors import ConfigInvalidError, EdgeError, ExitStatus
from edge.logs import get_logger
from edge.publisher import keys as curve_keys
from edge.publisher.replay import REPLAY_MAX_BYTES, REPLAY_MAX_COUNT, serve_request
from edge.publisher.schema import (
    ALARM_TOPIC,
    COVERAGE_TOPIC,
    HEALTH_TOPIC,
    CoverageGap,
    DefectHints,
    RunInfo,
    build_alarm,
    build_coverage,
    build_health,
    encode,
)
from edge.publisher.spool import Spool, SpooledMessage
from edge.records import IDENTIFIER, CropTag

log = get_logger(__name__)

BUILT_IN_COUNTERS = (
    # counters the publisher keeps itself; a pipeline's own counters must use other names
    "alarms_spooled",
    "alarms_sent",
    "coverage_gaps",
    "crops_dropped",
    "unsent",
    "replay_requests",
    "replay_messages",
    "subscriptions",
)
_SEND_BATCH = 256
_doorbell_ids = itertools.count()


class PublisherError(EdgeError):
    """The publisher's I/O thread failed; spooled alarms are safe but no longer sent."""

    exit_status = ExitStatus.SERVICE_FAILED


@dataclass(frozen=True)
class ScoredCrop:
    """A crop the engine scored over its threshold: the input of one alarm."""

    crop_tag: CropTag
    score: float
    threshold: float
    heatmap_png: bytes | None = None
    hints: DefectHints | None = None


class PublisherConfig(StrictModel):
    """Settings of one publisher (one vehicle, one run)."""

    vehicle_id: str = Field(pattern=IDENTIFIER, max_length=128, description="vehicle id")
    run_id: str = Field(
        pattern=IDENTIFIER,
        max_length=128,
        description="run id; keep it when the publisher restarts within a run",
    )
    model_id: str = Field(min_length=1, description="model id written into every alarm")
    spool_path: Path = Field(description="SQLite spool file (created)")
    publish_endpoint: str = Field("tcp://*:5560", description="XPUB bind endpoint")
    replay_endpoint: str | None = Field(
        "tcp://*:5561", description="ROUTER bind endpoint for replays; None: no replay"
    )
    keys_dir: Path | None = Field(
        None, description="CURVE keys folder (see edge.publisher.keys); None: no encryption"
    )
    sndhwm: int = Field(1000, ge=1, description="messages queued per subscriber before drops")
    linger_ms: int = Field(2000, ge=0, description="how long close() may flush queued copies")
    heartbeat_interval_s: float = Field(1.0, gt=0, description="seconds between heartbeats")
    startup_hold_s: float = Field(
        1.0,
        ge=0,
        description="with unsent messages at start, wait this long for a first subscription"
        " before sending, so reconnecting subscribers get the backlog live",
    )
    replay_max_count: int = Field(REPLAY_MAX_COUNT, ge=1, le=10_000)
    replay_max_bytes: int = Field(REPLAY_MAX_BYTES, ge=1024)
    spool_synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="FULL: an acknowledged alarm survives power loss (see spool.py)"
    )


class Publisher:
    """Spools and publishes alarms and coverage gaps of one run; serves replays; heartbeats.

    Binding happens in the constructor (errors such as an address in use raise here); the bound
    addresses are :attr:`publish_address` and :attr:`replay_address` (useful with port ``*``).
    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, config: PublisherConfig) -> None:
        self.config = config
        self.run = RunInfo(config.vehicle_id, config.run_id)
        self._lock = threading.Lock()  # counters, doorbell, closed flag: held briefly
        # Spool writes of both connections take turns here rather than in SQLite's busy handler,
        # which sleeps in steps of milliseconds.
        self._write_lock = threading.Lock()
        self._closed = False
        self._failure: BaseException | None = None
        self._started = time.monotonic()
        self._counters = dict.fromkeys(BUILT_IN_COUNTERS, 0)
        self._heartbeat_now = False
        self._spool = Spool(config.spool_path, synchronous=config.spool_synchronous)
        # The sender's own connection: sent marks are advisory, so NORMAL (see spool.py, 3).
        self._io_spool = Spool(config.spool_path, synchronous="NORMAL")
        self._context = zmq.Context()
        self._auth = None
        self._sockets: list[zmq.Socket] = []
        try:
            self._open_sockets()
        except BaseException:
            self._teardown()
            raise
        unsent = self._io_spool.count_unsent()
        self._hold_until = None
        if unsent and config.startup_hold_s > 0:
            self._hold_until = time.monotonic() + config.startup_hold_s
        log.info(
            "publisher_started",
            vehicle_id=self.run.vehicle_id,
            run_id=self.run.run_id,
            publish=self.publish_address,
            replay=self.replay_address,
            curve=config.keys_dir is not None,
            unsent=unsent,
            last_seq=self._spool.last_seq(ALARM_TOPIC, self.run.vehicle_id, self.run.run_id),
        )
        # The thread runs in a copy of this context so its log lines carry the process name.
        self._thread = threading.Thread(
            target=contextvars.copy_context().run,
            args=(self._serve,),
            name="publisher-io",
            daemon=True,
        )
        self._thread.start()

    # The public interface.

    def publish_alarm(
        self,
        crop_tag: CropTag,
        score: float,
        threshold: float,
        heatmap_png: bytes | None = None,
        *,
        hints: DefectHints | None = None,
    ) -> int:
        """Spool an alarm for ``crop_tag`` and queue it for sending; returns its sequence number.

        When this returns, the alarm is committed to the spool. Raises ValueError if the score
        is not finite or not over the threshold, SpoolError if the spool cannot be written, and
        PublisherError if the I/O thread has died (the alarm is spooled and goes out after a
        restart).
        """
        return self.publish_alarms([ScoredCrop(crop_tag, score, threshold, heatmap_png, hints)])[0]

    def publish_alarms(self, scored: Sequence[ScoredCrop]) -> list[int]:
        """:meth:`publish_alarm` for a batch in one spool transaction (one fsync, not one per
        alarm: what keeps a burst of alarms over a bad stretch cheap on eMMC). All of them are
        spooled, with consecutive numbers, or none (ValueError for any bad score)."""
        items = [(self._alarm_body(one), one.heatmap_png or None) for one in scored]
        messages = self._append(ALARM_TOPIC, items, "alarms_spooled")
        for one, message in zip(scored, messages):
            log.info(
                "alarm_spooled",
                seq=message.seq,
                crop_id=one.crop_tag.crop_id,
                image_score=float(one.score),
                threshold=float(one.threshold),
                along_track_m=one.crop_tag.along_track_m,
            )
        return [message.seq for message in messages]

    def publish_coverage_gap(self, gap: CoverageGap) -> int:
        """Spool a coverage gap and queue it for sending; returns its ``coverage/`` number."""

        def make_body(seq: int, raised_time: float) -> bytes:
            return encode(build_coverage(gap, self.run, seq=seq, raised_time=raised_time))

        (message,) = self._append(COVERAGE_TOPIC, [(make_body, None)], "coverage_gaps")
        with self._lock:
            self._counters["crops_dropped"] += gap.crops_dropped
        log.info(
            "coverage_gap_spooled",
            seq=message.seq,
            reason=gap.reason,
            crops_dropped=gap.crops_dropped,
            start_along_track_m=gap.start_along_track_m,
            end_along_track_m=gap.end_along_track_m,
        )
        return message.seq

    def heartbeat(self) -> None:
        """Send a heartbeat now (the I/O thread also sends one every interval)."""
        with self._lock:
            self._check_open()
            self._heartbeat_now = True
            self._ring()

    def update_counters(self, **values: int) -> None:
        """Set pipeline counters carried in every heartbeat (e.g. ``crops_inspected=1200``)."""
        for name, value in values.items():
            if name in BUILT_IN_COUNTERS:
                raise ValueError(f"counter {name!r} is kept by the publisher itself")
            if not (isinstance(value, int) and value >= 0):
                raise ValueError(f"counter {name}={value!r}: counters are integers >= 0")
        with self._lock:
            self._counters.update(values)

    def last_seq(self, topic: str = ALARM_TOPIC) -> int:
        """The last sequence number spooled for this run on ``topic`` (0: none)."""
        with self._write_lock:
            return self._spool.last_seq(topic, self.run.vehicle_id, self.run.run_id)

    @property
    def alive(self) -> bool:
        """True while the I/O thread runs (a supervisor's health check)."""
        return self._thread.is_alive() and self._failure is None

    def close(self) -> None:
        """Send what is unsent, a last heartbeat, then close with the bounded linger.

        Everything was spooled before, so what the linger cuts off is still in the spool and
        in the replay. Returns within about ``linger_ms`` plus the time to send the backlog.
        """
        with self._write_lock, self._lock:  # no publish is half done once this is taken
            if self._closed:
                return
            self._closed = True
            self._ring(b"close")
        self._thread.join(timeout=self.config.linger_ms / 1000 + 30.0)
        if self._thread.is_alive():
            log.error("publisher_io_stuck", seconds=self.config.linger_ms / 1000 + 30.0)
        self._teardown()
        log.info("publisher_closed", **self.counters())

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Caller side.

    def _alarm_body(self, scored: ScoredCrop) -> Callable[[int, float], bytes]:
        def make_body(seq: int, raised_time: float) -> bytes:
            alarm = build_alarm(
                scored.crop_tag,
                scored.score,
                scored.threshold,
                self.config.model_id,
                self.run,
                seq=seq,
                raised_time=raised_time,
                has_heatmap=bool(scored.heatmap_png),
                hints=scored.hints,
            )
            return encode(alarm)

        return make_body

    def _append(
        self,
        topic: str,
        items: list[tuple[Callable[[int, float], bytes], bytes | None]],
        counter: str,
    ) -> list[SpooledMessage]:
        with self._write_lock:
            with self._lock:
                self._check_open()
            messages = self._spool.append_many(topic, self.run, items)
            with self._lock:
                self._counters[counter] += len(messages)
                self._ring()
        if self._failure is not None:
            raise PublisherError(
                f"publisher I/O thread failed ({self._failure!r}); what it was given is spooled"
            )
        return messages

    def _check_open(self) -> None:
        if self._closed:
            raise PublisherError("the publisher is closed")

    def _ring(self, what: bytes = b"send") -> None:
        """Wake the I/O thread (under the lock). A full doorbell is fine: it is awake."""
        try:
            self._doorbell_tx.send(what, zmq.NOBLOCK)
        except zmq.Again:
            if what == b"close":
                self._doorbell_tx.send(what)

    def _open_sockets(self) -> None:
        config = self.config
        server_keys = None
        if config.keys_dir is not None:
            curve_keys.require_curve()
            server_keys = curve_keys.load_server_keys(config.keys_dir)
            from zmq.auth.thread import ThreadAuthenticator

            clients = Path(config.keys_dir) / curve_keys.CLIENTS_DIR
            if not any(clients.glob("*.key")):
                log.warning("curve_no_clients_allowed", folder=str(clients))
            self._auth = ThreadAuthenticator(self._context)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(clients))
        self._xpub = self._server_socket(zmq.XPUB, server_keys)
        self._xpub.setsockopt(zmq.SNDHWM, config.sndhwm)
        self._xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        _bind(self._xpub, config.publish_endpoint, "publish")
        self.publish_address: str = self._xpub.last_endpoint.decode()
        self._router = None
        self.replay_address: str | None = None
        if config.replay_endpoint is not None:
            self._router = self._server_socket(zmq.ROUTER, server_keys)
            _bind(self._router, config.replay_endpoint, "replay")
            self.replay_address = self._router.last_endpoint.decode()
        doorbell = f"inproc://publisher-doorbell-{next(_doorbell_ids)}"
        self._doorbell_rx = self._new_socket(zmq.PAIR)
        self._doorbell_rx.setsockopt(zmq.RCVHWM, 0)
        self._doorbell_rx.bind(doorbell)
        self._doorbell_tx = self._new_socket(zmq.PAIR)
        self._doorbell_tx.setsockopt(zmq.SNDHWM, 0)
        self._doorbell_tx.connect(doorbell)

    def _new_socket(self, kind: int) -> zmq.Socket:
        socket = self._context.socket(kind)
        socket.setsockopt(zmq.LINGER, self.config.linger_ms)
        self._sockets.append(socket)
        return socket

    def _server_socket(self, kind: int, server_keys: tuple[bytes, bytes] | None) -> zmq.Socket:
        socket = self._new_socket(kind)
        if server_keys is not None:
            socket.curve_publickey, socket.curve_secretkey = server_keys
            socket.curve_server = True
        return socket

    def _teardown(self) -> None:
        """Close what is left (sockets the I/O thread closed are skipped) and the spools."""
        thread = getattr(self, "_thread", None)
        if thread is not None and thread.is_alive():
            return  # its sockets and spool are still in use; leave them to the process exit
        for socket in self._sockets:
            if not socket.closed:
                socket.close(linger=0 if socket is getattr(self, "_doorbell_tx", None) else None)
        if self._auth is not None:
            self._auth.stop()  # its ZAP socket must close before the context can end
        self._context.term()  # bounded: every socket has a finite linger
        self._spool.close()
        self._io_spool.close()

    # The I/O thread.

    def _serve(self) -> None:
        try:
            self._serve_loop()
        except BaseException as error:  # noqa: BLE001 - kept for the caller, then logged
            self._failure = error
            log.exception("publisher_io_failed")
        finally:
            for socket in (self._xpub, self._router, self._doorbell_rx):
                if socket is not None:
                    socket.close()

    def _serve_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._xpub, zmq.POLLIN)
        poller.register(self._doorbell_rx, zmq.POLLIN)
        if self._router is not None:
            poller.register(self._router, zmq.POLLIN)
        interval = self.config.heartbeat_interval_s
        next_heartbeat = time.monotonic()
        closing = False
        while True:
            # 1. Wait for a doorbell, a subscription, a replay request or the next heartbeat.
            now = time.monotonic()
            wait = next_heartbeat - now
            if self._hold_until is not None:
                wait = min(wait, self._hold_until - now)
            events = dict(poller.poll(max(0, int(wait * 1000) + 1)))
            if self._xpub in events:
                self._read_subscriptions()
            if self._doorbell_rx in events:
                closing = self._drain_doorbell() or closing
            if self._router is not None and self._router in events:
                self._serve_replays()
            # 2. Send what the spool holds unsent, unless holding the backlog at start.
            if self._hold_until is not None and (closing or time.monotonic() >= self._hold_until):
                log.info("startup_hold_ended", reason="closing" if closing else "timeout")
                self._hold_until = None
            self._announce_last_seqs()
            if self._hold_until is None:
                self._send_unsent()
            # 3. Heartbeat when due or asked for, and a last one on close.
            with self._lock:
                asked, self._heartbeat_now = self._heartbeat_now, False
            if asked or closing or time.monotonic() >= next_heartbeat:
                self._send_heartbeat()
                next_heartbeat = time.monotonic() + interval
            if closing:
                return

    def _read_subscriptions(self) -> None:
        while True:
            try:
                frame = self._xpub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if frame[:1] != b"\x01":
                continue
            with self._lock:
                self._counters["subscriptions"] += 1
            log.info("subscription_received", topic=frame[1:].decode("utf-8", "replace"))
            if self._hold_until is not None:
                log.info("startup_hold_ended", reason="subscriber")
                self._hold_until = None

    def _drain_doorbell(self) -> bool:
        closing = False
        while True:
            try:
                closing = self._doorbell_rx.recv(zmq.NOBLOCK) == b"close" or closing
            except zmq.Again:
                return closing

    def _announce_last_seqs(self) -> None:
        """Snapshot the run's last numbers before a send pass: after the pass, everything up to
        them was handed to the PUB, so a heartbeat carrying them never runs ahead of the alarms
        it announces (except a backlog held at start, which the replay serves)."""
        vehicle_id, run_id = self.run.vehicle_id, self.run.run_id
        self._announced = {
            topic: self._io_spool.last_seq(topic, vehicle_id, run_id)
            for topic in (ALARM_TOPIC, COVERAGE_TOPIC)
        }

    def _send_unsent(self) -> None:
        while True:
            batch = self._io_spool.unsent(limit=_SEND_BATCH)
            if not batch:
                return
            for message in batch:
                frames = [message.topic.encode("ascii"), message.body]
                if message.heatmap_png:
                    frames.append(message.heatmap_png)
                self._xpub.send_multipart(frames)
            with self._write_lock:
                self._io_spool.mark_sent(message.key for message in batch)
            sent_alarms = sum(message.topic == ALARM_TOPIC for message in batch)
            with self._lock:
                self._counters["alarms_sent"] += sent_alarms
            log.debug("messages_sent", count=len(batch), last_seq=batch[-1].seq)

    def _send_heartbeat(self) -> None:
        unsent = self._io_spool.count_unsent()
        with self._lock:
            self._counters["unsent"] = unsent
            counters = dict(self._counters)
        body = build_health(
            self.run,
            sent_time=time.time(),
            uptime_s=time.monotonic() - self._started,
            heartbeat_interval_s=self.config.heartbeat_interval_s,
            last_seq=self._announced[ALARM_TOPIC],
            last_coverage_seq=self._announced[COVERAGE_TOPIC],
            counters=counters,
        )
        self._xpub.send_multipart([HEALTH_TOPIC.encode("ascii"), encode(body)])

    def _serve_replays(self) -> None:
        for _ in range(64):  # then give sending and heartbeats a turn
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if b"" not in frames[1:]:
                log.warning("replay_request_malformed", frames=len(frames))
                continue
            split = frames.index(b"", 1) + 1
            envelope, request = frames[:split], frames[split:]
            reply = serve_request(
                self._io_spool,
                request[0] if request else b"",
                max_count=self.config.replay_max_count,
                max_bytes=self.config.replay_max_bytes,
            )
            served = (len(reply) - 1) // 2
            with self._lock:
                self._counters["replay_requests"] += 1
                self._counters["replay_messages"] += served
            try:
                self._router.send_multipart(envelope + reply, zmq.NOBLOCK)
            except zmq.Again:
                log.warning("replay_reply_dropped", messages=served)
            log.debug("replay_served", messages=served)


def _bind(socket: zmq.Socket, endpoint: str, role: str) -> None:
    """Bind, or say which endpoint could not be bound and why (a port in use, a bad address):
    a user error, not one that a restart of the publisher would mend."""
    try:
        socket.bind(endpoint)
    except zmq.ZMQError as error:
        raise ConfigInvalidError(f"{role} endpoint {endpoint}: cannot bind ({error})") from error
