"""Labelled top-down track images: rectify them, and cut aligned fastener crops.

The labelled images this project starts from (a CC BY 4.0 set of nadir track photographs with
YOLO boxes for rail seats and sleepers, see samples/track-demo/README.md) were augmented by
their publisher: rotated by multiples of 90 degrees and by up to 15 degrees, sheared, cropped and
stretched to 512 x 512. A line-scan recording has none of that: rails run along the lines,
sleepers across them, and every pixel has a known size in millimetres.

:func:`rectify` undoes it with one affine map per image, fitted on the labels: the rails (lines
through the rail-seat box centres) become vertical, the sleepers (the line joining the two rail
seats of a sleeper) horizontal, the rails ``rail_spacing_mm`` apart and the sleepers
``sleeper_pitch_mm`` apart, at ``mm_per_px`` in both directions. Those two distances are
assumptions (standard gauge, 600 mm concrete-sleeper pitch), so the millimetres are nominal.

A rail-seat box is centred on the rail and holds two fasteners (clips), one each side of the
rail; :func:`fastener_crops` cuts one crop per clip, mirrored where needed so that the rail is
always on the crop's right-hand side (the grabber's canonical orientation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from edge.errors import InputUnreadableError

CLIP_CLASS = 0
SLEEPER_CLASS = 1


@dataclass(frozen=True)
class TrackGeometryMM:
    """Nominal sizes used to rectify images and cut crops, in millimetres."""

    mm_per_px: float = 4.0
    rail_spacing_mm: float = 1500.0
    """Between rail centrelines: 1435 mm standard gauge plus one rail-head width."""
    sleeper_pitch_mm: float = 600.0
    fastener_offset_mm: float = 104.0
    """From the rail centreline to a clip's centre (measured on the rectified images)."""
    crop_mm: float = 240.0
    """Side of a square crop centred on a clip."""


NOMINAL_GEOMETRY = TrackGeometryMM()


@dataclass
class LabelledImage:
    """A grey image and its YOLO boxes in pixels: ``(class, cx, cy, w, h)`` rows."""

    path: Path
    image: np.ndarray
    boxes: np.ndarray

    @property
    def scene(self) -> str:
        """The source photograph (Roboflow names augmented copies ``<scene>_jpg.rf.<hash>``)."""
        return self.path.name.split("_jpg")[0]


