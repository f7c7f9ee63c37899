"""The pipeline's parts on their own: model input, the wire, the in-flight window, the
acknowledgement watermark, the restart policy's arithmetic, and the baseline's ONNX export."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq

from edge.engine.backends import open_backend
from edge.engine.metadata import read_metadata
from edge.errors import ConfigInvalidError
from edge.evaluate.baseline import ZScoreBaseline
from edge.evaluate.calibrate import fit_threshold
from edge.pipeline import wire
from edge.pipeline.cpus import parse_cpu_list, pin, plan_cpus
from edge.pipeline.grabber_process import DropGap, InFlight, model_input
from edge.pipeline.replay import default_model, truncation_warning
from edge.pipeline.supervisor import RunOutcome, Watermark
from edge.publisher.replay import replay_endpoint_for
from edge.publisher.thresholds import thresholds_warnings
from edge.records import CropTag, Mileage

pytestmark = pytest.mark.timeout(30)


def _tag(crop_id: int, along_track_m: float = 0.0) -> CropTag:
    return CropTag(
        crop_id=crop_id,
        frame_index=0,
        box=(1, 2, 60, 60),
        line_index=10,
        along_track_m=along_track_m,
        capture_time=1_778_310_720.0 + along_track_m,
        rail="left",
        side="field",
        mileage=Mileage("L1", 5_000.0 + along_track_m, "increasing"),
    )


def test_model_input_resizes_with_area_and_scales_16_bit_to_8_bit_units():
    rng = np.random.default_rng(0)
    crop8 = rng.integers(0, 256, (60, 60), dtype=np.uint8)
    out = model_input(crop8, (1, 64, 64))
    assert out.shape == (1, 64, 64) and out.dtype == np.float32
    expected = cv2.resize(crop8, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32)
    np.testing.assert_array_equal(out[0], expected)
    crop16 = crop8.astype(np.uint16) * 257  # the same picture in 16 bits
    out16 = model_input(crop16, (1, 64, 64))
    # 8-bit resizing rounds to whole levels (in fixed point); 16-bit keeps 1/257 of a level.
    np.testing.assert_allclose(out16, out, atol=1.0)
    assert model_input(np.full((60, 60), 65535, np.uint16), (1, 64, 64)).max() == 255.0
    colour = model_input(crop8, (3, 32, 32))
    assert colour.shape == (3, 32, 32) and np.all(colour[0] == colour[2])


def test_crops_travel_as_a_json_header_and_one_raw_float32_buffer():
    context = zmq.Context()
    try:
        pull = context.socket(zmq.PULL)
        pull.bind("inproc://crops")
        push = context.socket(zmq.PUSH)
        push.connect("inproc://crops")
        pixels = np.random.default_rng(1).uniform(0, 255, (3, 1, 64, 64)).astype(np.float32)
        push.send_multipart(wire.encode_crops([_tag(i) for i in range(3)], pixels))
        frames = pull.recv_multipart(copy=False)
        assert len(frames) == 2 and len(frames[1].bytes) == pixels.nbytes
        header = json.loads(frames[0].bytes)
        assert header["shape"] == [3, 1, 64, 64] and len(json.dumps(header)) < 2000
        tags, received, resend = wire.decode_crops(frames)
        np.testing.assert_array_equal(received, pixels)
        assert [tag.crop_id for tag in tags] == [0, 1, 2] and tags[1] == _tag(1)
        assert resend is False
        with pytest.raises(ValueError, match="float32"):
            wire.encode_crops([_tag(0)], pixels[:1].astype(np.float64))
        push.close(0)
        pull.close(0)
    finally:
        context.term()


def test_the_window_holds_until_acknowledged_and_resends_what_is_not():
    context = zmq.Context()
    try:
        pull = context.socket(zmq.PULL)
        pull.bind("inproc://window")
        push = context.socket(zmq.PUSH)
        push.connect("inproc://window")
        window = InFlight(push, window=3, max_batch=2)
        pixels = np.zeros((1, 8, 8), np.float32)
        for crop_id in range(3):
            assert window.has_room()
            window.add(_tag(crop_id), pixels)
        assert not window.has_room()
        window.flush()
        batches = [wire.decode_crops(pull.recv_multipart()) for _ in range(2)]
        assert [[t.crop_id for t in tags] for tags, _, _ in batches] == [[0, 1], [2]]
        window.ack([1, 7])  # 7 was never sent: ignored
        assert window.has_room() and list(window.crops) == [0, 2]
        assert window.resend() == 2
        window.flush()
        tags, _, resend = wire.decode_crops(pull.recv_multipart())
        assert [t.crop_id for t in tags] == [0, 2] and resend is True
        assert window.sent == 3 and window.resent == 2
        push.close(0)
        pull.close(0)
    finally:
        context.term()


def test_consecutive_drops_make_one_gap_with_their_crop_ids():
    drops = DropGap()
    assert drops.close() is None
    for crop_id, metres in ((5, 3.0), (6, 3.0), (7, 3.6)):
        drops.drop(_tag(crop_id, metres))
    gap, ids = drops.close()
    assert ids == (5, 7) and gap.crops_dropped == 3 and gap.reason == "engine_behind"
    assert (gap.start_along_track_m, gap.end_along_track_m) == (3.0, 3.6)
    assert gap.start_mileage.mileage_m == 5_003.0 and gap.end_mileage.mileage_m == 5_003.6
    assert drops.close() is None and drops.total == 3
    assert wire.gap_from_dict(json.loads(json.dumps(wire.gap_to_dict(gap)))) == gap


def test_the_watermark_advances_over_contiguous_acknowledgements_only():
    marks = Watermark(0)
    assert marks.add(1) and marks.low == 0
    assert marks.add(0) and marks.low == 2
    assert not marks.add(1)  # a duplicate
    assert marks.add(3) and marks.low == 2 and marks.above == {3}
    assert marks.add(2) and marks.low == 4 and marks.above == set()


def test_default_model_is_the_pointer_or_the_only_graph(tmp_path):
    engines = tmp_path / "engines"
    engines.mkdir()
    with pytest.raises(Exception, match="no default model"):
        default_model(engines)
    (engines / "a.onnx").write_bytes(b"")
    assert default_model(engines) == engines / "a.onnx"
    (engines / "b.onnx").write_bytes(b"")
    with pytest.raises(Exception, match="a.onnx, b.onnx"):
        default_model(engines)
    (engines / "default.json").write_text('{"model": "b.onnx"}')
    assert default_model(engines) == engines / "b.onnx"
    assert replay_endpoint_for("tcp://*:5560") == "tcp://*:5561"
    assert replay_endpoint_for("ipc:///tmp/x") is None


def test_the_baseline_exported_as_onnx_scores_as_the_baseline_through_the_backend(tmp_path):
    rng = np.random.default_rng(3)
    normal = rng.normal(120, 10, (40, 1, 32, 32)).clip(0, 255).astype(np.float32)
    baseline = ZScoreBaseline.fit(normal, top_k=8)
    path = baseline.export_onnx(tmp_path / "zscore.onnx")
    metadata = read_metadata(path)  # the graph's hash matches its metadata
    assert metadata.model_id == baseline.model_id and metadata.image_size == 32
    crops = rng.normal(120, 10, (5, 1, 32, 32)).clip(0, 255).astype(np.float32)
    crops[4, :, 8:16, 8:16] = 255.0  # a bright square: an anomaly
    with open_backend("onnxruntime", path, max_batch=2) as backend:
        assert backend.crop_shape == (1, 32, 32) and backend.model_id == baseline.model_id
        result = backend.infer(crops)
    maps, scores = baseline.score(crops)
    np.testing.assert_allclose(result.image_score, scores, rtol=1e-5)
    np.testing.assert_allclose(result.anomaly_map, maps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.reconstruction, np.repeat(baseline.mean[None], 5, 0))
    assert result.image_score[4] > 3 * result.image_score[:4].max()


@pytest.mark.parametrize(
    ("text", "cores"),
    [("1", (1,)), ("3,1", (1, 3)), ("4-6", (4, 5, 6)), ("0,2-3,2", (0, 2, 3)), (" 7 ", (7,))],
)
def test_core_lists_read_as_taskset_writes_them(text, cores):
    assert parse_cpu_list(text) == cores


@pytest.mark.parametrize("text", ["", "a", "1-", "-2", "3-1", "1,,2", "1.5"])
def test_bad_core_lists_are_refused(text):
    with pytest.raises(ValueError):
        parse_cpu_list(text)


def test_engine_cores_leave_the_rest_to_the_other_processes():
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        pytest.skip("needs a machine with two CPU cores or more")
    assert plan_cpus(None) is None
    plan = plan_cpus([usable[-1]])
    assert plan == {
        "engine": (usable[-1],),
        "grabber": tuple(usable[:-1]),
        "publisher": tuple(usable[:-1]),
        "supervisor": tuple(usable[:-1]),
    }
    with pytest.raises(ConfigInvalidError, match="none is left for the grabber"):
        plan_cpus(usable)
    with pytest.raises(ConfigInvalidError, match=f"core\\(s\\) {usable[-1] + 1} not usable"):
        plan_cpus([usable[-1] + 1])


def test_thresholds_fitted_elsewhere_or_set_by_hand_are_warned_of(tmp_path):
    fitted = fit_threshold(np.linspace(0.1, 0.5, 200), 0.01, "m1", "crops")
    path = tmp_path / "cam0.thresholds.json"
    fitted.model_copy(update={"vehicle_id": "TIV-1", "camera_id": "cam0"}).save(path)
    assert thresholds_warnings(path, "TIV-1", "cam0") == []
    assert thresholds_warnings(path, "TIV-1") == []  # no camera given: not checked
    [warning] = thresholds_warnings(path, "TIV-1", "cam1")
    assert warning == (
        f"{path} was fitted for vehicle TIV-1, camera cam0; it is used on vehicle TIV-1, camera "
        "cam1: its false-alarm rate does not carry over"
    )
    [warning] = thresholds_warnings(path, "TIV-2")
    assert "it is used on vehicle TIV-2: its false-alarm rate" in warning
    # A file that names no vehicle or camera is taken as the recording's.
    fitted.save(path)
    assert thresholds_warnings(path, "TIV-2", "cam3") == []
    # A threshold outside the fitted scores (0.1 to 0.5) was set by hand.
    fitted.model_copy(update={"threshold": 0.6}).save(path)
    [warning] = thresholds_warnings(path, "TIV-1", "cam0")
    assert "threshold 0.6 is above every score it was fitted on (0.1 to 0.5)" in warning
    assert warning.endswith("possibly none")
    fitted.model_copy(update={"threshold": 0.05}).save(path)
    [warning] = thresholds_warnings(path, "TIV-1", "cam0")
    assert "threshold 0.05 is below every score it was fitted on (0.1 to 0.5)" in warning
    fitted.model_copy(update={"threshold": 0.5}).save(path)
    assert thresholds_warnings(path, "TIV-1", "cam0") == []


@pytest.mark.parametrize(
    ("mileages", "reach"),
    [
        ((27_405.0, 27_408.52, 27_412.1), "up to km 27 + 412.10 m"),  # increasing
        ((27_408.52, 27_404.0, 27_399.97), "up to km 27 + 399.97 m"),  # decreasing
        ((1_001.0, 1_000.2, 999.5), "up to km 0 + 999.50 m"),  # decreasing past a km post
    ],
)
def test_a_cut_short_run_was_inspected_up_to_its_last_crop_in_running_order(mileages, reach):
    scores = [
        {"along_track_m": 0.6 * k, "mileage_m": mileage} for k, mileage in enumerate(mileages)
    ]
    outcome = RunOutcome(frames=1, truncated=True, scores=scores[::-1])  # acks come in any order
    warning = truncation_warning(Path("run.mkv"), outcome)
    assert warning == (
        f"run.mkv is cut short: only its 1 complete frame was inspected ({reach}); whatever "
        "was recorded after the cut was not inspected"
    )
    assert truncation_warning(Path("run.mkv"), RunOutcome(frames=1, scores=scores)) is None


def test_pinning_moves_threads_started_before_it():
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        pytest.skip("needs a machine with two CPU cores or more")
    started, release = threading.Event(), threading.Event()
    seen: list[set[int]] = []

    def earlier_thread():
        started.set()
        release.wait(10)
        seen.append(os.sched_getaffinity(0))

    thread = threading.Thread(target=earlier_thread)
    thread.start()
    started.wait(10)
    try:
        pin([usable[0]])
        release.set()
        thread.join(10)
        assert seen == [{usable[0]}]
    finally:
        pin(usable)
    assert sorted(os.sched_getaffinity(0)) == usable
