"""``edge prepare-crops``: aligned fastener crops from labelled top-down track images.

Writes an MVTec-layout folder that ``edge train``, ``edge eval`` and ``edge calibrate`` read:

    OUT/train/good/*.png           normal crops of the training scenes
    OUT/test/good/*.png            normal crops of the test scenes
    OUT/test/<kind>/*.png          the same crops with an edited defect (missing, displaced,
    OUT/ground_truth/<kind>/*_mask.png    broken) and its mask
    OUT/holdout/...                the same layout for a third set of scenes, kept out of both
                                   training and test: for choosing checkpoints and settings,
                                   and (holdout/test/good) for fitting alarm thresholds
    OUT/manifest.json              scenes of each split, counts, geometry

Scenes (source photographs) never straddle splits: the augmented copies of one photograph all
go to the same split, and scenes named in ``--exclude-scenes`` (the sample recording's) go
nowhere. Defects are edited on the rectified image, then the crop is cut, so the fill comes
from the real surface beside the clip.
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from edge.datasets.topdown import (
    NOMINAL_GEOMETRY,
    TrackGeometryMM,
    fastener_crops,
    load_labelled,
    rectify,
)
from edge.evaluate.defects import DEFECT_KINDS, ClipBox, make_defect
from edge.logs import configure, get_logger

log = get_logger(__name__)

CLIP_HALF_MM = (44.0, 76.0)
"""Half width (across track) and half length (along track) of the region edited as a clip."""


def list_scenes(images_dir: Path) -> dict[str, list[Path]]:
    """Image files grouped by source scene, both sorted."""
    scenes: dict[str, list[Path]] = {}
    for path in sorted(images_dir.glob("*.jpg")) + sorted(images_dir.glob("*.png")):
        scenes.setdefault(path.name.split("_jpg")[0], []).append(path)
    return dict(sorted(scenes.items()))


def split_scenes(
    scenes: list[str], test_count: int, holdout_count: int, exclude: set[str], seed: int
):
    """Deterministic (train, test, holdout) split of the scenes not excluded."""
    pool = [scene for scene in scenes if scene not in exclude]
    order = np.random.default_rng(seed).permutation(len(pool))
    held_out = test_count + holdout_count
    test = sorted(pool[i] for i in order[:test_count])
    holdout = sorted(pool[i] for i in order[test_count:held_out])
    train = sorted(pool[i] for i in order[held_out:])
    return train, test, holdout


def clean(image: np.ndarray, median: int) -> np.ndarray:
    """Median filter against the salt-and-pepper noise the publisher's augmentation added."""
    return cv2.medianBlur(image, median) if median > 1 else image


def mostly_image(crop: np.ndarray, dark_level: int = 4, max_fraction: float = 0.02) -> bool:
    """False when a crop holds a black border of the source's own augmentation."""
    return float((crop <= dark_level).mean()) <= max_fraction


