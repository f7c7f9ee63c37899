"""``edge eval CHECKPOINT DATA_DIR``: score a labelled test set and report the metrics.

Steps: load the checkpoint; detect the data layout and load the test crops at the model's size;
score them in batches; compute image AUROC, pixel AUROC and AU-PRO (when there are masks),
F1-max and its threshold, precision and recall at the chosen threshold and the image AUROC of
each defect type; with ``--baseline``, fit the z-score baseline on normal training crops and
report it in the same table. ``--json`` prints the summary on stdout (logs go to stderr),
``--csv`` writes per-image scores, ``--heatmaps`` writes overlays.

:func:`evaluate` is the same evaluation as a function, for training and tests.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edge.argtypes import finite_float
from edge.errors import (
    ConfigInvalidError,
    EdgeError,
    InputUnreadableError,
    check_output_file,
    check_output_folder,
)
from edge.evaluate.baseline import ZScoreBaseline
from edge.evaluate.datasets import CropSet, load_normal_images, load_test_set
from edge.evaluate.heatmaps import write_panels
from edge.evaluate.metrics import DEFAULT_FPR_LIMIT, DetectionMetrics, detection_metrics
from edge.logs import configure, get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class ScorerResult:
    """What one scorer (the model or the baseline) gave on a test set.

    Attributes:
        metrics: the scorer's :class:`DetectionMetrics`.
        image_scores: float64 ``(n,)``.
        anomaly_maps: float32 ``(n, H, W)``.
    """

    metrics: DetectionMetrics
    image_scores: np.ndarray
    anomaly_maps: np.ndarray


@dataclass(frozen=True)
class EvalResult:
    """The outcome of :func:`evaluate`.

    Attributes:
        dataset: the test set that was scored.
        model: the model's scores and metrics.
        baseline: the z-score baseline's, or ``None``.
        reconstructions: float32 ``(n, C, H, W)`` in ``[0, 255]`` when asked for, else ``None``.
        seconds: wall time of the model's scoring (not loading, not metrics).
    """

    dataset: CropSet
    model: ScorerResult
    baseline: ScorerResult | None
    reconstructions: np.ndarray | None
    seconds: float

    @property
    def crops_per_second(self) -> float:
        return len(self.dataset) / self.seconds if self.seconds > 0 else math.nan

    def summary(self) -> dict:
        """JSON-ready summary: data description, then ``model`` and ``baseline`` metrics."""
        labels = self.dataset.labels
        return {
            "data_dir": str(self.dataset.root),
            "layout": self.dataset.layout,
            "num_images": len(self.dataset),
            "num_normal": int(np.sum(labels == 0)),
            "num_anomalous": int(np.sum(labels > 0)),
            "defect_types": sorted({t for t, y in zip(self.dataset.defect_types, labels) if y}),
            "has_masks": self.dataset.masks is not None,
            "image_size": int(self.dataset.crops.shape[-1]),
            "in_channels": int(self.dataset.crops.shape[1]),
            "model": self.model.metrics.to_dict(),
            "baseline": None if self.baseline is None else self.baseline.metrics.to_dict(),
            "seconds": round(self.seconds, 3),
            "crops_per_second": _finite_or_none(round(self.crops_per_second, 2)),
        }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def score_crops(
    model: torch.nn.Module,
    crops: np.ndarray,
    batch_size: int = 16,
    keep_reconstructions: bool = False,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Run the detector over crops in batches, on the device its weights are on.

    Args:
        model: a :class:`~edge.model.DiffFastener` (or anything with its ``forward``).
        crops: float32 ``(n, C, H, W)`` in ``[0, 255]``.
        batch_size: crops per forward pass.
        keep_reconstructions: also return the reconstructions (memory: as much as ``crops``).
        progress: show a tqdm bar on stderr (hidden when stderr is not a terminal).
    Returns:
        ``(anomaly_maps, image_scores, reconstructions)``: float32 ``(n, H, W)``, float64
        ``(n,)`` and float32 ``(n, C, H, W)`` or ``None``.
    """
    device = next(model.parameters()).device
    n, _, height, width = crops.shape
    anomaly_maps = np.empty((n, height, width), dtype=np.float32)
    image_scores = np.empty(n, dtype=np.float64)
    reconstructions = np.empty_like(crops, dtype=np.float32) if keep_reconstructions else None
    was_training = model.training
    model.eval()
    try:
        starts = range(0, n, batch_size)
        bar = tqdm(starts, desc="eval", unit="batch", disable=None if progress else True)
        with torch.inference_mode():
            for start in bar:
                stop = min(start + batch_size, n)
                batch = torch.from_numpy(np.ascontiguousarray(crops[start:stop])).to(device)
                anomaly_map, image_score, reconstruction = model(batch)
                anomaly_maps[start:stop] = anomaly_map[:, 0].float().cpu().numpy()
                image_scores[start:stop] = image_score.double().cpu().numpy()
                if reconstructions is not None:
                    reconstructions[start:stop] = reconstruction.float().cpu().numpy()
    finally:
        model.train(was_training)
    return anomaly_maps, image_scores, reconstructions


