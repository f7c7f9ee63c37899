"""Live mode and the restart limit of ``edge run``, over real processes and sockets.

- Live mode never blocks the camera: with room for one crop in flight, most crops of each
  rail seat find the window full and are dropped; every drop must be counted and reported on
  ``coverage/`` with its mileage range, and nothing in the gaps may be invented as an alarm.
- A stalled child (SIGSTOP) is killed and restarted; one failure more than
  ``restarts.max_restarts`` ends the service with ExitStatus.SERVICE_FAILED (11).
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from pipeline_support import artifacts, edge_command, free_port, start

from edge.errors import ExitStatus
from edge.publisher import Subscriber

pytestmark = pytest.mark.slow


def _config(tmp_path, shared, port: int, **changes) -> str:
    calibration = shared.detector.calibration / "TIV-test"
    config = {
        "vehicle_id": "TIV-test",
        "run_id": "live-1",
        "source": str(shared.defects),
        "geometry": str(calibration / "cam0.geometry.json"),
        "thresholds": str(calibration / "cam0.thresholds.json"),
        "model": str(shared.detector.model),
        "mode": "live",
        "publish_endpoint": f"tcp://127.0.0.1:{port}",
        "replay_endpoint": f"tcp://127.0.0.1:{port + 1}",
        "spool_path": str(tmp_path / "spool.db"),
        "publisher_heartbeat_s": 0.3,
        "linger_ms": 500,
        "timing": {"heartbeat_interval_s": 0.1, "unhealthy_after_s": 0.5, "stall_timeout_s": 5},
    }
    config.update(changes)
    path = tmp_path / "edge.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.timeout(120)
def test_live_mode_drops_what_the_engine_cannot_take_and_reports_coverage_gaps(
    tmp_path_factory, tmp_path
):
    shared = artifacts(tmp_path_factory)
    port = free_port()
    config = _config(tmp_path, shared, port, max_in_flight=1)
    subscriber = Subscriber(
        f"tcp://127.0.0.1:{port}",
        topics=("alarm/", "coverage/"),
        replay_endpoint=f"tcp://127.0.0.1:{port + 1}",
        validate=True,
    )
    process, _, stderr = start(edge_command("run", "--config", config))
    messages = []
    try:
        deadline = time.monotonic() + 90
        while process.poll() is None and time.monotonic() < deadline:
            messages += subscriber.poll(0.1)
        assert process.wait(5) == 0, "\n".join(stderr.snapshot()[-20:])
        messages += subscriber.poll(1.0)  # what the publisher's last heartbeat announced
    finally:
        process.kill()
        process.wait(10)
        subscriber.close()
    stopped = stderr.events("service_stopped")[0]
    gaps = [m.body for m in messages if m.topic == "coverage/"]
    alarms = [m.body for m in messages if m.topic == "alarm/"]
    # Drops happened, each one counted in a gap; with what was scored they make every crop.
    assert stopped["crops_dropped"] > 0 and stopped["coverage_gaps"] == len(gaps) > 0
    assert sum(gap["crops_dropped"] for gap in gaps) == stopped["crops_dropped"]
    assert stopped["crops"] + stopped["crops_dropped"] == 216
    assert [gap["seq"] for gap in gaps] == list(range(1, len(gaps) + 1))
    assert all(gap["reason"] == "engine_behind" for gap in gaps)
    # Gaps carry their mileage range, in order along the run, without overlap.
    previous_end = 0.0
    for gap in gaps:
        start_m, end_m = gap["start"]["mileage"]["mileage_m"], gap["end"]["mileage"]["mileage_m"]
        assert 12_300.0 <= start_m <= end_m <= 12_333.0
        assert gap["start"]["along_track_m"] >= previous_end
        previous_end = gap["end"]["along_track_m"]
    # Every alarm is a true defect, and every defect not alarmed lies in a gap.
    keys = {(d["rail"], d["side"], round(d["mileage_m"], 1)) for d in shared.truth}
    for alarm in alarms:
        key = (alarm["rail"], alarm["side"], round(alarm["mileage"]["mileage_m"], 1))
        assert key in keys
    alarmed = {(a["rail"], a["side"], round(a["mileage"]["mileage_m"], 1)) for a in alarms}
    for defect in shared.truth:
        if (defect["rail"], defect["side"], round(defect["mileage_m"], 1)) in alarmed:
            continue
        assert any(
            gap["start"]["mileage"]["mileage_m"] - 0.01
            <= defect["mileage_m"]
            <= gap["end"]["mileage"]["mileage_m"] + 0.01
            for gap in gaps
        ), defect


@pytest.mark.timeout(120)
def test_a_stalled_child_is_restarted_and_one_failure_too_many_ends_with_status_11(
    tmp_path_factory, tmp_path
):
    shared = artifacts(tmp_path_factory)
    config = _config(
        tmp_path,
        shared,
        free_port(),
        mode="replay",
        pace="realtime",
        timing={"heartbeat_interval_s": 0.1, "unhealthy_after_s": 0.5, "stall_timeout_s": 1.5},
        restarts={"max_restarts": 1, "window_s": 60},
    )
    process, _, stderr = start(edge_command("run", "--config", config))
    try:
        first = stderr.wait_event("child_ready", 60, where=lambda e: e.get("child") == "engine")
        stderr.wait_event("child_ready", 60, where=lambda e: e.get("child") == "grabber")
        os.kill(first["pid"], signal.SIGSTOP)  # a stall: alive, silent
        second = stderr.wait_event(
            "child_ready",
            30,
            where=lambda e: e.get("child") == "engine" and e["generation"] == 1,
        )
        os.kill(second["pid"], signal.SIGKILL)
        status = process.wait(30)
    finally:
        process.kill()
        process.wait(10)
    restarts = stderr.events("child_restarting")
    assert len(restarts) == 1 and "stalled" in restarts[0]["reason"]
    assert status == ExitStatus.SERVICE_FAILED == 11
    message = [line for line in stderr.finish() if line.startswith("edge run: ")]
    assert len(message) == 1 and "the engine failed 2 times within 60 s" in message[0]
    with pytest.raises(ProcessLookupError):
        os.kill(first["pid"], 0)  # the stalled engine was killed, not left behind