def prepare(
    dataset_dir: Path,
    out_dir: Path,
    test_scene_count: int = 8,
    holdout_scene_count: int = 8,
    exclude: set[str] | None = None,
    seed: int = 0,
    median: int = 3,
    geometry: TrackGeometryMM = NOMINAL_GEOMETRY,
) -> dict:
    """Build the crop folders; returns the manifest."""
    images_dir = dataset_dir / "images" if (dataset_dir / "images").is_dir() else dataset_dir
    scenes = list_scenes(images_dir)
    train, test, holdout = split_scenes(
        list(scenes), test_scene_count, holdout_scene_count, exclude or set(), seed
    )
    half_w = CLIP_HALF_MM[0] / geometry.mm_per_px
    half_h = CLIP_HALF_MM[1] / geometry.mm_per_px
    offset_px = geometry.fastener_offset_mm / geometry.mm_per_px
    counts = {"train": 0}
    for split in ("test", "holdout"):
        counts |= {f"{split}_good": 0, **{f"{split}_{kind}": 0 for kind in DEFECT_KINDS}}
    skipped = []
    jobs = (
        [(scene, "train") for scene in train]
        + [(scene, "holdout") for scene in holdout]
        + [(scene, "test") for scene in test]
    )
    for scene, split in tqdm(jobs, desc="scenes", disable=None):
        # Edits depend on the scene alone, not on which other scenes were prepared before.
        rng = np.random.default_rng([seed, zlib.crc32(scene.encode())])
        for path in scenes[scene]:
            labelled = load_labelled(path)
            labelled.image = clean(labelled.image, median)
            rectified = rectify(labelled, geometry)
            if rectified is None:
                skipped.append(path.name)
                continue
            for number, crop in enumerate(fastener_crops(rectified, geometry)):
                if not mostly_image(crop.image):
                    continue
                stem = f"{path.stem[:8]}-{path.stem[-8:]}-{number:02d}"
                if split == "train":
                    _write(out_dir / "train" / "good" / f"{stem}.png", crop.image)
                    counts["train"] += 1
                    continue
                root = out_dir if split == "test" else out_dir / "holdout"
                _write(root / "test" / "good" / f"{stem}.png", crop.image)
                counts[f"{split}_good"] += 1
                away = 1 if crop.mirrored else -1
                away_in_image = -away if crop.mirrored else away
                box = ClipBox(crop.centre[0], crop.centre[1], half_w, half_h)
                for kind in DEFECT_KINDS:
                    edited, mask = make_defect(kind, rectified.image, box, away_in_image, rng)
                    image, region = _cut_like(edited, mask, crop, geometry, offset_px)
                    if region.sum() == 0:
                        continue
                    _write(root / "test" / kind / f"{stem}.png", image)
                    _write(root / "ground_truth" / kind / f"{stem}_mask.png", region * 255)
                    counts[f"{split}_{kind}"] += 1
    manifest = {
        "source": str(dataset_dir),
        "train_scenes": train,
        "test_scenes": test,
        "holdout_scenes": holdout,
        "excluded_scenes": sorted(exclude or set()),
        "counts": counts,
        "skipped_images": skipped,
        "median_filter": median,
        "geometry_mm": geometry.__dict__,
        "seed": seed,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("crops_prepared", out=str(out_dir), **counts, skipped_images=len(skipped))
    return manifest


def _cut_like(image, mask, crop, geometry: TrackGeometryMM, offset_px: float):
    """Cut ``image`` and ``mask`` where ``crop`` was cut, in the crop's orientation."""
    side = int(round(geometry.crop_mm / geometry.mm_per_px))
    x0 = int(round(crop.centre[0] - side / 2))
    y0 = int(round(crop.centre[1] - side / 2))
    window = (slice(y0, y0 + side), slice(x0, x0 + side))
    cut, region = image[window], (mask[window] > 0.5).astype(np.uint8)
    if crop.mirrored:
        cut, region = cut[:, ::-1], region[:, ::-1]
    return np.ascontiguousarray(cut), np.ascontiguousarray(region)


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"{path}: could not write")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset_dir", help="folder with images/ and YOLO labels/")
    parser.add_argument("--out", required=True, help="output folder (MVTec layout)")
    parser.add_argument("--test-scenes", type=int, default=8, help="scenes held out for test")
    parser.add_argument(
        "--holdout-scenes",
        type=int,
        default=8,
        help="scenes held out for choosing checkpoints and fitting thresholds",
    )
    parser.add_argument(
        "--exclude-scenes", help="text file of scene names to leave out (e.g. the sample's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--median", type=int, default=3, help="median filter size (1: none)")


def run(args: argparse.Namespace) -> int:
    configure("prepare-crops")
    exclude = set()
    if args.exclude_scenes:
        exclude = {
            line.strip()
            for line in Path(args.exclude_scenes).read_text().splitlines()
            if line.strip() and not line.startswith("#")
        }
    prepare(
        Path(args.dataset_dir),
        Path(args.out),
        test_scene_count=args.test_scenes,
        holdout_scene_count=args.holdout_scenes,
        exclude=exclude,
        seed=args.seed,
        median=args.median,
    )
    return 0
