"""``edge run --config`` as systemd runs it, and the units in systemd/.

The service reads the generated recording with known defects (paced to its recorded speed, so
a run lasts 6.6 s) and tells a notify socket bound by the test what systemd would hear:
READY=1, WATCHDOG=1 (withheld while the engine is frozen), STOPPING=1 on SIGTERM; then it must
exit 0 within its stop timeout with the spool intact, and a restart with the same config must
finish the run so that a subscriber gets every alarm of the recording once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pipeline_support import REPO_ROOT, artifacts, edge_command, free_port, match_alarms, start

from edge.config import ConfigError
from edge.errors import ConfigInvalidError, ExitStatus
from edge.pipeline.notify import SystemdNotifier
from edge.pipeline.service import (
    ServiceConfig,
    load_config,
    thresholds_warnings_at_start,
)
from edge.publisher import Subscriber, validate_message
from edge.publisher.spool import Spool, check_spool

UNITS = ("diff-fastener-edge.service", "diff-fastener-edge-engine.service")
STOP_TIMEOUT_S = 8.0


class NotifySocket:
    """A real AF_UNIX datagram socket, as systemd's; keeps ``(monotonic time, text)``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(path))
        self.socket.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.socket.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def times(self, assignment: str) -> list[float]:
        return [t for t, text in list(self.messages) if assignment in text.split("\n")]

    def wait(self, assignment: str, timeout_s: float, count: int = 1) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            times = self.times(assignment)
            if len(times) >= count:
                return times[count - 1]
            time.sleep(0.02)
        raise TimeoutError(f"{assignment} x{count} not seen within {timeout_s} s")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.socket.close()