def evaluate(
    model: torch.nn.Module,
    dataset: CropSet,
    *,
    baseline: ZScoreBaseline | None = None,
    threshold: float | None = None,
    batch_size: int = 16,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
    keep_reconstructions: bool = False,
    progress: bool = False,
) -> EvalResult:
    """Score ``dataset`` with ``model`` (and ``baseline``) and compute every metric.

    Args:
        model: the detector, on the device it should run on; its train/eval mode is restored.
        dataset: a labelled :class:`CropSet` at the model's size and channels.
        baseline: a fitted z-score baseline to report beside the model, or ``None``.
        threshold: where the model's precision and recall are taken; ``None`` takes its
            F1-max threshold. The baseline always uses its own F1-max threshold (its scores
            are z-scores, not the model's units).
        batch_size, progress: as :func:`score_crops`.
        fpr_limit: AU-PRO integration limit.
        keep_reconstructions: keep the model's reconstructions (for heatmap panels).
    """
    log.info("eval_started", images=len(dataset), batch_size=batch_size)
    started = time.perf_counter()
    anomaly_maps, image_scores, reconstructions = score_crops(
        model, dataset.crops, batch_size, keep_reconstructions, progress
    )
    seconds = time.perf_counter() - started
    log.info("eval_scored", images=len(dataset), seconds=round(seconds, 3))
    model_metrics = detection_metrics(
        dataset.labels,
        image_scores,
        anomaly_maps,
        dataset.masks,
        dataset.defect_types,
        threshold,
        fpr_limit,
    )
    baseline_result = None
    if baseline is not None:
        baseline_maps, baseline_scores = baseline.score(dataset.crops)
        baseline_maps = baseline_maps[:, 0]
        baseline_metrics = detection_metrics(
            dataset.labels,
            baseline_scores,
            baseline_maps,
            dataset.masks,
            dataset.defect_types,
            None,
            fpr_limit,
        )
        baseline_result = ScorerResult(baseline_metrics, baseline_scores, baseline_maps)
    return EvalResult(
        dataset=dataset,
        model=ScorerResult(model_metrics, image_scores, anomaly_maps),
        baseline=baseline_result,
        reconstructions=reconstructions,
        seconds=seconds,
    )


