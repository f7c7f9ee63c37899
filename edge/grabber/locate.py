"""Find the rails, then the rail seats along each rail, then cut a crop on every fastener.

The method (chosen by measurement; alternatives and figures in docs/fastener-finding.md)
works on a reduced copy of the newest lines, about ``analysis_mm`` per pixel, and relies only
on what plain ballasted or slab track shows:

1. Rails (:func:`find_rails`). The slope: the image is sheared for each slope within
   ``max_rail_tilt_deg`` and averaged down the columns; at the rail's slope its edges add up
   while ballast averages out. The position: the column about which the image is most
   mirror-symmetric (:func:`mirror_symmetry`); a rail, its foot and the fasteners on both its
   sides mirror each other, a shadow's edge or a sleeper end do not. With both rails in view,
   the pair must lie ``gauge + head width`` apart. The line is refitted through the most
   symmetric column of each 300 mm of the window, one slope for both rails.
2. Rail seats (:func:`seat_profile`). Across a band on both sides of the rail, beyond the
   fasteners, the image is averaged into a profile along the rail. A sleeper (a baseplate on
   slab track) is a run of about ``sleeper_width_mm`` bounded by two opposite edges across
   the track and brighter (or darker, ``sleeper_tone``) than the ground on both sides of it:
   the evidence is the two edges' strength (:func:`edge_pair_score`) scaled by that contrast
   (:func:`run_contrast`), best over a few widths and over sleeper skews within
   ``max_sleeper_skew_deg``. Seats are its peaks, at least ``(1 - pitch_tolerance) * pitch``
   apart, centred midway between their two edges. The evidence never looks at the
   fasteners themselves, so a seat with a missing or broken clip is found like any other: the
   anomaly model must see the empty seat. With both rails in view, a seat found on one rail
   lowers the threshold for its partner on the other (:func:`pair_seats`).
3. Fasteners. One each side of the rail, ``fastener_offset_mm`` from its centre, along the
   sleeper. Where sleepers cross the rail askew, the rail is first moved to its most
   symmetric column with the sleepers levelled (:func:`refine_rail`).

Streaming: :class:`FastenerFinder` keeps a :class:`~edge.grabber.linebuffer.LineBuffer` and,
on every frame, decides the seats whose centre lies between the last decided line and the
newest line less a margin (the crop's half height and the search's reach). Each line is
decided once, so a fastener on a frame seam is cut once and whole; seats of a rail are also
kept apart by line index, never by frame.

Known limits:
- A hard shadow edge or a sharp change of light across a seat moves its centre, or loses it
  on slab track (measured on generated strips; docs/fastener-finding.md).
- A seat less than about ``(1 - sleeper_width_tolerance)`` visible at the first or last line of
  a run is not reported; one cut in half by the run's end is centred on the visible part.
- Switches, crossings, level crossings and hazard-striped sleepers do not look like plain
  track: seats there may be missed or off-centre. Nothing here detects them.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.ndimage import maximum_filter1d

from edge.grabber.crops import FoundFastener, cut_crop
from edge.grabber.geometry import TrackGeometry
from edge.grabber.linebuffer import LineBuffer
from edge.logs import get_logger
from edge.records import Direction, Rail

log = get_logger(__name__)

_MIN_RAIL_SYMMETRY = 0.2  # mirror symmetry (-1..1) a rail must reach
_PARTNER_SHARE = 0.5  # share of the seat threshold enough for a seat the other rail vouches for
_SKEW_GAIN = 1.1  # evidence a sleeper skew must gain over level sleepers to be taken
_WIDTH_TIE = 0.85  # widths with evidence within this share of the best count as a tie
_NOISE_QUANTILE = 75  # percentile of the gradient profile taken as its typical size
_SKEW_EXPLORE_EVERY = 4  # streaming: skews beside the last one are tried every this many frames
_FLANK_SHARE = 0.5  # each flank of the seat template, as a share of the seat width
_RAIL_CONTEXT_MM = 400.0  # track before the undecided lines that the rails are fitted on
_REFIT_STRETCH_MM = 300.0  # rails are refitted through one point per stretch this long


@dataclass(frozen=True)
class RailLine:
    """A rail's centre line in full-resolution pixels: ``x = x0 + slope * (line - line0)``.

    ``symmetry`` is the rail's mirror symmetry (-1..1), the evidence it was found with.
    """

    rail: Rail
    x0: float
    line0: float
    slope: float
    symmetry: float

    def x_at(self, line: float) -> float:
        return self.x0 + self.slope * (line - self.line0)


@dataclass(frozen=True)
class Seat:
    """A rail seat: where the sleeper's (or baseplate's) centre line crosses the rail centre.

    ``line`` is absolute (sub-line); ``evidence`` its strength (multiples of the threshold's
    unit, see :func:`edge_pair_score`); ``skew`` the sleeper's slope in the image, lines per
    pixel across (0 for level sleepers).
    """

    rail: Rail
    line: float
    evidence: float
    skew: float = 0.0


def shrink(lines: np.ndarray, fx: int, fy: int) -> np.ndarray:
    """``lines`` ``(n * fy + r, m * fx + c)`` averaged over blocks ``fy`` by ``fx``: float32
    ``(n, m)``. Blocks start at the first line, so shrinking frames one by one (each a
    multiple of ``fy`` lines) gives the rows that shrinking them together would."""
    rows, cols = lines.shape[0] // fy, lines.shape[1] // fx
    data = lines[: rows * fy, : cols * fx]
    if (fx > 1 or fy > 1) and rows > 0 and cols > 0:
        data = cv2.resize(data, (cols, rows), interpolation=cv2.INTER_AREA)
    return np.asarray(data, dtype=np.float32).reshape(rows, cols)


class _Reduced:
    """A window of lines reduced to about ``analysis_mm`` per pixel, with its coordinates.

    ``image`` is float32 ``(rows, columns)``; row ``r`` averages ``fy`` lines starting at
    ``first_line + r * fy`` and column ``c`` averages ``fx`` pixels starting at ``c * fx``.
    """

    def __init__(self, lines: np.ndarray, first_line: int, fx: int, fy: int) -> None:
        self.first_line, self.fx, self.fy = first_line, fx, fy
        # Salt-and-pepper and hot pixels would otherwise dominate the gradients.
        self.image = cv2.medianBlur(shrink(lines, fx, fy), 3)

    @classmethod
    def from_shrunk(cls, rows: np.ndarray, first_line: int, fx: int, fy: int) -> _Reduced:
        """From rows already shrunk by :func:`shrink` (a cache of earlier frames)."""
        reduced = cls.__new__(cls)
        reduced.first_line, reduced.fx, reduced.fy = first_line, fx, fy
        reduced.image = cv2.medianBlur(np.ascontiguousarray(rows, dtype=np.float32), 3)
        return reduced

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape

    def line_of(self, row: float) -> float:
        return self.first_line + row * self.fy + (self.fy - 1) / 2

    def row_of(self, line: float) -> float:
        return (line - self.first_line - (self.fy - 1) / 2) / self.fy

    def x_of(self, col: float) -> float:
        return col * self.fx + (self.fx - 1) / 2

    def col_of(self, x: float) -> float:
        return (x - (self.fx - 1) / 2) / self.fx


def sleeper_widths_mm(geometry: TrackGeometry) -> list[float]:
    """The sleeper (baseplate) widths tried, mm: ``sleeper_width_mm`` within its tolerance,
    in steps of about 18 %, so no width is more than 9 % from one tried."""
    tolerance = geometry.sleeper_width_tolerance
    low, high = math.log(1 - tolerance), math.log(1 + tolerance)
    count = max(1, math.ceil((high - low) / math.log(1.18))) + 1
    return [geometry.sleeper_width_mm * math.exp(v) for v in np.linspace(low, high, count)]


def _shear(image: np.ndarray, slope: float, centre_row: float) -> np.ndarray:
    """Image ``(rows, cols)`` sheared so that ``x = c + slope * (row - centre_row)`` is column c."""
    rows, cols = image.shape[:2]
    matrix = np.float32([[1, slope, -slope * centre_row], [0, 1, 0]])
    return cv2.warpAffine(
        image,
        matrix,
        (cols, rows),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )


def _rail_scores(column_mean: np.ndarray, half_foot: int) -> np.ndarray:
    """Two-sided edge energy of a column profile ``(cols,)``: min of left and right halves."""
    d = np.zeros_like(column_mean)
    d[1:-1] = np.abs(column_mean[2:] - column_mean[:-2]) / 2
    c = np.concatenate([[0.0], np.cumsum(d)])
    n = d.shape[0]
    scores = np.zeros(n)
    x = np.arange(half_foot, n - half_foot)
    left = c[x] - c[x - half_foot]
    right = c[x + half_foot + 1] - c[x + 1]
    scores[x] = np.minimum(left, right)
    return scores


def _parabolic(values: np.ndarray, i: int) -> float:
    """Sub-sample position of the peak at index ``i`` of ``values``."""
    if i <= 0 or i >= len(values) - 1:
        return float(i)
    a, b, c = values[i - 1], values[i], values[i + 1]
    denominator = a - 2 * b + c
    if denominator >= 0:
        return float(i)
    return float(i + 0.5 * (a - c) / denominator)


def mirror_symmetry(
    image: np.ndarray, reach: int, row_groups: list[np.ndarray] | None = None
) -> np.ndarray:
    """Left-right mirror symmetry of ``image`` ``(rows, cols)`` about every column, ``(cols,)``.

    Each row is high-passed across (its mean over ``2 * reach + 1`` columns removed), then the
    normalised correlation of the ``reach`` columns left of ``x`` with the mirrored ``reach``
    columns right of it, pooled over all rows: 1 for a perfect mirror, near 0 for ballast, -1
    for an anti-mirror such as a single step. A rail with its foot and its two fasteners is
    the most symmetric thing on plain track. With ``row_groups`` (arrays of row indices), the
    rows are pooled per group instead: ``(groups, cols)``.
    """
    image = np.ascontiguousarray(image, dtype=np.float32)
    high = image - cv2.blur(image, (2 * reach + 1, 1), borderType=cv2.BORDER_REFLECT)
    rows, cols = image.shape
    groups = row_groups if row_groups is not None else [np.arange(rows)]
    products = np.zeros((rows, cols), np.float32)
    for u in range(1, min(reach, (cols - 1) // 2) + 1):
        products[:, u : cols - u] += high[:, : cols - 2 * u] * high[:, 2 * u :]
    # Energy of the columns paired with x: half the sum of squares of x-u..x-1 and x+1..x+u,
    # u as far as both sides reach.
    x = np.arange(cols)
    u = np.minimum(np.minimum(x, cols - 1 - x), reach)
    squares = high * high
    out = np.empty((len(groups), cols))
    for n, group in enumerate(groups):
        column_energy = np.concatenate([[0.0], np.cumsum(squares[group].sum(axis=0))])
        energy = 0.5 * (
            column_energy[x]
            - column_energy[x - u]
            + column_energy[x + u + 1]
            - column_energy[x + 1]
        )
        # A floor on the energy keeps featureless stretches (black borders, glare) from scoring.
        floor = 0.05 * float(np.median(energy)) + 1e-6
        out[n] = products[group].sum(axis=0) / (energy + floor)
    return out if row_groups is not None else out[0]


def _best_columns(
    scores: np.ndarray, n_rails: int, low: int, high: int
) -> tuple[float, tuple[int, ...]]:
    """Best column, or best pair of columns ``low..high`` apart, by summed score."""
    cols = scores.shape[0]
    if n_rails == 1:
        i = int(np.argmax(scores))
        return float(scores[i]), (i,)
    if low >= cols:
        return -math.inf, (0, 0)
    width = high - low + 1
    padded = np.concatenate([scores, np.full(high + 1, -np.inf)])
    ahead = maximum_filter1d(padded, size=width, origin=-(width // 2))[low : low + cols]
    total = scores + ahead
    i = int(np.argmax(total))
    j = i + low + int(np.argmax(padded[i + low : i + high + 1]))
    return float(total[i]), (i, j)


def find_rails(
    reduced: _Reduced,
    geometry: TrackGeometry,
    direction: Direction = "increasing",
    slope_hint: float | None = None,
) -> list[RailLine]:
    """The rails in a reduced window, in image order; an empty list when none is clear.

    Steps: (1) average rows in blocks short enough that a rail at the steepest slope moves at
    most two columns within one; (2) the slope: for each slope within the tilt limit, shear,
    average down the columns and score every column with :func:`_rail_scores`; keep the slope
    whose best rail (or pair of rails ``gauge + head`` apart) scores highest; (3) the columns:
    at that slope, the most mirror-symmetric column (or pair), see :func:`mirror_symmetry`;
    (4) the rails' lines refitted through the most symmetric column of each 300 mm: one slope
    for all rails in view, one offset each, stretches that disagree dropped once.
    """
    g = geometry
    rows, cols = reduced.shape
    names = g.rails_left_to_right(direction)
    col_mm = g.mm_per_px * reduced.fx
    row_mm = g.mm_per_line * reduced.fy
    half_foot = max(2, round(g.rail_foot_width_mm / col_mm / 2))
    reach = max(3, round((g.fastener_offset_mm + g.fastener_size_mm[0] / 2) / col_mm))
    max_slope = math.tan(math.radians(g.max_rail_tilt_deg)) * row_mm / col_mm  # cols per row
    spacing = g.rail_spacing_mm / col_mm
    low = max(1, int(math.floor(spacing * (1 - g.rail_spacing_tolerance))))
    high = int(math.ceil(spacing * (1 + g.rail_spacing_tolerance)))

    # 1. Blocks of rows.
    block = max(1, min(16, int(2.0 / max(max_slope, 1e-6))))
    n_blocks = rows // block
    if n_blocks < 4:
        return []
    blocks = reduced.image[: n_blocks * block].reshape(n_blocks, block, cols).mean(axis=1)
    centre = (n_blocks - 1) / 2

    # 2. Slope, in columns per block; one step moves the far rows by about one column.
    step = 1.0 / max(1.0, n_blocks / 2)
    n_steps = int(math.ceil(max_slope * block / step))

    def total_at(slope: float) -> float:
        profile = _shear(blocks, slope, centre).mean(axis=0).astype(np.float64)
        return _best_columns(_rail_scores(profile, half_foot), len(names), low, high)[0]

    coarse, totals, k_hint = 3, {}, 0
    if slope_hint is not None:
        # Streaming: the last window's slope (pixels per line) and two steps either side.
        k_hint = round(slope_hint * reduced.fy / reduced.fx * block / step)
        for k in range(max(-n_steps, k_hint - 2), min(n_steps, k_hint + 2) + 1):
            totals[k] = total_at(k * step)
    if not totals or max(totals, key=totals.get) in (k_hint - 2, k_hint + 2):
        totals |= {k: total_at(k * step) for k in range(-n_steps, n_steps + 1, coarse)}
    k_best = max(totals, key=totals.get)
    for k in range(max(-n_steps, k_best - coarse + 1), min(n_steps, k_best + coarse - 1) + 1):
        if k not in totals:
            totals[k] = total_at(k * step)
    k = max(totals, key=totals.get)
    slope = k * step
    if k - 1 in totals and k + 1 in totals:
        slope += _parabolic(np.array([totals[k - 1], totals[k], totals[k + 1]]), 1) * step - step

    # 3. Columns.
    upright = _shear(blocks, slope, centre)
    symmetry = mirror_symmetry(upright, reach)
    _, columns = _best_columns(symmetry, len(names), low, high)
    if min(symmetry[c] for c in columns) < _MIN_RAIL_SYMMETRY:
        return []

    # 4. Refit the rails through the most symmetric column of each stretch of about 300 mm:
    # one slope for all rails in view (they are parallel), one offset per rail, weighted by
    # symmetry; stretches that disagree (an asymmetric, defective seat) are dropped once.
    n_stretches = max(4, round(n_blocks * block * row_mm / _REFIT_STRETCH_MM))
    stretches = np.array_split(np.arange(n_blocks), n_stretches)
    search = max(2, half_foot // 2)
    points = []  # (rail number, block row from centre, column, weight)
    for n, column in enumerate(columns):
        lo, hi = max(0, column - search - reach), min(cols, column + search + reach + 1)
        a, b = max(column - search - lo, 0), column + search + 1 - lo
        local = mirror_symmetry(upright[:, lo:hi], reach, stretches)
        for stretch, row in zip(stretches, local):
            window = row[a:b]
            if window.size < 3:
                continue
            i = int(np.argmax(window))
            if window[i] >= _MIN_RAIL_SYMMETRY / 2:
                y = float(stretch.mean()) - centre
                points.append((n, y, lo + a + _parabolic(window, i), float(window[i])))
    offsets = [_parabolic(symmetry, c) for c in columns]
    fit_slope = 0.0
    for _ in range(2):
        if len(points) < len(columns) + 2 or {p[0] for p in points} != set(range(len(columns))):
            break
        design = np.zeros((len(points), len(columns) + 1))
        for k, (n, y, _, _) in enumerate(points):
            design[k, n], design[k, -1] = 1.0, y
        weights = np.sqrt([p[3] for p in points])
        target = np.array([p[2] for p in points])
        solution, *_ = np.linalg.lstsq(design * weights[:, None], target * weights, rcond=None)
        offsets, fit_slope = list(solution[:-1]), float(solution[-1])
        residual = np.abs(design @ solution - target)
        limit = max(0.75, 2.5 * float(np.median(residual)))
        points = [p for p, r in zip(points, residual) if r <= limit]
    # Back from the upright (sheared) blocks to reduced rows and columns.
    col_slope = (slope + fit_slope) / block
    return [
        RailLine(
            rail=name,
            x0=reduced.x_of(offset),
            line0=reduced.line_of((centre + 0.5) * block - 0.5),
            slope=col_slope * reduced.fx / reduced.fy,
            symmetry=float(symmetry[column]),
        )
        for name, column, offset in zip(names, columns, offsets)
    ]


def run_contrast(profile: np.ndarray, width: float, higher: bool) -> np.ndarray:
    """Relative contrast ``(rows,)`` of a run of ``width`` rows against both its flanks.

    ``profile`` is ``(rows,)`` mean intensity across a band. ``higher`` (the run is brighter
    than its flanks): ``1 - max(flanks) / run``; otherwise ``1 - run / min(flanks)``. Using
    the weaker flank makes a step (one flank like the run, as at a change of light) score near
    zero. Where the profile ends, a missing flank is replaced by the other.
    """
    rows = profile.shape[0]
    cumulative = np.concatenate([[0.0], np.cumsum(profile)])
    y = np.arange(rows)
    half = max(1, int(round(width / 2)))
    flank = max(2, int(round(width * _FLANK_SHARE)))

    def means(start: np.ndarray, stop: np.ndarray, min_count: int) -> np.ndarray:
        a, b = np.clip(start, 0, rows), np.clip(stop, 0, rows)
        count = b - a
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count >= min_count, (cumulative[b] - cumulative[a]) / count, np.nan)

    inner = means(y - half, y + half + 1, half + 1)
    before = means(y - half - flank, y - half, (flank + 1) // 2)
    after = means(y + half + 1, y + half + 1 + flank, (flank + 1) // 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        if higher:
            contrast = 1 - np.fmax(before, after) / inner
        else:
            contrast = 1 - inner / np.fmin(before, after)
    return np.where(np.isfinite(contrast), contrast, -1.0)


def shade_contrast(shade: np.ndarray, width: float, tone: str) -> np.ndarray:
    """:func:`run_contrast` of a sleeper of ``tone`` brighter, darker or either."""
    if tone == "brighter":
        return run_contrast(shade, width, higher=True)
    if tone == "darker":
        return run_contrast(shade, width, higher=False)
    return np.maximum(run_contrast(shade, width, True), run_contrast(shade, width, False))


def _peaks(evidence: np.ndarray, min_gap: int, threshold: float) -> list[int]:
    """Rows of seats in ``evidence`` ``(rows,)``: local maxima at least ``threshold``, taken
    strongest first, each at least ``min_gap`` rows from every one already taken."""
    local_max = maximum_filter1d(evidence, size=3, mode="constant", cval=-np.inf)
    candidates = np.flatnonzero((evidence >= local_max) & (evidence >= threshold))
    taken: list[int] = []
    for row in candidates[np.argsort(-evidence[candidates], kind="stable")]:
        if all(abs(int(row) - t) >= min_gap for t in taken):
            taken.append(int(row))
    return sorted(taken)


def _sample(profile: np.ndarray, at: np.ndarray) -> np.ndarray:
    """``profile`` linearly interpolated at fractional rows ``at``; NaN outside."""
    return np.interp(at, np.arange(profile.shape[0]), profile, left=np.nan, right=np.nan)


def edge_pair_score(
    gradient: np.ndarray, width: float, noise: float, tone: str = "either"
) -> np.ndarray:
    """Strength ``(rows,)`` of two opposite cross-track edges about ``width`` rows apart.

    ``gradient`` is a ``(rows,)`` profile of the along-track intensity gradient averaged across
    a band. A sleeper or baseplate gives one edge where it starts and one of opposite sign
    where it ends; ballast averages out. ``tone`` says which sign comes first: ``brighter``
    (a bright sleeper: rising, then falling going down the image), ``darker``, or ``either``.
    Each edge is taken as the strongest within 9 % of ``width`` of where it is expected (the
    widths tried are 18 % apart, and a sharp edge is one row wide). The score is the geometric
    mean of the two edges' magnitudes over ``noise`` (the profile's typical gradient); 0 when
    the signs agree, as at a step in light.
    """
    y = np.arange(gradient.shape[0], dtype=np.float64)
    size = 2 * max(1, int(round(0.09 * width))) + 1
    rising = maximum_filter1d(np.maximum(gradient, 0), size=size, mode="nearest")
    falling = maximum_filter1d(np.maximum(-gradient, 0), size=size, mode="nearest")

    def pair(first: np.ndarray, last: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            score = np.sqrt(_sample(first, y - width / 2) * _sample(last, y + width / 2))
        return np.where(np.isfinite(score), score, 0.0)

    if tone == "brighter":
        return pair(rising, falling) / noise
    if tone == "darker":
        return pair(falling, rising) / noise
    return np.maximum(pair(rising, falling), pair(falling, rising)) / noise


@dataclass(frozen=True, eq=False)
class SeatProfile:
    """Seat evidence along one rail of a reduced window.

    ``evidence`` is ``(rows,)``; ``peaks`` the rows of the seats found on their own and
    ``centres`` their sub-row centres (midway between the sleeper's two edges); ``skew`` the
    sleepers' slope in the reduced window, rows per column (0 when level).
    """

    rail: RailLine
    evidence: np.ndarray
    peaks: list[int]
    centres: list[float]
    skew: float
    total: float
    skew_steps: int = 0


def _edge_midpoint(gradient: np.ndarray, top: int, row: int, width: float, tone: str) -> float:
    """Sub-row centre of the seat at ``row``: midway between its two edges.

    ``gradient`` is the along-track gradient profile, padded by ``top`` rows. The edges are
    the pair of local extrema (of the seat's polarity) near ``row -/+ width / 2`` whose
    product is largest among pairs no further than 15 % from ``width`` apart, so that a
    stronger stray edge nearby (a shadow, a slab joint) cannot pull one end away alone.
    Falls back to ``row`` when no such pair exists.
    """
    reach = max(1.5, 0.15 * width)
    sign = {"brighter": 1.0, "darker": -1.0}.get(tone, 0.0)
    centre = row + top

    def extrema(at: float, polarity: float) -> list[tuple[float, float]]:
        lo = max(1, int(math.floor(at - reach)))
        hi = min(gradient.shape[0] - 1, int(math.ceil(at + reach)) + 1)
        values = gradient * polarity if polarity else np.abs(gradient)
        return [
            (i - 1 + _parabolic(values[i - 1 : i + 2], 1), float(values[i]))
            for i in range(lo, hi)
            if values[i] > 0 and values[i] >= values[i - 1] and values[i] >= values[i + 1]
        ]

    best = None
    for first, a in extrema(centre - width / 2, sign):
        for last, b in extrema(centre + width / 2, -sign):
            if abs((last - first) - width) <= reach and (best is None or a * b > best[0]):
                best = (a * b, (first + last) / 2 - top)
    return best[1] if best is not None else float(row)


def _interpolate_rows(profiles: np.ndarray, at: np.ndarray) -> np.ndarray:
    """``profiles`` ``(rows, n)`` read at fractional rows ``at`` ``(rows, n)``, clamped."""
    rows = profiles.shape[0]
    at = np.clip(at, 0, rows - 1)
    low = np.minimum(at.astype(np.int64), rows - 2) if rows > 1 else np.zeros_like(at, np.int64)
    frac = at - low
    columns = np.arange(profiles.shape[1])[None, :]
    high = np.minimum(low + 1, rows - 1)
    return profiles[low, columns] * (1 - frac) + profiles[high, columns] * frac


def band_groups(
    reduced: _Reduced, rail: RailLine, geometry: TrackGeometry, summed: tuple[np.ndarray, ...]
) -> tuple[list[np.ndarray], np.ndarray] | None:
    """The seat bands beside ``rail``, as sums over narrow groups of columns, row by row.

    ``summed`` are images cumulated along rows (``(rows, cols + 1)``, a leading zero column):
    the group sums come out of them at fractional columns that follow the rail, so the rail
    is upright without resampling the image. Returns one ``(rows, groups)`` array per summed
    image and the groups' centres, columns from the rail; None when no band is in the image.
    The bands lie beyond the fasteners, so a defective fastener does not change the evidence;
    a group is narrow enough that the steepest sleeper skew moves it at most half a row.
    """
    g = geometry
    rows, cols = reduced.shape
    col_mm = g.mm_per_px * reduced.fx
    row_mm = g.mm_per_line * reduced.fy
    inner = (g.fastener_offset_mm + g.fastener_size_mm[0] / 2 + 20.0) / col_mm
    outer = inner + g.seat_band_mm / col_mm
    max_skew = math.tan(math.radians(g.max_sleeper_skew_deg)) * col_mm / row_mm
    group = max(1.0, min(outer - inner, 0.5 / max(max_skew, 1e-6)))
    n_groups = max(1, int(math.ceil((outer - inner) / group)))
    edges = np.linspace(inner, outer, n_groups + 1)
    centre_row = rows / 2
    rail_col = reduced.col_of(rail.x_at(reduced.line_of(centre_row)))
    slope = rail.slope * reduced.fy / reduced.fx
    rail_cols = rail_col + slope * (np.arange(rows) - centre_row)
    # Group k of each side spans offsets edges[k]..edges[k+1] from the rail; in the summed
    # images pixel c covers [c, c + 1), hence the half pixel.
    starts = np.concatenate([-edges[1:][::-1], edges[:-1]])
    stops = np.concatenate([-edges[:-1][::-1], edges[1:]])
    first = rail_cols[:, None] + starts[None, :] + 0.5
    last = rail_cols[:, None] + stops[None, :] + 0.5
    keep = ((first >= 0) & (last <= cols)).all(axis=0)
    if not keep.any():
        return None
    row_index = np.arange(rows)[:, None]

    def read(cumulated: np.ndarray, at: np.ndarray) -> np.ndarray:
        low = np.minimum(at.astype(np.int64), cols - 1)
        frac = at - low
        return cumulated[row_index, low] * (1 - frac) + cumulated[row_index, low + 1] * frac

    first, last = first[:, keep], last[:, keep]
    out = [read(cumulated, last) - read(cumulated, first) for cumulated in summed]
    centres = (starts + stops) / 2
    return out, centres[keep]


def seat_profile(
    reduced: _Reduced,
    rail: RailLine,
    geometry: TrackGeometry,
    summed: tuple[np.ndarray, np.ndarray],
    open_start: bool = False,
    open_end: bool = False,
    skew_hint: int | None = None,
    explore: bool = True,
) -> SeatProfile | None:
    """Seat evidence along one rail in a reduced window, and the seats it shows on its own.

    ``summed`` is the reduced image times its validity, and the validity (1 where there is
    image, 0 in fill), each cumulated along rows (see :func:`band_groups`).
    ``open_start``/``open_end`` say that the window begins or ends the run: the profile is
    then extended there with the window's typical ground, so a sleeper cut by the run's first
    or last line still shows an edge at that line.
    Steps: (1) band groups; (2) for each sleeper skew within ``max_sleeper_skew_deg``, shift
    each group along the rail by the skew and sum into one profile of mean intensity;
    (3) evidence: :func:`edge_pair_score` times :func:`shade_contrast` (scaled by
    ``min_seat_contrast``, at most 1), best over the widths of :func:`sleeper_widths_mm`;
    keep the skew with the most evidence in its seats (level, unless a skew gains 10 %);
    (4) peaks above ``min_seat_edges`` at least ``(1 - pitch_tolerance) * pitch`` apart, each
    centred midway between its two edges (:func:`_edge_midpoint`).
    """
    g = geometry
    rows, _ = reduced.shape
    col_mm = g.mm_per_px * reduced.fx
    row_mm = g.mm_per_line * reduced.fy
    slope = rail.slope * reduced.fy / reduced.fx

    # 1. Band groups.
    bands = band_groups(reduced, rail, g, summed)
    if bands is None:
        return None
    (shade_sums, valid_sums), group_cols = bands

    # 2-3. Skews (rows per column), each with its best evidence over sleeper widths.
    max_skew = math.tan(math.radians(g.max_sleeper_skew_deg)) * col_mm / row_mm
    reach_cols = float(np.abs(group_cols).max())
    skew_step = 1.5 / reach_cols  # the band's outer edge moves about 1.5 rows per step
    n_skews = int(math.ceil(max_skew / skew_step))
    widths = [w / row_mm for w in sleeper_widths_mm(g)]
    nominal = g.sleeper_width_mm / row_mm
    nearness = np.array([abs(math.log(w / nominal)) for w in widths])
    pad = int(math.ceil(max(widths))) + 2
    min_gap = max(3, int(g.sleeper_pitch_mm * (1 - g.pitch_tolerance) / row_mm))
    tone = g.sleeper_tone
    y = np.arange(rows, dtype=np.float64)[:, None]
    noise_level: list[float] = []

    def evidence_at(skew: float) -> tuple[float, np.ndarray, list[int], list[float]]:
        at = y + skew * group_cols[None, :]
        shade = _interpolate_rows(shade_sums, at).sum(axis=1)
        valid = _interpolate_rows(valid_sums, at).sum(axis=1)
        valid_rows = valid >= 0.5 * valid_sums.shape[1] * valid_sums.max(initial=1.0)
        if not valid_rows.any():
            return 0.0, np.zeros(rows), [], []
        with np.errstate(invalid="ignore", divide="ignore"):
            shade = shade / valid
        # Rows without enough image (fill) take the nearest valid row's value.
        if not valid_rows.all():
            index = np.flatnonzero(valid_rows)
            nearest = index[np.clip(np.searchsorted(index, np.arange(rows)), 0, len(index) - 1)]
            shade = shade[nearest]
        # An open end of the run: extend with the window's typical ground (its median).
        top = pad if open_start else 0
        ground = float(np.median(shade))
        shade = np.concatenate(
            [np.full(top, ground), shade, np.full(pad if open_end else 0, ground)]
        )
        gradient = np.gradient(shade)
        # The typical gradient is fixed by the level profile: resampling at a skew smooths
        # the profile and would otherwise flatter every skew but zero.
        if not noise_level:
            noise_level.append(float(np.percentile(np.abs(gradient), _NOISE_QUANTILE)) + 1e-6)
        stack = np.array(
            [
                edge_pair_score(gradient, w, noise_level[0], tone)
                * np.clip(shade_contrast(shade, w, tone) / g.min_seat_contrast, 0, 1)
                for w in widths
            ]
        )
        evidence = stack.max(axis=0)
        # The width: the one nearest the nominal among those within a few per cent of the
        # best, for a slab joint or a shadow just beyond a seat can make a wider pair as strong.
        close = stack >= _WIDTH_TIE * evidence[None, :]
        best_width = np.asarray(widths)[np.argmin(np.where(close, nearness[:, None], np.inf), 0)]
        evidence = evidence[top : top + rows]
        peaks = _peaks(evidence, min_gap, g.min_seat_edges)
        centres = [_edge_midpoint(gradient, top, p, best_width[p + top], tone) for p in peaks]
        return (float(evidence[peaks].sum()) if peaks else 0.0), evidence, peaks, centres

    # Coarse skews first, then the fine ones around the best coarse one; or, streaming, only
    # the last window's skew and its neighbours (a camera's yaw changes slowly if at all).
    coarse = 3
    candidates = {0: evidence_at(0.0)}
    if skew_hint is None:
        for k in range(-n_skews, n_skews + 1, coarse):
            candidates.setdefault(k, evidence_at(k * skew_step))
        k_best = max(candidates, key=lambda k: candidates[k][0])
    else:
        candidates.setdefault(skew_hint, evidence_at(skew_hint * skew_step))
        k_best, coarse = skew_hint, (2 if explore else 1)
    for k in range(max(-n_skews, k_best - coarse + 1), min(n_skews, k_best + coarse - 1) + 1):
        if k not in candidates:
            candidates[k] = evidence_at(k * skew_step)
    k_best = max(candidates, key=lambda k: candidates[k][0])
    # Level sleepers are the rule on a line-scan camera: a skew must earn its place.
    if candidates[k_best][0] < _SKEW_GAIN * candidates[0][0]:
        k_best = 0
    total, evidence, peaks, centres = candidates[k_best]
    skew = k_best * skew_step
    # Back from the rail-upright frame to the reduced window.
    return SeatProfile(rail, evidence, peaks, centres, skew / (1 + skew * slope), total, k_best)


def refine_rail(reduced: _Reduced, profile: SeatProfile, geometry: TrackGeometry) -> RailLine:
    """The rail's line moved across to its most mirror-symmetric column with sleepers levelled.

    Where sleepers cross the rail askew (a yawed camera, a sheared image), the two fasteners
    of a seat lie on different rows and the row-wise symmetry of :func:`find_rails` can lock
    beside the rail. Upright rail, levelled sleepers: the fasteners mirror each other again.
    Searched within a rail foot's width of the first estimate; the slope is kept.
    """
    g = geometry
    rail = profile.rail
    rows, cols = reduced.shape
    col_mm = g.mm_per_px * reduced.fx
    reach = max(3, round((g.fastener_offset_mm + g.fastener_size_mm[0] / 2) / col_mm))
    search = max(2, round(g.rail_foot_width_mm / col_mm))
    centre_row = rows / 2
    rail_col = reduced.col_of(rail.x_at(reduced.line_of(centre_row)))
    slope = rail.slope * reduced.fy / reduced.fx
    first = int(math.floor(rail_col)) - search - reach - 1
    last = int(math.ceil(rail_col)) + search + reach + 2
    if first < 0 or last > cols:
        return rail
    upright = _shear(reduced.image, slope, centre_row)[:, first:last]
    skew = profile.skew  # rows per column in the reduced window; in the upright one:
    upright_skew = skew / (1 - skew * slope) if abs(1 - skew * slope) > 1e-6 else skew
    matrix = np.float32([[1, 0, 0], [upright_skew, 1, -upright_skew * (rail_col - first)]])
    levelled = cv2.warpAffine(
        np.ascontiguousarray(upright),
        matrix,
        (last - first, rows),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    symmetry = mirror_symmetry(levelled, reach)
    centre = rail_col - first
    lo, hi = int(math.floor(centre)) - search, int(math.ceil(centre)) + search + 1
    window = symmetry[lo:hi]
    i = int(np.argmax(window))
    if window[i] <= symmetry[int(round(centre))]:
        return rail
    shift_cols = lo + _parabolic(window, i) - centre
    return RailLine(
        rail=rail.rail,
        x0=rail.x0 + shift_cols * reduced.fx,
        line0=rail.line0,
        slope=rail.slope,
        symmetry=float(window[i]),
    )


def pair_seats(
    profiles: list[SeatProfile], reduced: _Reduced, geometry: TrackGeometry
) -> list[list[tuple[int, float]]]:
    """Seats per rail as ``(row, sub-row centre)``: each rail's own peaks plus those its
    partner rail vouches for.

    With both rails in view, a sleeper crosses both: a seat found on one rail predicts one on
    the other (along the sleeper's skew). Where the other rail has no seat near the prediction
    but a local maximum of evidence at least ``_PARTNER_SHARE`` of the threshold, it is taken.
    This recovers a seat whose sleeper is dirty, shadowed or painted on one side only.
    """
    seats = [list(p.peaks) for p in profiles]
    if len(profiles) != 2:
        return [[(r, c) for r, c in zip(p.peaks, p.centres)] for p in profiles]
    row_mm = geometry.mm_per_line * reduced.fy
    tolerance = max(2, int(round(0.1 * geometry.sleeper_pitch_mm / row_mm)))
    min_gap = max(3, int(geometry.sleeper_pitch_mm * (1 - geometry.pitch_tolerance) / row_mm))
    weights = np.array([max(p.total, 1e-6) for p in profiles])
    skew = float(np.dot(weights, [p.skew for p in profiles]) / weights.sum())
    rows = reduced.shape[0]
    vouched: list[dict[int, float]] = [{}, {}]
    for a, b in ((0, 1), (1, 0)):
        evidence = profiles[b].evidence
        for row in profiles[a].peaks:
            line = reduced.line_of(row)
            across = reduced.col_of(profiles[b].rail.x_at(line)) - reduced.col_of(
                profiles[a].rail.x_at(line)
            )
            predicted = int(round(row + skew * across))
            if any(abs(r - predicted) < min_gap for r in seats[b]):
                continue
            lo, hi = max(0, predicted - tolerance), min(rows, predicted + tolerance + 1)
            if hi <= lo:
                continue
            best = lo + int(np.argmax(evidence[lo:hi]))
            is_peak = 0 < best < rows - 1 and evidence[best] >= evidence[best - 1]
            is_peak = is_peak and evidence[best] >= evidence[best + 1]
            if is_peak and evidence[best] >= _PARTNER_SHARE * geometry.min_seat_edges:
                seats[b].append(best)
                vouched[b][best] = _parabolic(evidence, best)
        seats[b].sort()
    return [
        [(r, p.centres[p.peaks.index(r)] if r in p.peaks else vouched[i][r]) for r in rows_]
        for i, (p, rows_) in enumerate(zip(profiles, seats))
    ]


class FastenerFinder:
    """Streaming fastener finder: frames in, one :class:`FoundFastener` per fastener out.

    ``push(frame, frame_index)`` returns the fasteners that became decidable with this frame;
    ``flush()`` returns the rest at the end of a run (crops that run past the last line are
    padded and marked ``truncated``). Fasteners come in along-track order, field and gauge of a
    seat together.

    Per-frame cost is that of the reduced window (the new frame plus about one sleeper pitch of
    context), independent of the camera's resolution beyond one resize.
    """

    def __init__(self, geometry: TrackGeometry, direction: Direction = "increasing") -> None:
        g = self.geometry = geometry
        self.direction = direction
        self._fx = max(1, round(g.analysis_mm / g.mm_per_px))
        self._fy = max(1, round(g.analysis_mm / g.mm_per_line))
        crop_h = g.crop_size[1]
        widest = g.lines(max(sleeper_widths_mm(g)))
        reach = widest * (0.5 + _FLANK_SHARE) + g.lines(g.sleeper_pitch_mm) / 2
        self._margin = int(math.ceil(max(crop_h / 2, reach))) + 2 * self._fy
        self._context = self._margin + int(math.ceil(g.lines(_RAIL_CONTEXT_MM)))
        # Two decisions may find the same seat a line apart; seats of a rail are far further.
        self._same_seat = g.lines(g.sleeper_pitch_mm * (1 - g.pitch_tolerance)) / 2
        self.buffer = LineBuffer(keep_lines=self._context + self._margin + crop_h)
        self._decided = 0
        self._last_seat: dict[Rail, float] = {}
        self._frames: deque[tuple[int, int, int]] = deque()  # (frame_index, first, lines)
        self.rails: list[RailLine] = []
        self._rails_window: tuple[int, int] | None = None
        self._rows_first = 0  # shrunk rows cached, from absolute row (line // fy) ...
        self._rows = np.zeros((0, 0), np.float32)
        self._skews: dict[Rail, int] = {}  # the last sleeper skew of each rail, in steps
        self._decisions = 0

    def push(self, frame: np.ndarray, frame_index: int) -> list[FoundFastener]:
        """Add a frame ``(lines, pixels)``; the fasteners decided with it."""
        # Lines not yet decided (and their context) must outlive this frame's arrival, however
        # long the frame: a fixed depth lost the last lines of every frame longer than it.
        needed = frame.shape[0] + self._context + self._margin + self.geometry.crop_size[1]
        self.buffer.keep_lines = max(self.buffer.keep_lines, needed)
        first = self.buffer.push(frame)
        self._frames.append((frame_index, first, frame.shape[0]))
        while self._frames and self._frames[0][1] + self._frames[0][2] <= self.buffer.start:
            self._frames.popleft()
        decide_to = self.buffer.end - self._margin
        if decide_to - self._decided < self._fy:
            return []
        return self._decide(decide_to)

    def flush(self) -> list[FoundFastener]:
        """At the end of a run: every fastener not yet decided."""
        if self.buffer.end <= self._decided:
            return []
        return self._decide(self.buffer.end)

    def _decide(self, decide_to: int) -> list[FoundFastener]:
        g = self.geometry
        fy = self._fy
        first = max(self.buffer.start, self._decided - self._context)
        first = -(-first // fy) * fy  # row blocks aligned to absolute lines
        reduced = self._reduced(first, self.buffer.end)
        if reduced.shape[0] < 8 or reduced.shape[1] < 8:
            self._decided = decide_to
            return []
        window = (first, self.buffer.end)
        if window != self._rails_window:
            hint = self.rails[0].slope if self.rails else None
            self.rails = find_rails(reduced, g, self.direction, hint)
            self._rails_window = window
        if not self.rails:
            log.warning("rails_not_found", first_line=first, last_line=self.buffer.end)
            self._decided = decide_to
            return []
        valid = np.ones(reduced.shape, np.float32)
        if g.fill_level is not None:
            scale = 257.0 if self.buffer.dtype == np.uint16 else 1.0
            filled = (reduced.image <= g.fill_level * scale).astype(np.uint8)
            valid = 1.0 - cv2.dilate(filled, np.ones((5, 5), np.uint8)).astype(np.float32)
        zero = np.zeros((reduced.shape[0], 1), np.float32)
        summed = tuple(
            np.concatenate([zero, np.cumsum(image, axis=1, dtype=np.float32)], axis=1)
            for image in (reduced.image * valid, valid)
        )
        open_start = first == 0
        open_end = decide_to == self.buffer.end
        profiles = []
        for rail in self.rails:
            hint = self._skews.get(rail.rail)
            explore = self._decisions % _SKEW_EXPLORE_EVERY == 0
            profile = seat_profile(
                reduced, rail, g, summed, open_start, open_end, hint, explore=explore
            )
            if profile is None:
                continue
            if profile.peaks:
                self._skews[rail.rail] = profile.skew_steps
            if profile.skew_steps:  # level sleepers: find_rails' symmetry already holds
                profile = dataclasses.replace(profile, rail=refine_rail(reduced, profile, g))
            profiles.append(profile)
        found: list[FoundFastener] = []
        for profile, rows in zip(profiles, pair_seats(profiles, reduced, g)):
            rail = profile.rail
            for row, centre in rows:
                seat = Seat(
                    rail.rail,
                    reduced.line_of(centre),
                    float(profile.evidence[row]),
                    skew=profile.skew * reduced.fy / reduced.fx,
                )
                if not self._decided <= seat.line < decide_to:
                    continue
                if seat.line - self._last_seat.get(rail.rail, -math.inf) < self._same_seat:
                    continue
                self._last_seat[rail.rail] = seat.line
                found.extend(self._cut(rail, seat))
        self._decided = decide_to
        self._decisions += 1
        found.sort(key=lambda f: (f.line, f.x))
        return found

    def _reduced(self, first: int, end: int) -> _Reduced:
        """Lines ``[first, end)`` reduced; rows shrunk before are kept and not shrunk again."""
        fy = self._fy
        row_first, row_end = first // fy, end // fy
        cached_end = self._rows_first + self._rows.shape[0]
        if not self._rows_first <= row_first <= cached_end:
            self._rows_first, self._rows, cached_end = row_first, self._rows[:0], row_first
        if row_end > cached_end:
            fresh = shrink(self.buffer.read(cached_end * fy, row_end * fy), self._fx, fy)
            self._rows = np.concatenate([self._rows, fresh]) if self._rows.size else fresh
        self._rows = self._rows[row_first - self._rows_first :]
        self._rows_first = row_first
        return _Reduced.from_shrunk(self._rows[: row_end - row_first], first, self._fx, fy)

    def _cut(self, rail: RailLine, seat: Seat) -> list[FoundFastener]:
        g = self.geometry
        rail_x = rail.x_at(seat.line)
        offset = g.px(g.fastener_offset_mm)
        out = []
        for image_side, sign in (("left", -1.0), ("right", 1.0)):
            x = rail_x + sign * offset
            line = seat.line + sign * offset * seat.skew
            if not 0 <= x < (self.buffer.width or 0):
                continue  # this fastener is outside the image
            mirrored = sign > 0  # fastener right of the rail: flip to put the rail on the right
            crop, x0, line0, truncated = cut_crop(self.buffer, g, x, line, mirrored)
            frame_index, frame_first = self._frame_of(line)
            width, height = g.crop_size
            out.append(
                FoundFastener(
                    crop=crop,
                    rail=rail.rail,
                    side=g.side_of(rail.rail, image_side, self.direction),
                    x=float(x),
                    line=float(line),
                    frame_index=frame_index,
                    box=(x0, line0 - frame_first, width, height),
                    mirrored=mirrored,
                    truncated=truncated,
                    score=seat.evidence,
                )
            )
        return out

    def _frame_of(self, line: float) -> tuple[int, int]:
        index = int(math.floor(line + 0.5))
        for frame_index, first, n in self._frames:
            if first <= index < first + n:
                return frame_index, first
        # Past the newest line (a crop at the very end): the nearest frame.
        frame_index, first, _ = self._frames[-1] if index >= first else self._frames[0]
        return frame_index, first
