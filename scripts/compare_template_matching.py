"""The template-matching alternative to the fastener finder, scored like measure_localisation.

A baseline for the method comparison in docs/fastener-finding.md, not part of the pipeline.
The rail-seat template is the mean of the ``clips`` boxes (resized to the median box size and
normalised) of the scenes in one half of the data; it is matched with OpenCV's normalised
correlation at a few rotations on the images of the other half; peaks above a threshold,
chosen on the first half, at least one box apart, become crops of the finder's size centred
on the peak. Halves are split by scene (the image name's prefix), so no scene is in both.

Run from the repository root::

    .venv/bin/python scripts/compare_template_matching.py \
        --calibration calibration/track-topdown-ccby.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure_localisation import (  # noqa: E402
    DEFAULT_DATA,
    rail_angle_from_labels,
    read_labels,
    score_image,
)

from edge.grabber.geometry import TrackGeometry  # noqa: E402

ROTATIONS = (-14.0, -7.0, 0.0, 7.0, 14.0)


def load(data: Path, max_tilt: float) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``(half, grey image, clip boxes)`` of the images with rails within ``max_tilt``."""
    images = sorted((data / "images").glob("*.jpg"))
    scenes = sorted({p.name.split("_")[0] for p in images})
    out = []
    for path in images:
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        clips, sleepers = read_labels(data / "labels" / (path.stem + ".txt"), *image.shape[::-1])
        angle = rail_angle_from_labels(clips, sleepers)
        if angle is not None and abs(angle) <= max_tilt:
            out.append((scenes.index(path.name.split("_")[0]) % 2, image, clips))
    return out


def template_from(samples: list[tuple[int, np.ndarray, np.ndarray]]) -> np.ndarray:
    sizes = np.concatenate([c[:, 2:4] for _, _, c in samples])
    w, h = (int(round(v)) for v in np.median(sizes, axis=0))
    patches = []
    for _, image, clips in samples:
        for cx, cy, bw, bh in clips:
            x0, y0, x1, y1 = int(cx - bw / 2), int(cy - bh / 2), int(cx + bw / 2), int(cy + bh / 2)
            if x0 < 0 or y0 < 0 or x1 > image.shape[1] or y1 > image.shape[0]:
                continue
            patch = cv2.resize(image[y0:y1, x0:x1].astype(np.float32), (w, h))
            patches.append((patch - patch.mean()) / (patch.std() + 1e-6))
    return np.mean(patches, axis=0).astype(np.float32)


def detect(image: np.ndarray, template: np.ndarray, threshold: float) -> list[tuple[float, float]]:
    """Centres of peaks of the best correlation over the rotations, one box apart."""
    h, w = template.shape
    best = np.full(image.shape, -1.0, np.float32)
    centre = (w / 2, h / 2)
    for angle in ROTATIONS:
        rotated = cv2.warpAffine(template, cv2.getRotationMatrix2D(centre, angle, 1.0), (w, h))
        score = cv2.matchTemplate(image.astype(np.float32), rotated, cv2.TM_CCOEFF_NORMED)
        padded = np.full(image.shape, -1.0, np.float32)
        padded[h // 2 : h // 2 + score.shape[0], w // 2 : w // 2 + score.shape[1]] = score
        best = np.maximum(best, padded)
    peaks = (best >= threshold) & (best == cv2.dilate(best, np.ones((h, w), np.uint8)))
    return [(float(x), float(y)) for y, x in zip(*np.nonzero(peaks))]


def evaluate(samples, template, threshold, geometry) -> dict:
    width, height = geometry.crop_size
    totals = dict(boxes=0, found=0, crops=0, hits=0)
    for _, image, clips in samples:
        centres = detect(image, template, threshold)
        boxes = [(round(x - width / 2), round(y - height / 2), width, height) for x, y in centres]
        found, hits, _, _ = score_image(boxes, clips)
        totals["boxes"] += len(clips)
        totals["found"] += found
        totals["crops"] += len(boxes)
        totals["hits"] += hits
    return dict(
        totals,
        recall=round(totals["found"] / max(1, totals["boxes"]), 4),
        precision=round(totals["hits"] / max(1, totals["crops"]), 4),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--max-tilt", type=float, default=15.0)
    args = parser.parse_args(argv)
    geometry = TrackGeometry.load(args.calibration)
    samples = load(args.data, args.max_tilt)
    results = {}
    for fit_half in (0, 1):
        fit = [s for s in samples if s[0] == fit_half]
        test = [s for s in samples if s[0] != fit_half]
        template = template_from(fit)
        # The threshold that maximises min(recall, precision) on the fitting half.
        grid = np.arange(0.2, 0.8, 0.05)
        scores = [evaluate(fit, template, t, geometry) for t in grid]
        best = int(np.argmax([min(s["recall"], s["precision"]) for s in scores]))
        results[f"fit_half_{fit_half}"] = dict(
            threshold=round(float(grid[best]), 2),
            on_fit_half=scores[best],
            on_other_half=evaluate(test, template, grid[best], geometry),
        )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
