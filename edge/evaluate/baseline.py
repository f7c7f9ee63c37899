"""The per-pixel z-score baseline that ``edge eval --baseline`` reports beside the model.

Fitted on normal training crops: each pixel (and channel) gets the mean and standard deviation
of its values over the training crops. A crop's anomaly map is ``|x - mean| / std`` averaged
over channels, and its image score is the mean of the top-k map values, with the same ``k`` as
the model. It needs no training and no GPU, so if Diff-Fastener cannot beat it on a data set,
the model (or the data) is at fault, not the metric.

Known limit: it assumes the crops are aligned (the same part of the fastener at the same pixel)
and lit alike; a shifted or rotated normal fastener scores high.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import ModelInvalidError

FORMAT = "zscore-baseline/1"
DEFAULT_STD_FLOOR = 1.0
"""Smallest standard deviation used, in 8-bit grey levels: a pixel that never varied in
training (a black border) would otherwise give an infinite z-score for any change."""


def top_k_mean(anomaly_maps: np.ndarray, top_k: int) -> np.ndarray:
    """Mean of the ``top_k`` largest values of each map: ``(n, ...) -> (n,)`` float64."""
    flat = np.asarray(anomaly_maps, dtype=np.float64).reshape(len(anomaly_maps), -1)
    if not 1 <= top_k <= flat.shape[1]:
        raise ValueError(f"top_k must be in [1, {flat.shape[1]}], got {top_k}")
    return np.partition(flat, flat.shape[1] - top_k, axis=1)[:, -top_k:].mean(axis=1)


@dataclass(frozen=True)
class ZScoreBaseline:
    """Per-pixel mean and (floored) standard deviation of normal crops.

    Attributes:
        mean: float32 ``(C, H, W)`` in pixel units.
        std: float32 ``(C, H, W)``, already floored at ``std_floor``.
        top_k: values averaged into the image score.
        std_floor: the floor applied to ``std``.
        num_train_crops: how many crops it was fitted on.
    """

    mean: np.ndarray
    std: np.ndarray
    top_k: int
    std_floor: float = DEFAULT_STD_FLOOR
    num_train_crops: int = 0

    @classmethod
    def fit(
        cls, crops: np.ndarray, top_k: int, std_floor: float = DEFAULT_STD_FLOOR
    ) -> ZScoreBaseline:
        """Fit on normal crops.

        Args:
            crops: ``(n, C, H, W)`` in ``[0, 255]``, ``n >= 2``.
            top_k: as the model's ``top_k``.
            std_floor: floor of the population standard deviation (``ddof=0``).
        """
        crops = np.asarray(crops, dtype=np.float64)
        if crops.ndim != 4 or len(crops) < 2:
            raise ValueError(f"need (n >= 2, C, H, W) normal crops, got shape {crops.shape}")
        if std_floor <= 0:
            raise ValueError(f"std_floor must be positive, got {std_floor}")
        mean = crops.mean(axis=0)
        std = np.maximum(crops.std(axis=0), std_floor)
        return cls(
            mean.astype(np.float32),
            std.astype(np.float32),
            int(top_k),
            float(std_floor),
            len(crops),
        )

    def anomaly_maps(self, crops: np.ndarray) -> np.ndarray:
        """``(n, C, H, W)`` crops in ``[0, 255]`` -> float32 ``(n, 1, H, W)`` z-score maps."""
        crops = np.asarray(crops, dtype=np.float32)
        if crops.shape[1:] != self.mean.shape:
            raise ValueError(f"crops {crops.shape[1:]} do not match the baseline {self.mean.shape}")
        z = np.abs(crops - self.mean) / self.std
        return z.mean(axis=1, keepdims=True)

    def score(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Score crops as the model does.

        Args:
            crops: ``(n, C, H, W)`` in ``[0, 255]``.
        Returns:
            ``(anomaly_map, image_score)``: float32 ``(n, 1, H, W)`` and float64 ``(n,)``.
        """
        anomaly_map = self.anomaly_maps(crops)
        return anomaly_map, top_k_mean(anomaly_map, self.top_k)

    def save(self, path: str | Path) -> None:
        """Write an ``.npz`` file that :meth:`load` reads back."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as file:
            np.savez(
                file,
                format=np.array(FORMAT),
                mean=self.mean,
                std=self.std,
                top_k=np.array(self.top_k),
                std_floor=np.array(self.std_floor),
                num_train_crops=np.array(self.num_train_crops),
            )

    @classmethod
    def load(cls, path: str | Path) -> ZScoreBaseline:
        """Read a file written by :meth:`save`; :class:`ModelInvalidError` names a bad file."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["format"]) != FORMAT:
                    raise ModelInvalidError(f"{path}: not a z-score baseline ({FORMAT})")
                return cls(
                    mean=data["mean"].astype(np.float32),
                    std=data["std"].astype(np.float32),
                    top_k=int(data["top_k"]),
                    std_floor=float(data["std_floor"]),
                    num_train_crops=int(data["num_train_crops"]),
                )
        except (OSError, KeyError, ValueError) as error:
            raise ModelInvalidError(f"{path}: not a readable z-score baseline ({error})") from error
