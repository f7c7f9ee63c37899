"""The publisher: schema, plain-SUB reception, heartbeats, replay, linger, SIGKILL, CURVE."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time

import jsonschema
import numpy as np
import pytest
import zmq
from publisher_support import (
    RUN,
    VEHICLE,
    child_env,
    collect,
    make_tag,
    plain_sub,
    publisher_config,
    python_command,
    receive,
    wait_for_topic,
)

from edge.config import ConfigError
from edge.errors import ConfigInvalidError
from edge.publisher import (
    CoverageGap,
    DefectHints,
    Publisher,
    PublisherConfig,
    RunInfo,
    ScoredCrop,
    Subscriber,
    validate_message,
)
from edge.publisher import keys as curve_keys
from edge.publisher.replay import encode_request
from edge.publisher.schema import build_alarm, encode, schema
from edge.publisher.spool import Spool
from edge.records import GpsFix

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def context():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


# The messages.


def test_alarm_carries_every_field_the_design_lists():
    tag = make_tag(10)
    hints = DefectHints(3, 4, 0.97, 0.125, 0.5, (1, 2, 8, 6))
    alarm = build_alarm(
        tag, 0.83, 0.41, "model-7", RunInfo(VEHICLE, RUN), seq=12, raised_time=1.8e9, hints=hints
    )
    validate_message("alarm/", alarm)
    assert alarm["seq"] == 12 and alarm["vehicle_id"] == VEHICLE and alarm["run_id"] == RUN
    assert alarm["capture_time"] == {
        "utc": "2026-05-09T07:12:03.450000Z",
        "epoch_s": 1_778_310_723.45,
    }
    assert alarm["mileage"] == {
        "line_id": "L120",
        "mileage_m": 43_216.5,
        "km_post": 43,
        "metres": pytest.approx(216.5),
        "direction": "increasing",
    }
    assert alarm["gps"] == {
        "lat": 52.0907,
        "lon": 5.1214,
        "fix_quality": 4,
        "age_s": 0.05,
        "dead_reckoned": False,
    }
    assert alarm["crop"] == {
        "crop_id": 10,
        "camera_id": "cam1",
        "frame_index": 2,
        "line_index": 17,
        "box": {"x": 102, "y": 40, "width": 64, "height": 64},
    }
    assert (alarm["rail"], alarm["side"], alarm["along_track_m"]) == ("left", "gauge", 6.0)
    assert (alarm["image_score"], alarm["threshold"], alarm["model_id"]) == (0.83, 0.41, "model-7")
    assert alarm["hints"]["region"] == {"x": 1, "y": 2, "width": 8, "height": 6}
    assert schema("alarm/")["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_alarm_without_gps_fix_or_mileage_is_valid_and_bad_ones_are_refused():
    tag = make_tag(3, gps=GpsFix(None, math.nan, 0, None, True), mileage=None)
    run = RunInfo(VEHICLE, RUN)
    alarm = build_alarm(tag, np.float32(0.9), 0.5, "m", run, seq=1, raised_time=1.8e9)
    validate_message("alarm/", alarm)
    assert alarm["gps"]["lat"] is None and alarm["gps"]["lon"] is None
    assert alarm["mileage"] is None
    with pytest.raises(ValueError, match="not a finite number"):
        build_alarm(tag, float("nan"), 0.5, "m", run, seq=1, raised_time=1.8e9)
    with pytest.raises(ValueError, match="not over threshold"):
        build_alarm(tag, 0.5, 0.5, "m", run, seq=1, raised_time=1.8e9)
    with pytest.raises(jsonschema.ValidationError):
        validate_message("alarm/", {**alarm, "rail": "middle"})
    with pytest.raises(jsonschema.ValidationError):
        validate_message("alarm/", {key: value for key, value in alarm.items() if key != "seq"})
    with pytest.raises(jsonschema.ValidationError):
        validate_message("coverage/", alarm)
    with pytest.raises(ValueError, match="run_id"):
        RunInfo(VEHICLE, "runs/7")


def test_defect_hints_from_an_anomaly_map():
    anomaly_map = np.zeros((8, 10))
    anomaly_map[2:4, 5:8] = 0.7
    anomaly_map[3, 6] = 0.95
    hints = DefectHints.from_anomaly_map(anomaly_map[None], pixel_threshold=0.5)
    assert (hints.peak_x, hints.peak_y, hints.peak_value) == (6, 3, 0.95)
    assert hints.area_fraction == pytest.approx(6 / 80)
    assert hints.region == (5, 2, 3, 2)
    assert DefectHints.from_anomaly_map(np.zeros((4, 4))).region is None


def test_config_rejects_unknown_keys_and_round_trips(tmp_path):
    config = publisher_config(tmp_path / "spool.db")
    assert PublisherConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match="linger"):
        PublisherConfig.from_json(json.dumps({**json.loads(config.to_json()), "linger": 5}))


# Publishing.


def test_plain_sub_receives_alarms_coverage_and_heartbeats(tmp_path, context):
    with Publisher(publisher_config(tmp_path / "spool.db")) as publisher:
        sub = plain_sub(context, publisher.publish_address, b"alarm/", b"coverage/", b"health/")
        wait_for_topic(sub, b"health/")
        pngs = {seq: b"\x89PNG" + bytes([seq]) * 50 for seq in (2, 5)}
        for crop_id in range(1, 8):
            seq = publisher.publish_alarm(make_tag(crop_id), 0.9, 0.4, pngs.get(crop_id))
            assert seq == crop_id
        publisher.update_counters(crops_inspected=1234)
        with pytest.raises(ValueError, match="kept by the publisher"):
            publisher.update_counters(alarms_sent=0)
        gap = CoverageGap.from_crops(make_tag(20), make_tag(30), "engine_behind", 11)
        assert publisher.publish_coverage_gap(gap) == 1
        alarms = receive(sub, b"alarm/", 7, timeout_s=5)
        coverage = receive(sub, b"coverage/", 1, timeout_s=5)
        heartbeats = receive(sub, b"health/", 3, timeout_s=5)
    bodies = [json.loads(frames[1]) for frames in alarms]
    for body in bodies:
        validate_message("alarm/", body)
    assert [body["seq"] for body in bodies] == list(range(1, 8))
    assert [body["crop"]["crop_id"] for body in bodies] == list(range(1, 8))
    assert {body["seq"]: frames[2] for body, frames in zip(bodies, alarms) if len(frames) == 3} == (
        pngs
    )
    assert [body["has_heatmap"] for body in bodies] == [seq in pngs for seq in range(1, 8)]
    coverage_body = json.loads(coverage[0][1])
    validate_message("coverage/", coverage_body)
    assert coverage_body["crops_dropped"] == 11
    assert coverage_body["start"]["mileage"]["km_post"] == 43
    assert coverage_body["end"]["along_track_m"] == pytest.approx(18.0)
    health = [json.loads(frames[1]) for frames in heartbeats]
    for body in health:
        validate_message("health/", body)
    assert health[-1]["last_seq"] == 7 and health[-1]["last_coverage_seq"] == 1
    assert health[-1]["counters"]["alarms_sent"] == 7
    assert health[-1]["counters"]["crops_dropped"] == 11
    assert health[-1]["counters"]["crops_inspected"] == 1234
    spacing = [
        b["sent_time"]["epoch_s"] - a["sent_time"]["epoch_s"] for a, b in zip(health, health[1:])
    ]
    assert all(0.1 < gap_s < 0.6 for gap_s in spacing), spacing


def test_a_batch_is_spooled_whole_or_not_at_all(tmp_path):
    with Publisher(publisher_config(tmp_path / "spool.db")) as publisher:
        good = [ScoredCrop(make_tag(i), 0.9, 0.4) for i in range(3)]
        assert publisher.publish_alarms(good) == [1, 2, 3]
        bad = [*good, ScoredCrop(make_tag(9), float("nan"), 0.4)]
        with pytest.raises(ValueError, match="image_score"):
            publisher.publish_alarms(bad)
        assert publisher.last_seq() == 3
        assert publisher.publish_alarm(make_tag(4), 0.9, 0.4) == 4


def test_replay_endpoint_serves_a_run_from_a_number_in_bounded_batches(tmp_path, context):
    config = publisher_config(tmp_path / "spool.db", replay_max_count=4)
    with Publisher(config) as publisher:
        for crop_id in range(1, 11):
            publisher.publish_alarm(make_tag(crop_id), 0.9, 0.4, b"png%d" % crop_id)
        request = context.socket(zmq.REQ)
        request.setsockopt(zmq.LINGER, 0)
        request.setsockopt(zmq.RCVTIMEO, 5000)
        request.connect(publisher.replay_address)
        request.send(encode_request(VEHICLE, RUN, "alarm/", 3, max_count=100))
        header, *parts = request.recv_multipart()
        request.send(encode_request(VEHICLE, RUN, "alarm/", 9, max_count=100))
        last_header, *last_parts = request.recv_multipart()
        request.send(b'{"op": "replay", "topic": "health/"}')
        error = json.loads(request.recv())
    header = json.loads(header)
    assert header == {
        "status": "ok",
        "vehicle_id": VEHICLE,
        "run_id": RUN,
        "topic": "alarm/",
        "from_seq": 3,
        "count": 4,
        "last_seq": 10,
        "more": True,
    }
    bodies = [json.loads(frame) for frame in parts[0::2]]
    assert [body["seq"] for body in bodies] == [3, 4, 5, 6]
    assert parts[1::2] == [b"png3", b"png4", b"png5", b"png6"]
    for body in bodies:
        validate_message("alarm/", body)
    assert json.loads(last_header)["more"] is False
    assert [json.loads(frame)["seq"] for frame in last_parts[0::2]] == [9, 10]
    assert error["status"] == "error"


def test_close_is_bounded_by_linger_with_a_subscriber_that_never_reads(tmp_path, context):
    config = publisher_config(tmp_path / "spool.db", linger_ms=300, sndhwm=10)
    publisher = Publisher(config)
    stuck = plain_sub(context, publisher.publish_address, b"alarm/", b"health/")
    stuck.setsockopt(zmq.RCVHWM, 1)
    wait_for_topic(stuck, b"health/")
    heatmap = bytes(200_000)  # 100 alarms * 200 kB: far more than socket buffers hold
    for crop_id in range(100):
        publisher.publish_alarm(make_tag(crop_id), 0.9, 0.4, heatmap)
    started = time.monotonic()
    publisher.close()
    assert time.monotonic() - started < 3.0
    with Spool(config.spool_path) as spool:
        assert spool.last_seq("alarm/", VEHICLE, RUN) == 100
        assert spool.count_unsent() == 0


KILLED_PUBLISHER = """
import sys
from edge.publisher import Publisher, PublisherConfig
from edge.records import CropTag

