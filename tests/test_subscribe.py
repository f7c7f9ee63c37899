"""Exactly once, in order: late joiners, duplicates, lost gaps, and `edge subscribe` frozen by
SIGSTOP while the PUB's high-water mark drops its messages."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import zmq
from publisher_support import (
    REPO_ROOT,
    child_env,
    collect,
    make_tag,
    publisher_config,
    wait_sent,
)

from edge.publisher import CoverageGap, Publisher, ScoredCrop, Subscriber, validate_message

pytestmark = pytest.mark.timeout(40)


def test_late_subscriber_gets_every_alarm_once_via_heartbeat_and_replay(tmp_path):
    with Publisher(publisher_config(tmp_path / "spool.db")) as publisher:
        for crop_id in range(1, 31):
            publisher.publish_alarm(make_tag(crop_id), 0.9, 0.4)
        wait_sent(publisher, 30)  # all 30 gone to nobody before the subscriber exists
        with Subscriber(
            publisher.publish_address, replay_endpoint=publisher.replay_address, validate=True
        ) as subscriber:
            # No alarm follows: only a heartbeat's last_seq can tell the subscriber of 1..30.
            early = collect(subscriber, 30, timeout_s=5)
            assert subscriber.stats.replayed == 30 and subscriber.stats.heartbeats >= 1
            for crop_id in range(31, 61):
                publisher.publish_alarm(make_tag(crop_id), 0.9, 0.4)
            late = collect(subscriber, 30, timeout_s=5)
            time.sleep(0.5)
            extra = collect(subscriber, 1, timeout_s=0.3)
    got = early + late
    assert [m.body["seq"] for m in got] == list(range(1, 61))
    assert [m.body["crop"]["crop_id"] for m in got] == list(range(1, 61))
    assert extra == []
    for message in got:
        validate_message(message.topic, message.body)
    assert subscriber.stats.invalid == 0 and subscriber.stats.lost == 0


def test_from_seq_starts_each_run_there(tmp_path):
    with Publisher(publisher_config(tmp_path / "spool.db")) as publisher:
        for crop_id in range(1, 7):
            publisher.publish_alarm(make_tag(crop_id), 0.9, 0.4)
        with Subscriber(
            publisher.publish_address, replay_endpoint=publisher.replay_address, from_seq=4
        ) as subscriber:
            got = collect(subscriber, 3, timeout_s=5)
            assert collect(subscriber, 1, timeout_s=0.5) == []
    assert [m.body["seq"] for m in got] == [4, 5, 6]


def test_resent_alarms_after_a_restart_are_dropped_as_duplicates(tmp_path):
    """A power cut loses sent marks (spool.py, 3): the restarted publisher sends 1..10 again,
    and the subscriber must not deliver them twice."""
    spool_path = tmp_path / "spool.db"
    publisher = Publisher(publisher_config(spool_path))
    address = publisher.publish_address
    subscriber = Subscriber(address, replay_endpoint=publisher.replay_address, validate=True)
    try:
        for crop_id in range(1, 11):
            publisher.publish_alarm(make_tag(crop_id), 0.9, 0.4)
        first = collect(subscriber, 10, timeout_s=5)
        publisher.close()
        database = sqlite3.connect(spool_path)
        database.execute("UPDATE messages SET sent_time = NULL")
        database.commit()
        database.close()
        publisher = Publisher(
            publisher_config(spool_path, publish_endpoint=address, startup_hold_s=5.0)
        )
        deadline = time.monotonic() + 5
        while subscriber.stats.duplicates < 10 and time.monotonic() < deadline:
            assert subscriber.poll(0.05) == []
        publisher.publish_alarm(make_tag(11), 0.9, 0.4)
        second = collect(subscriber, 1, timeout_s=5)
    finally:
        publisher.close()
        subscriber.close()
    assert [m.body["seq"] for m in first + second] == list(range(1, 12))
    assert subscriber.stats.duplicates >= 10


def test_without_replay_a_gap_is_counted_lost_and_skipped(tmp_path):
    with Publisher(publisher_config(tmp_path / "spool.db", replay_endpoint=None)) as publisher:
        assert publisher.replay_address is None
        for crop_id in range(1, 6):
            publisher.publish_alarm(make_tag(crop_id), 0.9, 0.4)
        wait_sent(publisher, 5)
        with Subscriber(publisher.publish_address) as subscriber:
            deadline = time.monotonic() + 5
            while subscriber.stats.lost < 5 and time.monotonic() < deadline:
                subscriber.poll(0.05)
            for crop_id in range(6, 9):
                publisher.publish_alarm(make_tag(crop_id), 0.9, 0.4)
            got = collect(subscriber, 3, timeout_s=5)
    assert subscriber.stats.lost == 5
    assert [m.body["seq"] for m in got] == [6, 7, 8]


def test_a_replay_outage_holds_messages_until_the_replay_answers(tmp_path):
    """Numbers are never skipped while a replay endpoint is configured: live messages after a
    gap wait until the (restarted) publisher's replay endpoint serves the gap."""
    spool_path = tmp_path / "spool.db"
    probe_context = zmq.Context()
    probe = probe_context.socket(zmq.ROUTER)
    probe.bind("tcp://127.0.0.1:*")
    replay_address = probe.last_endpoint.decode()
    probe_context.destroy(linger=0)  # a free port, where no replay answers yet
    first = Publisher(publisher_config(spool_path, replay_endpoint=None))
    address = first.publish_address
    for crop_id in range(1, 4):
        first.publish_alarm(make_tag(crop_id), 0.9, 0.4)
    wait_sent(first, 3)
    subscriber = Subscriber(
        address, replay_endpoint=replay_address, replay_timeout_s=0.2, retry_interval_s=0.2
    )
    second = None
    try:
        assert collect(subscriber, 1, timeout_s=0.8) == []  # heartbeat seen, replay failing
        for crop_id in range(4, 6):
            first.publish_alarm(make_tag(crop_id), 0.9, 0.4)
        assert collect(subscriber, 1, timeout_s=0.8) == []  # 4 and 5 held behind the gap
        assert subscriber.stats.replay_failures >= 1
        first.close()
        second = Publisher(
            publisher_config(spool_path, publish_endpoint=address, replay_endpoint=replay_address)
        )
        got = collect(subscriber, 5, timeout_s=5)
    finally:
        for publisher in (first, second):
            if publisher is not None:
                publisher.close()
        subscriber.close()
    assert [m.body["seq"] for m in got] == [1, 2, 3, 4, 5]
    assert subscriber.stats.lost == 0


