"""Build samples/track-demo/: a recorded run made from real top-down track photographs.

The photographs (CC BY 4.0, see samples/track-demo/README.md) are single frames, augmented by
their publisher. For each scene listed in samples/track-demo/scenes.txt this script takes the
copy whose rails are closest to vertical, removes the salt-and-pepper noise, rectifies it to
4 mm per pixel with rails vertical (edge.datasets.topdown.rectify), cuts a 512-pixel-wide band
centred on the track from the middle of the gap before its first sleeper to the middle of the
gap after its last, and joins the bands into one strip: the sleeper pitch (600 mm) runs on
across the joins. A ballast-only lead-in makes the strip a whole number of frames and puts the
frame boundaries at varying places relative to the sleepers, so some fasteners straddle two
frames. A few clips are edited to be missing, displaced or broken (edge.evaluate.defects), and
the result is written with edge record's writer as run.mkv, run.json and run.nmea, with
truth.json listing every fastener and each edit.

    python scripts/build_sample.py --data ../shared/data/track-topdown-ccby/train
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from edge.datasets.prepare import list_scenes
from edge.datasets.topdown import NOMINAL_GEOMETRY, load_labelled, rectify
from edge.evaluate.defects import ClipBox, make_defect
from edge.grabber.record import strip_frames, write_recording
from edge.telemetry.run import RunInfo
from edge.telemetry.simulate import SimulatedTrack

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "track-demo"
WIDTH_PX = 512
LINES_PER_FRAME = 512
HALF_PITCH_PX = int(NOMINAL_GEOMETRY.sleeper_pitch_mm / NOMINAL_GEOMETRY.mm_per_px / 2)
OFFSET_PX = NOMINAL_GEOMETRY.fastener_offset_mm / NOMINAL_GEOMETRY.mm_per_px
CLIP_HALF_PX = (11.0, 19.0)
START_KM_POST, START_METRES = 27, 410.0
EDITS = ("missing", "displaced", "missing", "broken", "displaced", "missing", "displaced")


def most_vertical(paths: list[Path]):
    """The rectified copy of a scene whose original rails were closest to vertical."""
    best, best_tilt = None, None
    for path in paths:
        labelled = load_labelled(path)
        labelled.image = cv2.medianBlur(labelled.image, 3)
        rectified = rectify(labelled, NOMINAL_GEOMETRY)
        if rectified is None or len(rectified.rails) != 2:
            continue
        linear = rectified.matrix[:, :2]
        tilt = abs(np.degrees(np.arctan2(linear[0, 1], linear[1, 1])))
        sheared = abs(np.degrees(np.arctan2(linear[1, 0], linear[0, 0])))
        score = tilt + sheared
        if best_tilt is None or score < best_tilt:
            best, best_tilt = rectified, score
    return best


def band(rectified) -> tuple[np.ndarray, list[dict]]:
    """The track band of one scene and its fasteners (x, line relative to the band)."""
    (left_x, left_ys), (right_x, right_ys) = rectified.rails
    centre_x = (left_x + right_x) / 2
    x0 = int(round(centre_x - WIDTH_PX / 2))
    seats = sorted(set(np.round(left_ys + right_ys).astype(int)))
    seats = _merge_close(seats)
    height = rectified.image.shape[0]
    while seats and seats[0] - HALF_PITCH_PX < 0:
        seats.pop(0)
    while seats and seats[-1] + HALF_PITCH_PX > height:
        seats.pop()
    y0, y1 = seats[0] - HALF_PITCH_PX, seats[-1] + HALF_PITCH_PX
    window = (slice(y0, y1), slice(x0, x0 + WIDTH_PX))
    image = rectified.image[window].copy()
    valid = rectified.valid[window]
    if (valid == 0).any():
        image = cv2.inpaint(image, (valid == 0).astype(np.uint8), 5, cv2.INPAINT_TELEA)
    fasteners = []
    for seat_y in seats:
        for rail, rail_x in (("left", left_x), ("right", right_x)):
            for direction in (-1, 1):
                outside = (direction < 0) == (rail == "left")
                fasteners.append(
                    {
                        "rail": rail,
                        "side": "field" if outside else "gauge",
                        "x": float(rail_x + direction * OFFSET_PX - x0),
                        "line": float(seat_y - y0),
                        "away": direction,
                    }
                )
    return image, fasteners


def _merge_close(values: list[int], tolerance: int = 30) -> list[int]:
    merged: list[list[int]] = []
    for value in values:
        if merged and value - merged[-1][-1] <= tolerance:
            merged[-1].append(value)
        else:
            merged.append([value])
    return [int(round(np.mean(group))) for group in merged]


def lead_in(first_band: np.ndarray, lines: int) -> np.ndarray:
    """``lines`` of ballast and rails, tiled from the gap at the top of the first band."""
    gap = first_band[:40]  # the band starts mid-gap: its first 40 lines are ballast only
    tiles = []
    while sum(len(tile) for tile in tiles) < lines:
        tiles.append(gap if len(tiles) % 2 == 0 else gap[::-1])
    return np.concatenate(tiles)[:lines]


def build(data: Path, out: Path, seed: int) -> dict:
    scenes = list_scenes(data / "images")
    names = [
        line.strip()
        for line in (SAMPLE / "scenes.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    bands, fasteners, sources = [], [], []
    for name in names:
        rectified = most_vertical(scenes[name])
        if rectified is None:
            raise SystemExit(f"{name}: no copy of this scene rectifies with two rails")
        image, found = band(rectified)
        bands.append(image)
        fasteners.append(found)
        sources.append(rectified.source.name)
    body = sum(len(image) for image in bands)
    lead = (-body) % LINES_PER_FRAME or 0
    strip_parts, offset, all_fasteners = [lead_in(bands[0], lead)], lead, []
    for image, found in zip(bands, fasteners):
        for fastener in found:
            all_fasteners.append({**fastener, "line": fastener["line"] + offset})
        strip_parts.append(image)
        offset += len(image)
    strip = np.ascontiguousarray(np.concatenate(strip_parts))

    # Edits: spread along the run, one sleeper each, none in the first or last metre.
    rng = np.random.default_rng(seed)
    candidates = [f for f in all_fasteners if 250 < f["line"] < len(strip) - 250]
    seat_lines = _merge_close(sorted(round(f["line"]) for f in candidates))
    picks = np.linspace(0, len(seat_lines) - 1, len(EDITS)).round().astype(int)
    places = [("left", "field"), ("right", "gauge"), ("left", "gauge"), ("right", "field")]
    chosen = []
    for number, pick in enumerate(picks):
        rail, side = places[number % len(places)]
        chosen += [
            f
            for f in candidates
            if abs(f["line"] - seat_lines[pick]) < 30 and f["rail"] == rail and f["side"] == side
        ]
    edits = []
    for kind, fastener in zip(EDITS, chosen):
        box = ClipBox(fastener["x"], fastener["line"], *CLIP_HALF_PX)
        strip, _ = make_defect(kind, strip, box, fastener["away"], rng)
        fastener["state"] = kind
        edits.append(fastener)

    mm = NOMINAL_GEOMETRY.mm_per_px
    start_mileage = 1000.0 * START_KM_POST + START_METRES

    def described(fastener: dict) -> dict:
        along = fastener["line"] * mm / 1000.0
        return {
            "rail": fastener["rail"],
            "side": fastener["side"],
            "state": fastener.get("state", "normal"),
            "line_index": int(round(fastener["line"])),
            "x_px": round(fastener["x"], 1),
            "along_track_m": round(along, 3),
            "mileage_m": round(start_mileage + along, 3),
        }

    run = RunInfo(
        vehicle_id="demo-vehicle",
        run_id="track-demo",
        line_id="DEMO-LINE",
        track_id="1",
        start_km_post=START_KM_POST,
        start_metres=START_METRES,
        direction="increasing",
        mm_per_line=mm,
        lines_per_frame=LINES_PER_FRAME,
        camera_id="cam0",
        start_time_utc=datetime(2025, 6, 14, 23, 59, 52, tzinfo=timezone.utc),
    )
    track = SimulatedTrack(start_lat=52.37891, start_lon=4.90012, heading_deg=147.0, speed_kmh=54.0)
    summary = write_recording(out / "run.mkv", strip_frames(strip, LINES_PER_FRAME), run, track)
    truth = {
        "recording": "run.mkv",
        "mm_per_px": mm,
        "lines": int(len(strip)),
        "lead_in_lines": int(lead),
        "fasteners_total": len(all_fasteners),
        "defects": [described(f) for f in edits],
        "fasteners": [described(f) for f in sorted(all_fasteners, key=lambda f: f["line"])],
        "source_images": sources,
        "seed": seed,
    }
    (out / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    return {"summary": json.loads(summary.to_json()), "fasteners": len(all_fasteners)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="track-topdown-ccby/train folder")
    parser.add_argument("--out", default=str(SAMPLE))
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    print(json.dumps(build(Path(args.data), Path(args.out), args.seed), indent=2))


if __name__ == "__main__":
    main()