config = PublisherConfig.from_json(sys.argv[1])
with Publisher(config) as publisher:
    print(publisher.publish_address, flush=True)
    crop_id = 0
    while True:
        tag = CropTag(crop_id, crop_id, (0, 0, 64, 64), 0, 0.6 * crop_id, 1.8e9 + crop_id,
                      "left", "gauge")
        print(publisher.publish_alarm(tag, 0.9, 0.4), flush=True)
        crop_id += 1
"""


@pytest.mark.parametrize("held", [False, True], ids=["sending", "backlog-held"])
def test_publisher_killed_mid_run_restarts_sends_unsent_and_keeps_numbering(
    tmp_path, context, held
):
    """SIGKILL a publisher process; a new one on the same spool sends what was unsent, goes on
    numbering, and a subscriber ends with every alarm once. ``backlog-held``: the killed
    publisher held its sending (an earlier crash left an unsent alarm and no subscriber came),
    so everything it acknowledged is unsent and must go out live after the restart."""
    spool_path = tmp_path / "spool.db"
    if held:
        with Spool(spool_path) as spool:
            run = RunInfo(VEHICLE, RUN)
            spool.append(
                "alarm/",
                run,
                lambda seq, now: encode(
                    build_alarm(make_tag(0), 0.9, 0.4, "m", run, seq=seq, raised_time=now)
                ),
            )
    config = publisher_config(spool_path, startup_hold_s=30.0 if held else 0.0)
    child = subprocess.Popen(
        [*python_command(KILLED_PUBLISHER), config.to_json()],
        stdout=subprocess.PIPE,
        env=child_env(),
        text=True,
    )
    try:
        address = child.stdout.readline().strip()
        acknowledged = [int(child.stdout.readline()) for _ in range(150)]
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()
        child.wait(10)
    first = 2 if held else 1
    assert acknowledged == list(range(first, first + 150))
    with Spool(spool_path) as spool:
        last = spool.last_seq("alarm/", VEHICLE, RUN)
        unsent = [m.seq for m in spool.unsent(limit=10_000)]
    assert last >= acknowledged[-1]
    if held:
        assert unsent == list(range(1, last + 1))
    # Restart on the same port, with a plain SUB already connecting.
    sub = plain_sub(context, address, b"alarm/")
    restart = publisher_config(spool_path, publish_endpoint=address, startup_hold_s=5.0)
    with Publisher(restart) as publisher:
        live = receive(sub, b"alarm/", len(unsent), timeout_s=10)
        assert [json.loads(frames[1])["seq"] for frames in live] == unsent
        new = [publisher.publish_alarm(make_tag(1000 + i), 0.9, 0.4) for i in range(20)]
        assert new == list(range(last + 1, last + 21))
        with Subscriber(
            publisher.publish_address, replay_endpoint=publisher.replay_address, validate=True
        ) as subscriber:
            got = collect(subscriber, last + 20, timeout_s=10)
    assert [m.body["seq"] for m in got] == list(range(1, last + 21))
    assert subscriber.stats.invalid == 0
    with Spool(spool_path) as spool:
        assert spool.count_unsent() == 0


# CURVE.


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE (no libsodium)")
def test_curve_allowed_key_receives_and_others_receive_nothing(tmp_path, context):
    keys_dir = tmp_path / "keys"
    server_public_file = curve_keys.create_server_keys(keys_dir)
    allowed_public, allowed_secret = curve_keys.create_client_keys(tmp_path / "depot", "depot")
    curve_keys.allow_client(keys_dir, allowed_public)
    _, stranger_secret = curve_keys.create_client_keys(tmp_path / "stranger", "stranger")
    server_public = curve_keys.load_public_key(server_public_file)
    config = publisher_config(tmp_path / "spool.db", keys_dir=keys_dir)
    with Publisher(config) as publisher:
        for crop_id in (1, 2):  # before the subscriber exists: it must fetch them by replay
            publisher.publish_alarm(make_tag(crop_id), 0.9, 0.4)
        subscriber = Subscriber(
            publisher.publish_address,
            replay_endpoint=publisher.replay_address,
            server_public_key=server_public,
            client_keys=curve_keys.load_client_keys(allowed_secret),
            validate=True,
        )
        no_keys = plain_sub(context, publisher.publish_address, b"")
        stranger = context.socket(zmq.SUB)
        stranger.setsockopt(zmq.LINGER, 0)
        stranger.curve_serverkey = server_public
        stranger.curve_publickey, stranger.curve_secretkey = curve_keys.load_client_keys(
            stranger_secret
        )
        stranger.setsockopt(zmq.SUBSCRIBE, b"")
        stranger.connect(publisher.publish_address)
        assert len(collect(subscriber, 2, timeout_s=5)) == 2  # the allowed client is in
        for crop_id in range(3, 6):
            publisher.publish_alarm(make_tag(crop_id), 0.9, 0.4)
        got = collect(subscriber, 3, timeout_s=5)
        subscriber.close()
        assert receive(no_keys, b"", 1, timeout_s=0.5) == []
        assert receive(stranger, b"", 1, timeout_s=0.5) == []
    assert [m.body["seq"] for m in got] == [3, 4, 5]
    assert subscriber.stats.replayed == 2 and subscriber.stats.live >= 3


def test_keys_folder_without_clients_is_refused_by_name(tmp_path):
    if not zmq.has("curve"):
        pytest.skip("libzmq built without CURVE (no libsodium)")
    (tmp_path / "keys").mkdir()
    with pytest.raises(ConfigInvalidError, match="clients"):
        Publisher(publisher_config(tmp_path / "spool.db", keys_dir=tmp_path / "keys"))


def test_published_frames_are_exactly_what_the_spool_holds(tmp_path, context):
    with Publisher(publisher_config(tmp_path / "spool.db")) as publisher:
        sub = plain_sub(context, publisher.publish_address, b"alarm/", b"health/")
        wait_for_topic(sub, b"health/")
        publisher.publish_alarm(make_tag(4), 0.9, 0.4, b"heat")
        frames = receive(sub, b"alarm/", 1, timeout_s=5)[0]
    with Spool(tmp_path / "spool.db") as spool:
        stored = spool.alarms_from(RunInfo(VEHICLE, RUN), 1)[0]
    assert frames == [b"alarm/", stored.body, b"heat"]
    assert encode(json.loads(stored.body)) == stored.body