def _config(tmp_path: Path, shared, port: int) -> Path:
    calibration = shared.detector.calibration / "TIV-test"
    config = {
        "vehicle_id": "TIV-test",
        "run_id": "service-1",
        "source": str(shared.defects),
        "geometry": str(calibration / "cam0.geometry.json"),
        "thresholds": str(calibration / "cam0.thresholds.json"),
        "model": str(shared.detector.model),
        "mode": "replay",
        "pace": "realtime",
        "publish_endpoint": f"tcp://127.0.0.1:{port}",
        "replay_endpoint": f"tcp://127.0.0.1:{port + 1}",
        "spool_path": "spool/alarms.db",
        "publisher_heartbeat_s": 0.3,
        "linger_ms": 500,
        "timing": {
            "heartbeat_interval_s": 0.1,
            "unhealthy_after_s": 0.5,
            "stall_timeout_s": 6.0,
            "stop_timeout_s": STOP_TIMEOUT_S,
        },
        "restarts": {"max_restarts": 3, "window_s": 60},
    }
    path = tmp_path / "edge.json"
    path.write_text(json.dumps(config, indent=2))
    return path


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_service_notifies_drains_on_sigterm_and_finishes_the_run_after_a_restart(
    tmp_path_factory, tmp_path
):
    shared = artifacts(tmp_path_factory)
    port = free_port()
    config = _config(tmp_path, shared, port)
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "300000"}
    process, _, stderr = start(edge_command("run", "--config", str(config)), **env)
    try:
        # 1. READY after the engine's self-test, then WATCHDOG every 0.15 s.
        ready = notify.wait("READY=1", timeout_s=60)
        self_test = stderr.wait_event("engine_ready", 5)
        notified = stderr.wait_event("pipeline_ready", 5)  # logged right after READY=1
        assert self_test["timestamp"] < notified["timestamp"] and self_test["self_test_s"] > 0
        notify.wait("WATCHDOG=1", timeout_s=5, count=3)
        # 2. The engine frozen: no WATCHDOG while its heartbeat is stale; back after SIGCONT.
        engine = stderr.wait_event("child_ready", 5, where=lambda e: e.get("child") == "engine")
        os.kill(engine["pid"], signal.SIGSTOP)
        frozen_at = time.monotonic()
        time.sleep(1.5)
        os.kill(engine["pid"], signal.SIGCONT)
        thawed_at = time.monotonic()
        resumed = notify.wait("WATCHDOG=1", timeout_s=3, count=len(notify.times("WATCHDOG=1")) + 1)
        withheld = [t for t in notify.times("WATCHDOG=1") if frozen_at + 0.7 < t < thawed_at]
        assert withheld == [], "WATCHDOG=1 sent while the engine was frozen"
        assert resumed - thawed_at < 1.0
        assert stderr.events("watchdog_withheld")
        # 3. Some alarms, then SIGTERM: STOPPING, then exit 0 within the stop timeout.
        deadline = time.monotonic() + 20
        while len(stderr.events("alarm_spooled")) < 3:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        terminated = time.monotonic()
        status = process.wait(STOP_TIMEOUT_S + 5)
        stopped_in = time.monotonic() - terminated
        stopping = notify.wait("STOPPING=1", timeout_s=1)
    finally:
        process.kill()
        process.wait(10)
        notify.close()
    assert status == 0, "\n".join(stderr.snapshot()[-20:])
    assert stopped_in < STOP_TIMEOUT_S and stopping - terminated < 1.0
    assert ready < stopping
    assert not stderr.events("child_killed_at_stop")
    summary = stderr.events("service_stopped")[0]
    assert summary["stopped_by"] == "SIGTERM" and summary["restarts"] == 0
    # 4. The spool is intact: consistent, numbered 1..k, each alarm valid and of its own crop.
    spool_path = tmp_path / "spool" / "alarms.db"
    with sqlite3.connect(spool_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with Spool(spool_path) as spool:
        first = spool.read_from("alarm/", "TIV-test", "service-1", 1, limit=1000)
    bodies = [json.loads(message.body) for message in first]
    assert [body["seq"] for body in bodies] == list(range(1, len(bodies) + 1))
    assert 3 <= len(bodies) < len(shared.truth), "the stop did not fall in the run"
    assert len({body["crop"]["crop_id"] for body in bodies}) == len(bodies)
    for body in bodies:
        validate_message("alarm/", body)
    # 5. Restart with the same config: a subscriber from the start of the run gets every
    # alarm once (those spooled before the stop by replay, unsent ones from the spool, the
    # rest live); the recording read again raises no alarm twice.
    subscriber = Subscriber(
        f"tcp://127.0.0.1:{port}", replay_endpoint=f"tcp://127.0.0.1:{port + 1}", validate=True
    )
    process, _, stderr = start(edge_command("run", "--config", str(config)))
    delivered = []
    try:
        deadline = time.monotonic() + 90
        while process.poll() is None and time.monotonic() < deadline:
            delivered += [m for m in subscriber.poll(0.1) if m.topic == "alarm/"]
        delivered += [m for m in subscriber.poll(0.5) if m.topic == "alarm/"]
        assert process.wait(5) == 0, "\n".join(stderr.snapshot()[-20:])
    finally:
        process.kill()
        process.wait(10)
        subscriber.close()
    alarms = [message.body for message in delivered]
    assert [body["seq"] for body in alarms] == list(range(1, len(shared.truth) + 1))
    matched = match_alarms(shared.truth, alarms)
    assert matched["missed"] == [] and matched["extra"] == []
    assert [body["crop"]["crop_id"] for body in alarms[: len(bodies)]] == [
        body["crop"]["crop_id"] for body in bodies
    ]
    with Spool(spool_path) as spool:
        assert spool.count_unsent() == 0
        assert spool.last_seq("alarm/", "TIV-test", "service-1") == len(shared.truth)
    ready_event = stderr.events("publisher_ready")[0]
    assert ready_event["alarms_in_spool"] == len(bodies)


@pytest.mark.timeout(30)
def test_systemd_analyze_verify_passes_on_the_units():
    """``systemd-analyze verify`` exits 0 even on an unknown key (it only warns), so any output
    at all fails the test too."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    units = [str(REPO_ROOT / "systemd" / unit) for unit in UNITS]
    result = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, timeout=25)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr
    service = (REPO_ROOT / "systemd" / UNITS[0]).read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "StartLimitIntervalSec=",
        "StartLimitBurst=",
        "KillMode=mixed",
        "TimeoutStopSec=",
        "StateDirectory=",
        "Wants=diff-fastener-edge-engine.service",
    ):
        assert f"\n{line}" in service, line
    assert "\nPrivateDevices=" not in service  # it would hide the GPU
    builder = (REPO_ROOT / "systemd" / UNITS[1]).read_text()
    assert "\nType=oneshot" in builder and "\nWatchdogSec=" not in builder
    assert "\nBefore=diff-fastener-edge.service" in builder


@pytest.mark.timeout(30)
def test_the_example_config_loads_and_a_misspelt_key_is_refused(tmp_path):
    example = load_config(REPO_ROOT / "systemd" / "diff-fastener-edge.json")
    assert example.mode == "live" and example.timing.stop_timeout_s < 30  # TimeoutStopSec
    settings = example.pipeline_settings()
    assert settings.grabber.mode == "live" and settings.publisher.vehicle_id == "demo-vehicle"
    data = json.loads((REPO_ROOT / "systemd" / "diff-fastener-edge.json").read_text())
    data["max_in_fligth"] = 8
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="max_in_fligth"):
        ServiceConfig.load(bad)
    # Relative paths are taken from the config file's folder.
    data.pop("max_in_fligth")
    data["spool_path"] = "spool/alarms.db"
    (tmp_path / "edge.json").write_text(json.dumps(data))
    assert load_config(tmp_path / "edge.json").spool_path == tmp_path / "spool" / "alarms.db"
    # The engine's own cores, as a list or as taskset writes them, reach the supervisor's
    # settings; an empty list, a core this machine lacks or garbage are refused, naming the file.
    last = max(os.sched_getaffinity(0))
    for given in ([last], str(last), f"{last}-{last}"):
        data["engine_cpus"] = given
        (tmp_path / "edge.json").write_text(json.dumps(data))
        assert load_config(tmp_path / "edge.json").pipeline_settings().engine_cpus == (last,)
    for given, problem in (
        ([], "engine_cpus: Tuple should have at least 1 item"),
        ([last + 1], f"engine_cpus {last + 1}: core\\(s\\) {last + 1} not usable here"),
        ("x", "engine_cpus: Value error, 'x' is not a core list"),
    ):
        data["engine_cpus"] = given
        (tmp_path / "edge.json").write_text(json.dumps(data))
        with pytest.raises(ConfigInvalidError, match=f"^{tmp_path / 'edge.json'}: {problem}"):
            load_config(tmp_path / "edge.json")


@pytest.mark.timeout(30)
def test_the_service_warns_of_thresholds_fitted_for_another_camera_than_its_geometry(tmp_path):
    data = json.loads((REPO_ROOT / "systemd" / "diff-fastener-edge.json").read_text())
    calibration = REPO_ROOT / "calibration" / "demo-vehicle"
    geometry = json.loads((calibration / "cam0.geometry.json").read_text())
    (tmp_path / "cam1.geometry.json").write_text(json.dumps({**geometry, "camera_id": "cam1"}))
    data.update(geometry="cam1.geometry.json", thresholds=str(calibration / "cam0.thresholds.json"))
    (tmp_path / "edge.json").write_text(json.dumps(data))
    [warning] = thresholds_warnings_at_start(load_config(tmp_path / "edge.json"))
    assert warning.endswith(
        "was fitted for vehicle demo-vehicle, camera cam0; it is used on vehicle demo-vehicle, "
        "camera cam1: its false-alarm rate does not carry over"
    )
    data["geometry"] = str(calibration / "cam0.geometry.json")
    (tmp_path / "edge.json").write_text(json.dumps(data))
    assert thresholds_warnings_at_start(load_config(tmp_path / "edge.json")) == []
    # A geometry file that cannot be read stops the service at start, naming it.
    (tmp_path / "cam1.geometry.json").write_text("{")
    data["geometry"] = "cam1.geometry.json"
    (tmp_path / "edge.json").write_text(json.dumps(data))
    with pytest.raises(ConfigInvalidError, match=f"^{tmp_path / 'cam1.geometry.json'}: not valid"):
        thresholds_warnings_at_start(load_config(tmp_path / "edge.json"))


def test_a_spool_path_that_cannot_be_a_spool_stops_the_service_at_start_naming_it(tmp_path):
    data = json.loads((REPO_ROOT / "systemd" / "diff-fastener-edge.json").read_text())
    (tmp_path / "spool").write_text("not a folder\n")
    data["spool_path"] = "spool/alarms.db"
    (tmp_path / "edge.json").write_text(json.dumps(data))
    config = load_config(tmp_path / "edge.json")
    with pytest.raises(ConfigInvalidError) as caught:
        check_spool(config.spool_path, f"spool_path in {tmp_path / 'edge.json'}")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'spool' / 'alarms.db'}: cannot open the spool (")
    assert message.endswith(f"(spool_path in {tmp_path / 'edge.json'})")
    assert caught.value.exit_status == ExitStatus.CONFIG_INVALID
    # A spool that can be opened is left as a real spool, and opening it again works.
    data["spool_path"] = "spool-ok/alarms.db"
    (tmp_path / "edge.json").write_text(json.dumps(data))
    check_spool(load_config(tmp_path / "edge.json").spool_path, "spool_path")
    assert (tmp_path / "spool-ok" / "alarms.db").stat().st_size > 0


def test_the_log_level_is_the_configs_else_the_env_files(tmp_path, monkeypatch):
    data = json.loads((REPO_ROOT / "systemd" / "diff-fastener-edge.json").read_text())
    (tmp_path / "edge.json").write_text(json.dumps(data))
    monkeypatch.setenv("EDGE_LOG_LEVEL", "warning")
    assert load_config(tmp_path / "edge.json").pipeline_settings().log_level == "warning"
    monkeypatch.delenv("EDGE_LOG_LEVEL")
    assert load_config(tmp_path / "edge.json").level() == "info"
    monkeypatch.setenv("EDGE_LOG_LEVEL", "warning")
    data["log_level"] = "debug"
    (tmp_path / "edge.json").write_text(json.dumps(data))
    assert load_config(tmp_path / "edge.json").pipeline_settings().log_level == "debug"
    data["log_level"] = "verbose"
    (tmp_path / "edge.json").write_text(json.dumps(data))
    with pytest.raises(ConfigInvalidError, match="log_level"):
        load_config(tmp_path / "edge.json")


def test_notifier_sends_to_an_abstract_socket_and_halves_the_watchdog_period():
    name = f"edge-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(2)
    try:
        notifier = SystemdNotifier(
            {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}
        )
        assert notifier.watchdog_interval_s is None  # the watchdog is meant for PID 1
        notifier = SystemdNotifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "2000000"})
        assert notifier.watchdog_interval_s == pytest.approx(1.0)
        assert notifier.ready("up")
        assert server.recv(4096) == b"READY=1\nSTATUS=up"
        assert notifier.stopping()
        assert server.recv(4096) == b"STOPPING=1"
        notifier.close()
    finally:
        server.close()
    assert not SystemdNotifier({}).watchdog()  # no NOTIFY_SOCKET: nothing sent, no error
