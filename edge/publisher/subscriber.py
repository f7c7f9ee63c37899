"""Receive alarms exactly once, in order: a SUB socket, gap detection, and replays.

``edge subscribe tcp://HOST:PORT [--topic alarm/] [--replay tcp://HOST:PORT] [--from-seq N]``
(the replay endpoint defaults to the next port up, as the publisher binds it)
prints each message's JSON as one line on stdout, in sequence order per (vehicle, run), and
exits 0 on Ctrl-C or SIGTERM. The :class:`Subscriber` class does the work; the pipeline's
tests and the depot's tools use it directly.

How every alarm arrives exactly once although PUB/SUB drops (slow joiner, high-water mark, a
subscriber frozen for minutes):

1. Each (vehicle, run, topic) stream has a next expected number, starting at ``from_seq``.
2. A live message with that number is delivered; a lower one, or one already held, is a
   duplicate and dropped; a higher one is held back and marks a gap.
3. Heartbeats (always subscribed) carry the last numbers, so a lost tail is a gap too, seen
   within one heartbeat interval.
4. Gaps are filled from the replay endpoint in bounded batches, and held messages are then
   delivered in order. A failed replay is retried every ``retry_interval_s``; held messages
   wait for it. Without a replay endpoint a gap is logged as ``messages_lost`` and skipped.

Limits: the state lives in memory, so a restarted subscriber delivers again from ``from_seq``
(a consumer that must not see an alarm twice across its own restarts persists the last number
it handled and passes the next one as ``from_seq``). Numbers deleted from the publisher's
spool before they were fetched are reported lost, not invented.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import zmq

from edge.errors import EdgeError, check_output_folder
from edge.logs import get_logger
from edge.publisher import keys as curve_keys
from edge.publisher.replay import (
    REPLAY_MAX_COUNT,
    ReplayError,
    ReplayReply,
    decode_reply,
    encode_request,
    replay_endpoint_for,
)
from edge.publisher.schema import (
    ALARM_TOPIC,
    COVERAGE_TOPIC,
    HEALTH_TOPIC,
    SEQUENCED_TOPICS,
    TOPICS,
    validate_message,
)

log = get_logger(__name__)

_LAST_SEQ_FIELD = {ALARM_TOPIC: "last_seq", COVERAGE_TOPIC: "last_coverage_seq"}
_DRAIN_MAX = 5000


@dataclass(frozen=True)
class Message:
    """One delivered message: ``json`` is the frame exactly as published."""

    topic: str
    body: dict
    json: bytes
    heatmap_png: bytes | None
    replayed: bool

    @property
    def key(self) -> tuple[str, str, str, int | None]:
        return (self.body["vehicle_id"], self.body["run_id"], self.topic, self.body.get("seq"))


@dataclass
class SubscriberStats:
    """Counts since the subscriber started."""

    live: int = 0
    replayed: int = 0
    duplicates: int = 0
    heartbeats: int = 0
    gaps: int = 0
    lost: int = 0
    invalid: int = 0
    replay_requests: int = 0
    replay_failures: int = 0


@dataclass
class _Stream:
    next_seq: int
    known_last: int = 0
    pending: dict[int, Message] = field(default_factory=dict)
    retry_at: float = 0.0
    in_gap: bool = False


class Subscriber:
    """A SUB socket plus the bookkeeping that turns it into exactly-once, in-order delivery.

    Args:
        endpoint: the publisher's PUB endpoint, e.g. ``tcp://10.0.0.5:5560``.
        topics: what to deliver (``alarm/``, ``coverage/``, ``health/``). Heartbeats are always
            received for gap detection; they are delivered only if ``health/`` is asked for.
        replay_endpoint: the publisher's replay ROUTER; None: gaps are logged and skipped.
        from_seq: the first number delivered of each run (1: the whole run).
        server_public_key, client_keys: CURVE keys (``(public, secret)`` for the client) when
            the publisher has them configured; see :mod:`edge.publisher.keys`.
        validate: check each message against the JSON Schema; invalid ones are dropped and
            counted.
        rcvhwm: messages the SUB may queue while this process is busy; beyond them the
            publisher drops, and the gap is fetched from the replay.

    One Subscriber follows one publisher (one vehicle): every replay goes to the one
    ``replay_endpoint``. Messages held behind a gap stay in memory until the replay answers,
    so a replay endpoint that never answers makes that memory grow with the live traffic.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        topics: Iterable[str] = (ALARM_TOPIC,),
        replay_endpoint: str | None = None,
        from_seq: int = 1,
        server_public_key: bytes | None = None,
        client_keys: tuple[bytes, bytes] | None = None,
        validate: bool = False,
        rcvhwm: int = 10_000,
        replay_timeout_s: float = 2.0,
        retry_interval_s: float = 1.0,
    ) -> None:
        self.topics = tuple(dict.fromkeys(topics))
        unknown = [topic for topic in self.topics if topic not in TOPICS]
        if unknown or not self.topics:
            raise ValueError(f"topics {unknown or '[]'}: choose from {list(TOPICS)}")
        if from_seq < 1:
            raise ValueError(f"from_seq {from_seq}: sequence numbers start at 1")
        if (server_public_key is None) != (client_keys is None):
            raise ValueError("CURVE needs both the server's public key and the client's keys")
        if client_keys is not None:
            curve_keys.require_curve()
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.from_seq = from_seq
        self.validate = validate
        self.stats = SubscriberStats()
        self._sequenced = [topic for topic in self.topics if topic in SEQUENCED_TOPICS]
        self._curve = (server_public_key, client_keys) if client_keys else None
        self._replay_timeout_ms = int(replay_timeout_s * 1000)
        self._retry_interval_s = retry_interval_s
        self._streams: dict[tuple[str, str, str], _Stream] = {}
        self._context = zmq.Context()
        self._req: zmq.Socket | None = None
        self._sub = self._socket(zmq.SUB)
        self._sub.setsockopt(zmq.RCVHWM, rcvhwm)
        for topic in {*self.topics, HEALTH_TOPIC}:
            self._sub.setsockopt(zmq.SUBSCRIBE, topic.encode("ascii"))
        self._sub.connect(endpoint)
        log.info(
            "subscriber_started",
            endpoint=endpoint,
            replay=replay_endpoint,
            topics=",".join(self.topics),
            from_seq=from_seq,
            curve=self._curve is not None,
        )

    def poll(self, timeout_s: float = 0.2) -> list[Message]:
        """Messages ready for delivery, in order; waits up to ``timeout_s`` for the first."""
        out: list[Message] = []
        if self._sub.poll(int(timeout_s * 1000)):
            for _ in range(_DRAIN_MAX):
                try:
                    frames = self._sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_live(frames, out)
        self._fill_gaps(out)
        return out

    def messages(
        self, stop: threading.Event | None = None, poll_s: float = 0.2
    ) -> Iterator[Message]:
        """Deliver messages until ``stop`` is set."""
        while stop is None or not stop.is_set():
            yield from self.poll(poll_s)

    def next_seq(self, vehicle_id: str, run_id: str, topic: str = ALARM_TOPIC) -> int:
        """The next number this subscriber will deliver on a stream."""
        stream = self._streams.get((vehicle_id, run_id, topic))
        return stream.next_seq if stream else self.from_seq

    def close(self) -> None:
        for socket in (self._sub, self._req):
            if socket is not None:
                socket.close(linger=0)
        self._req = None
        self._context.term()
        log.info("subscriber_stopped", **asdict(self.stats))

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Live messages.

    def _on_live(self, frames: list[bytes], out: list[Message]) -> None:
        message = self._parse(frames[0].decode("ascii", "replace"), frames[1:], replayed=False)
        if message is None:
            return
        if message.topic == HEALTH_TOPIC:
            self.stats.heartbeats += 1
            for topic in self._sequenced:
                stream = self._stream(message.body["vehicle_id"], message.body["run_id"], topic)
                stream.known_last = max(stream.known_last, message.body[_LAST_SEQ_FIELD[topic]])
            if HEALTH_TOPIC in self.topics:
                out.append(message)
            return
        if message.topic in self._sequenced:
            self._ingest(message, out)

    def _parse(self, topic: str, parts: list[bytes], replayed: bool) -> Message | None:
        try:
            body = json.loads(parts[0])
            if self.validate:
                validate_message(topic, body)
            else:
                _check_shape(topic, body)
        except Exception as error:  # noqa: BLE001 - any bad message is dropped and counted
            self.stats.invalid += 1
            log.error("message_invalid", topic=topic, error=str(error)[:300])
            return None
        png = parts[1] if len(parts) > 1 and parts[1] else None
        return Message(topic, body, parts[0], png, replayed)

    def _stream(self, vehicle_id: str, run_id: str, topic: str) -> _Stream:
        key = (vehicle_id, run_id, topic)
        if key not in self._streams:
            self._streams[key] = _Stream(next_seq=self.from_seq)
            log.info("stream_seen", vehicle_id=vehicle_id, run_id=run_id, topic=topic)
        return self._streams[key]

    def _ingest(self, message: Message, out: list[Message]) -> None:
        """Steps 1-2 of the module docstring for one sequenced message."""
        body = message.body
        stream = self._stream(body["vehicle_id"], body["run_id"], message.topic)
        seq = int(body["seq"])
        stream.known_last = max(stream.known_last, seq)
        if seq < stream.next_seq or seq in stream.pending:
            self.stats.duplicates += 1
            return
        if seq > stream.next_seq:
            stream.pending[seq] = message
            return
        self._deliver(message, out)
        stream.next_seq += 1
        while stream.next_seq in stream.pending:
            self._deliver(stream.pending.pop(stream.next_seq), out)
            stream.next_seq += 1

    def _deliver(self, message: Message, out: list[Message]) -> None:
        if message.replayed:
            self.stats.replayed += 1
        else:
            self.stats.live += 1
        out.append(message)

    # Gaps.

    def _fill_gaps(self, out: list[Message]) -> None:
        """Steps 3-4: fetch (or, without replay, skip) every stream's missing numbers."""
        for key, stream in self._streams.items():
            if stream.known_last < stream.next_seq:
                stream.in_gap = False
                continue
            if not stream.in_gap:
                stream.in_gap = True
                self.stats.gaps += 1
                log.info(
                    "gap_seen",
                    vehicle_id=key[0],
                    run_id=key[1],
                    topic=key[2],
                    from_seq=stream.next_seq,
                    known_last=stream.known_last,
                )
            if self.replay_endpoint is None:
                self._skip(key, stream, out, reason="no replay endpoint")
            elif time.monotonic() >= stream.retry_at:
                self._fetch(key, stream, out)

    def _fetch(self, key: tuple[str, str, str], stream: _Stream, out: list[Message]) -> None:
        vehicle_id, run_id, topic = key
        while stream.next_seq <= stream.known_last:
            asked = stream.next_seq
            reply = self._request(vehicle_id, run_id, topic, asked)
            if reply is None:
                stream.retry_at = time.monotonic() + self._retry_interval_s
                return
            stream.known_last = max(stream.known_last, reply.last_seq)
            for body_frame, png in reply.messages:
                message = self._parse(topic, [body_frame, png or b""], replayed=True)
                if message is not None and message.key[:3] == key:
                    self._ingest(message, out)
            if stream.next_seq == asked:
                # Nothing usable came back for the number asked: deleted from the spool.
                self._skip(key, stream, out, reason="not served by the replay endpoint")

    def _skip(
        self, key: tuple[str, str, str], stream: _Stream, out: list[Message], reason: str
    ) -> None:
        """Give up the numbers up to the first held message (or the known last) as lost."""
        resume = min(stream.pending) if stream.pending else stream.known_last + 1
        lost = resume - stream.next_seq
        if lost > 0:
            self.stats.lost += lost
            log.error(
                "messages_lost",
                vehicle_id=key[0],
                run_id=key[1],
                topic=key[2],
                from_seq=stream.next_seq,
                to_seq=resume - 1,
                count=lost,
                reason=reason,
            )
            stream.next_seq = resume
        while stream.next_seq in stream.pending:
            self._deliver(stream.pending.pop(stream.next_seq), out)
            stream.next_seq += 1

    def _request(
        self, vehicle_id: str, run_id: str, topic: str, from_seq: int
    ) -> ReplayReply | None:
        """One replay request; None after a timeout or an error reply (retried later)."""
        if self._req is None:
            self._req = self._socket(zmq.REQ)
            self._req.setsockopt(zmq.RCVTIMEO, self._replay_timeout_ms)
            self._req.setsockopt(zmq.SNDTIMEO, self._replay_timeout_ms)
            self._req.connect(self.replay_endpoint)
        self.stats.replay_requests += 1
        try:
            self._req.send(encode_request(vehicle_id, run_id, topic, from_seq, REPLAY_MAX_COUNT))
            return decode_reply(self._req.recv_multipart())
        except zmq.Again:
            # A REQ that timed out cannot send again: start a fresh one next time.
            self._req.close(linger=0)
            self._req = None
            log.warning("replay_timeout", endpoint=self.replay_endpoint, from_seq=from_seq)
        except ReplayError as error:
            log.error("replay_refused", error=str(error)[:300], from_seq=from_seq)
        self.stats.replay_failures += 1
        return None

    def _socket(self, kind: int) -> zmq.Socket:
        socket = self._context.socket(kind)
        socket.setsockopt(zmq.LINGER, 0)
        if self._curve is not None:
            server_public_key, (public, secret) = self._curve
            socket.curve_serverkey = server_public_key
            socket.curve_publickey = public
            socket.curve_secretkey = secret
        return socket


