"""Frame sources on real files written by OpenCV's FFmpeg encoder (FFV1 in Matroska)."""

from datetime import datetime, timezone

import cv2
import numpy as np
import pytest
from structlog.testing import capture_logs

from edge.errors import ExitStatus, InputUnreadableError
from edge.grabber.record import write_recording
from edge.grabber.sources import (
    CameraSource,
    RecordingSource,
    StillsSource,
    container_truncation,
    open_source,
    read_image,
)
from edge.telemetry.run import RunInfo
from edge.telemetry.simulate import SimulatedTrack

LINES, PIXELS, FRAMES = 32, 48, 10


def _run(lines_per_frame=LINES):
    return RunInfo(
        vehicle_id="v1",
        run_id="r1",
        line_id="L1",
        start_km_post=3,
        direction="increasing",
        mm_per_line=1.0,
        lines_per_frame=lines_per_frame,
        start_time_utc=datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc),
    )


TRACK = SimulatedTrack(start_lat=52.0, start_lon=5.0, heading_deg=90.0, speed_kmh=72.0)


def _frames(dtype, seed=0):
    rng = np.random.default_rng(seed)
    high = np.iinfo(dtype).max
    frames = rng.integers(0, high + 1, (FRAMES, LINES, PIXELS), dtype=dtype)
    frames[0, 0, :2] = (0, high)  # both ends of the range must survive
    return frames


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8])
def test_grey_ffv1_recording_reads_back_bit_exact(tmp_path, dtype):
    frames = _frames(dtype)
    path = tmp_path / "run.mkv"
    write_recording(path, frames, _run(), TRACK)
    source = RecordingSource(path)
    read = list(source)
    assert source.native_grey
    assert source.pixel_format == (b"Y1\x00\x10" if dtype == np.uint16 else b"Y800")
    assert [frame.index for frame in read] == list(range(FRAMES))
    for frame, original in zip(read, frames):
        assert frame.image.dtype == dtype and frame.image.shape == (LINES, PIXELS)
        assert np.array_equal(frame.image, original)
    assert not source.truncated and source.frames_read == FRAMES
    # Iterating again reopens the file and gives the same frames.
    assert np.array_equal(next(iter(source)).image, frames[0])


def test_colour_recording_is_read_as_grey(tmp_path):
    rng = np.random.default_rng(1)
    colour = np.zeros((4, LINES, PIXELS, 3), np.uint8)
    colour[..., 0] = rng.integers(0, 256, (4, LINES, PIXELS))  # blue varies
    colour[..., 2] = 200  # red constant: a channel pick would differ from luma
    path = tmp_path / "colour.mkv"
    writer = cv2.VideoWriter(
        str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"FFV1"), 10.0, (PIXELS, LINES)
    )
    for image in colour:
        writer.write(image)
    writer.release()
    source = RecordingSource(path)
    read = list(source)
    assert not source.native_grey
    assert len(read) == 4
    for frame, original in zip(read, colour):
        assert frame.image.shape == (LINES, PIXELS) and frame.image.dtype == np.uint8
        # FFV1 colour is lossless, so the grey is exactly OpenCV's luma of the original.
        assert np.array_equal(frame.image, cv2.cvtColor(original, cv2.COLOR_BGR2GRAY))
        assert not np.array_equal(frame.image, original[..., 0])


def _packet_ends(path, data):
    """Byte offset where each frame's packet ends, found with the demuxer in raw mode."""
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_FORMAT, -1])
    ends, search_from = [], 0
    while True:
        ok, packet = capture.read()
        if not ok:
            break
        start = data.find(packet.tobytes(), search_from)
        assert start > 0
        ends.append(start + packet.size)
        search_from = start + packet.size
    capture.release()
    return ends


def test_recording_cut_at_70_percent_yields_every_complete_frame_and_warns(tmp_path):
    frames = _frames(np.uint16, seed=2)
    full = tmp_path / "full.mkv"
    write_recording(full, frames, _run(), TRACK)
    data = full.read_bytes()
    ends = _packet_ends(full, data)
    assert len(ends) == FRAMES
    cut_at = int(0.7 * len(data))
    complete = sum(end <= cut_at for end in ends)
    assert 0 < complete < FRAMES  # the cut falls inside the frames, not in the header or index
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[:cut_at])

    source = RecordingSource(cut)
    with capture_logs() as logs:
        read = list(source)
    assert len(read) == complete
    for frame, original in zip(read, frames):
        assert np.array_equal(frame.image, original)
    assert source.truncated
    warnings = [entry for entry in logs if entry["event"] == "recording_truncated"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["file"] == str(cut) and warnings[0]["frames"] == complete
    assert ExitStatus.RECORDING_TRUNCATED == 3


def test_recording_cut_inside_its_first_frame_fails_saying_it_is_cut_short(tmp_path):
    full = tmp_path / "full.mkv"
    write_recording(full, _frames(np.uint16, seed=4), _run(), TRACK)
    data = full.read_bytes()
    first_end = _packet_ends(full, data)[0]
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: first_end - 16])

    with pytest.raises(InputUnreadableError) as caught:
        RecordingSource(cut)
    message = str(caught.value)
    assert message.startswith(f"{cut}: ")
    assert "cut short before its first frame" in message
    assert f"the file has {first_end - 16}" in message
    assert caught.value.exit_status == ExitStatus.INPUT_UNREADABLE


