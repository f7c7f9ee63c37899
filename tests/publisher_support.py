"""Shared pieces of the publisher tests: crop tags, configs, plain sockets, child processes."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import zmq

from edge.publisher import PublisherConfig
from edge.records import CropTag, GpsFix, Mileage

REPO_ROOT = Path(__file__).resolve().parents[1]
VEHICLE = "TIV-07"
RUN = "2026-05-09T0712Z"


def make_tag(crop_id: int, **changes) -> CropTag:
    """A crop of a run going up the line from km 43 + 210 m, one fastener every 0.6 m."""
    fields = {
        "crop_id": crop_id,
        "frame_index": crop_id // 4,
        "box": (100 + crop_id % 4, 40, 64, 64),
        "line_index": 17,
        "along_track_m": 0.6 * crop_id,
        "capture_time": 1_778_310_723.25 + 0.02 * crop_id,
        "rail": "left" if crop_id % 2 == 0 else "right",
        "side": "gauge" if crop_id % 3 else "field",
        "camera_id": "cam1",
        "gps": GpsFix(lat=52.0907, lon=5.1214, quality=4, age_s=0.05, dead_reckoned=False),
        "mileage": Mileage("L120", 43_210.5 + 0.6 * crop_id, "increasing"),
    }
    fields.update(changes)
    return CropTag(**fields)


def publisher_config(spool_path: Path, **changes) -> PublisherConfig:
    """A publisher on random loopback ports with short intervals for tests."""
    fields = {
        "vehicle_id": VEHICLE,
        "run_id": RUN,
        "model_id": "diff-fastener-tiny-test",
        "spool_path": spool_path,
        "publish_endpoint": "tcp://127.0.0.1:*",
        "replay_endpoint": "tcp://127.0.0.1:*",
        "heartbeat_interval_s": 0.2,
        "linger_ms": 200,
        "startup_hold_s": 0.0,
    }
    fields.update(changes)
    return PublisherConfig(**fields)


def plain_sub(context: zmq.Context, endpoint: str, *topics: bytes) -> zmq.Socket:
    """A pyzmq SUB socket, no project code: LINGER 0, subscribed to ``topics``."""
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    for topic in topics:
        socket.setsockopt(zmq.SUBSCRIBE, topic)
    socket.connect(endpoint)
    return socket


def wait_for_topic(socket: zmq.Socket, topic: bytes, timeout_s: float = 5.0) -> list[bytes]:
    """Receive until a message on ``topic`` arrives (proof the subscription is live)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if socket.poll(100):
            frames = socket.recv_multipart()
            if frames[0] == topic:
                return frames
    raise TimeoutError(f"no {topic!r} message within {timeout_s} s")


def receive(socket: zmq.Socket, topic: bytes, count: int, timeout_s: float) -> list[list[bytes]]:
    """Up to ``count`` messages on ``topic`` (other topics skipped) within ``timeout_s``."""
    got: list[list[bytes]] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:
        if socket.poll(50):
            frames = socket.recv_multipart()
            if frames[0] == topic:
                got.append(frames)
    return got


def collect(subscriber, count: int, timeout_s: float, topic: str = "alarm/") -> list:
    """Poll a Subscriber until ``count`` messages of ``topic`` were delivered."""
    got = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:
        got += [message for message in subscriber.poll(0.05) if message.topic == topic]
    return got


def wait_sent(publisher, count: int, timeout_s: float = 5.0) -> None:
    """Wait until the publisher has handed ``count`` alarms to its PUB socket."""
    deadline = time.monotonic() + timeout_s
    while publisher.counters()["alarms_sent"] < count:
        assert time.monotonic() < deadline, f"{publisher.counters()} after {timeout_s} s"
        time.sleep(0.01)


def child_env() -> dict[str, str]:
    """Environment for a child Python that must import this tree's ``edge``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env["PYTHONUNBUFFERED"] = "1"
    return env


def python_command(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def seqs(bodies: list[dict]) -> list[int]:
    return [body["seq"] for body in bodies]


def loads(frame: bytes) -> dict:
    return json.loads(frame)
