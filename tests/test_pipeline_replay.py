"""``edge-replay`` on a generated recording with known defects, over real processes and sockets.

One replay (the ``defects_run`` fixture) feeds three tests: the alarms a plain pyzmq SUB socket
receives, the ``--json`` summary, and the ``--report`` folder. A fourth replay kills the engine
process mid-run and must end with the same alarms. The detector is the z-score baseline
exported as ONNX (why: tests/pipeline_support.py).
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import time
from html.parser import HTMLParser

import cv2
import numpy as np
import pytest
import zmq
from pipeline_support import (
    artifacts,
    free_port,
    match_alarms,
    replay_command,
    start,
)

from edge.publisher import Subscriber
from edge.publisher.schema import validate_message

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return artifacts(tmp_path_factory)


def _replay_args(shared, *extra: str) -> list[str]:
    return [
        str(shared.defects),
        "--model",
        str(shared.detector.model),
        "--calibration",
        str(shared.detector.calibration),
        "--heatmap-vmax",
        "8",
        *extra,
    ]


@pytest.fixture(scope="module")
def defects_run(shared, tmp_path_factory):
    """One replay with ``--publish``, ``--report`` and ``--json``; a plain SUB (no project
    code) connected before it starts, which the publisher waits for."""
    port = free_port()
    report = tmp_path_factory.mktemp("report")
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"alarm/")
    sub.connect(f"tcp://127.0.0.1:{port}")
    command = replay_command(
        *_replay_args(
            shared,
            "--publish",
            f"tcp://127.0.0.1:{port}",
            "--wait-for-subscriber",
            "20",
            "--report",
            str(report),
            "--json",
        )
    )
    started = time.monotonic()
    process, stdout, stderr = start(command)
    received: list[list[bytes]] = []
    try:
        while process.poll() is None and time.monotonic() - started < 100:
            if sub.poll(100):
                received.append(sub.recv_multipart())
        while sub.poll(300):  # anything still in flight after the exit
            received.append(sub.recv_multipart())
    finally:
        process.kill()
        process.wait(10)
        sub.close()
        context.term()
    out = stdout.finish()
    return {
        "status": process.returncode,
        "received": received,
        "summary": json.loads(out[-1]) if out else None,
        "stderr": stderr.finish(),
        "report": report,
        "seconds": time.monotonic() - started,
    }


@pytest.mark.timeout(150)
def test_plain_sub_receives_exactly_the_expected_alarms(shared, defects_run):
    assert defects_run["status"] == 0, "\n".join(defects_run["stderr"][-20:])
    received = defects_run["received"]
    assert all(frames[0] == b"alarm/" for frames in received)
    bodies = [json.loads(frames[1]) for frames in received]
    for body in bodies:
        validate_message("alarm/", body)
    # Every alarm once, numbered 1..n in order, for the recording's run.
    assert [body["seq"] for body in bodies] == list(range(1, len(bodies) + 1))
    assert {(body["vehicle_id"], body["run_id"]) for body in bodies} == {("TIV-test", "defects-1")}
    assert len({body["crop"]["crop_id"] for body in bodies}) == len(bodies)
    # Exactly the drawn defects: rail, side, and mileage within 1 m, one to one.
    matched = match_alarms(shared.truth, bodies, tolerance_m=1.0)
    assert matched["missed"] == [] and matched["extra"] == []
    assert len(bodies) == len(shared.truth) == 28
    assert matched["max_error_m"] < 0.1  # the finder's centres are within a few mm
    # Each message carries its heatmap overlay as a decodable 64 x 64 colour PNG.
    for frames in received:
        assert len(frames) == 3 and json.loads(frames[1])["has_heatmap"] is True
        image = cv2.imdecode(np.frombuffer(frames[2], np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (64, 64, 3)
    # Scores over the threshold, the model's id in every alarm.
    assert all(body["image_score"] > body["threshold"] for body in bodies)
    assert {body["model_id"] for body in bodies} == {shared.detector.model_id}


@pytest.mark.timeout(150)
def test_json_summary_matches_what_was_published(shared, defects_run):
    summary = defects_run["summary"]
    assert summary is not None and summary["error"] is None and summary["exit_status"] == 0
    published = [json.loads(frames[1]) for frames in defects_run["received"]]
    assert [(a["seq"], a["crop_id"]) for a in summary["alarms"]] == [
        (body["seq"], body["crop"]["crop_id"]) for body in published
    ]
    assert summary["frames"] == 16
    # Every fastener drawn was cut once: 54 seats, 2 rails, 2 sides.
    assert summary["crops"] == len(shared.truth) + shared.normal_crops_in_defects == 216
    assert summary["coverage_gaps"] == [] and summary["truncated"] is False
    assert summary["backend"]["backend"] == "onnxruntime"
    assert summary["backend"]["device"] == "cpu"
    assert summary["model_id"] == shared.detector.model_id
    assert summary["threshold"] == pytest.approx(shared.detector.threshold)
    assert summary["crops_per_second"] > 0 and summary["engine_crops_per_second"] > 0
    assert summary["restarts"] == {"engine": 0, "publisher": 0, "grabber": 0}
    for alarm in summary["alarms"]:
        assert alarm["km_post"] == 12 and 300.0 <= alarm["metres"] <= 333.0


class _Sources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])


@pytest.mark.timeout(150)
def test_report_folder_holds_the_alarms(defects_run):
    report = defects_run["report"]
    alarms = defects_run["summary"]["alarms"]
    parser = _Sources()
    parser.feed((report / "index.html").read_text(encoding="utf-8"))
    # One crop, reconstruction and heatmap per alarm, plus the score plot; all exist as PNG.
    assert "scores.png" in parser.images
    per_alarm = [src for src in parser.images if src.startswith("alarms/")]
    assert len(per_alarm) == 3 * len(alarms)
    for kind in ("crop", "reconstruction", "heatmap"):
        assert sum(src.endswith(f"-{kind}.png") for src in per_alarm) == len(alarms)
    for src in parser.images:
        assert (report / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
    assert {"alarms.csv", "alarms.geojson"} <= set(parser.links)
    # The reconstruction of the baseline is its mean crop: the same picture for every alarm.
    reconstructions = {(report / src).read_bytes() for src in per_alarm if "reconstruction" in src}
    assert len(reconstructions) == 1
    # CSV and GeoJSON hold the alarms.
    with (report / "alarms.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(int(row["seq"]), row["rail"], row["side"]) for row in rows] == [
        (a["seq"], a["rail"], a["side"]) for a in alarms
    ]
    assert [float(row["mileage_m"]) for row in rows] == pytest.approx(
        [a["mileage_m"] for a in alarms]
    )
    # crops.csv: every crop once, along the track; the alarms are the crops over the threshold.
    with (report / "crops.csv").open(newline="", encoding="utf-8") as handle:
        crops = list(csv.DictReader(handle))
    assert len(crops) == defects_run["summary"]["crops"]
    along = [float(row["along_track_m"]) for row in crops]
    assert along == sorted(along)
    threshold = defects_run["summary"]["threshold"]
    over = sorted(int(row["seq"]) for row in crops if float(row["score"]) > threshold)
    assert over == [a["seq"] for a in alarms]
    assert all(row["seq"] == "" for row in crops if float(row["score"]) <= threshold)
    assert {row["scored"] for row in crops} == {"True"}
    geojson = json.loads((report / "alarms.geojson").read_text(encoding="utf-8"))
    assert geojson["type"] == "FeatureCollection"
    assert len(geojson["features"]) == len(alarms)
    for feature, alarm in zip(geojson["features"], alarms):
        assert feature["geometry"]["type"] == "Point"
        assert feature["geometry"]["coordinates"] == pytest.approx([alarm["lon"], alarm["lat"]])
        assert feature["properties"]["seq"] == alarm["seq"]
        assert 52.0 < alarm["lat"] < 52.2 and 5.1 < alarm["lon"] < 5.2


@pytest.mark.timeout(150)
def test_engine_killed_mid_run_ends_with_the_same_alarms(shared, defects_run, tmp_path):
    """The engine is stopped (SIGSTOP) so crops pile up in flight, then SIGKILLed: the
    supervisor restarts it, the grabber resends what was not acknowledged, and the run ends
    with the alarms of the undisturbed run, each once."""
    undisturbed = defects_run["summary"]["alarms"]
    command = replay_command(*_replay_args(shared, "--realtime", "--json"))
    process, stdout, stderr = start(command)
    try:
        engine = stderr.wait_event(
            "child_started", 60, where=lambda event: event.get("child") == "engine"
        )
        stderr.wait_event("child_ready", 60, where=lambda event: event.get("child") == "grabber")
        deadline = time.monotonic() + 30
        while sum("ALARM" in line for line in stderr.snapshot()) < 3:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        os.kill(engine["pid"], signal.SIGSTOP)
        time.sleep(1.0)  # the grabber keeps cutting; its window fills with unscored crops
        os.kill(engine["pid"], signal.SIGKILL)
        assert process.wait(90) == 0, "\n".join(stderr.snapshot()[-20:])
    finally:
        process.kill()
    summary = json.loads(stdout.finish()[-1])
    lines = stderr.finish()
    restarted = [e for e in stderr.events("child_restarting") if e["child"] == "engine"]
    assert len(restarted) == 1 and "status -9" in restarted[0]["reason"]
    resent = sum(event["count"] for event in stderr.events("crops_resent"))
    assert resent > 0, "nothing was in flight: the test did not test the resend"
    assert summary["restarts"]["engine"] == 1
    key = ("seq", "crop_id", "rail", "side", "mileage_m", "image_score")
    assert [tuple(a[k] for k in key) for a in summary["alarms"]] == [
        tuple(a[k] for k in key) for a in undisturbed
    ]
    assert summary["crops"] == 216
    assert len([line for line in lines if re.match(r"ALARM #", line)]) == len(undisturbed)


@pytest.mark.timeout(150)
def test_publisher_killed_mid_run_every_alarm_reaches_a_subscriber_once(
    shared, defects_run, tmp_path
):
    """The publisher is frozen, then SIGKILLed, mid-run. Its successor sends what the spool
    holds unsent, the grabber resends what was not acknowledged, the successor drops crops
    the spool already alarmed on, and a subscriber (with replay) gets every alarm once."""
    undisturbed = defects_run["summary"]["alarms"]
    port = free_port()
    subscriber = Subscriber(
        f"tcp://127.0.0.1:{port}", replay_endpoint=f"tcp://127.0.0.1:{port + 1}", validate=True
    )
    publish = ("--publish", f"tcp://127.0.0.1:{port}", "--wait-for-subscriber", "20")
    command = replay_command(
        *_replay_args(shared, "--realtime", "--json", "--serve-after", "2", *publish)
    )
    process, stdout, stderr = start(command)
    delivered = []
    try:
        publisher = stderr.wait_event(
            "child_ready", 60, where=lambda event: event.get("child") == "publisher"
        )
        deadline = time.monotonic() + 30
        while sum("ALARM" in line for line in stderr.snapshot()) < 3:
            assert time.monotonic() < deadline and process.poll() is None
            delivered += subscriber.poll(0.05)
        os.kill(publisher["pid"], signal.SIGSTOP)
        stopped = time.monotonic()
        while time.monotonic() - stopped < 1.0:
            delivered += subscriber.poll(0.05)
        os.kill(publisher["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 90
        while process.poll() is None and time.monotonic() < deadline:
            delivered += subscriber.poll(0.1)
        delivered += subscriber.poll(0.3)
        assert process.wait(5) == 0, "\n".join(stderr.snapshot()[-20:])
    finally:
        process.kill()
        process.wait(10)
        subscriber.close()
    summary = json.loads(stdout.finish()[-1])
    assert summary["restarts"]["publisher"] == 1
    assert sum(event["count"] for event in stderr.events("crops_resent")) > 0
    key = ("crop_id", "rail", "side", "mileage_m", "image_score")
    assert sorted(tuple(a[k] for k in key) for a in summary["alarms"]) == sorted(
        tuple(a[k] for k in key) for a in undisturbed
    )
    assert [a["seq"] for a in summary["alarms"]] == list(range(1, len(undisturbed) + 1))
    alarms = [message.body for message in delivered if message.topic == "alarm/"]
    assert [body["seq"] for body in alarms] == list(range(1, len(undisturbed) + 1))
    assert sorted(body["crop"]["crop_id"] for body in alarms) == sorted(
        a["crop_id"] for a in undisturbed
    )


@pytest.mark.timeout(150)
def test_engine_pinned_to_its_own_core_gives_the_same_alarms(shared, defects_run):
    """``--engine-cpus``: each child reports the cores the kernel lets it run on (its own
    affinity mask, read in the child), and the alarms are those of the unpinned run."""
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        pytest.skip("needs a machine with two CPU cores or more")
    engine_core, others = usable[-1], usable[:-1]
    command = replay_command(*_replay_args(shared, "--engine-cpus", str(engine_core), "--json"))
    process, stdout, stderr = start(command)
    try:
        assert process.wait(120) == 0, "\n".join(stderr.snapshot()[-20:])
    finally:
        process.kill()
    summary = json.loads(stdout.finish()[-1])
    stderr.finish()
    started = {
        event["process"]: event["cpus"]
        for event in stderr.events("child_started")
        if "cpus" in event
    }
    assert started == {"engine": [engine_core], "grabber": others, "publisher": others}
    key = ("seq", "crop_id", "rail", "side", "image_score")
    assert [tuple(a[k] for k in key) for a in summary["alarms"]] == [
        tuple(a[k] for k in key) for a in defects_run["summary"]["alarms"]
    ]
    assert summary["crops"] == 216