def load_labelled(image_path: str | Path, labels_dir: str | Path | None = None) -> LabelledImage:
    """Read an image as grey and its YOLO label file (``labels/<stem>.txt`` beside ``images/``)."""
    image_path = Path(image_path)
    image = cv2.imread(str(image_path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise InputUnreadableError(f"{image_path}: not a readable image")
    labels_dir = Path(labels_dir) if labels_dir else image_path.parent.parent / "labels"
    label_path = labels_dir / f"{image_path.stem}.txt"
    if not label_path.is_file():
        raise InputUnreadableError(f"{label_path}: label file missing for {image_path.name}")
    rows = np.loadtxt(label_path, ndmin=2)
    if rows.size == 0:
        rows = np.zeros((0, 5))
    height, width = image.shape
    boxes = rows.copy()
    boxes[:, 1:] *= [width, height, width, height]
    return LabelledImage(image_path, image, boxes)


@dataclass
class RectifiedImage:
    """A rectified track image and where its rails and rail seats are.

    ``rails`` holds one entry per rail, left to right: the rail centreline's x and the y of each
    rail seat on it (pixels of the rectified image). ``valid`` is 1 where the rectified image
    holds data (the rest is border left by the warp).
    """

    source: Path
    image: np.ndarray
    valid: np.ndarray
    rails: list[tuple[float, list[float]]] = field(default_factory=list)
    matrix: np.ndarray | None = None


def _split_rails(centres: np.ndarray, width: int) -> list[np.ndarray]:
    """Group rail-seat centres ``(N, 2)`` into one or two rails by their x (2-means)."""
    xs = centres[:, 0]
    if len(xs) < 2 or xs.max() - xs.min() < 0.25 * width:
        return [centres]
    threshold = (xs.max() + xs.min()) / 2
    for _ in range(20):
        threshold = (xs[xs < threshold].mean() + xs[xs >= threshold].mean()) / 2
    return [centres[xs < threshold], centres[xs >= threshold]]


def rectify(labelled: LabelledImage, geometry: TrackGeometryMM = NOMINAL_GEOMETRY):
    """Warp a labelled image so rails run vertically at the nominal scale.

    Returns:
        a :class:`RectifiedImage`, or ``None`` when the labels cannot fix the map (fewer than
        two rail seats, or neither a gauge nor a sleeper pitch measurable).
    """
    image, boxes = labelled.image, labelled.boxes
    height, width = image.shape

    # 1. Quarter turns: sleepers are wider than tall when the rails run vertically.
    sleepers = boxes[boxes[:, 0] == SLEEPER_CLASS]
    if len(sleepers) and np.median(sleepers[:, 3] / sleepers[:, 4]) < 1.0:
        image = cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)
        boxes = np.c_[boxes[:, 0], height - 1 - boxes[:, 2], boxes[:, 1], boxes[:, 4], boxes[:, 3]]
        height, width = image.shape
    seats = boxes[boxes[:, 0] == CLIP_CLASS][:, 1:3]
    if len(seats) < 2:
        return None
    rails = _split_rails(seats, width)

    # 2. Rail direction v (along track) from a line fit per rail, x = a*y + b.
    directions = []
    for rail in rails:
        if len(rail) >= 2 and np.ptp(rail[:, 1]) > 0.1 * height:
            slope = np.polyfit(rail[:, 1], rail[:, 0], 1)[0]
            directions.append(np.array([slope, 1.0]) / np.hypot(slope, 1.0))
    if not directions:
        return None
    v = np.mean(directions, axis=0)
    v /= np.linalg.norm(v)

    # 3. Sleeper direction u from the two seats of each sleeper, and the gauge in pixels.
    pairs = []
    if len(rails) == 2:
        for seat in rails[0]:
            offsets = rails[1] - seat
            along = np.abs(offsets @ v)
            nearest = int(np.argmin(along))
            if along[nearest] < 0.3 * np.linalg.norm(offsets[nearest]):
                pairs.append(offsets[nearest])
    if pairs:
        u = np.mean([p / np.linalg.norm(p) for p in pairs], axis=0)
        u /= np.linalg.norm(u)
        gauge_px = float(np.median([np.linalg.norm(p) for p in pairs]))
    else:
        u, gauge_px = np.array([v[1], -v[0]]), None

    # 4. Sleeper pitch in pixels: the smallest step between seats along a rail.
    basis_inv = np.linalg.inv(np.c_[u, v])
    steps = []
    for rail in rails:
        along = np.sort((rail @ basis_inv.T)[:, 1])
        gaps = np.diff(along)
        steps += list(gaps[gaps > 0.1 * height])
    pitch_px = float(min(steps)) if steps else None
    if gauge_px is None and pitch_px is None:
        return None
    scale_u = geometry.rail_spacing_mm / geometry.mm_per_px / gauge_px if gauge_px else None
    scale_v = geometry.sleeper_pitch_mm / geometry.mm_per_px / pitch_px if pitch_px else None
    scale_u = scale_u or scale_v
    scale_v = scale_v or scale_u

    # 5. The affine map and the warp; its bounding box becomes the new canvas.
    linear = np.diag([scale_u, scale_v]) @ basis_inv
    corners = np.array([[0, 0], [width, 0], [0, height], [width, height]], float) @ linear.T
    low, high = corners.min(axis=0), corners.max(axis=0)
    matrix = np.c_[linear, -low]
    size = tuple(int(s) for s in np.ceil(high - low))
    warped = cv2.warpAffine(image, matrix, size, flags=cv2.INTER_AREA)
    valid = cv2.warpAffine(np.ones_like(image), matrix, size, flags=cv2.INTER_NEAREST)
    rail_lines = []
    for rail in sorted(rails, key=lambda r: r[:, 0].mean()):
        mapped = rail @ linear.T - low
        rail_lines.append((float(mapped[:, 0].mean()), sorted(float(y) for y in mapped[:, 1])))
    return RectifiedImage(labelled.path, warped, valid, rail_lines, matrix)


@dataclass(frozen=True)
class FastenerCrop:
    """One clip's crop from a rectified image, in canonical orientation (rail on the right)."""

    image: np.ndarray
    rail_index: int
    side: str
    centre: tuple[float, float]
    mirrored: bool


def fastener_crops(
    rectified: RectifiedImage,
    geometry: TrackGeometryMM = NOMINAL_GEOMETRY,
    min_valid: float = 0.99,
) -> list[FastenerCrop]:
    """Cut a square crop around each clip of each rail seat.

    Sides: with two rails in view, the clip outside the track is ``field`` and the one between
    the rails ``gauge``; with one rail, the side cannot be told from the image and is named by
    position (``field`` left, ``gauge`` right, a documented guess). Crops that reach outside the
    image data (less than ``min_valid`` of their pixels valid) are skipped.

    Returns:
        crops of ``crop_mm / mm_per_px`` pixels square, uint8, rail on the crop's right.
    """
    side_px = int(round(geometry.crop_mm / geometry.mm_per_px))
    offset_px = geometry.fastener_offset_mm / geometry.mm_per_px
    height, width = rectified.image.shape
    crops = []
    for rail_index, (rail_x, seat_ys) in enumerate(rectified.rails):
        for seat_y in seat_ys:
            for direction in (-1, 1):
                cx, cy = rail_x + direction * offset_px, seat_y
                x0, y0 = int(round(cx - side_px / 2)), int(round(cy - side_px / 2))
                if x0 < 0 or y0 < 0 or x0 + side_px > width or y0 + side_px > height:
                    continue
                window = (slice(y0, y0 + side_px), slice(x0, x0 + side_px))
                if rectified.valid[window].mean() < min_valid:
                    continue
                crop = rectified.image[window]
                mirrored = direction > 0
                if mirrored:
                    crop = crop[:, ::-1]
                outside = (direction < 0) == (rail_index == 0)
                side = "field" if outside else "gauge"
                if len(rectified.rails) == 1:
                    side = "field" if direction < 0 else "gauge"
                crops.append(
                    FastenerCrop(np.ascontiguousarray(crop), rail_index, side, (cx, cy), mirrored)
                )
    return crops
