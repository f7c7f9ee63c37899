"""``edge calibrate``: fit the alarm threshold of a camera on held-out normal crops.

The threshold is the ``1 - false_alarm_rate`` quantile of the image scores of normal crops the
model never trained on (numpy's ``higher`` method, so the threshold is an observed score and
at most ``false_alarm_rate`` of the crops lie above it). With fewer than
``ceil(1 / false_alarm_rate)`` crops that quantile is not defined by the data: the fit is
refused rather than returning a threshold that flags everything (or nothing).

Several folders may be given; their scores are pooled. Normal crops from more scenes (light,
ballast, clip types) estimate the tail of the normal scores better than one small set: on the
track photographs, a threshold fitted on 223 crops of 8 scenes flagged about 5 % of the normal
crops of 8 other scenes, not the 1 % asked for (docs/training.md).

Folders are refused (exit status 2) before any scoring when one is given twice (the same
resolved path: its crops would count twice towards the minimum), or when its normal crops
would come from a ``train/good`` split, the crops the model was fitted on, whose scores sit
low: the root of an ``edge prepare-crops`` output or of an MVTec AD category (read as its
``train/good``, :func:`edge.evaluate.datasets.training_folder`), or a ``train/good`` folder
itself. The refusal names the held-out normal folders of that layout (``holdout/test/good``,
``test/good``) to give instead.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np

from edge.errors import CalibrationRefusedError, UsageError, check_output_file
from edge.logs import configure, get_logger
from edge.publisher.thresholds import ScoreSummary, Thresholds, now_utc, thresholds_path
from edge.records import IDENTIFIER

log = get_logger(__name__)

MIN_CROPS_FLOOR = 50


def min_crops(false_alarm_rate: float) -> int:
    """Fewest normal crops that define the ``1 - false_alarm_rate`` quantile (and at least 50)."""
    return max(MIN_CROPS_FLOOR, math.ceil(1.0 / false_alarm_rate))


def fit_threshold(
    scores: np.ndarray,
    false_alarm_rate: float,
    model_id: str,
    data_dir: str,
    vehicle_id: str = "",
    camera_id: str = "",
) -> Thresholds:
    """The threshold for ``false_alarm_rate`` from normal-crop ``scores`` (shape ``(N,)``).

    Raises:
        CalibrationRefusedError: fewer than :func:`min_crops` finite scores.
    """
    scores = np.asarray(scores, dtype=np.float64)
    finite = scores[np.isfinite(scores)]
    needed = min_crops(false_alarm_rate)
    if len(finite) < needed:
        raise CalibrationRefusedError(
            f"{data_dir}: {len(finite)} normal crops with a score; a false-alarm rate of "
            f"{false_alarm_rate:g} needs at least {needed} (minimum = max(50, 1 / rate))"
        )
    threshold = float(np.quantile(finite, 1.0 - false_alarm_rate, method="higher"))
    summary = ScoreSummary(
        minimum=float(finite.min()),
        median=float(np.median(finite)),
        p95=float(np.quantile(finite, 0.95)),
        p99=float(np.quantile(finite, 0.99)),
        maximum=float(finite.max()),
    )
    return Thresholds(
        model_id=model_id,
        threshold=threshold,
        false_alarm_rate=false_alarm_rate,
        crops=len(finite),
        min_crops=needed,
        scores=summary,
        data_dir=str(data_dir),
        fitted_at=now_utc(),
        vehicle_id=vehicle_id,
        camera_id=camera_id,
    )


def score_folder(model_path: Path, data_dir: Path, backend_name: str | None, batch: int = 16):
    """Image scores of the normal crops in ``data_dir`` with the model; returns
    ``(scores (N,), model_id)``."""
    from edge.engine.backends import open_backend
    from edge.evaluate.datasets import load_normal_images

    name = backend_name or ("onnxruntime" if model_path.suffix == ".onnx" else "torch")
    with open_backend(name, model_path, max_batch=batch) as backend:
        channels, size = backend.crop_shape[0], backend.crop_shape[-1]
        crops = load_normal_images(data_dir, size, channels).crops
        result = backend.infer(np.ascontiguousarray(crops, dtype=np.float32))
        scores = np.where(result.ok, result.image_score, np.nan)
        return scores, backend.model_id


HELD_OUT_NORMAL = (Path("holdout", "test", "good"), Path("test", "good"))
"""Normal crops kept out of training, under the root of an ``edge prepare-crops`` output
(both) or an MVTec AD category (``test/good``)."""


def _training_split(folder: Path) -> tuple[Path, Path] | None:
    """``(layout root, train/good folder)`` when the normal crops read from ``folder`` would
    be its layout's training crops, else ``None``."""
    if (folder / "train" / "good").is_dir():
        return folder, folder / "train" / "good"
    if folder.name == "good" and folder.parent.name == "train":
        return folder.parent.parent, folder
    resolved = folder.resolve()  # e.g. "." inside a train/good folder
    if resolved.name == "good" and resolved.parent.name == "train":
        return resolved.parent.parent, folder
    return None