def read_calibration_threshold(
    path: str | Path, model_id: str | None = None
) -> tuple[float, str | None]:
    """The image-score threshold of a calibration JSON file, and the model id it was fitted for.

    Reads a top-level ``threshold`` (or ``image_threshold``) number and an optional
    ``model_id``. Provisional: ``edge calibrate`` defines the calibration file; this reader
    takes only those keys and ignores the rest.

    Raises:
        ConfigInvalidError: the file cannot be read or has no threshold, or it names a model
            other than ``model_id`` (as :func:`edge.publisher.thresholds.load_thresholds`).
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigInvalidError(f"{path}: a folder, not a calibration file (.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigInvalidError(f"{path}: cannot read ({error.strerror})") from error
    except json.JSONDecodeError as error:
        raise ConfigInvalidError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ConfigInvalidError(f"{path}: expected a JSON object with a 'threshold'")
    value = data.get("threshold", data.get("image_threshold"))
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigInvalidError(f"{path}: no numeric 'threshold' (or 'image_threshold') key")
    fitted_for = data.get("model_id")
    fitted_for = None if fitted_for is None else str(fitted_for)
    if model_id is not None and fitted_for is not None and fitted_for != model_id:
        raise ConfigInvalidError(
            f"{path}: fitted for model {fitted_for}, not for the model in use ({model_id}); "
            "run edge calibrate for this model"
        )
    return float(value), fitted_for


def write_scores_csv(path: str | Path, result: EvalResult) -> None:
    """Per-image scores: path, defect type, label, image score, call at the threshold,
    and the baseline's score when it was run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    threshold = result.model.metrics.threshold
    strict = result.model.metrics.alarm_when == "score > threshold"

    def called(score: float) -> bool:
        return score > threshold if strict else score >= threshold

    header = ["path", "defect_type", "label", "image_score", "anomalous"]
    if result.baseline is not None:
        header.append("baseline_score")
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for index, source in enumerate(result.dataset.paths):
            score = float(result.model.image_scores[index])
            row = [
                str(source),
                result.dataset.defect_types[index],
                int(result.dataset.labels[index]),
                f"{score:.6g}",
                int(math.isfinite(threshold) and called(score)),
            ]
            if result.baseline is not None:
                row.append(f"{float(result.baseline.image_scores[index]):.6g}")
            writer.writerow(row)


def write_heatmaps(out_dir: str | Path, result: EvalResult) -> int:
    """One panel (crop, reconstruction, overlay with the GT outline) per test image."""
    dataset = result.dataset
    names = [f"{t}_{Path(p).stem}" for t, p in zip(dataset.defect_types, dataset.paths)]
    captions = [
        f"{t} {score:.3f}" for t, score in zip(dataset.defect_types, result.model.image_scores)
    ]
    written = write_panels(
        out_dir,
        dataset.crops,
        result.reconstructions,
        result.model.anomaly_maps,
        dataset.masks,
        names,
        captions,
    )
    return len(written)


def format_table(summary: dict) -> str:
    """The model's metrics and the baseline's side by side, one metric a row."""
    model, baseline = summary["model"], summary["baseline"]
    keys = [k for k in model if k != "per_defect_image_auroc"]
    rows = [(key, model[key], None if baseline is None else baseline[key]) for key in keys]
    for name, value in model["per_defect_image_auroc"].items():
        other = None if baseline is None else baseline["per_defect_image_auroc"].get(name)
        rows.append((f"image_auroc[{name}]", value, other))

    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    width = max(len(row[0]) for row in rows)
    lines = [f"{'metric':<{width}}  {'model':>10}  {'baseline':>10}"]
    lines += [f"{key:<{width}}  {cell(m):>10}  {cell(b):>10}" for key, m, b in rows]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written by edge train")
    parser.add_argument(
        "data_dir", type=Path, help="MVTec-layout category folder, or normal/ + abnormal/ folder"
    )
    threshold = parser.add_mutually_exclusive_group()
    threshold.add_argument(
        "--threshold",
        type=finite_float,
        help="image-score threshold for precision and recall (a finite number)",
    )
    threshold.add_argument(
        "--calibration", type=Path, help="calibration JSON whose 'threshold' to use"
    )
    parser.add_argument(
        "--baseline", action="store_true", help="also report the per-pixel z-score baseline"
    )
    parser.add_argument(
        "--train-dir",
        type=Path,
        help="normal crops for the baseline (default: the checkpoint's data folder, "
        "else DATA_DIR/train/good)",
    )
    parser.add_argument("--save-baseline", type=Path, help="write the fitted baseline (.npz)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--csv", type=Path, help="write per-image scores to this CSV file")
    parser.add_argument("--heatmaps", type=Path, help="write overlay PNGs into this folder")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fpr-limit", type=float, default=DEFAULT_FPR_LIMIT)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _baseline_train_dir(args: argparse.Namespace, payload: dict) -> Path:
    if args.train_dir is not None:
        return args.train_dir
    recorded = (payload.get("extra") or {}).get("data_dir")
    if recorded:
        return Path(recorded)
    return args.data_dir / "train" / "good"


