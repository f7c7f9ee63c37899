"""``edge crossval``: k-fold cross-validation of training and evaluation (the paper: 5 folds).

Every crop of an MVTec-layout folder (normal crops of ``train/good`` and ``test/good``,
anomalous crops of ``test/<defect>``) is dealt into ``k`` folds that keep the share of
anomalous crops (:func:`edge.evaluate.datasets.stratified_folds`). For fold ``i`` a model is
trained on the *normal* crops outside fold ``i`` (the method never trains on defects) and
evaluated on fold ``i``; the figures are reported per fold and as mean and standard deviation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edge.argtypes import positive_int
from edge.errors import UsageError, check_output_file, check_output_folder
from edge.evaluate.datasets import CropSet, load_normal_images, load_test_set, stratified_folds
from edge.logs import configure, get_logger

log = get_logger(__name__)

MIN_FOLDS = 2
"""Fewer folds leave nothing to train on, or nothing held out."""

REPORTED = ("image_auroc", "pixel_auroc", "aupro", "f1_max")


def all_crops(root: Path, image_size: int, in_channels: int) -> CropSet:
    """The training normals and the test set of ``root`` as one labelled set."""
    normal = load_normal_images(root, image_size, in_channels)
    test = load_test_set(root, image_size, in_channels)
    masks = None
    if test.masks is not None:
        empty = np.zeros((len(normal.crops), image_size, image_size), test.masks.dtype)
        masks = np.concatenate([empty, test.masks])
    return CropSet(
        crops=np.concatenate([normal.crops, test.crops]),
        labels=np.concatenate([normal.labels, test.labels]),
        masks=masks,
        defect_types=list(normal.defect_types) + list(test.defect_types),
        paths=list(normal.paths) + list(test.paths),
        layout=test.layout,
        root=test.root,
    )


def cross_validate(config, folds: int, out_dir: Path) -> dict:
    """Train and evaluate ``folds`` times; returns per-fold metrics and their mean and std.

    Args:
        config: a :class:`edge.train.TrainConfig`; ``data_dir`` is the MVTec-layout folder.
    """
    from edge.evaluate.run import evaluate
    from edge.model.checkpoint import load_checkpoint
    from edge.train import train

    model_config = config.model
    crops = all_crops(Path(config.data_dir), model_config.image_size, model_config.in_channels)
    normal, anomalous = int(np.sum(crops.labels == 0)), int(np.sum(crops.labels != 0))
    if folds > max(normal, anomalous):  # stratified: each fold takes crops of each class
        raise UsageError(
            f"--folds {folds}: too many for {config.data_dir} ({normal} normal and "
            f"{anomalous} anomalous crops); at most {max(normal, anomalous)}"
        )
    results = []
    for fold, (train_index, held_out) in enumerate(
        stratified_folds(crops.labels, folds, config.seed)
    ):
        normal = train_index[crops.labels[train_index] == 0]
        images = np.ascontiguousarray(crops.crops[normal].transpose(0, 2, 3, 1) / 255.0)
        fold_config = config.model_copy(update={"out_dir": str(out_dir / f"fold{fold}")})
        checkpoint = train(fold_config, images=images.astype(np.float32))
        model, _ = load_checkpoint(checkpoint)
        metrics = evaluate(model, crops.subset(held_out)).model.metrics.to_dict()
        results.append({"fold": fold, "train_crops": int(len(normal)), **metrics})
        log.info("fold_done", fold=fold, **{k: metrics[k] for k in REPORTED})
    summary = {}
    for key in REPORTED:
        values = [r[key] for r in results if r[key] is not None]
        summary[key] = {
            "mean": float(np.mean(values)) if values else None,
            "std": float(np.std(values)) if values else None,
        }
    return {"folds": results, "summary": summary, "k": folds}


def fold_count(text: str) -> int:
    """An argparse type: a number of folds, at least :data:`MIN_FOLDS`."""
    value = int(text)
    if value < MIN_FOLDS:
        raise argparse.ArgumentTypeError(
            f"{text} is too few folds; the smallest allowed is {MIN_FOLDS}"
        )
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from edge.model.config import PRESETS

    parser.add_argument("data_dir", help="MVTec-layout folder (train/good, test/...)")
    parser.add_argument("--config", help="TrainConfig JSON for each fold")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="model preset when no --config (default edge)"
    )
    parser.add_argument("--folds", type=fold_count, default=5, help=f"at least {MIN_FOLDS}")
    parser.add_argument("--steps", type=positive_int)
    parser.add_argument("--out", default="runs/crossval")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from edge.train import build_config

    configure("crossval")
    overrides: dict = {"data_dir": args.data_dir}
    if args.preset:
        from edge.model.config import preset

        overrides["model"] = json.loads(preset(args.preset).to_json())
    if args.steps:
        overrides["steps"] = args.steps
    config = build_config(args.config, **overrides)
    out = check_output_folder(args.out, "--out")
    check_output_file(out / "crossval.json")
    result = cross_validate(config, args.folds, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "crossval.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result["summary"].items():
            if value["mean"] is not None:
                print(f"{key:>12}: {value['mean']:.4f} +/- {value['std']:.4f}")
    return 0
