"""Subscribers that join late or freeze: every alarm exactly once, over real processes.

A long generated recording (7 strips, 1512 fasteners) is replayed with a threshold under every
score, so every crop is an alarm. Two ``edge subscribe`` processes follow it: one is frozen
with SIGSTOP after its first alarm while more than 1000 further alarms are published (the PUB
drops what its high-water mark, 100 here, and the socket buffers cannot hold), the other
starts only once those alarms are out. Both must end with every alarm once, in order, through
the replay endpoint and their de-duplication.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
from pipeline_support import artifacts, edge_command, free_port, replay_command, start

pytestmark = pytest.mark.slow

FROZEN_FOR = 1001  # alarms published while the first subscriber is stopped


def _alarm_lines(lines) -> int:
    return sum(line.startswith("ALARM #") for line in lines.snapshot())


def _bodies(lines: list[str]) -> list[dict]:
    return [json.loads(line) for line in lines if line.startswith("{")]


def _wait_for_lines(lines, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while len(lines.snapshot()) < count and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.mark.timeout(240)
def test_late_and_frozen_subscribers_each_get_every_alarm_once(tmp_path_factory):
    shared = artifacts(tmp_path_factory)
    port = free_port()
    publish, replay = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"
    subscribe = ("subscribe", f"tcp://127.0.0.1:{port}", "--replay", replay, "--validate")
    frozen, frozen_out, frozen_err = start(edge_command(*subscribe))
    run, run_out, run_err = start(
        replay_command(
            str(shared.long),
            "--model",
            str(shared.detector.model),
            "--calibration",
            str(shared.low_calibration),
            "--publish",
            publish,
            "--wait-for-subscriber",
            "30",
            "--serve-after",
            "5",
            "--sndhwm",
            "100",
            "--json",
        )
    )
    late = None
    try:
        # 1. The first subscriber sees an alarm, then is frozen.
        _wait_for_lines(frozen_out, 1, timeout_s=60)
        assert frozen_out.snapshot(), "\n".join(run_err.snapshot()[-20:])
        frozen.send_signal(signal.SIGSTOP)
        stopped_at = _alarm_lines(run_err)
        # 2. More than 1000 alarms go out while it is stopped; then the second one starts.
        deadline = time.monotonic() + 120
        while _alarm_lines(run_err) < stopped_at + FROZEN_FOR:
            assert time.monotonic() < deadline and run.poll() is None, "run ended too early"
            time.sleep(0.05)
        late, late_out, late_err = start(edge_command(*subscribe))
        frozen.send_signal(signal.SIGCONT)
        # 3. The run ends (after serving replays for 5 s); both have every alarm.
        assert run.wait(120) == 0, "\n".join(run_err.snapshot()[-20:])
        total = len(json.loads(run_out.finish()[-1])["alarms"])
        for out in (frozen_out, late_out):
            _wait_for_lines(out, total, timeout_s=20)
        for process in (frozen, late):
            process.send_signal(signal.SIGINT)
            assert process.wait(15) == 0
    finally:
        for process in (run, frozen, late):
            if process is not None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                process.wait(10)
    assert total == 7 * 216 and total - stopped_at >= FROZEN_FOR
    for out in (frozen_out, late_out):
        bodies = _bodies(out.finish())
        assert [body["seq"] for body in bodies] == list(range(1, total + 1))
        assert len({body["crop"]["crop_id"] for body in bodies}) == total
    stats = {
        name: next(
            json.loads(line)
            for line in err.finish()
            if line.startswith("{") and '"subscriber_stopped"' in line
        )
        for name, err in (("frozen", frozen_err), ("late", late_err))
    }
    # The frozen one lost messages on the PUB side and fetched them; the late one started
    # after the first thousand were out and fetched those.
    assert stats["frozen"]["replayed"] > 0 and stats["frozen"]["lost"] == 0
    assert stats["late"]["replayed"] >= FROZEN_FOR and stats["late"]["lost"] == 0
    assert stats["frozen"]["invalid"] == stats["late"]["invalid"] == 0
