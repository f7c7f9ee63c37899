"""The SQLite spool: numbering, durability across reopen and SIGKILL, batches, sent marks."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import threading

import pytest
from publisher_support import child_env, python_command

from edge.publisher.schema import ALARM_TOPIC, COVERAGE_TOPIC, RunInfo
from edge.publisher.spool import Spool, SpoolError

pytestmark = pytest.mark.timeout(30)

RUN_A = RunInfo("TIV-07", "run-a")
RUN_B = RunInfo("TIV-07", "run-b")


def body(seq: int, _spooled_time: float = 0.0) -> bytes:
    return json.dumps({"seq": seq}).encode()


def test_numbers_are_per_stream_and_strictly_increasing(tmp_path):
    with Spool(tmp_path / "spool.db") as spool:
        got = {}
        for run, topic in [(RUN_A, ALARM_TOPIC), (RUN_B, ALARM_TOPIC), (RUN_A, COVERAGE_TOPIC)] * 4:
            got.setdefault((run.run_id, topic), []).append(spool.append(topic, run, body).seq)
        assert got == {
            ("run-a", ALARM_TOPIC): [1, 2, 3, 4],
            ("run-b", ALARM_TOPIC): [1, 2, 3, 4],
            ("run-a", COVERAGE_TOPIC): [1, 2, 3, 4],
        }
        stored = spool.alarms_from(RUN_A, 2)
        assert [m.seq for m in stored] == [2, 3, 4]
        assert [json.loads(m.body)["seq"] for m in stored] == [2, 3, 4]
        assert spool.last_seq(COVERAGE_TOPIC, "TIV-07", "run-a") == 4
        assert spool.last_seq(ALARM_TOPIC, "TIV-07", "no-such-run") == 0
        with pytest.raises(ValueError, match="not spooled"):
            spool.append("health/", RUN_A, body)


def test_spool_survives_reopen_in_wal_mode_with_full_sync(tmp_path):
    path = tmp_path / "spool.db"
    with Spool(path) as spool:
        for _ in range(5):
            spool.append(ALARM_TOPIC, RUN_A, body, heatmap_png=b"\x89PNG-heatmap")
        assert spool.mark_sent([(ALARM_TOPIC, "TIV-07", "run-a", seq) for seq in (1, 2)]) == 2
        pragmas = (
            spool._db.execute("PRAGMA journal_mode").fetchone()[0],
            spool._db.execute("PRAGMA synchronous").fetchone()[0],
        )
    assert pragmas == ("wal", 2)  # 2 is FULL
    with Spool(path) as spool:
        assert [m.seq for m in spool.unsent()] == [3, 4, 5]
        assert spool.alarms_from(RUN_A, 1)[0].heatmap_png == b"\x89PNG-heatmap"
        assert spool.alarms_from(RUN_A, 1)[0].sent_time is not None
        assert spool.append(ALARM_TOPIC, RUN_A, body).seq == 6


def test_a_failing_body_stores_nothing_and_uses_no_number(tmp_path):
    def broken(seq: int, _time: float) -> bytes:
        raise ValueError("score is NaN")

    with Spool(tmp_path / "spool.db") as spool:
        spool.append(ALARM_TOPIC, RUN_A, body)
        with pytest.raises(ValueError, match="NaN"):
            spool.append(ALARM_TOPIC, RUN_A, broken)
        assert spool.append(ALARM_TOPIC, RUN_A, body).seq == 2
        assert [m.seq for m in spool.alarms_from(RUN_A, 1)] == [1, 2]


def test_batches_are_bounded_by_count_and_bytes(tmp_path):
    with Spool(tmp_path / "spool.db") as spool:
        for _ in range(10):
            spool.append(ALARM_TOPIC, RUN_A, body, heatmap_png=b"x" * 1000)
        assert [m.seq for m in spool.alarms_from(RUN_A, 3, limit=4)] == [3, 4, 5, 6]
        # Each message is 1000 + len(body) bytes: 2500 bytes hold two of them.
        assert [m.seq for m in spool.alarms_from(RUN_A, 1, max_bytes=2500)] == [1, 2]
        # One message over the limit is still returned, alone.
        assert [m.seq for m in spool.alarms_from(RUN_A, 9, max_bytes=10)] == [9]
        assert spool.alarms_from(RUN_A, 11) == []


def test_sent_marks_keep_the_first_time_and_unsent_is_in_order(tmp_path):
    with Spool(tmp_path / "spool.db") as spool:
        for run in (RUN_B, RUN_A, RUN_B):
            spool.append(ALARM_TOPIC, run, body)
        keys = [(ALARM_TOPIC, "TIV-07", "run-b", 1)]
        assert spool.mark_sent(keys, sent_time=100.0) == 1
        assert spool.mark_sent(keys, sent_time=200.0) == 0
        assert spool.read_from(ALARM_TOPIC, "TIV-07", "run-b", 1)[0].sent_time == 100.0
        assert [(m.run_id, m.seq) for m in spool.unsent()] == [("run-a", 1), ("run-b", 2)]
        assert spool.count_unsent() == 2


def test_deleting_a_run_keeps_its_numbering(tmp_path):
    with Spool(tmp_path / "spool.db") as spool:
        for _ in range(3):
            spool.append(ALARM_TOPIC, RUN_A, body)
        assert spool.delete_run("TIV-07", "run-a") == 3
        assert spool.alarms_from(RUN_A, 1) == []
        assert spool.append(ALARM_TOPIC, RUN_A, body).seq == 4


def test_concurrent_writers_never_share_a_number(tmp_path):
    path = tmp_path / "spool.db"
    Spool(path).close()
    numbers: dict[int, list[int]] = {}

    def writer(index: int) -> None:
        with Spool(path) as spool:
            numbers[index] = [spool.append(ALARM_TOPIC, RUN_A, body).seq for _ in range(40)]

    threads = [threading.Thread(target=writer, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = sorted(seq for own in numbers.values() for seq in own)
    assert everything == list(range(1, 161))
    assert all(own == sorted(own) for own in numbers.values())


def test_a_file_that_is_not_a_spool_is_refused_by_name(tmp_path):
    path = tmp_path / "spool.db"
    path.write_bytes(b"this is not an SQLite database" * 100)
    with pytest.raises(SpoolError, match="spool.db"):
        Spool(path)


WRITER = """
import sys
from edge.publisher.schema import RunInfo
from edge.publisher.spool import Spool

