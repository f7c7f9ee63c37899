"""Synthetic line-scan track strips with known fasteners, for tests of the fastener finder.

A strip is what a downward line-scan camera records over a stretch of track: rails (with the
lateral drift of the vehicle, which tilts them a few degrees in the image), concrete sleepers in
ballast or a concrete slab with baseplates, and at every rail seat one fastener on each side of
each rail. It can carry light changes, painted numbers, hazard-striped sleepers, sensor noise,
and defective fasteners (missing, broken, displaced) with a pixel mask of each defect.

Everything is drawn in millimetres and mapped to pixels with the camera's
:class:`~edge.grabber.geometry.TrackGeometry`, so non-square pixels come out right. The same
seed gives the same strip, bit for bit.

Coordinates: ``x`` is the pixel column, ``line`` the row; a pixel's centre is at its integer
index. A fastener's centre is the centre of its clip, on the sleeper's centre line.

Known limit: the drawing is a caricature (Voronoi stones, a U-shaped clip on a housing). It is
meant to exercise geometry, light and clutter, not to look like any particular fastening
system; the real images in ``shared/data/track-topdown-ccby`` are the check on real track.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from pydantic import Field

from edge.config import StrictModel
from edge.grabber.geometry import TrackGeometry
from edge.records import Rail, Side

FastenerState = Literal["normal", "missing", "broken", "displaced"]
DEFECTS: tuple[FastenerState, ...] = ("missing", "broken", "displaced")

_STONE_MM = 45.0  # typical ballast stone size
_SLAB_JOINT_MM = 5000.0
_SLEEPER_LENGTH_MM = 2600.0


class StripSpec(StrictModel):
    """What to draw. Sizes in millimetres unless the name says px or lines."""

    lines: int = Field(gt=0, description="strip length, lines")
    width_px: int | None = Field(
        None, gt=0, description="strip width; default: both rails or one rail plus 700 mm a side"
    )
    seed: int = 0
    rail_x_px: float | None = Field(
        None, description="centre of the image-left rail (or the only rail) at line 0"
    )
    tilt_deg: float = Field(
        0.0, description="rail angle to the image vertical from lateral drift (sleepers stay level)"
    )
    seat_lines: tuple[float, ...] | None = Field(
        None, description="centre lines of the rail seats; default: pitch with jitter"
    )
    first_seat_mm: float = Field(300.0, description="along-track position of the first seat")
    pitch_jitter_mm: float = Field(15.0, ge=0, description="random error of each seat position")
    defect_rate: float = Field(0.0, ge=0, le=1, description="share of defective fasteners")
    light_changes: bool = Field(False, description="daylight ramps, a slow swell, vignetting")
    shadow: bool = Field(False, description="a hard shadow over part of the width (a mast)")
    painted_numbers: bool = Field(False, description="white numbers painted on sleepers or slab")
    striped_sleepers: float = Field(0.0, ge=0, le=1, description="share of hazard-striped sleepers")
    noise_sigma: float = Field(2.0, ge=0, description="sensor noise, 8-bit grey levels")
    salt_pepper: float = Field(0.0, ge=0, le=0.2, description="share of stuck black/white pixels")
    bit_depth: Literal[8, 16] = 8


@dataclass(frozen=True, eq=False)
class TrueFastener:
    """One fastener drawn in a strip.

    ``x`` and ``line`` are the clip centre (pixel column, line). ``defect_mask`` is a boolean
    ``(height, width)`` array of the pixels that differ from a normal fastener (None when
    normal), placed with its top-left pixel at ``mask_origin = (x, line)`` of the strip.
    """

    x: float
    line: float
    rail: Rail
    side: Side
    state: FastenerState
    defect_mask: np.ndarray | None
    mask_origin: tuple[int, int]


@dataclass(frozen=True, eq=False)
class TrackStrip:
    """A generated strip: ``image`` of shape ``(lines, width)``, uint8 or uint16."""

    image: np.ndarray
    fasteners: tuple[TrueFastener, ...]
    geometry: TrackGeometry
    rail_x_at: tuple[tuple[float, float], ...]  # per rail in image order: (x at line 0, slope)

    def frames(self, lines_per_frame: int) -> Iterator[np.ndarray]:
        """The strip cut into frames of ``lines_per_frame`` lines (the last may be shorter)."""
        for first in range(0, self.image.shape[0], lines_per_frame):
            yield self.image[first : first + lines_per_frame]

    def defect_mask(self) -> np.ndarray:
        """Union of all defect masks, boolean ``(lines, width)``."""
        mask = np.zeros(self.image.shape, dtype=bool)
        for fastener in self.fasteners:
            if fastener.defect_mask is None:
                continue
            x0, y0 = fastener.mask_origin
            _paste_or(mask, fastener.defect_mask, x0, y0)
        return mask


def _paste_or(target: np.ndarray, patch: np.ndarray, x0: int, y0: int) -> None:
    h, w = patch.shape
    ty0, tx0 = max(0, y0), max(0, x0)
    ty1, tx1 = min(target.shape[0], y0 + h), min(target.shape[1], x0 + w)
    if ty1 > ty0 and tx1 > tx0:
        target[ty0:ty1, tx0:tx1] |= patch[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0]


def generate_strip(geometry: TrackGeometry, spec: StripSpec) -> TrackStrip:
    """Draw a strip. Deterministic in ``spec.seed``.

    Steps: (1) rail positions and seat lines, (2) ballast or slab, (3) sleepers or baseplates
    with paint, (4) rails, (5) fasteners with their states and masks, (6) light, optics, noise.
    """
    rng = np.random.default_rng(spec.seed)
    g = geometry

    # 1. Rails and rail seats.
    rails = g.rails_left_to_right()
    spacing_px = g.px(g.rail_spacing_mm)
    margin_px = g.px(700.0)
    width = spec.width_px or round(2 * margin_px + (spacing_px if len(rails) == 2 else 0))
    x_first = (
        spec.rail_x_px
        if spec.rail_x_px is not None
        else (width - (len(rails) - 1) * spacing_px) / 2
    )
    slope = math.tan(math.radians(spec.tilt_deg)) * g.mm_per_line / g.mm_per_px
    rail_x_at = tuple((x_first + i * spacing_px, slope) for i in range(len(rails)))
    if spec.seat_lines is not None:
        seat_lines = np.asarray(spec.seat_lines, dtype=np.float64)
    else:
        positions = np.arange(spec.first_seat_mm, spec.lines * g.mm_per_line, g.sleeper_pitch_mm)
        jitter = rng.uniform(-1, 1, positions.shape) * spec.pitch_jitter_mm
        seat_lines = (positions + jitter) / g.mm_per_line
    shape = (spec.lines, width)

    # 2. Ground: ballast stones or a slab.
    if g.track_form == "ballasted":
        image = _ballast(shape, g, rng)
    else:
        image = _slab(shape, g, rng)

    # 3. Sleepers (ballasted) or baseplates (slab), with paint.
    for seat in seat_lines:
        if g.track_form == "ballasted":
            _draw_sleeper(image, g, seat, rail_x_at, rng, spec)
        else:
            for x0, k in rail_x_at:
                _draw_baseplate(image, g, x0 + k * seat, seat, rng)
            if spec.painted_numbers and rng.random() < 0.5:
                _paint_number(image, g, seat + g.lines(g.sleeper_pitch_mm / 2), rail_x_at, rng)

    # 4. Rails.
    for x0, k in rail_x_at:
        _draw_rail(image, g, x0, k, rng)

    # 5. Fasteners: one each side of each rail at each seat.
    fasteners = []
    for seat in seat_lines:
        for rail, (x0, k) in zip(rails, rail_x_at):
            rail_x = x0 + k * seat
            for image_side in ("left", "right"):
                sign = -1.0 if image_side == "left" else 1.0
                centre_x = rail_x + sign * g.px(g.fastener_offset_mm)
                state: FastenerState = "normal"
                if rng.random() < spec.defect_rate:
                    state = DEFECTS[int(rng.integers(len(DEFECTS)))]
                mask, origin = _draw_fastener(image, g, centre_x, seat, sign < 0, state, rng)
                fasteners.append(
                    TrueFastener(
                        x=float(centre_x),
                        line=float(seat),
                        rail=rail,
                        side=g.side_of(rail, image_side),
                        state=state,
                        defect_mask=mask,
                        mask_origin=origin,
                    )
                )

    # 6. Light, optics, noise, quantisation.
    if spec.light_changes or spec.shadow:
        image *= _light_field(shape, g, rng, spec.light_changes, spec.shadow)
    image = cv2.GaussianBlur(image, (0, 0), 0.6)
    if spec.noise_sigma > 0:
        image += rng.normal(0.0, spec.noise_sigma, shape).astype(np.float32)
    if spec.salt_pepper > 0:
        stuck = rng.random(shape) < spec.salt_pepper
        image[stuck] = rng.choice(np.array([0.0, 255.0], np.float32), int(stuck.sum()))
    if spec.bit_depth == 16:
        out = np.clip(image * 257.0, 0, 65535).astype(np.uint16)
    else:
        out = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    in_view = [f for f in fasteners if 0 <= f.line < spec.lines and 0 <= f.x < width]
    return TrackStrip(out, tuple(in_view), g, rail_x_at)


# Ground ----------------------------------------------------------------------------------------


def _ballast(shape: tuple[int, int], g: TrackGeometry, rng: np.random.Generator) -> np.ndarray:
    """Ballast: Voronoi stones with random grey, lit in the middle, dark gaps between them.

    Drawn on a square grid of the finer pixel size, then resampled to the camera's pixels.
    """
    cell_mm = min(g.mm_per_px, g.mm_per_line)
    h = max(2, round(shape[0] * g.mm_per_line / cell_mm))
    w = max(2, round(shape[1] * g.mm_per_px / cell_mm))
    stones = max(4, int(h * w * cell_mm**2 / (_STONE_MM**2 * 0.8)))
    seeds = np.ones((h, w), np.uint8)
    seeds[rng.integers(0, h, stones), rng.integers(0, w, stones)] = 0
    _, labels = cv2.distanceTransformWithLabels(
        seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL
    )
    grey = rng.uniform(45, 150, labels.max() + 1).astype(np.float32)
    value = grey[labels]
    border = np.zeros((h, w), np.uint8)
    border[:, 1:] |= (labels[:, 1:] != labels[:, :-1]).astype(np.uint8)
    border[1:, :] |= (labels[1:, :] != labels[:-1, :]).astype(np.uint8)
    to_gap = cv2.distanceTransform(1 - border, cv2.DIST_L2, 3) * cell_mm
    shade = np.clip(0.35 + to_gap / 12.0, 0.35, 1.0)
    ground = value * shade
    return cv2.resize(ground, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


def _slab(shape: tuple[int, int], g: TrackGeometry, rng: np.random.Generator) -> np.ndarray:
    """Concrete slab: mid grey, low-frequency mottling, fine grain, transverse joints."""
    low = cv2.resize(
        rng.normal(0, 8, (max(2, shape[0] // 40), max(2, shape[1] // 40))).astype(np.float32),
        (shape[1], shape[0]),
        interpolation=cv2.INTER_CUBIC,
    )
    image = 135.0 + low + rng.normal(0, 3, shape).astype(np.float32)
    joint_lines = np.arange(
        rng.uniform(0, _SLAB_JOINT_MM), shape[0] * g.mm_per_line, _SLAB_JOINT_MM
    )
    for joint in joint_lines / g.mm_per_line:
        y0, y1 = int(joint), int(joint + max(1, g.lines(12)))
        image[max(0, y0) : max(0, y1)] *= 0.55
    return image.astype(np.float32)


# Sleepers, baseplates, paint -------------------------------------------------------------------


def _draw_sleeper(
    image: np.ndarray,
    g: TrackGeometry,
    seat: float,
    rail_x_at: tuple[tuple[float, float], ...],
    rng: np.random.Generator,
    spec: StripSpec,
) -> None:
    """A concrete sleeper centred on line ``seat``: straight edges, a few stones lying over
    them (ballast spilt on the sleeper), hazard stripes on some."""
    lines, width = image.shape
    half = g.lines(g.sleeper_width_mm) / 2
    centre_x = np.mean([x0 + k * seat for x0, k in rail_x_at])
    if len(rail_x_at) == 1:
        # A per-rail camera: the sleeper runs toward the track centre on the gauge side.
        gauge_dir = 1.0 if g.side_of(g.rails_in_view, "right") == "gauge" else -1.0
        centre_x += gauge_dir * g.px(g.rail_spacing_mm / 2)
    half_len = g.px(_SLEEPER_LENGTH_MM) / 2
    left, right = centre_x - half_len, centre_x + half_len
    top, bottom = seat - half, seat + half
    y0, y1 = max(0, int(np.floor(top))), min(lines, int(np.ceil(bottom)) + 1)
    if y1 <= y0:
        return
    cover = _box_alpha((y1 - y0, width), left, right, top - y0, bottom - y0)
    xs = np.arange(width)
    ys = np.arange(y0, y1, dtype=np.float32)[:, None]
    if rng.random() < spec.striped_sleepers:
        # Hazard stripes at 45 degrees on the ground, 150 mm black, 150 mm white.
        period = g.px(300.0)
        phase = (xs[None, :] + (ys - seat) * g.mm_per_line / g.mm_per_px) % period
        concrete = np.where(phase < period / 2, 25.0, 235.0).astype(np.float32)
    else:
        concrete = rng.uniform(150, 200) + rng.normal(0, 4, cover.shape).astype(np.float32)
    region = image[y0:y1]
    region[:] = region * (1 - cover) + concrete * cover
    # Stones spilt over the two edges, about one per 300 mm of sleeper and edge.
    for _ in range(int(rng.poisson(2 * _SLEEPER_LENGTH_MM / 300.0))):
        edge = top if rng.random() < 0.5 else bottom
        x = rng.uniform(max(0.0, left), min(float(width), right))
        y = edge + rng.normal(0, g.lines(10.0))
        axes = (
            max(1, round(g.px(rng.uniform(12, 25)))),
            max(1, round(g.lines(rng.uniform(12, 25)))),
        )
        cv2.ellipse(
            image, (round(x), round(y)), axes, rng.uniform(0, 180), 0, 360, rng.uniform(45, 150), -1
        )
    if spec.painted_numbers and rng.random() < 0.5:
        _paint_number(image, g, seat, rail_x_at, rng)


def _paint_number(
    image: np.ndarray,
    g: TrackGeometry,
    line: float,
    rail_x_at: tuple[tuple[float, float], ...],
    rng: np.random.Generator,
) -> None:
    """A white two- or three-digit number about 80 mm tall, beside a rail, not on a fastener."""
    x0, k = rail_x_at[int(rng.integers(len(rail_x_at)))]
    rail_x = x0 + k * line
    side = 1.0 if rng.random() < 0.5 else -1.0
    start = rail_x + side * g.px(g.fastener_offset_mm + g.fastener_size_mm[0] / 2 + 40)
    text = str(int(rng.integers(10, 999)))
    # Draw at 1 mm per pixel, then map onto the camera's pixels.
    patch = np.zeros((100, 60 * len(text) + 20), np.uint8)
    cv2.putText(patch, text, (10, 88), cv2.FONT_HERSHEY_SIMPLEX, 3.0, 255, 9, cv2.LINE_AA)
    size = (max(1, round(g.px(patch.shape[1]))), max(1, round(g.lines(patch.shape[0]))))
    alpha = cv2.resize(patch, size, interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    left = round(start if side > 0 else start - size[0])
    top = round(line - size[1] / 2)
    _blend(image, alpha, left, top, 235.0)


def _draw_baseplate(
    image: np.ndarray, g: TrackGeometry, rail_x: float, seat: float, rng: np.random.Generator
) -> None:
    """Slab track: a dark baseplate under the rail, wider than both fasteners."""
    half_w = g.px(g.fastener_offset_mm + g.fastener_size_mm[0] / 2 + 60)
    half_h = g.lines(g.sleeper_width_mm) / 2
    x0, y0 = math.floor(rail_x - half_w) - 1, math.floor(seat - half_h) - 1
    alpha = _box_alpha(
        (math.ceil(2 * half_h) + 3, math.ceil(2 * half_w) + 3),
        rail_x - half_w - x0,
        rail_x + half_w - x0,
        seat - half_h - y0,
        seat + half_h - y0,
    )
    _blend(image, alpha, x0, y0, rng.uniform(70, 95))


# Rails -----------------------------------------------------------------------------------------


def _draw_rail(
    image: np.ndarray, g: TrackGeometry, x0: float, slope: float, rng: np.random.Generator
) -> None:
    """Rail foot (dark, rusty) and head (bright running band with dark edges), anti-aliased."""
    lines, width = image.shape
    centre = x0 + slope * np.arange(lines, dtype=np.float32)[:, None]
    offset = np.abs(np.arange(width, dtype=np.float32)[None, :] - centre)
    foot = np.clip(g.px(g.rail_foot_width_mm) / 2 + 0.5 - offset, 0, 1)
    head = np.clip(g.px(g.rail_head_width_mm) / 2 + 0.5 - offset, 0, 1)
    band = np.clip(g.px(g.rail_head_width_mm) * 0.3 + 0.5 - offset, 0, 1)
    foot_grey = rng.uniform(55, 80)
    head_grey = rng.uniform(120, 150)
    shine = rng.uniform(190, 230) + cv2.GaussianBlur(
        rng.normal(0, 6, (lines, 1)).astype(np.float32), (0, 0), 5
    )
    image[:] = image * (1 - foot) + foot_grey * foot
    image[:] = image * (1 - head) + head_grey * head
    image[:] = image * (1 - band) + shine * band


# Fasteners -------------------------------------------------------------------------------------


def _clip_polylines(state: FastenerState, rng: np.random.Generator) -> list[np.ndarray]:
    """The clip in millimetres, canonical way round: the rail lies toward +u, along-track is v.

    A U open away from the rail, and a toe bearing on the rail foot.
    """
    u_bar = np.array([[-32, -52], [22, -52], [22, 52], [-32, 52]], np.float64)
    toe = np.array([[0, 0], [40, 0]], np.float64)
    if state == "broken":
        # One arm of the U snapped off at the bend.
        u_bar = u_bar[:3] if rng.random() < 0.5 else u_bar[1:]
    if state == "displaced":
        angle = math.radians(rng.uniform(12, 25) * (1 if rng.random() < 0.5 else -1))
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        shift = np.array([-rng.uniform(10, 20), rng.uniform(20, 35) * rng.choice([-1, 1])])
        u_bar = u_bar @ rot.T + shift
        toe = toe @ rot.T + shift
    return [u_bar, toe]


def _draw_fastener(
    image: np.ndarray,
    g: TrackGeometry,
    cx: float,
    cy: float,
    rail_on_right: bool,
    state: FastenerState,
    rng: np.random.Generator,
) -> tuple[np.ndarray | None, tuple[int, int]]:
    """Housing plus clip centred on ``(cx, cy)``; returns the defect mask and its origin."""
    half_u, half_v = 80.0, 90.0  # drawing area around the centre, mm
    x0 = math.floor(cx - g.px(half_u))
    y0 = math.floor(cy - g.lines(half_v))
    pw = math.ceil(g.px(2 * half_u)) + 2
    ph = math.ceil(g.lines(2 * half_v)) + 2
    # A fine grid of sub-pixels, near 0.5 mm square, in whole sub-pixels per pixel.
    rx = max(1, math.ceil(g.mm_per_px / 0.5))
    ry = max(1, math.ceil(g.mm_per_line / 0.5))
    sx, sy = g.mm_per_px / rx, g.mm_per_line / ry
    sign = 1.0 if rail_on_right else -1.0

    def to_fine(points_mm: np.ndarray) -> np.ndarray:
        # Pixel-centre coordinates -> sub-pixel indices (16 fractional bits for cv2 drawing).
        px = cx + sign * points_mm[:, 0] / g.mm_per_px
        py = cy + points_mm[:, 1] / g.mm_per_line
        fx = (px - x0 + 0.5) * rx - 0.5
        fy = (py - y0 + 0.5) * ry - 0.5
        return np.rint(np.stack([fx, fy], 1) * 16).astype(np.int32)

    def render(polys: list[np.ndarray], thickness_mm: float) -> np.ndarray:
        fine = np.zeros((ph * ry, pw * rx), np.uint8)
        thick = max(1, round(thickness_mm / min(sx, sy)))
        for poly in polys:
            cv2.polylines(fine, [to_fine(poly)], False, 255, thick, cv2.LINE_8, 4)
        return cv2.resize(fine, (pw, ph), interpolation=cv2.INTER_AREA).astype(np.float32) / 255

    housing = np.array([[-34, -62], [34, -62], [34, 62], [-34, 62]], np.float64)
    fine = np.zeros((ph * ry, pw * rx), np.uint8)
    cv2.fillPoly(fine, [to_fine(housing)], 255, cv2.LINE_8, 4)
    housing_alpha = cv2.resize(fine, (pw, ph), interpolation=cv2.INTER_AREA) / 255.0
    _blend(image, housing_alpha.astype(np.float32), x0, y0, rng.uniform(40, 65))
    bolt = np.array([[-12 + 9 * math.cos(a), 9 * math.sin(a)] for a in np.linspace(0, 6.3, 16)])
    _blend(image, render([bolt], 6.0), x0, y0, rng.uniform(95, 120))

    normal = render(_clip_polylines("normal", rng), 14.0)
    if state == "normal":
        drawn, mask = normal, None
    elif state == "missing":
        drawn, mask = None, normal > 0.5
    else:
        drawn = render(_clip_polylines(state, rng), 14.0)
        mask = (normal > 0.5) != (drawn > 0.5)
    if drawn is not None:
        _blend(image, drawn, x0, y0, rng.uniform(185, 225))
    return mask, (x0, y0)


# Light -----------------------------------------------------------------------------------------


def _light_field(
    shape: tuple[int, int],
    g: TrackGeometry,
    rng: np.random.Generator,
    daylight: bool,
    shadow: bool,
) -> np.ndarray:
    """Multiplicative gain ``(lines, width)``.

    Daylight (a cloud, a cutting): the gain ramps by 0.6-1.4 over 0.5-2 m of track, three
    times, plus a slow swell and vignetting across. Shadow (a mast, a bridge): part of the
    width at 0.5 for 30 % of the strip, with a 25 mm penumbra.
    """
    lines, width = shape
    y = np.arange(lines, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    field = np.ones(shape, np.float32)
    if daylight:
        gain = np.ones((lines, 1), np.float32)
        for start in rng.uniform(0, lines, 3):
            ramp = g.lines(rng.uniform(500, 2000))
            gain *= 1 + (rng.uniform(0.6, 1.4) - 1) * np.clip((y - start) / ramp, 0, 1)
        period = g.lines(rng.uniform(1500, 4000))
        swell = 1 + 0.25 * np.sin(2 * np.pi * y / period + rng.uniform(0, 6))
        vignette = 1 - 0.3 * ((x - width / 2) / (width / 2)) ** 2
        field *= np.clip(gain, 0.35, 2.0) * swell * vignette
    if shadow:
        dark = np.ones(shape, np.float32)
        s0 = rng.uniform(0, lines * 0.7)
        edge_x = rng.uniform(0.2, 0.8) * width
        dark[(y > s0) & (y < s0 + lines * 0.3) & (x < edge_x)] = 0.5
        field *= cv2.GaussianBlur(dark, (0, 0), sigmaX=3, sigmaY=max(0.5, g.lines(25.0)))
    return field


# Compositing -----------------------------------------------------------------------------------


def _box_alpha(
    shape: tuple[int, int], left: float, right: float, top: float, bottom: float
) -> np.ndarray:
    """Anti-aliased coverage ``(lines, width)`` of an axis-aligned box, pixel-centre coordinates."""
    ys = np.arange(shape[0], dtype=np.float32)[:, None]
    xs = np.arange(shape[1], dtype=np.float32)[None, :]
    ax = np.clip(xs + 0.5 - left, 0, 1) * np.clip(right - xs + 0.5, 0, 1)
    ay = np.clip(ys + 0.5 - top, 0, 1) * np.clip(bottom - ys + 0.5, 0, 1)
    return ay * ax


def _blend(image: np.ndarray, alpha: np.ndarray, x0: int, y0: int, grey: float) -> None:
    """Paint ``grey`` over ``image`` with coverage ``alpha`` placed at ``(x0, y0)``, clipped."""
    h, w = alpha.shape
    ty0, tx0 = max(0, y0), max(0, x0)
    ty1, tx1 = min(image.shape[0], y0 + h), min(image.shape[1], x0 + w)
    if ty1 <= ty0 or tx1 <= tx0:
        return
    a = alpha[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0]
    region = image[ty0:ty1, tx0:tx1]
    region[:] = region * (1 - a) + grey * a
