"""The strip generator: deterministic, truthful about where it drew each fastener and defect."""

from __future__ import annotations

import numpy as np

from edge.grabber.geometry import TrackGeometry
from edge.grabber.stripgen import StripSpec, generate_strip

GEOMETRY = TrackGeometry(mm_per_px=3.0, mm_per_line=2.0)


def test_same_seed_same_strip_other_seed_other_strip():
    spec = dict(lines=600, light_changes=True, painted_numbers=True, defect_rate=0.5)
    a = generate_strip(GEOMETRY, StripSpec(seed=3, **spec))
    b = generate_strip(GEOMETRY, StripSpec(seed=3, **spec))
    c = generate_strip(GEOMETRY, StripSpec(seed=4, **spec))
    assert a.image.tobytes() == b.image.tobytes()
    assert [(f.x, f.line, f.state) for f in a.fasteners] == [
        (f.x, f.line, f.state) for f in b.fasteners
    ]
    assert a.image.tobytes() != c.image.tobytes()


def test_fasteners_sit_each_side_of_each_rail_at_every_seat():
    strip = generate_strip(GEOMETRY, StripSpec(lines=1500, seed=1, tilt_deg=2.0))
    width = strip.image.shape[1]
    # 2 rails + 2 * 700 mm around them, at 3 mm per pixel.
    assert width == round((1435 + 72 + 1400) / 3.0)
    seats = sorted({f.line for f in strip.fasteners})
    assert len(seats) == 5 and len(strip.fasteners) == 20
    # 600 mm pitch (300 lines) with at most 15 mm (7.5 lines) of jitter.
    assert all(abs(b - a - 300) <= 15 for a, b in zip(seats, seats[1:]))
    slope = np.tan(np.radians(2.0)) * 2.0 / 3.0
    for (x0, k), rail in zip(strip.rail_x_at, ("left", "right")):
        assert abs(k - slope) < 1e-9
        mine = [f for f in strip.fasteners if f.rail == rail]
        for f in mine:
            assert abs(abs(f.x - (x0 + k * f.line)) - 100 / 3.0) < 1e-9
        assert {f.side for f in mine} == {"field", "gauge"}
    # The dark housing (grey 40-65) shows 10 mm railwards and 30 mm along from every true
    # centre, between the clip's toe and its U; the concrete around it is far brighter.
    for f in strip.fasteners:
        (x0, k) = strip.rail_x_at[0 if f.rail == "left" else 1]
        toward_rail = 1 if x0 + k * f.line > f.x else -1
        x = round(f.x + toward_rail * 10 / 3.0)
        assert strip.image[round(f.line + 15), x] < 80
        assert strip.image[round(f.line + 15), x + toward_rail * -30] > 120


def test_every_defect_has_a_mask_at_its_fastener_and_normal_ones_have_none():
    strip = generate_strip(GEOMETRY, StripSpec(lines=3000, seed=2, defect_rate=1.0))
    states = {f.state for f in strip.fasteners}
    assert states == {"missing", "broken", "displaced"}
    for f in strip.fasteners:
        assert f.defect_mask is not None and f.defect_mask.dtype == bool
        ys, xs = np.nonzero(f.defect_mask)
        assert len(ys) > 20
        x0, y0 = f.mask_origin
        # The defect lies within 100 mm of the fastener centre.
        assert abs(xs.mean() + x0 - f.x) * 3.0 < 100 and abs(ys.mean() + y0 - f.line) * 2.0 < 100
    union = strip.defect_mask()
    assert union.shape == strip.image.shape
    assert union.sum() == sum(int(f.defect_mask.sum()) for f in strip.fasteners)
    normal = generate_strip(GEOMETRY, StripSpec(lines=900, seed=2))
    assert all(f.state == "normal" and f.defect_mask is None for f in normal.fasteners)
    assert not normal.defect_mask().any()


def test_a_missing_or_broken_clip_leaves_the_dark_housing_where_its_mask_is():
    strip = generate_strip(GEOMETRY, StripSpec(lines=3000, seed=5, defect_rate=1.0))
    checked = 0
    for f in strip.fasteners:
        if f.state not in ("missing", "broken"):
            continue
        x0, y0 = f.mask_origin
        h, w = f.defect_mask.shape
        # Steel would be 185-225; the housing left behind is 40-65, ballast below it darker.
        region = strip.image[y0 : y0 + h, x0 : x0 + w].astype(float)
        assert region[f.defect_mask].mean() < 100
        checked += 1
    assert checked >= 10


def test_sixteen_bit_strips_use_the_range_and_frames_cover_the_strip():
    strip = generate_strip(GEOMETRY, StripSpec(lines=1000, seed=6, bit_depth=16))
    assert strip.image.dtype == np.uint16 and int(strip.image.max()) > 40000
    frames = list(strip.frames(300))
    assert [f.shape[0] for f in frames] == [300, 300, 300, 100]
    np.testing.assert_array_equal(np.concatenate(frames), strip.image)


def test_slab_track_has_baseplates_darker_than_the_slab():
    slab = TrackGeometry(mm_per_px=3.0, mm_per_line=2.0, track_form="slab")
    strip = generate_strip(slab, StripSpec(lines=900, seed=7, noise_sigma=0))
    (x0, k), _ = strip.rail_x_at
    f = next(f for f in strip.fasteners if f.rail == "left")
    plate_x = round(x0 + k * f.line - (100 + 40 + 40) / 3.0)  # beyond the field fastener
    gap_line = round(f.line + 150)  # 300 mm along: bare slab
    assert strip.image[round(f.line), plate_x] < strip.image[gap_line, plate_x] - 30