spool = Spool(sys.argv[1])
run = RunInfo("TIV-07", "run-a")
png = bytes(range(256)) * 64
count = 0
while True:
    message = spool.append("alarm/", run, lambda seq, t: b'{"seq": %d}' % seq, png)
    sys.stdout.write(f"{message.seq}\\n")
    sys.stdout.flush()
    count += 1
    if count % 5 == 0:
        spool.mark_sent([message.key])
"""


def test_sigkill_mid_write_loses_nothing_acknowledged(tmp_path):
    path = tmp_path / "spool.db"
    child = subprocess.Popen(
        [*python_command(WRITER), str(path)], stdout=subprocess.PIPE, env=child_env(), text=True
    )
    acknowledged = []
    try:
        while len(acknowledged) < 300:
            line = child.stdout.readline()
            assert line, "the writer died before being killed"
            acknowledged.append(int(line))
        child.send_signal(signal.SIGKILL)
        acknowledged += [int(line) for line in child.stdout.read().split()]
    finally:
        child.kill()
        child.wait(10)
    assert child.returncode == -signal.SIGKILL
    assert acknowledged == list(range(1, len(acknowledged) + 1))
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    check.close()
    with Spool(path) as spool:
        stored = spool.alarms_from(RUN_A, 1, limit=100_000)
        last = spool.last_seq(ALARM_TOPIC, "TIV-07", "run-a")
        # Everything acknowledged is there; at most the one commit the kill cut off from stdout.
        assert [m.seq for m in stored] == list(range(1, last + 1))
        assert len(acknowledged) <= last <= len(acknowledged) + 1
        assert all(json.loads(m.body)["seq"] == m.seq for m in stored)
        assert all(m.heatmap_png == bytes(range(256)) * 64 for m in stored)
        assert spool.append(ALARM_TOPIC, RUN_A, body).seq == last + 1