class _Lines:
    """Read a child's stream on a thread, so a stopped child never blocks the test."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    def wait_for(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.lines) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.lines) >= count, f"{len(self.lines)} lines of {count}"

    def finish(self) -> list[str]:
        self._thread.join(10)
        return self.lines


def _edge_subscribe(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edge", "subscribe", *args],
        cwd=REPO_ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stopped_stats(stderr_lines: list[str]) -> dict:
    events = [json.loads(line) for line in stderr_lines if line.startswith("{")]
    return next(event for event in events if event["event"] == "subscriber_stopped")


def test_edge_subscribe_prints_json_lines_and_exits_zero_on_sigterm(tmp_path):
    heatmaps = tmp_path / "heatmaps"
    with Publisher(publisher_config(tmp_path / "spool.db")) as publisher:
        for crop_id in range(1, 4):
            publisher.publish_alarm(make_tag(crop_id), 0.9, 0.4, b"\x89PNG%d" % crop_id)
        publisher.publish_coverage_gap(
            CoverageGap.from_crops(make_tag(5), make_tag(9), "camera_stall", 0)
        )
        child = _edge_subscribe(
            publisher.publish_address,
            "--replay",
            publisher.replay_address,
            "--topic",
            "alarm/",
            "--topic",
            "coverage/",
            "--heatmaps",
            str(heatmaps),
            "--validate",
        )
        stdout, stderr = _Lines(child.stdout), _Lines(child.stderr)
        stdout.wait_for(4, timeout_s=15)
        child.send_signal(signal.SIGTERM)
        assert child.wait(10) == 0
    bodies = [json.loads(line) for line in stdout.finish()]
    for body in bodies:
        validate_message(f"{body['type']}/", body)
    assert sorted((body["type"], body["seq"]) for body in bodies) == [
        ("alarm", 1),
        ("alarm", 2),
        ("alarm", 3),
        ("coverage", 1),
    ]
    assert [body["seq"] for body in bodies if body["type"] == "alarm"] == [1, 2, 3]
    saved = sorted(path.name for path in heatmaps.iterdir())
    assert len(saved) == 3 and (heatmaps / saved[1]).read_bytes() == b"\x89PNG2"
    assert _stopped_stats(stderr.finish())["invalid"] == 0


def test_edge_subscribe_frozen_by_sigstop_ends_with_every_alarm_once_in_order(tmp_path):
    """SIGSTOP the subscriber process, publish 1200 alarms with heatmaps (far more than the
    SNDHWM of 50 plus the socket buffers hold, so the PUB drops), SIGCONT: the replay fills
    the hole and the duplicates are dropped."""
    config = publisher_config(tmp_path / "spool.db", sndhwm=50)
    heatmap = bytes(range(256)) * 32  # 8 kB
    total = 5 + 1200
    with Publisher(config) as publisher:
        child = _edge_subscribe(publisher.publish_address, "--replay", publisher.replay_address)
        stdout, stderr = _Lines(child.stdout), _Lines(child.stderr)
        try:
            for crop_id in range(1, 6):
                publisher.publish_alarm(make_tag(crop_id), 0.9, 0.4, heatmap)
            stdout.wait_for(5, timeout_s=15)
            child.send_signal(signal.SIGSTOP)
            for first in range(6, total + 1, 50):  # in batches, as the engine scores them
                batch = range(first, min(first + 50, total + 1))
                scored = [ScoredCrop(make_tag(i), 0.9, 0.4, heatmap) for i in batch]
                assert publisher.publish_alarms(scored) == list(batch)
            child.send_signal(signal.SIGCONT)
            stdout.wait_for(total, timeout_s=20)
            time.sleep(0.5)  # a heartbeat or two: nothing more may come
            child.send_signal(signal.SIGINT)
            assert child.wait(10) == 0
        finally:
            child.send_signal(signal.SIGCONT)
            child.kill()
            child.wait(10)
    bodies = [json.loads(line) for line in stdout.finish()]
    assert [body["seq"] for body in bodies] == list(range(1, total + 1))
    assert {(body["vehicle_id"], body["run_id"]) for body in bodies} == {
        (config.vehicle_id, config.run_id)
    }
    for body in bodies:
        validate_message("alarm/", body)
    stats = _stopped_stats(stderr.finish())
    assert stats["replayed"] > 0, "the PUB dropped nothing: the test did not test the replay"
    assert stats["live"] + stats["replayed"] == total and stats["lost"] == 0


def test_edge_subscribe_fetches_from_the_next_port_up_without_replay_flag(tmp_path):
    """A subscriber started after the alarms went out gets them from the replay endpoint,
    which it finds one port above the PUB endpoint, as the publisher binds it by default."""
    from pipeline_support import free_port

    port = free_port()
    config = publisher_config(
        tmp_path / "spool.db",
        publish_endpoint=f"tcp://127.0.0.1:{port}",
        replay_endpoint=f"tcp://127.0.0.1:{port + 1}",
    )
    with Publisher(config) as publisher:
        for crop_id in range(1, 4):
            publisher.publish_alarm(make_tag(crop_id), 0.9, 0.4, None)
        child = _edge_subscribe(f"tcp://127.0.0.1:{port}")
        stdout = _Lines(child.stdout)
        stdout.wait_for(3, timeout_s=15)
        child.send_signal(signal.SIGTERM)
        assert child.wait(10) == 0
    assert [json.loads(line)["seq"] for line in stdout.finish()] == [1, 2, 3]


@pytest.mark.parametrize("endpoint", ["tcp://*:5590", "notanendpoint", "tcp://127.0.0.1:99999"])
def test_edge_subscribe_refuses_an_endpoint_it_cannot_connect_to(endpoint):
    child = _edge_subscribe(endpoint)
    _, stderr = child.communicate(timeout=30)
    assert child.returncode == 2
    assert f"{endpoint!r} is not an endpoint to connect to" in stderr


def test_edge_subscribe_refuses_a_bad_replay_endpoint_or_a_file_for_heatmaps(tmp_path):
    child = _edge_subscribe("tcp://127.0.0.1:5590", "--replay", "nonsense")
    _, stderr = child.communicate(timeout=30)
    assert child.returncode == 2
    assert "'nonsense' is not an endpoint to connect to" in stderr
    notes = tmp_path / "notes.txt"
    notes.write_text("not a folder\n")
    child = _edge_subscribe("tcp://127.0.0.1:5590", "--heatmaps", str(notes))
    _, stderr = child.communicate(timeout=30)
    assert child.returncode == 8
    assert stderr.strip().splitlines()[-1] == (
        f"edge subscribe: {notes}: a file, not a folder (--heatmaps names the folder to write into)"
    )
