"""Edited defects on real track images: missing, displaced and broken fasteners.

Real defective fasteners are rare in any image set, so the held-out evaluation set and the
sample recording are made by editing real images, the way a technician would retouch a
photograph: sleeper surface from beside a clip is copied over it (missing), the clip is cut out
and put back elsewhere with the hole filled (displaced), or part of it is covered (broken).
These edits are separate from the training synthesis (:mod:`edge.synthesis`, Perlin regions),
so an evaluation on them measures defects of a kind the model did not train on.

All functions work on a grey ``(H, W)`` image (uint8 or float) and a clip box
``(cx, cy, half_w, half_h)`` in pixels, with ``away`` = -1 or +1 the x direction pointing away
from the rail (towards the sleeper surface used as fill). Each returns the edited image and the
defect mask (float32 ``(H, W)`` in [0, 1]). Edges are feathered by ``feather_px``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

DEFECT_KINDS = ("missing", "displaced", "broken")


@dataclass(frozen=True)
class ClipBox:
    """A fastener's box: centre and half sizes in pixels."""

    cx: float
    cy: float
    half_w: float
    half_h: float

    def slices(self, dx: float = 0.0, dy: float = 0.0) -> tuple[slice, slice]:
        y0 = int(round(self.cy + dy - self.half_h))
        x0 = int(round(self.cx + dx - self.half_w))
        return (
            slice(y0, y0 + int(round(2 * self.half_h))),
            slice(x0, x0 + int(round(2 * self.half_w))),
        )


def _soft_mask(shape, box: ClipBox, feather_px: float, dx: float = 0.0, dy: float = 0.0):
    mask = np.zeros(shape, np.float32)
    mask[box.slices(dx, dy)] = 1.0
    if feather_px > 0:
        mask = cv2.GaussianBlur(mask, (0, 0), feather_px)
        mask[box.slices(dx, dy)] = np.maximum(mask[box.slices(dx, dy)], 0.5)
    return mask


def _shifted(image: np.ndarray, dx: float, dy: float) -> np.ndarray:
    matrix = np.float32([[1, 0, dx], [0, 1, dy]])
    height, width = image.shape
    return cv2.warpAffine(
        image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )


def _blend(image: np.ndarray, fill: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = image.astype(np.float32) * (1 - mask) + fill.astype(np.float32) * mask
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        return np.clip(np.round(out), info.min, info.max).astype(image.dtype)
    return out.astype(image.dtype)


def remove_clip(image, box: ClipBox, away: int, feather_px: float = 1.5):
    """Cover the clip with the surface found ``2 * half_w`` further from the rail."""
    fill = _shifted(image.astype(np.float32), -away * 2.2 * box.half_w, 0.0)
    mask = _soft_mask(image.shape, box, feather_px)
    return _blend(image, fill, mask), (mask > 0.5).astype(np.float32)


def displace_clip(image, box: ClipBox, away: int, shift: tuple[float, float], feather_px=1.5):
    """Remove the clip, then paste it back moved by ``shift = (dx, dy)`` pixels.

    The mask covers both where the clip was and where it now is.
    """
    dx, dy = shift
    emptied, hole = remove_clip(image, box, away, feather_px)
    moved = _shifted(image.astype(np.float32), dx, dy)
    target = _soft_mask(image.shape, box, feather_px, dx, dy)
    out = _blend(emptied, moved, target)
    mask = np.maximum(hole, (target > 0.5).astype(np.float32))
    return out, mask


def break_clip(image, box: ClipBox, away: int, rng: np.random.Generator, feather_px=1.5):
    """Cover a random part (a third to a half) of the clip with the surface beside it."""
    fraction = float(rng.uniform(0.35, 0.55))
    part = rng.integers(0, 4)
    if part < 2:  # the upper or lower part (along track)
        half_h = box.half_h * fraction
        cy = box.cy - box.half_h + half_h if part == 0 else box.cy + box.half_h - half_h
        piece = ClipBox(box.cx, cy, box.half_w, half_h)
    else:  # the part towards or away from the rail
        half_w = box.half_w * fraction
        sign = -away if part == 2 else away
        piece = ClipBox(box.cx + sign * (box.half_w - half_w), box.cy, half_w, box.half_h)
    fill = _shifted(image.astype(np.float32), -away * 2.2 * box.half_w, 0.0)
    mask = _soft_mask(image.shape, piece, feather_px)
    return _blend(image, fill, mask), (mask > 0.5).astype(np.float32)


def make_defect(kind: str, image, box: ClipBox, away: int, rng: np.random.Generator):
    """Apply one defect ``kind`` (``missing``, ``displaced``, ``broken``) with random settings.

    Displacements move the clip 30-50 % of its length along the rail or 40-70 % of its width
    away from the rail, so it no longer sits on its seat.
    """
    if kind == "missing":
        return remove_clip(image, box, away)
    if kind == "displaced":
        if rng.random() < 0.5:
            shift = (0.0, float(rng.choice([-1, 1]) * rng.uniform(0.6, 1.0) * box.half_h))
        else:
            shift = (float(away * rng.uniform(0.8, 1.4) * box.half_w), 0.0)
        return displace_clip(image, box, away, shift)
    if kind == "broken":
        return break_clip(image, box, away, rng)
    raise ValueError(f"unknown defect kind {kind!r}; choose from {DEFECT_KINDS}")