def _run(args: argparse.Namespace) -> int:
    from edge.model.checkpoint import load_checkpoint

    # Outputs first: a path that cannot be written fails now, not after the scoring.
    if args.csv is not None:
        check_output_file(args.csv, "--csv")
    if args.save_baseline is not None:
        check_output_file(args.save_baseline, "--save-baseline")
    if args.heatmaps is not None:
        check_output_folder(args.heatmaps, "--heatmaps")
    model, payload = load_checkpoint(args.checkpoint)
    config = model.config
    model_id = payload.get("model_id")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)

    threshold, threshold_source = args.threshold, "argument"
    if args.calibration is not None:
        threshold, _ = read_calibration_threshold(args.calibration, model_id)
        threshold_source = "calibration"
    if threshold is None:
        threshold_source = "f1_max"

    dataset = load_test_set(args.data_dir, config.image_size, config.in_channels)
    baseline = None
    train_dir = None
    if args.baseline:
        train_dir = _baseline_train_dir(args, payload)
        if train_dir.exists() and not train_dir.is_dir():
            raise InputUnreadableError(f"{train_dir}: a file, not a folder of normal crops")
        if not train_dir.is_dir():
            raise InputUnreadableError(
                f"{train_dir}: no such folder; the baseline needs normal training crops "
                "(give --train-dir)"
            )
        normal = load_normal_images(train_dir, config.image_size, config.in_channels)
        if len(normal) < 2:
            raise InputUnreadableError(f"{train_dir}: the baseline needs at least 2 normal crops")
        baseline = ZScoreBaseline.fit(normal.crops, config.top_k)
        train_dir = normal.root
        log.info("baseline_fitted", train_dir=str(train_dir), crops=len(normal))
        if args.save_baseline is not None:
            baseline.save(args.save_baseline)

    result = evaluate(
        model,
        dataset,
        baseline=baseline,
        threshold=threshold,
        batch_size=args.batch_size,
        fpr_limit=args.fpr_limit,
        keep_reconstructions=args.heatmaps is not None,
        progress=True,
    )
    summary = {
        "checkpoint": str(args.checkpoint),
        "model_id": model_id,
        "preset": config.preset,
        "threshold_source": threshold_source,
        **result.summary(),
        "baseline_train_dir": None if train_dir is None else str(train_dir),
        "baseline_train_crops": None if baseline is None else baseline.num_train_crops,
    }
    if args.csv is not None:
        write_scores_csv(args.csv, result)
    if args.heatmaps is not None:
        count = write_heatmaps(args.heatmaps, result)
        log.info("heatmaps_written", folder=str(args.heatmaps), images=count)
    metrics = summary["model"]
    log.info(
        "eval_done",
        image_auroc=metrics["image_auroc"],
        pixel_auroc=metrics["pixel_auroc"],
        aupro=metrics["aupro"],
        f1_max=metrics["f1_max"],
    )
    if args.json:
        print(json.dumps(summary, allow_nan=False))
    else:
        print(format_table(summary))
    return 0


def run(args: argparse.Namespace) -> int:
    configure("eval")
    if args.batch_size < 1 or not 0.0 < args.fpr_limit <= 1.0:
        print("edge eval: need --batch-size >= 1 and 0 < --fpr-limit <= 1", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except EdgeError as error:
        log.error("eval_failed", error=str(error))
        print(f"edge eval: {error}", file=sys.stderr)
        return int(error.exit_status)
