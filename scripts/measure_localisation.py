"""Recall and precision of the fastener finder on the real top-down track images.

Data: ``shared/data/track-topdown-ccby`` (CC BY 4.0, "sleepers" by Roboflow user daksh-e0zes;
read from disk, never copied into the repository). 150 grey 512x512 images of ballasted track,
YOLO labels: class 0 ``clips`` is one box per rail seat, centred on the rail and covering both
clips; class 1 ``sleepers``.

Which images: those whose rails lie within ``--max-tilt`` degrees of the image vertical. The
angle is taken from the labels, not from the image, so the selection does not depend on the
finder: (1) the sleeper boxes say whether the rails run roughly up the image (sleeper boxes
wider than tall) or across it; (2) the direction between every two clip-box centres that lies
within 45 degrees of the rail axis is collected, and the most common direction (1-degree bins,
summed over three bins) is the rail direction, because clips of one rail line up along it while
pairs across the rails scatter; its median within 2.5 degrees of that bin is the angle.

Scoring, per image (each image is one frame of its own: ``push`` then ``flush``):
- a crop that contains the centre of at least one ``clips`` box is a hit, else a false positive;
- a ``clips`` box whose centre no crop contains is a miss.
recall = boxes found / boxes, precision = hit crops / crops.

Run from the repository root::

    .venv/bin/python scripts/measure_localisation.py \
        --calibration calibration/track-topdown-ccby.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from edge.grabber.geometry import TrackGeometry
from edge.grabber.locate import FastenerFinder

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/track-topdown-ccby/train"


def read_labels(path: Path, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """YOLO labels as pixel boxes ``(n, 4)`` of ``(cx, cy, w, h)``: clips and sleepers."""
    rows = np.loadtxt(path, ndmin=2) if path.stat().st_size else np.zeros((0, 5))
    scale = np.array([width, height, width, height], dtype=np.float64)
    clips = rows[rows[:, 0] == 0][:, 1:5] * scale
    sleepers = rows[rows[:, 0] == 1][:, 1:5] * scale
    return clips, sleepers


def rail_angle_from_labels(clips: np.ndarray, sleepers: np.ndarray) -> float | None:
    """Angle of the rails to the image vertical, degrees (x growing down the image positive).

    None when the rails run closer to the image horizontal, or when the labels cannot tell.
    """
    if len(sleepers) == 0 or len(clips) < 2:
        return None
    if np.median(sleepers[:, 2] - sleepers[:, 3]) <= 0:
        return None  # sleepers taller than wide: the rails run across the image
    angles = []
    centres = clips[:, :2]
    for i in range(len(centres)):
        for j in range(i + 1, len(centres)):
            dx, dy = centres[j] - centres[i]
            if dy < 0:
                dx, dy = -dx, -dy
            angle = math.degrees(math.atan2(dx, dy))
            if abs(angle) < 45:
                angles.append(angle)
    if not angles:
        return None
    counts, edges = np.histogram(angles, bins=90, range=(-45, 45))
    k = int(np.argmax(np.convolve(counts, [1, 1, 1], mode="same")))
    mode = edges[k] + 0.5
    return float(np.median([a for a in angles if abs(a - mode) <= 2.5]))


def score_image(
    boxes: list[tuple[int, int, int, int]], clips: np.ndarray
) -> tuple[int, int, int, list[bool]]:
    """``(boxes found, hit crops, false crops, found flag per box)`` for one image."""
    found = [False] * len(clips)
    hits = false = 0
    for x0, y0, w, h in boxes:
        inside = (
            (clips[:, 0] >= x0)
            & (clips[:, 0] < x0 + w)
            & (clips[:, 1] >= y0)
            & (clips[:, 1] < y0 + h)
        )
        if inside.any():
            hits += 1
            for i in np.flatnonzero(inside):
                found[i] = True
        else:
            false += 1
    return sum(found), hits, false, found


def draw(image: np.ndarray, clips: np.ndarray, boxes: list, found: list[bool], path: Path) -> None:
    """Overlay for a person: clip centres (green found, red missed) and crops (blue)."""
    canvas = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    for x0, y0, w, h in boxes:
        cv2.rectangle(canvas, (x0, y0), (x0 + w - 1, y0 + h - 1), (255, 128, 0), 1)
    for (cx, cy, _, _), ok in zip(clips, found):
        cv2.circle(canvas, (round(cx), round(cy)), 4, (0, 200, 0) if ok else (0, 0, 255), -1)
    cv2.imwrite(str(path), canvas)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="folder with images/, labels/"
    )
    parser.add_argument("--calibration", type=Path, required=True, help="TrackGeometry JSON")
    parser.add_argument("--max-tilt", type=float, default=15.0, help="rails within this, degrees")
    parser.add_argument(
        "--overlays", type=Path, help="write a PNG per image with a miss or false crop"
    )
    parser.add_argument("--json", type=Path, help="write the figures and per-image counts here")
    args = parser.parse_args(argv)

    geometry = TrackGeometry.load(args.calibration)
    images = sorted((args.data / "images").glob("*.jpg"))
    if not images:
        print(f"no images under {args.data / 'images'}", file=sys.stderr)
        return 2
    if args.overlays:
        args.overlays.mkdir(parents=True, exist_ok=True)

    totals = dict(images=0, skipped=0, boxes=0, found=0, crops=0, hits=0, false=0)
    per_image = []
    seconds = 0.0
    for path in images:
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if image is None:
            print(f"{path}: unreadable", file=sys.stderr)
            return 2
        clips, sleepers = read_labels(
            args.data / "labels" / (path.stem + ".txt"), image.shape[1], image.shape[0]
        )
        angle = rail_angle_from_labels(clips, sleepers)
        if angle is None or abs(angle) > args.max_tilt:
            totals["skipped"] += 1
            continue
        start = time.perf_counter()
        finder = FastenerFinder(geometry)
        crops = finder.push(image, 0) + finder.flush()
        seconds += time.perf_counter() - start
        boxes = [c.box for c in crops]
        found, hits, false, flags = score_image(boxes, clips)
        totals["images"] += 1
        totals["boxes"] += len(clips)
        totals["found"] += found
        totals["crops"] += len(crops)
        totals["hits"] += hits
        totals["false"] += false
        per_image.append(
            dict(
                image=path.name,
                angle=round(angle, 1),
                boxes=len(clips),
                found=found,
                crops=len(crops),
                false=false,
            )
        )
        if args.overlays and (found < len(clips) or false):
            draw(image, clips, boxes, flags, args.overlays / (path.stem + ".png"))

    recall = totals["found"] / max(1, totals["boxes"])
    precision = totals["hits"] / max(1, totals["crops"])
    figures = dict(
        totals,
        recall=round(recall, 4),
        precision=round(precision, 4),
        ms_per_image=round(1000 * seconds / max(1, totals["images"]), 2),
    )
    print(json.dumps(figures))
    if args.json:
        args.json.write_text(json.dumps(dict(figures, per_image=per_image), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
