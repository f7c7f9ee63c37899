"""Find the rails, then the rail seats along each rail, then cut a crop on every fastener.

The method (measured against template matching and the alternatives listed in
``docs/fastener-finding.md``) works on a reduced copy of the newest lines, about
``analysis_mm`` per pixel, and uses only what every ballasted or slab track shows:

1. Rails. A rail is the one long structure that runs along the track: averaged along a rail,
   its edges add up, while ballast, sleepers and paint average out. For each slope within
   ``max_rail_tilt_deg`` the image is sheared so that lines of that slope become columns and
   averaged down the columns; the rail is where the averaged profile has strong edges on both
   halves of a rail-foot-wide window (one-sided steps, such as a shadow's edge or a sleeper
   end, score low). With both rails in view the pair must lie ``gauge + head width`` apart.
2. Rail seats. Beside each rail, beyond the fasteners, the horizontal texture (absolute
   horizontal gradient) is averaged across a band ``seat_band_mm`` wide on both sides. On
   ballasted track a sleeper is a run of lines much smoother than the ballast on *both* sides
   of it; on slab track a baseplate is a run of lines rougher than the slab on both sides.
   The relative contrast of a run of sleeper width against its two flanks, best over a few
   widths, peaks at each seat; peaks closer than ``(1 - pitch_tolerance) * pitch`` merge.
   Because the evidence is the sleeper or baseplate, a seat whose clips are missing is still
   found, which is the point: the anomaly model must see the empty seat.
3. Fasteners. One each side of the rail, ``fastener_offset_mm`` from the rail centre, on the
   seat's line (line-scan sleepers stay level when the vehicle drifts sideways).

Streaming: :class:`FastenerFinder` keeps a :class:`~edge.grabber.linebuffer.LineBuffer`, and
on every frame decides the seats whose centre lies between the last decided line and the
newest line less a margin (the crop's half height and the search's reach). Each line is decided
once, so a fastener on a frame boundary is cut once, whole; seats are also kept apart by line
index, never by frame.

Known limits: sleepers are taken as level in the image (true for lateral drift of a line-scan
camera). A camera yawed by an angle a puts the crop centres ``fastener_offset * sin(a)`` off
along the track (5 mm at 3 degrees and 100 mm). Switches, crossings and level crossings, where
rails or sleepers do not look like plain track, give fewer or wrong seats; nothing here detects
them.
"""

