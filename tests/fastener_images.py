"""Small generated fastener crops for tests: a clip on a sleeper beside a rail.

Grey 32 x 32 crops in canonical orientation (rail on the right): sleeper surface with texture,
a dark clip in the middle (position jittered by a pixel), the rail as a dark band on the right.
Defects are kinds the training synthesis never makes: the clip missing, moved off its seat, or
cut in half.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

SIZE = 32


def fastener_crop(
    rng: np.random.Generator, defect: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One crop (uint8 ``(32, 32)``) and its defect mask (uint8 ``(32, 32)``, 255 = defect)."""
    crop = np.full((SIZE, SIZE), 165.0) + rng.normal(0.0, 7.0, (SIZE, SIZE))
    crop[:5] = crop[-5:] = 95.0 + rng.normal(0.0, 12.0, (5, SIZE))  # ballast above and below
    crop[:, 26:31] = 70.0 + rng.normal(0.0, 3.0, (SIZE, 5))  # the rail
    cx, cy = 16 + int(rng.integers(-1, 2)), 16 + int(rng.integers(-1, 2))
    clip = np.zeros((SIZE, SIZE), np.uint8)
    cv2.rectangle(clip, (cx - 4, cy - 8), (cx + 4, cy + 8), 1, -1)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    if defect == "missing":
        mask = clip * 255
        clip[:] = 0
    elif defect == "displaced":
        moved = np.zeros_like(clip)
        cv2.rectangle(moved, (cx - 12, cy - 4), (cx - 4, cy + 12), 1, -1)
        mask = np.maximum(clip, moved) * 255
        clip = moved
    elif defect == "broken":
        mask = clip.copy()
        mask[: cy + 1] = 0
        clip = clip - mask
        mask = mask * 255
    crop[clip > 0] = 55.0 + rng.normal(0.0, 4.0, int(clip.sum()))
    return np.clip(crop, 0, 255).astype(np.uint8), mask


def write_normal_folder(folder: Path, count: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        cv2.imwrite(str(folder / f"{index:03d}.png"), fastener_crop(rng)[0])
    return folder


def write_mvtec_test(root: Path, count: int, seed: int, kinds=("missing", "displaced")) -> Path:
    """``root/test/good``, ``root/test/<kind>`` and ``root/ground_truth/<kind>``."""
    rng = np.random.default_rng(seed)
    write_normal_folder(root / "test" / "good", count, seed + 1)
    for kind in kinds:
        (root / "test" / kind).mkdir(parents=True, exist_ok=True)
        (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            crop, mask = fastener_crop(rng, kind)
            cv2.imwrite(str(root / "test" / kind / f"{index:03d}.png"), crop)
            cv2.imwrite(str(root / "ground_truth" / kind / f"{index:03d}_mask.png"), mask)
    return root
