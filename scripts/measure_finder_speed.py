"""Frames per second of the fastener finder on one CPU core, on generated line-scan frames.

The vehicle needs about 150 crops per second per rail at 160 km/h (a seat every ~0.6 m, two
fasteners a seat; research/edge-anchors.md 5.1). This script generates a strip for a camera
geometry, cuts it into frames, pushes the frames through :class:`FastenerFinder` several
times over and reports the time per frame, the line rate and the speed it keeps up with, and
the crops per second it delivers.

Run from the repository root, e.g.::

    .venv/bin/python scripts/measure_finder_speed.py --calibration calibration/example-camera.json

Known limit: the strip is looped, so a jump in the ballast pattern recurs every loop; the
finder does not care, and the timing is what is measured. Numbers depend on the CPU and on
what else runs on it: the script times CPU seconds of its own process (process_time) and pins
OpenCV to one thread, so the figures are those of one core; the wall time is printed too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from edge.grabber.geometry import TrackGeometry
from edge.grabber.locate import FastenerFinder
from edge.grabber.stripgen import StripSpec, generate_strip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibration", type=Path, required=True, help="TrackGeometry JSON")
    parser.add_argument("--lines-per-frame", type=int, default=1024)
    parser.add_argument("--strip-frames", type=int, default=4, help="frames in the strip drawn")
    parser.add_argument("--loops", type=int, default=4, help="times the strip is pushed")
    parser.add_argument("--threads", type=int, default=1, help="OpenCV threads")
    args = parser.parse_args(argv)

    cv2.setNumThreads(args.threads)
    geometry = TrackGeometry.load(args.calibration)
    strip = generate_strip(
        geometry,
        StripSpec(
            lines=args.lines_per_frame * args.strip_frames,
            seed=0,
            tilt_deg=1.0,
            light_changes=True,
            painted_numbers=True,
            defect_rate=0.1,
        ),
    )
    frames = list(strip.frames(args.lines_per_frame))
    finder = FastenerFinder(geometry)
    seconds: list[float] = []  # CPU time of this process: other work on the machine is not ours
    wall: list[float] = []
    crops = 0
    for loop in range(args.loops):
        for index, frame in enumerate(frames):
            start, start_wall = time.process_time(), time.perf_counter()
            crops += len(finder.push(frame, loop * len(frames) + index))
            seconds.append(time.process_time() - start)
            wall.append(time.perf_counter() - start_wall)
    crops += len(finder.flush())

    # The first frames fill the buffer and decide nothing; time the steady state.
    steady = seconds[len(frames) :]
    per_frame = statistics.mean(steady)
    lines_per_s = args.lines_per_frame / per_frame
    km_per_h = lines_per_s * geometry.mm_per_line * 3.6e-3
    rails = len(geometry.rails_left_to_right())
    figures = {
        "camera": geometry.camera_id,
        "frame": [args.lines_per_frame, int(strip.image.shape[1])],
        "dtype": str(strip.image.dtype),
        "opencv_threads": args.threads,
        "cpu_ms_per_frame_mean": round(1000 * per_frame, 2),
        "cpu_ms_per_frame_p95": round(1000 * float(np.percentile(steady, 95)), 2),
        "wall_ms_per_frame_median": round(1000 * statistics.median(wall[len(frames) :]), 2),
        "frames_per_s": round(1 / per_frame, 1),
        "lines_per_s": round(lines_per_s),
        "keeps_up_to_km_per_h": round(km_per_h),
        "crops_per_s_per_rail_at_that_speed": round(
            km_per_h / 3.6e-3 / geometry.sleeper_pitch_mm * 2, 1
        ),
        "crops_cut": crops,
        "crops_expected": len(strip.fasteners) * args.loops,
        "rails": rails,
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
