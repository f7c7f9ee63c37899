"""The scoring of scripts/measure_localisation.py, checked on boxes worked out by hand."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "measure_localisation.py"
spec = importlib.util.spec_from_file_location("measure_localisation", SCRIPT)
measure = importlib.util.module_from_spec(spec)
spec.loader.exec_module(measure)


def clips_on_two_rails(angle_deg: float) -> np.ndarray:
    """Three seats on each of two rails 240 px apart, rotated by ``angle_deg`` (x grows down)."""
    t = math.radians(angle_deg)
    centres = []
    for v in (100.0, 270.0, 440.0):
        for u in (140.0, 380.0):
            # Rail direction (sin t, cos t); across it (cos t, -sin t); about (256, 256).
            x = 256 + (u - 256) * math.cos(t) + (v - 256) * math.sin(t)
            y = 256 - (u - 256) * math.sin(t) + (v - 256) * math.cos(t)
            centres.append((x, y, 50.0, 45.0))
    return np.array(centres)


@pytest.mark.parametrize("angle", [0.0, 7.5, -12.0, 14.0])
def test_rail_angle_from_labels(angle):
    sleepers = np.array([[256.0, 100.0, 380.0, 50.0]])
    found = measure.rail_angle_from_labels(clips_on_two_rails(angle), sleepers)
    assert found == pytest.approx(angle, abs=1e-6)


def test_rails_across_the_image_are_not_measured():
    sleepers = np.array([[256.0, 256.0, 50.0, 380.0]])  # taller than wide
    assert measure.rail_angle_from_labels(clips_on_two_rails(90.0), sleepers) is None


def test_score_counts_hits_misses_and_false_crops():
    clips = np.array([[100.0, 100.0, 50, 40], [300.0, 100.0, 50, 40], [100.0, 400.0, 50, 40]])
    boxes = [
        (80, 80, 43, 74),  # holds clip 0
        (60, 70, 43, 74),  # holds clip 0 too (the other side of the rail): still a hit
        (290, 300, 43, 74),  # holds nothing: false
        (101, 360, 43, 74),  # starts one pixel right of clip 2's centre: false
    ]
    found, hits, false, flags = measure.score_image(boxes, clips)
    assert (found, hits, false) == (1, 2, 2)
    assert flags == [True, False, False]