from __future__ import annotations

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
_PARTNER_SHARE = float(
    __import__("os").environ.get("EDGE_PARTNER", "0.5")
)  # of the seat threshold, for a seat the other rail vouches for
_REFINE = __import__("os").environ.get("EDGE_REFINE", "1") == "1"
_REFINE_SEARCH = float(__import__("os").environ.get("EDGE_RS", "1.0"))
_SKEW_GAIN = float(
    __import__("os").environ.get("EDGE_SKEWGAIN", "1.1")
)  # evidence a skew needs over level sleepers
_WIDTH_TIE = float(
    __import__("os").environ.get("EDGE_TIE", "0.85")
)  # evidence within this share of the best counts as a tie
_NOISE_Q = float(__import__("os").environ.get("EDGE_NQ", "75"))
_FLANK_SHARE = 0.5  # each flank of the seat template, as a share of the seat width
_MIN_RAIL_LINES_MM = float(
    __import__("os").environ.get("EDGE_CTX", "400")
)  # rails are not searched on less track than this


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

    ``line`` is absolute (sub-line); ``contrast`` the seat evidence (0..1); ``skew`` the
    sleeper's slope in the image, lines per pixel across (0 for level sleepers).
    """

    rail: Rail
    line: float
    contrast: float
    skew: float = 0.0


class _Reduced:
    """A window of lines reduced to about ``analysis_mm`` per pixel, with its coordinates.

    ``image`` is float32 ``(rows, columns)``; row ``r`` averages ``fy`` lines starting at
    ``first_line + r * fy`` and column ``c`` averages ``fx`` pixels starting at ``c * fx``.
    """

    def __init__(self, lines: np.ndarray, first_line: int, fx: int, fy: int) -> None:
        rows, cols = lines.shape[0] // fy, lines.shape[1] // fx
        self.first_line, self.fx, self.fy = first_line, fx, fy
        data = lines[: rows * fy, : cols * fx].astype(np.float32)
        if fx > 1 or fy > 1:
            data = cv2.resize(data, (cols, rows), interpolation=cv2.INTER_AREA)
        # Salt-and-pepper and hot pixels would otherwise dominate the gradients.
        self.image = cv2.medianBlur(data, 3)

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


def mirror_symmetry(image: np.ndarray, reach: int) -> np.ndarray:
    """Left-right mirror symmetry of ``image`` ``(rows, cols)`` about every column, ``(cols,)``.

    Each row is high-passed across (its mean over ``2 * reach + 1`` columns removed), then the
    normalised correlation of the ``reach`` columns left of ``x`` with the mirrored ``reach``
    columns right of it, pooled over all rows: 1 for a perfect mirror, near 0 for ballast, -1
    for an anti-mirror such as a single step. A rail with its foot and its two fasteners is
    the most symmetric thing on plain track.
    """
    image = image.astype(np.float32)
    high = image - cv2.blur(image, (2 * reach + 1, 1), borderType=cv2.BORDER_REFLECT)
    cols = image.shape[1]
    products = np.zeros(cols)
    energy = np.zeros(cols)
    for u in range(1, min(reach, (cols - 1) // 2) + 1):
        left, right = high[:, : cols - 2 * u], high[:, 2 * u :]
        products[u : cols - u] += np.einsum("ij,ij->j", left, right)
        energy[u : cols - u] += 0.5 * (
            np.einsum("ij,ij->j", left, left) + np.einsum("ij,ij->j", right, right)
        )
    # A floor on the energy keeps featureless stretches (black borders, glare) from scoring.
    floor = 0.05 * float(np.median(energy)) + 1e-6
    return products / (energy + floor)


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
    reduced: _Reduced, geometry: TrackGeometry, direction: Direction = "increasing"
) -> list[RailLine]:
    """The rails in a reduced window, in image order; an empty list when none is clear.

    Steps: (1) average rows in blocks short enough that a rail at the steepest slope moves at
    most two columns within one; (2) the slope: for each slope within the tilt limit, shear,
    average down the columns and score every column with :func:`_rail_scores`; keep the slope
    whose best rail (or pair of rails ``gauge + head`` apart) scores highest; (3) the columns:
    at that slope, the most mirror-symmetric column (or pair), see :func:`mirror_symmetry`;
    (4) each rail's line refitted through the most symmetric column of each quarter of the
    window, which refines slope and position and follows a slowly turning rail.
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

    coarse = 3
    totals = {k: total_at(k * step) for k in range(-n_steps, n_steps + 1, coarse)}
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
    if __import__("os").environ.get("EDGE_RAILS") == "projection":
        scores = _rail_scores(upright.mean(axis=0).astype(np.float64), half_foot)
        _, columns = _best_columns(scores, len(names), low, high)
        symmetry = np.ones_like(symmetry)
    if min(symmetry[c] for c in columns) < _MIN_RAIL_SYMMETRY:
        return []

    # 4. Refit the rails through the most symmetric column of each stretch of about 300 mm:
    # one slope for all rails in view (they are parallel), one offset per rail, weighted by
    # symmetry; stretches that disagree (an asymmetric, defective seat) are dropped once.
    stretches = np.array_split(np.arange(n_blocks), max(4, round(n_blocks * block * row_mm / 300)))
    search = max(2, half_foot // 2)
    points = []  # (rail number, block row from centre, column, weight)
    for n, column in enumerate(columns):
        lo, hi = max(0, column - search - reach), min(cols, column + search + reach + 1)
        a, b = max(column - search - lo, 0), column + search + 1 - lo
        for stretch in stretches:
            window = mirror_symmetry(upright[stretch, lo:hi], reach)[a:b]
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


def seat_contrast(profile: np.ndarray, width: float, rougher: bool) -> np.ndarray:
    """Relative contrast ``(rows,)`` of a run of ``width`` rows against both its flanks.

    ``profile`` is ``(rows,)``, e.g. mean intensity or texture across a band. ``rougher``
    (the run is higher than its flanks): ``1 - max(flanks) / inner``; otherwise (lower):
    ``1 - inner / min(flanks)``. Using the weaker flank makes a step (one flank like the run,
    as at a change in light) score near zero. Where the profile ends (the start or end of a
    run) a missing flank is replaced by the other.
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
        if rougher:
            contrast = 1 - np.fmax(before, after) / inner
        else:
            contrast = 1 - inner / np.fmin(before, after)
    return np.where(np.isfinite(contrast), contrast, -1.0)


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
    mean of the two edges' magnitudes over ``noise`` (the typical magnitude); 0 when the signs
    agree, as at a step in light.
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


_SEAT_CUE = __import__("os").environ.get("EDGE_SEAT_CUE", "plateau")
_GATE = float(__import__("os").environ.get("EDGE_GATE", "0.1"))


def shade_contrast(shade: np.ndarray, width: float, tone: str) -> np.ndarray:
    """Relative brightness contrast ``(rows,)`` of a run of ``width`` rows against both flanks.

    ``shade`` is a ``(rows,)`` profile of mean intensity. Brighter: ``1 - max(flanks) / inner``;
    darker: ``1 - inner / min(flanks)``; either: the larger of the two.
    """
    if tone == "brighter":
        return seat_contrast(shade, width, rougher=True)
    if tone == "darker":
        return seat_contrast(shade, width, rougher=False)
    return np.maximum(seat_contrast(shade, width, True), seat_contrast(shade, width, False))


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


def seat_profile(
    reduced: _Reduced,
    rail: RailLine,
    geometry: TrackGeometry,
    cues: np.ndarray,
    open_start: bool = False,
    open_end: bool = False,
) -> SeatProfile | None:
    """Seat evidence along one rail in a reduced window, and the seats it shows on its own.

    ``cues`` is ``(rows, cols, 2)``: the absolute horizontal gradient (texture) and the signed
    vertical gradient of the reduced window. ``open_start``/``open_end`` say that the window
    begins or ends the run: profiles are then mirrored there, so a sleeper cut in half by the
    run's first or last line is still found (centred on that line).
    Steps: (1) shear so the rail is a column; (2) for each sleeper skew within
    ``max_sleeper_skew_deg``, shear the other way about the rail so sleepers of that skew
    become rows, and average the cues across the seat bands on both sides of the rail
    (ballasted: beyond the fasteners; slab: over them); (3) seat evidence, best over a few
    sleeper widths; keep the skew with the most evidence; (4) local maxima above the threshold
    at least ``(1 - pitch_tolerance) * pitch`` apart, refined to sub-row.
    """
    g = geometry
    rows, cols = reduced.shape
    col_mm = g.mm_per_px * reduced.fx
    row_mm = g.mm_per_line * reduced.fy
    centre_row = rows / 2
    rail_col = reduced.col_of(rail.x_at(reduced.line_of(centre_row)))
    slope = rail.slope * reduced.fy / reduced.fx

    # 1. Rail upright; keep only the columns of the bands.
    slab = g.track_form == "slab"
    # The bands lie beyond the fasteners, so a defective fastener does not change the evidence.
    inner_mm = g.fastener_offset_mm + g.fastener_size_mm[0] / 2 + 20.0
    outer_mm = inner_mm + g.seat_band_mm
    upright = _shear(cues, slope, centre_row)
    first_col = max(0, int(math.floor(rail_col - outer_mm / col_mm)))
    last_col = min(cols, int(math.ceil(rail_col + outer_mm / col_mm)) + 1)
    if last_col - first_col < 4:
        return None
    upright = np.ascontiguousarray(upright[:, first_col:last_col])
    local_rail = rail_col - first_col
    band_cols = np.abs(np.arange(upright.shape[1]) - local_rail) * col_mm
    in_band = (band_cols >= inner_mm) & (band_cols <= outer_mm)
    if in_band.sum() < 2:
        return None

    # 2-3. Skews (rows per column), each with its best evidence over sleeper widths.
    max_skew = math.tan(math.radians(g.max_sleeper_skew_deg)) * col_mm / row_mm
    reach_cols = outer_mm / col_mm
    skew_step = 1.5 / reach_cols  # the band's outer edge moves about 1.5 rows per step
    n_skews = int(math.ceil(max_skew / skew_step))
    widths = [w / row_mm for w in sleeper_widths_mm(g)]
    pad = int(math.ceil(max(widths))) + 2
    min_gap = max(3, int(g.sleeper_pitch_mm * (1 - g.pitch_tolerance) / row_mm))
    tone = g.sleeper_tone

    def evidence_at(skew: float) -> tuple[float, np.ndarray, list[int]]:
        if skew == 0:
            levelled = upright
        else:
            matrix = np.float32([[1, 0, 0], [skew, 1, -skew * local_rail]])
            levelled = cv2.warpAffine(
                upright,
                matrix,
                (upright.shape[1], rows),
                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                borderMode=cv2.BORDER_REPLICATE,
            )
        texture, shade, valid = levelled[:, in_band].sum(axis=1).astype(np.float64).T
        valid_rows = valid >= 0.5 * in_band.sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            texture, shade = texture / valid, shade / valid
        if not valid_rows.any():
            return 0.0, np.zeros(rows), [], []
        # Rows without enough image (fill) take the nearest valid row's values.
        if not valid_rows.all():
            index = np.flatnonzero(valid_rows)
            nearest = index[np.clip(np.searchsorted(index, np.arange(rows)), 0, len(index) - 1)]
            texture, shade = texture[nearest], shade[nearest]
        # An open end of the run: extend with the window's typical ground (its median), so a
        # sleeper cut by the first or last line shows an edge there.
        top = pad if open_start else 0
        ground_shade, ground_texture = float(np.median(shade)), float(np.median(texture))
        if open_start:
            shade = np.concatenate([np.full(pad, ground_shade), shade])
            texture = np.concatenate([np.full(pad, ground_texture), texture])
        if open_end:
            shade = np.concatenate([shade, np.full(pad, ground_shade)])
            texture = np.concatenate([texture, np.full(pad, ground_texture)])
        gradient = np.gradient(shade)
        # The gradient's typical size, fixed by the level profile: resampling at a skew smooths
        # the profile and would otherwise flatter every skew but zero.
        noise = noise_level.setdefault(
            "noise", float(np.percentile(np.abs(gradient), _NOISE_Q)) + 1e-6
        )
        best_width = np.full(shade.shape, widths[len(widths) // 2])
        if _SEAT_CUE == "texture":
            evidence = np.max([seat_contrast(texture, w, rougher=slab) for w in widths], axis=0)
            threshold = g.min_seat_contrast
        elif _SEAT_CUE == "edges":
            evidence = np.max([edge_pair_score(gradient, w, noise) for w in widths], axis=0)
            threshold = g.min_seat_edges
        elif _SEAT_CUE == "signed":
            evidence = np.max([edge_pair_score(gradient, w, noise, tone) for w in widths], axis=0)
            threshold = g.min_seat_edges
        elif _SEAT_CUE == "plateau":
            stack = np.array(
                [
                    edge_pair_score(gradient, w, noise, tone)
                    * np.clip(shade_contrast(shade, w, tone) / g.min_seat_contrast, 0, 1)
                    for w in widths
                ]
            )
            evidence = stack.max(axis=0)
            # The width is the one nearest the nominal among those within a few per cent of
            # the best: a slab joint or a shadow just beyond a seat can make a wider pair
            # almost as strong.
            nominal = g.sleeper_width_mm / row_mm
            nearness = np.array([abs(math.log(w / nominal)) for w in widths])
            close = stack >= _WIDTH_TIE * evidence[None, :]
            best_width = np.asarray(widths)[
                np.argmin(np.where(close, nearness[:, None], np.inf), axis=0)
            ]
            threshold = g.min_seat_edges
        elif _SEAT_CUE == "plateau_only":
            evidence = np.max([shade_contrast(shade, w, tone) for w in widths], axis=0)
            threshold = g.min_seat_contrast
        elif _SEAT_CUE == "gated":
            # Edges bound both a sleeper and a gap between sleepers; the smoother side is the
            # sleeper (the rougher, on slab track), so the texture decides which is which.
            evidence = np.max(
                [
                    edge_pair_score(gradient, w, noise)
                    * np.clip(seat_contrast(texture, w, rougher=slab) / _GATE, 0, 1)
                    for w in widths
                ],
                axis=0,
            )
            threshold = g.min_seat_edges
        else:
            t = np.max([seat_contrast(texture, w, rougher=slab) for w in widths], axis=0)
            e = np.max([edge_pair_score(gradient, w, noise) for w in widths], axis=0)
            evidence = np.sqrt(np.clip(t / g.min_seat_contrast, 0, None) * e / g.min_seat_edges)
            threshold = 1.0
        evidence = evidence[top : top + rows]
        peaks = _peaks(evidence, min_gap, threshold)
        centres = [_edge_midpoint(gradient, top, p, best_width[p + top], tone) for p in peaks]
        return (float(evidence[peaks].sum()) if peaks else 0.0), evidence, peaks, centres

    # Coarse skews first, then the fine ones around the best coarse one.
    coarse = 3
    noise_level: dict[str, float] = {}
    candidates = {0: None} | {k: None for k in range(-n_skews, n_skews + 1, coarse)}
    for k in candidates:
        candidates[k] = evidence_at(k * skew_step)
    k_best = max(candidates, key=lambda k: candidates[k][0])
    for k in range(k_best - coarse + 1, k_best + coarse):
        if -n_skews <= k <= n_skews and k not in candidates:
            candidates[k] = evidence_at(k * skew_step)
    k_best = max(candidates, key=lambda k: candidates[k][0])
    # Level sleepers are the rule on a line-scan camera: a skew must earn its place.
    if __import__("os").environ.get("DBG"):
        print("skews", {k: (round(v[0], 1), len(v[2])) for k, v in sorted(candidates.items())})
    if candidates[k_best][0] < _SKEW_GAIN * candidates[0][0]:
        k_best = 0
    total, evidence, peaks, centres = candidates[k_best]
    skew = k_best * skew_step

    # Back from the upright window (sheared by the rail's slope) to the reduced window.
    return SeatProfile(rail, evidence, peaks, centres, skew / (1 + skew * slope), total)


def refine_rail(reduced: _Reduced, profile: SeatProfile, geometry: TrackGeometry) -> RailLine:
    """The rail's line moved across to its most mirror-symmetric column with sleepers levelled.

    Where sleepers cross the rail askew (a yawed camera, a sheared image), the two fasteners
    of a seat lie on different rows and the row-wise symmetry of :func:`find_rails` can lock
    beside the rail. Upright rail, levelled sleepers: the fasteners mirror each other again.
    Searched within half a rail foot of the first estimate; the slope is kept.
    """
    g = geometry
    rail = profile.rail
    rows, cols = reduced.shape
    col_mm = g.mm_per_px * reduced.fx
    reach = max(3, round((g.fastener_offset_mm + g.fastener_size_mm[0] / 2) / col_mm))
    search = max(2, round(g.rail_foot_width_mm / col_mm * _REFINE_SEARCH))
    centre_row = rows / 2
    rail_col = reduced.col_of(rail.x_at(reduced.line_of(centre_row)))
    slope = rail.slope * reduced.fy / reduced.fx
    first = int(math.floor(rail_col)) - search - reach - 1
    last = int(math.ceil(rail_col)) + search + reach + 2
    if first < 0 or last > cols:
        return rail
    upright = _shear(reduced.image, slope, centre_row)[:, first:last]
    skew = profile.skew * (1 + 0.0)  # rows per column in the reduced window
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
        self._context = self._margin + int(math.ceil(g.lines(_MIN_RAIL_LINES_MM)))
        # Two decisions may find the same seat a line apart; seats of a rail are far further.
        self._same_seat = g.lines(g.sleeper_pitch_mm * (1 - g.pitch_tolerance)) / 2
        self.buffer = LineBuffer(keep_lines=self._context + self._margin + crop_h)
        self._decided = 0
        self._last_seat: dict[Rail, float] = {}
        self._frames: deque[tuple[int, int, int]] = deque()  # (frame_index, first, lines)
        self.rails: list[RailLine] = []
        self._rails_window: tuple[int, int] | None = None

    def push(self, frame: np.ndarray, frame_index: int) -> list[FoundFastener]:
        """Add a frame ``(lines, pixels)``; the fasteners decided with it."""
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
        lines = self.buffer.read(first, self.buffer.end)
        reduced = _Reduced(lines, first, self._fx, fy)
        if reduced.shape[0] < 8 or reduced.shape[1] < 8:
            self._decided = decide_to
            return []
        window = (first, self.buffer.end)
        if window != self._rails_window:
            self.rails = find_rails(reduced, g, self.direction)
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
        texture = np.abs(cv2.Sobel(reduced.image, cv2.CV_32F, 1, 0, ksize=3))
        cues = np.dstack([texture * valid, reduced.image * valid, valid])
        open_start = first == 0
        open_end = decide_to == self.buffer.end
        profiles = [seat_profile(reduced, r, g, cues, open_start, open_end) for r in self.rails]
        profiles = [p for p in profiles if p is not None]
        if _REFINE:
            profiles = [
                SeatProfile(
                    refine_rail(reduced, p, g), p.evidence, p.peaks, p.centres, p.skew, p.total
                )
                for p in profiles
            ]
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
        found.sort(key=lambda f: (f.line, f.x))
        return found

    def _cut(self, rail: RailLine, seat: Seat) -> list[FoundFastener]:
        g = self.geometry
        rail_x = rail.x_at(seat.line)
        offset = g.px(g.fastener_offset_mm)
        frame_index, frame_first = self._frame_of(seat.line)
        out = []
        for image_side, sign in (("left", -1.0), ("right", 1.0)):
            x = rail_x + sign * offset
            line = seat.line + sign * offset * seat.skew
            if not 0 <= x < (self.buffer.width or 0):
                continue  # this fastener is outside the image
            mirrored = sign > 0  # fastener right of the rail: flip to put the rail on the right
            crop, x0, line0, truncated = cut_crop(self.buffer, g, x, line, mirrored)
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
                    score=seat.contrast,
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
