"""Camera and track geometry: the calibration files load, typos fail, names map by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.config import ConfigError
from edge.grabber.geometry import TrackGeometry

CALIBRATION = Path(__file__).resolve().parents[1] / "calibration"


@pytest.mark.parametrize("name", ["example-camera.json", "track-topdown-ccby.json"])
def test_calibration_files_load_and_round_trip(name, tmp_path):
    geometry = TrackGeometry.load(CALIBRATION / name)
    geometry.save(tmp_path / name)
    assert TrackGeometry.load(tmp_path / name) == geometry


def test_example_camera_sizes():
    geometry = TrackGeometry.load(CALIBRATION / "example-camera.json")
    # 260 mm at 0.75 mm per pixel across and 1 mm per line along.
    assert geometry.crop_size == (347, 260)
    assert geometry.rail_spacing_mm == 1435 + 72
    # tan(4 degrees) * 1.0 / 0.75 pixels across per line.
    assert abs(geometry.max_rail_slope - 0.0932) < 1e-3


def test_a_misspelt_key_names_the_file(tmp_path):
    path = tmp_path / "camera.json"
    text = (CALIBRATION / "example-camera.json").read_text()
    path.write_text(text.replace('"mm_per_line"', '"mm_per_lines"'))
    with pytest.raises(ConfigError, match="camera.json"):
        TrackGeometry.load(path)


def test_a_binary_file_or_a_folder_is_refused_naming_it(tmp_path):
    binary = tmp_path / "cam0.geometry.json"
    binary.write_bytes(b'{"camera_id": "\xff\xfe"}')
    with pytest.raises(ConfigError) as caught:
        TrackGeometry.load(binary)
    assert str(caught.value) == f"{binary}: not UTF-8 text, so not JSON (byte 15 is 0xff)"
    with pytest.raises(ConfigError) as caught:
        TrackGeometry.load(tmp_path)
    assert str(caught.value) == f"{tmp_path}: a folder, not a JSON file"


def test_a_crop_that_cannot_reach_the_rail_is_refused():
    with pytest.raises(ValueError, match="crop_mm"):
        TrackGeometry(mm_per_px=1.0, mm_per_line=1.0, crop_mm=(120.0, 260.0))


@pytest.mark.parametrize(
    ("left_rail_image_side", "direction", "order", "left_rail_image_left_side"),
    [
        ("left", "increasing", ("left", "right"), "field"),
        ("right", "increasing", ("right", "left"), "gauge"),
        ("left", "decreasing", ("right", "left"), "gauge"),
        ("right", "decreasing", ("left", "right"), "field"),
    ],
)
def test_rail_and_side_names(left_rail_image_side, direction, order, left_rail_image_left_side):
    geometry = TrackGeometry(
        mm_per_px=1.0, mm_per_line=1.0, left_rail_image_side=left_rail_image_side
    )
    assert geometry.rails_left_to_right(direction) == order
    other = {"field": "gauge", "gauge": "field"}
    assert geometry.side_of("left", "left", direction) == left_rail_image_left_side
    assert geometry.side_of("left", "right", direction) == other[left_rail_image_left_side]
    # The right rail's sides are the mirror of the left rail's.
    assert geometry.side_of("right", "left", direction) == other[left_rail_image_left_side]


def test_per_rail_camera_names_its_one_rail():
    geometry = TrackGeometry(mm_per_px=1.0, mm_per_line=1.0, rails_in_view="right")
    assert geometry.rails_left_to_right() == ("right",)
    assert geometry.side_of("right", "right") == "field"
