"""Heatmap overlays: what an engineer looks at to judge an alarm or a failed evaluation.

The anomaly map is coloured with OpenCV's JET colour map on a fixed scale ``[0, vmax]`` (not
stretched per image: stretching makes every normal crop look alarming) and blended over the
crop; the ground-truth defect outline, when known, is drawn in white. Two entry points:

- :func:`overlay_png`: one small PNG per crop, as the publisher attaches to an alarm.
- :func:`write_panels`: for ``edge eval --heatmaps``, one PNG per image with the crop, the
  model's reconstruction and the overlay side by side.

Crops are in the model's layout and units: ``(C, H, W)`` float in ``[0, 255]``, grey or RGB.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

GT_COLOUR = (255, 255, 255)
"""BGR colour of the ground-truth outline."""


def _to_bgr(crop: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` float ``[0, 255]``, grey or RGB -> uint8 ``(H, W, 3)`` BGR."""
    crop = np.asarray(crop)
    if crop.ndim == 2:
        crop = crop[None]
    image = np.clip(np.rint(crop.transpose(1, 2, 0)), 0, 255).astype(np.uint8)
    if image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(image, cv2.COLOR_RGB2BGR)


def colour_map(anomaly_map: np.ndarray, vmax: float = 1.0) -> np.ndarray:
    """``(H, W)`` or ``(1, H, W)`` map -> uint8 ``(H, W, 3)`` BGR, JET on ``[0, vmax]``."""
    values = np.asarray(anomaly_map, dtype=np.float32).squeeze()
    scaled = np.clip(values / np.float32(vmax), 0.0, 1.0) * 255.0
    return cv2.applyColorMap(np.rint(scaled).astype(np.uint8), cv2.COLORMAP_JET)


def overlay(
    crop: np.ndarray,
    anomaly_map: np.ndarray,
    mask: np.ndarray | None = None,
    alpha: float = 0.5,
    vmax: float = 1.0,
) -> np.ndarray:
    """The colour heatmap blended over the crop, with the ground-truth outline.

    Args:
        crop: ``(C, H, W)`` in ``[0, 255]``.
        anomaly_map: ``(H, W)`` or ``(1, H, W)``; values above ``vmax`` saturate.
        mask: ``(H, W)``, non-zero on defect pixels, or ``None``.
        alpha: weight of the heatmap in the blend.
    Returns:
        uint8 ``(H, W, 3)`` BGR image.
    """
    blended = cv2.addWeighted(colour_map(anomaly_map, vmax), alpha, _to_bgr(crop), 1 - alpha, 0)
    if mask is not None and np.any(mask):
        binary = (np.asarray(mask).squeeze() > 0).astype(np.uint8)
        contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(blended, contours, -1, GT_COLOUR, 1)
    return blended


def _encode_png(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("OpenCV could not encode the overlay as PNG")
    return buffer.tobytes()


def overlay_png(
    crop: np.ndarray,
    anomaly_map: np.ndarray,
    mask: np.ndarray | None = None,
    alpha: float = 0.5,
    vmax: float = 1.0,
) -> bytes:
    """:func:`overlay` of one crop as PNG bytes, at the crop's own size (small, for alarms)."""
    return _encode_png(overlay(crop, anomaly_map, mask, alpha, vmax))


def panel(
    crop: np.ndarray,
    reconstruction: np.ndarray | None,
    anomaly_map: np.ndarray,
    mask: np.ndarray | None = None,
    caption: str | None = None,
    vmax: float = 1.0,
    min_side: int = 128,
) -> np.ndarray:
    """Crop | reconstruction | overlay, side by side, enlarged so each tile is ``min_side`` px.

    Args:
        crop, reconstruction: ``(C, H, W)`` in ``[0, 255]``; ``reconstruction`` may be ``None``.
        anomaly_map: ``(H, W)`` or ``(1, H, W)``.
        mask: ``(H, W)`` or ``None``.
        caption: text written on the first tile (image score, defect type).
    Returns:
        uint8 ``(h, 2 or 3 * w, 3)`` BGR image.
    """
    tiles = [_to_bgr(crop)]
    if reconstruction is not None:
        tiles.append(_to_bgr(reconstruction))
    tiles.append(overlay(crop, anomaly_map, mask, vmax=vmax))
    height, width = tiles[0].shape[:2]
    factor = max(1, int(np.ceil(min_side / min(height, width))))
    tiles = [
        cv2.resize(tile, (width * factor, height * factor), interpolation=cv2.INTER_NEAREST)
        for tile in tiles
    ]
    image = np.concatenate(tiles, axis=1)
    if caption:
        cv2.putText(
            image, caption, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 255), 1, cv2.LINE_AA
        )
    return image


def write_panels(
    out_dir: str | Path,
    crops: np.ndarray,
    reconstructions: np.ndarray | None,
    anomaly_maps: np.ndarray,
    masks: np.ndarray | None,
    names: Sequence[str],
    captions: Sequence[str] | None = None,
    vmax: float = 1.0,
) -> list[Path]:
    """Write one :func:`panel` PNG per crop into ``out_dir``.

    Args:
        crops: ``(n, C, H, W)``; reconstructions: the same shape, or ``None``.
        anomaly_maps: ``(n, 1, H, W)`` or ``(n, H, W)``; masks: ``(n, H, W)`` or ``None``.
        names: ``n`` file names (without folder); ``.png`` is added when missing.
        captions: ``n`` texts, or ``None``.
    Returns:
        The written paths, in input order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, name in enumerate(names):
        image = panel(
            crops[index],
            None if reconstructions is None else reconstructions[index],
            anomaly_maps[index],
            None if masks is None else masks[index],
            None if captions is None else captions[index],
            vmax=vmax,
        )
        path = out_dir / (name if name.endswith(".png") else f"{name}.png")
        path.write_bytes(_encode_png(image))
        written.append(path)
    return written
