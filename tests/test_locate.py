"""The fastener finder on generated strips: recall, centre error, frame seams, orientation.

Acceptance item 1 of the grabber issue: recall >= 99 %, crop centre error <= 5 mm, and no
fastener cut twice across frame boundaries. Every figure is measured on strips drawn by
edge.grabber.stripgen, whose true fastener centres the finder never sees; the tests assert the
acceptance limits and, tighter, the values measured when they were written.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge.grabber.crops import FoundFastener, crop_origin
from edge.grabber.geometry import TrackGeometry
from edge.grabber.locate import FastenerFinder
from edge.grabber.stripgen import StripSpec, TrackStrip, generate_strip

# 3 mm across, 2 mm along: non-square pixels on purpose.
BALLASTED = TrackGeometry(mm_per_px=3.0, mm_per_line=2.0)
# Slab: baseplates darker than the slab, 40 mm of them visible beyond the fasteners.
SLAB = TrackGeometry(
    mm_per_px=3.0, mm_per_line=2.0, track_form="slab", sleeper_tone="darker", seat_band_mm=40.0
)
MATCH_MM = 100.0  # a found fastener further than this from a true one matches nothing


def run_finder(
    strip: TrackStrip, lines_per_frame: int, geometry: TrackGeometry | None = None
) -> list[FoundFastener]:
    finder = FastenerFinder(geometry or strip.geometry)
    found: list[FoundFastener] = []
    for index, frame in enumerate(strip.frames(lines_per_frame)):
        found += finder.push(frame, index)
    return found + finder.flush()


def match(strip: TrackStrip, found: list[FoundFastener]) -> dict:
    """Pair true and found fasteners of the same rail and side; errors in millimetres."""
    g = strip.geometry
    pairs, unmatched_found = [], set(range(len(found)))
    misses = []
    for true in strip.fasteners:
        errors = [
            (
                float(np.hypot((f.x - true.x) * g.mm_per_px, (f.line - true.line) * g.mm_per_line)),
                i,
            )
            for i, f in enumerate(found)
            if f.rail == true.rail and f.side == true.side
        ]
        near = [e for e in errors if e[0] <= MATCH_MM]
        if not near:
            misses.append(true)
            continue
        error, i = min(near)
        pairs.append((true, found[i], error, len(near)))
        unmatched_found.discard(i)
    return {
        "recall": len(pairs) / len(strip.fasteners),
        "max_error_mm": max(p[2] for p in pairs),
        "cut_twice": sum(1 for p in pairs if p[3] > 1),
        "false": len(unmatched_found),
        "misses": misses,
        "pairs": pairs,
    }


@pytest.mark.timeout(60)
def test_ballasted_strips_recall_and_centre_error():
    specs = [
        StripSpec(
            lines=3000,
            seed=1,
            tilt_deg=2.5,
            light_changes=True,
            shadow=True,
            painted_numbers=True,
            defect_rate=0.3,
        ),
        StripSpec(
            lines=3000,
            seed=2,
            tilt_deg=-3.0,
            light_changes=True,
            striped_sleepers=0.3,
            defect_rate=0.3,
            salt_pepper=0.01,
        ),
        StripSpec(
            lines=3000, seed=3, tilt_deg=1.0, painted_numbers=True, defect_rate=0.5, noise_sigma=5.0
        ),
    ]
    strips = [generate_strip(BALLASTED, spec) for spec in specs]
    results = [match(strip, run_finder(strip, 700)) for strip in strips]
    true_count = sum(len(r["pairs"]) + len(r["misses"]) for r in results)
    recall = sum(len(r["pairs"]) for r in results) / true_count
    max_error = max(r["max_error_mm"] for r in results)
    assert true_count == 120
    # Acceptance: recall >= 99 %, centre error <= 5 mm. Measured: 100 %, 0.44 mm.
    assert recall >= 0.99 and max_error <= 5.0, [m for r in results for m in r["misses"]]
    assert recall == 1.0 and max_error <= 1.0
    assert sum(r["cut_twice"] for r in results) == 0
    assert sum(r["false"] for r in results) == 0
    # A seat whose clips are missing, broken or displaced is still found: the model must see it.
    defective = [p for r in results for p in r["pairs"] if p[0].state != "normal"]
    defective_true = [f for strip in strips for f in strip.fasteners if f.state != "normal"]
    assert len(defective) == len(defective_true) > 20


@pytest.mark.timeout(60)
def test_slab_track_recall_and_centre_error():
    strip = generate_strip(
        SLAB,
        StripSpec(
            lines=3000,
            seed=4,
            tilt_deg=2.0,
            light_changes=True,
            defect_rate=0.3,
            painted_numbers=True,
        ),
    )
    result = match(strip, run_finder(strip, 512))
    assert len(strip.fasteners) == 40
    # Acceptance: recall >= 99 %, centre error <= 5 mm. Measured: 100 %, 0.31 mm.
    assert result["recall"] == 1.0
    assert result["max_error_mm"] <= 1.0
    assert result["cut_twice"] == 0 and result["false"] == 0


@pytest.mark.timeout(60)
def test_fasteners_on_frame_boundaries_are_cut_once_and_whole():
    lines_per_frame = 256  # shorter than the 300-line seat pitch: seams fall everywhere
    seams = [256 * k for k in range(2, 11)]
    offsets = [0, 3, -2, 1, -1, 5, -4, 2, 0]  # seat centre lines on or just beside a seam
    strip = generate_strip(
        BALLASTED,
        StripSpec(
            lines=3072,
            seed=5,
            tilt_deg=2.0,
            seat_lines=tuple(float(s + o) for s, o in zip(seams, offsets)),
        ),
    )
    found = run_finder(strip, lines_per_frame)
    result = match(strip, found)
    assert len(strip.fasteners) == 4 * len(seams)
    assert result["recall"] == 1.0
    assert result["cut_twice"] == 0 and result["false"] == 0
    assert len(found) == len(strip.fasteners)
    width, height = BALLASTED.crop_size
    spanning = 0
    for _, fastener, _, _ in result["pairs"]:
        # Whole: the crop is exactly the strip's pixels around the centre, across the seam.
        x0, line0 = crop_origin(BALLASTED, fastener.x, fastener.line)
        assert not fastener.truncated
        expected = strip.image[line0 : line0 + height, x0 : x0 + width]
        if fastener.mirrored:
            expected = expected[:, ::-1]
        np.testing.assert_array_equal(fastener.crop, expected)
        # Tagged with the frame that holds its centre line, box in that frame's pixels.
        assert fastener.frame_index == fastener.line_index // lines_per_frame
        frame_first = fastener.frame_index * lines_per_frame
        assert fastener.box == (x0, line0 - frame_first, width, height)
        spanning += line0 < frame_first or line0 + height > frame_first + lines_per_frame
    # The point of the test: every crop here straddles a seam.
    assert spanning == len(found)


@pytest.mark.timeout(60)
def test_same_fasteners_whatever_the_frame_size():
    strip = generate_strip(
        BALLASTED, StripSpec(lines=2400, seed=6, tilt_deg=-2.0, light_changes=True)
    )
    by_frames = {}
    for lines_per_frame in (200, 777, 2400):
        found = run_finder(strip, lines_per_frame)
        by_frames[lines_per_frame] = sorted((f.rail, f.side, f.line, f.x) for f in found)
    reference = by_frames[2400]
    assert len(reference) == len(strip.fasteners) == 32
    for lines_per_frame in (200, 777):
        other = by_frames[lines_per_frame]
        assert [o[:2] for o in other] == [r[:2] for r in reference]
        # Only the window the rails were fitted on differs: positions agree within 1 mm.
        line_gap = max(abs(o[2] - r[2]) for o, r in zip(other, reference)) * 2.0
        x_gap = max(abs(o[3] - r[3]) for o, r in zip(other, reference)) * 3.0
        assert line_gap <= 1.0 and x_gap <= 1.5


@pytest.mark.timeout(60)
def test_frames_longer_than_the_buffer_depth_lose_no_fastener():
    # A regression: the line buffer once kept a fixed depth, so with frames longer than it the
    # undecided lines at the end of every frame were dropped, and their seats with them.
    strip = generate_strip(BALLASTED, StripSpec(lines=7000, seed=11))
    depth = FastenerFinder(BALLASTED).buffer.keep_lines
    for lines_per_frame in (depth + 97, 2 * depth + 31):
        found = run_finder(strip, lines_per_frame)
        assert len(found) == len(strip.fasteners) == 92, lines_per_frame
        assert match(strip, found)["recall"] == 1.0


def test_crops_are_canonical_rail_on_the_right():
    strip = generate_strip(BALLASTED, StripSpec(lines=1500, seed=7))
    found = run_finder(strip, 1500)
    width, height = BALLASTED.crop_size
    assert len(found) == len(strip.fasteners) == 20
    for fastener in found:
        assert fastener.crop.shape == (height, width) and fastener.crop.dtype == np.uint8
        rail_x = fastener.x + (-1 if fastener.mirrored else 1) * BALLASTED.px(100.0)
        assert fastener.mirrored == (fastener.x > rail_x)
        # The rail head's shine is the brightest column: it must be in the crop's right half.
        assert int(np.argmax(fastener.crop.mean(axis=0))) > width // 2
    assert {f.mirrored for f in found} == {True, False}


def test_sixteen_bit_frames_give_sixteen_bit_crops_at_the_same_places():
    spec = dict(lines=1500, seed=8, tilt_deg=1.5, light_changes=True)
    eight = generate_strip(BALLASTED, StripSpec(**spec))
    sixteen = generate_strip(BALLASTED, StripSpec(**spec, bit_depth=16))
    found8, found16 = run_finder(eight, 500), run_finder(sixteen, 500)
    assert sixteen.image.dtype == np.uint16 and int(sixteen.image.max()) > 255
    assert len(found8) == len(found16) == 20
    for a, b in zip(found8, found16):
        assert b.crop.dtype == np.uint16
        assert (a.rail, a.side) == (b.rail, b.side)
        assert abs(a.line - b.line) * 2.0 <= 0.5 and abs(a.x - b.x) * 3.0 <= 0.5


def test_rail_and_side_names_follow_the_calibration_and_the_direction():
    # Track's left on the image's right (say, the camera looks backwards).
    geometry = BALLASTED.model_copy(update={"left_rail_image_side": "right"})
    strip = generate_strip(geometry, StripSpec(lines=1200, seed=9))
    found = run_finder(strip, 600, geometry)
    assert len(found) == 16
    (x_left_image, slope), (x_right_image, _) = strip.rail_x_at
    for fastener in found:
        rail_xs = (x_left_image + slope * fastener.line, x_right_image + slope * fastener.line)
        on_image_left_rail = abs(fastener.x - rail_xs[0]) < abs(fastener.x - rail_xs[1])
        # Written out by hand: the image-left rail is the right rail; outside is field.
        assert fastener.rail == ("right" if on_image_left_rail else "left")
        outside = fastener.x < rail_xs[0] or fastener.x > rail_xs[1]
        assert fastener.side == ("field" if outside else "gauge")
    # Running toward decreasing mileage swaps the rail names, never the sides.
    backwards = FastenerFinder(geometry, direction="decreasing")
    found_back = backwards.push(strip.image, 0) + backwards.flush()
    forwards = FastenerFinder(geometry)
    found_fore = forwards.push(strip.image, 0) + forwards.flush()
    assert [(f.line, f.x) for f in found_back] == [(f.line, f.x) for f in found_fore]
    swap = {"left": "right", "right": "left"}
    assert [f.rail for f in found_back] == [swap[f.rail] for f in found_fore]
    assert [f.side for f in found_back] == [f.side for f in found_fore]


def test_per_rail_camera_finds_both_sides_of_its_rail():
    geometry = BALLASTED.model_copy(update={"rails_in_view": "left"})
    strip = generate_strip(
        geometry, StripSpec(lines=1800, seed=10, tilt_deg=-2.0, light_changes=True, defect_rate=0.3)
    )
    result = match(strip, run_finder(strip, 600))
    assert strip.image.shape[1] == round(1400 / 3.0)
    assert len(strip.fasteners) == 12
    assert result["recall"] == 1.0 and result["false"] == 0
    assert result["max_error_mm"] <= 5.0
    # Left rail, track's left on the image's left: its field side is the image-left one.
    for _, fastener, _, _ in result["pairs"]:
        assert fastener.rail == "left"
        assert fastener.side == ("field" if fastener.mirrored is False else "gauge")


def test_plain_ballast_gives_no_fasteners():
    rng = np.random.default_rng(11)
    ballast = rng.integers(40, 160, size=(1200, 900), dtype=np.uint8)
    finder = FastenerFinder(BALLASTED)
    assert finder.push(ballast[:600], 0) + finder.push(ballast[600:], 1) + finder.flush() == []