def _check_shape(topic: str, body: object) -> None:
    """The fields the bookkeeping relies on, checked even when the schema is not."""
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")
    for name in ("vehicle_id", "run_id"):
        if not isinstance(body.get(name), str):
            raise ValueError(f"{name} missing")
    numbers = [_LAST_SEQ_FIELD[t] for t in SEQUENCED_TOPICS] if topic == HEALTH_TOPIC else ["seq"]
    for name in numbers:
        value = body.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} missing or not a count")
    if topic in SEQUENCED_TOPICS and body["seq"] < 1:
        raise ValueError("seq must be >= 1")


# The `edge subscribe` command.


def valid_connect_endpoint(endpoint: str) -> bool:
    """Whether ``endpoint`` names one place to connect to: ``tcp://HOST:PORT`` (no wildcard
    host, port 1-65535) or ``ipc://PATH``."""
    if endpoint.startswith("ipc://"):
        return len(endpoint) > len("ipc://")
    match = re.fullmatch(r"tcp://([^*:/]+|\[[0-9a-fA-F:]+\]):(\d+)", endpoint)
    return bool(match) and 1 <= int(match.group(2)) <= 65535


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("endpoint", help="the publisher's PUB endpoint, e.g. tcp://HOST:5560")
    parser.add_argument(
        "--topic",
        action="append",
        choices=TOPICS,
        help="topic to print (repeatable); default alarm/",
    )
    replay = parser.add_mutually_exclusive_group()
    replay.add_argument(
        "--replay", help="the publisher's replay endpoint (default: the next port up, PORT+1)"
    )
    replay.add_argument(
        "--no-replay", action="store_true", help="log gaps as messages_lost instead of fetching"
    )
    parser.add_argument(
        "--from-seq", type=int, default=1, help="first sequence number to print of each run"
    )
    parser.add_argument("--server-key", type=Path, help="CURVE: the publisher's server.key")
    parser.add_argument("--client-key", type=Path, help="CURVE: this subscriber's NAME.key_secret")
    parser.add_argument("--heatmaps", type=Path, help="folder to save heatmap PNGs in")
    parser.add_argument(
        "--validate", action="store_true", help="drop (and log) messages that break the schema"
    )