def check_data_dirs(data_dirs: list[str]) -> list[Path]:
    """The normal-crop folders as paths, each once and none of them a training split.

    Raises:
        UsageError: a folder given twice (same resolved path), or one whose crops would come
            from a ``train/good`` split; the message names the folder, and the held-out
            normal folders of its layout.
    """
    seen: dict[Path, str] = {}
    for text in data_dirs:
        resolved = Path(text).resolve()
        if resolved in seen:
            first = seen[resolved]
            twice = "given twice" if first == text else f"the same folder as {first}"
            raise UsageError(f"{text}: {twice}; its crops would count twice towards the minimum")
        seen[resolved] = text
    for text in data_dirs:
        split = _training_split(Path(text))
        if split is None:
            continue
        root, train = split
        held_out = [str(root / name) for name in HELD_OUT_NORMAL if (root / name).is_dir()]
        instead = (
            f"normal crops not used in training: {' or '.join(held_out)}"
            if held_out
            else "a folder of normal crops not used in training"
        )
        raise UsageError(
            f"{text}: its normal crops would come from {train}, the training split; give {instead}"
        )
    return [Path(text) for text in data_dirs]


def identifier(text: str) -> str:
    """An argparse type: a vehicle or camera id (:data:`edge.records.IDENTIFIER`); it names
    the file written, so a slash or a leading dot could put it anywhere."""
    if len(text) > 128 or not re.match(IDENTIFIER, text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an id: letters, digits and . _ : + - only, starting with a letter "
            "or digit, at most 128 characters"
        )
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint (.pt) or exported graph (.onnx)")
    parser.add_argument(
        "data_dirs",
        nargs="+",
        metavar="data_dir",
        help="folder(s) of normal crops not used in training; scores of several are pooled",
    )
    parser.add_argument("--false-alarm-rate", type=float, default=0.01, help="per normal crop")
    parser.add_argument(
        "--vehicle", type=identifier, help="vehicle id; with --camera names the file written"
    )
    parser.add_argument("--camera", type=identifier, help="camera id, e.g. cam0")
    parser.add_argument("--calibration-dir", default="calibration")
    parser.add_argument(
        "--out", help="file to write (default CALIBRATION_DIR/VEHICLE/CAMERA.thresholds.json)"
    )
    parser.add_argument("--backend", choices=["torch", "onnxruntime"], help="default: by suffix")


def run(args: argparse.Namespace) -> int:
    configure("calibrate")
    if not 0.0 < args.false_alarm_rate < 1.0:
        print("edge calibrate: --false-alarm-rate must lie in (0, 1)", file=sys.stderr)
        return 2
    if not args.out and not (args.vehicle and args.camera):
        # No default camera: a forgotten flag must not overwrite another camera's threshold.
        print("edge calibrate: name the camera (--vehicle and --camera) or --out", file=sys.stderr)
        return 2
    data_dirs = check_data_dirs(args.data_dirs)
    if args.out:
        out = check_output_file(args.out, "--out")
    else:
        out = check_output_file(thresholds_path(args.calibration_dir, args.vehicle, args.camera))
    per_folder = [score_folder(Path(args.model), d, args.backend) for d in data_dirs]
    scores = np.concatenate([folder_scores for folder_scores, _ in per_folder])
    model_id = per_folder[0][1]
    thresholds = fit_threshold(
        scores,
        args.false_alarm_rate,
        model_id,
        ", ".join(args.data_dirs),
        vehicle_id=args.vehicle or "",
        camera_id=args.camera or "",
    )
    thresholds.save(out)
    log.info(
        "threshold_fitted",
        file=str(out),
        threshold=thresholds.threshold,
        crops=thresholds.crops,
        false_alarm_rate=thresholds.false_alarm_rate,
    )
    print(thresholds.to_json())
    return 0
