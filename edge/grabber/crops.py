"""Fastener crops: the pixels the anomaly model sees, and where they came from.

Every crop is cut at full resolution, ``TrackGeometry.crop_mm`` in size, centred on the
fastener, and turned so that the rail lies on the crop's right-hand side (the canonical way
round): a fastener on the image-right of its rail is mirrored left-right. With that, a field
fastener of the left rail and a gauge fastener of the right rail look alike to the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge.grabber.geometry import TrackGeometry
from edge.grabber.linebuffer import LineBuffer
from edge.records import Rail, Side


@dataclass(frozen=True, eq=False)
class FoundFastener:
    """One fastener found by :class:`~edge.grabber.locate.FastenerFinder`.

    Attributes:
        crop: ``(height lines, width px)`` pixels, same dtype as the frames, in canonical
            orientation (rail on the right; see ``mirrored``).
        rail, side: which rail (looking toward increasing mileage) and which side of it.
        x: fastener centre across the track, px in the frame (sub-pixel).
        line: fastener centre along the track, absolute line index from the start of the run
            (sub-line); ``line_index`` is its nearest whole line.
        frame_index: the frame that holds ``line_index``.
        box: ``(x, y, width, height)`` of the crop in that frame's pixels; ``y`` may be
            negative or run past the frame when the crop spans frames.
        mirrored: the crop was flipped left-right to put the rail on its right.
        truncated: part of the crop lay outside the image or the recorded lines and was filled
            by repeating the nearest pixel.
        score: the seat's evidence (see edge.grabber.locate.edge_pair_score): its two edges'
            strength over the typical gradient, scaled by its brightness contrast; a seat
            counts from ``TrackGeometry.min_seat_edges`` (half that when the other rail's seat
            vouches for it).
    """

    crop: np.ndarray
    rail: Rail
    side: Side
    x: float
    line: float
    frame_index: int
    box: tuple[int, int, int, int]
    mirrored: bool
    truncated: bool
    score: float

    @property
    def line_index(self) -> int:
        return int(np.floor(self.line + 0.5))


def crop_origin(geometry: TrackGeometry, x: float, line: float) -> tuple[int, int]:
    """Top-left ``(x px, line)`` of the crop centred on ``(x, line)`` (pixel-centre coords)."""
    width, height = geometry.crop_size
    return int(np.floor(x - (width - 1) / 2 + 0.5)), int(np.floor(line - (height - 1) / 2 + 0.5))


def cut_crop(
    buffer: LineBuffer, geometry: TrackGeometry, x: float, line: float, mirror: bool
) -> tuple[np.ndarray, int, int, bool]:
    """Cut the crop centred on ``(x, line)`` from the buffer.

    Returns ``(crop, x0, line0, truncated)``: the ``(height, width)`` crop (mirrored when asked),
    the absolute top-left corner it was cut at, and whether padding was needed.
    """
    width, height = geometry.crop_size
    x0, line0 = crop_origin(geometry, x, line)
    crop, truncated = buffer.read_padded(x0, line0, width, height)
    if mirror:
        crop = np.ascontiguousarray(crop[:, ::-1])
    return crop, x0, line0, truncated