def run(args: argparse.Namespace) -> int:
    """Print messages as JSON lines until SIGINT or SIGTERM; exit 0."""
    curve: dict = {}
    if (args.server_key is None) != (args.client_key is None):
        print("edge subscribe: --server-key and --client-key go together", file=sys.stderr)
        return 2
    if args.from_seq < 1:
        print("edge subscribe: --from-seq starts at 1", file=sys.stderr)
        return 2
    for endpoint in (args.endpoint, args.replay):
        if endpoint is not None and not valid_connect_endpoint(endpoint):
            print(
                f"edge subscribe: {endpoint!r} is not an endpoint to connect to "
                "(tcp://HOST:PORT with a port from 1 to 65535, or ipc://PATH)",
                file=sys.stderr,
            )
            return 2
    replay = None if args.no_replay else args.replay or replay_endpoint_for(args.endpoint)
    if args.server_key is not None:
        try:
            curve = {
                "server_public_key": curve_keys.load_public_key(args.server_key),
                "client_keys": curve_keys.load_client_keys(args.client_key),
            }
        except EdgeError as error:
            print(f"edge subscribe: {error}", file=sys.stderr)
            return int(error.exit_status)
    if args.heatmaps is not None:
        try:
            check_output_folder(args.heatmaps, "--heatmaps").mkdir(parents=True, exist_ok=True)
        except EdgeError as error:
            print(f"edge subscribe: {error}", file=sys.stderr)
            return int(error.exit_status)
    stop = threading.Event()
    previous = {
        signum: signal.signal(signum, lambda *_: stop.set())
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    subscriber = Subscriber(
        args.endpoint,
        topics=args.topic or (ALARM_TOPIC,),
        replay_endpoint=replay,
        from_seq=args.from_seq,
        validate=args.validate,
        **curve,
    )
    try:
        for message in subscriber.messages(stop):
            sys.stdout.write(message.json.decode("utf-8") + "\n")
            sys.stdout.flush()
            if args.heatmaps is not None and message.heatmap_png is not None:
                vehicle_id, run_id, topic, seq = message.key
                name = f"{vehicle_id}_{run_id}_{topic.rstrip('/')}_{seq:08d}.png"
                (args.heatmaps / name).write_bytes(message.heatmap_png)
    except BrokenPipeError:
        # The reader went away (`| head`): point stdout at /dev/null so the exit flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        subscriber.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