def test_recording_whose_writer_never_closed_it_counts_as_truncated(tmp_path):
    frames = _frames(np.uint8, seed=3)
    path = tmp_path / "open.mkv"
    write_recording(path, frames, _run(), TRACK)
    data = bytearray(path.read_bytes())
    assert container_truncation(path) is None
    # What a muxer leaves before its trailer: the Segment's 8-byte size is "unknown".
    segment = data.find(b"\x18\x53\x80\x67")
    assert data[segment + 4] == 0x01
    data[segment + 4 : segment + 12] = b"\x01" + b"\xff" * 7
    path.write_bytes(bytes(data))
    source = RecordingSource(path)
    assert len(list(source)) == FRAMES
    assert source.truncated


@pytest.mark.parametrize(
    "name, content",
    [("empty.mkv", b""), ("notes.mkv", b"kilometre 12 fasteners checked by hand\n" * 40)],
)
def test_empty_or_text_file_fails_at_open_naming_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputUnreadableError) as caught:
        RecordingSource(path)
    assert str(path) in str(caught.value)
    assert caught.value.exit_status == ExitStatus.INPUT_UNREADABLE


def test_missing_recording_fails_naming_the_file(tmp_path):
    path = tmp_path / "nowhere.mkv"
    with pytest.raises(InputUnreadableError, match="nowhere.mkv"):
        open_source(path)


def test_stills_in_natural_order_grey_and_16_bit_kept(tmp_path):
    rng = np.random.default_rng(4)
    images = {n: rng.integers(0, 65536, (LINES, PIXELS), dtype=np.uint16) for n in (1, 2, 10)}
    for n, image in images.items():
        assert cv2.imwrite(str(tmp_path / f"frame{n}.png"), image)
    (tmp_path / "notes.txt").write_text("not an image")
    source = open_source(tmp_path)
    assert isinstance(source, StillsSource)
    read = list(source)
    assert [frame.index for frame in read] == [0, 1, 2]
    for frame, n in zip(read, (1, 2, 10)):  # frame10 after frame2, not before it
        assert frame.image.dtype == np.uint16
        assert np.array_equal(frame.image, images[n])


def test_colour_still_is_grey_and_a_differing_still_is_named(tmp_path):
    colour = np.zeros((LINES, PIXELS, 3), np.uint8)
    colour[..., 1] = 100
    cv2.imwrite(str(tmp_path / "a.png"), colour)
    cv2.imwrite(str(tmp_path / "b.png"), np.zeros((LINES + 2, PIXELS), np.uint8))
    source = StillsSource(tmp_path)
    frames = iter(source)
    first = next(frames)
    assert first.image.shape == (LINES, PIXELS)
    assert int(first.image[0, 0]) == int(cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)[0, 0]) == 59
    with pytest.raises(InputUnreadableError, match="b.png"):
        next(frames)


def test_folder_without_images_fails_naming_the_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("no stills here")
    with pytest.raises(InputUnreadableError, match=str(tmp_path)):
        StillsSource(tmp_path)


def test_camera_construction_errors_name_the_camera():
    # No camera is attached here, so only the failures can be tested.
    with pytest.raises(InputUnreadableError, match="camera:97"):
        CameraSource(97)
    with pytest.raises(InputUnreadableError, match="nosuchsrc"):
        open_source("nosuchsrc ! appsink")
    with pytest.raises(InputUnreadableError, match="camera:98"):
        open_source("98")


def test_a_missing_image_or_a_folder_is_named_as_such(tmp_path):
    for path, problem in (
        (tmp_path / "strip.png", "no such image file"),
        (tmp_path, "a folder, not an image"),
    ):
        with pytest.raises(InputUnreadableError) as caught:
            read_image(path)
        assert str(caught.value) == f"{path}: {problem}"
    (tmp_path / "strip.png").write_text("not a picture\n")
    with pytest.raises(InputUnreadableError, match="not an image that OpenCV can read"):
        read_image(tmp_path / "strip.png")
