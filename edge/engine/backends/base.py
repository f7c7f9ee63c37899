"""What every backend shares: the result type, the per-crop NaN/inf check and batch splitting.

A backend runs the exported detector (``DiffFastener.forward``) on a batch of crops and returns
numpy arrays. Subclasses implement :meth:`Backend._infer_batch` for one batch of at most
``max_batch`` crops; :meth:`Backend.infer` validates the crops, splits larger batches, checks
every crop's outputs for NaN and inf and counts those crops as model errors.

This module imports numpy only: the TensorRT worker process imports it and must never load
torch (torch and pycuda in one process fight over CUDA contexts, research/edge-anchors.md 2.6).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from edge.errors import ConfigInvalidError, EdgeError, ExitStatus
from edge.logs import get_logger

log = get_logger(__name__)

OUTPUT_NAMES = ("anomaly_map", "image_score", "reconstruction")
"""Names of the detector's outputs, in order, in the ONNX graph and in every backend."""

PRECISIONS = ("fp32", "fp16", "int8")


class BackendUnavailableError(ConfigInvalidError):
    """The chosen backend cannot run here: a package, a GPU or an execution provider is missing."""


class BackendFailedError(EdgeError):
    """A backend stopped working while running (its worker died, CUDA failed)."""

    exit_status = ExitStatus.SERVICE_FAILED


@dataclass(frozen=True)
class CropError:
    """One crop whose outputs hold NaN or inf: a model error, never a score."""

    index: int
    reason: str


@dataclass(frozen=True)
class InferenceResult:
    """Outputs of one :meth:`Backend.infer` call, with a per-crop validity mask.

    Attributes:
        anomaly_map: ``(batch, 1, H, W)`` float32, per-pixel anomaly probability in ``[0, 1]``.
        image_score: ``(batch,)`` float32, mean of the top-k map values; NaN where not ``ok``.
        reconstruction: ``(batch, C, H, W)`` float32, in pixel units ``[0, 255]``.
        ok: ``(batch,)`` bool; False where any output of that crop held NaN or inf.
        errors: one :class:`CropError` per crop that is not ``ok``.

    Unpacks like the detector's forward: ``anomaly_map, image_score, reconstruction = result``.
    A crop with ``ok`` False has no score: its ``image_score`` is NaN (which compares False
    with any threshold, so read ``ok``), its map and reconstruction are the raw outputs.
    """

    anomaly_map: np.ndarray
    image_score: np.ndarray
    reconstruction: np.ndarray
    ok: np.ndarray
    errors: tuple[CropError, ...] = field(default=())

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.anomaly_map, self.image_score, self.reconstruction))

    def __len__(self) -> int:
        return int(self.ok.shape[0])

    @property
    def model_errors(self) -> int:
        """Number of crops whose outputs held NaN or inf."""
        return len(self.errors)


def _nonfinite_summary(name: str, values: np.ndarray) -> str | None:
    """``"anomaly_map: 3 NaN, 0 inf"`` for one crop's output, or None when all finite."""
    nan = int(np.isnan(values).sum())
    inf = int(np.isinf(values).sum())
    if nan == 0 and inf == 0:
        return None
    return f"{name}: {nan} NaN, {inf} inf"


def check_outputs(
    anomaly_map: np.ndarray, image_score: np.ndarray, reconstruction: np.ndarray
) -> InferenceResult:
    """Wrap raw outputs in an :class:`InferenceResult`, flagging crops with NaN or inf.

    Args:
        anomaly_map: ``(batch, 1, H, W)``.
        image_score: ``(batch,)``.
        reconstruction: ``(batch, C, H, W)``.
    Returns:
        the result; ``image_score`` is a float32 copy with NaN at every crop that is not ok.
    """
    batch = image_score.shape[0]
    ok = np.ones(batch, dtype=bool)
    errors = []
    for index in range(batch):
        reasons = [
            reason
            for reason in (
                _nonfinite_summary("anomaly_map", anomaly_map[index]),
                _nonfinite_summary("image_score", image_score[index : index + 1]),
                _nonfinite_summary("reconstruction", reconstruction[index]),
            )
            if reason
        ]
        if reasons:
            ok[index] = False
            errors.append(CropError(index, "; ".join(reasons)))
    score = np.array(image_score, dtype=np.float32, copy=True)
    score[~ok] = np.nan
    return InferenceResult(
        anomaly_map=np.asarray(anomaly_map, dtype=np.float32),
        image_score=score,
        reconstruction=np.asarray(reconstruction, dtype=np.float32),
        ok=ok,
        errors=tuple(errors),
    )


class Backend(abc.ABC):
    """Runs the detector on crops. Chosen by name through :func:`edge.engine.backends.open_backend`.

    Attributes:
        name: ``"torch"``, ``"onnxruntime"`` or ``"tensorrt"``.
        device: ``"cpu"`` or ``"cuda:N"``: where the model actually runs.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``: how it actually runs.
        max_batch: the largest batch sent to the runtime at once; larger batches are split.
        crop_shape: ``(C, H, W)`` the model takes.
        model_id: the weights' id (from the checkpoint or the export metadata), if known.
        model_errors: crops whose outputs held NaN or inf since the backend was opened.
    """

    name: str = "abstract"

    def __init__(
        self,
        *,
        device: str,
        precision: str,
        max_batch: int,
        crop_shape: tuple[int, int, int],
        model_id: str | None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.device = device
        self.precision = precision
        self.max_batch = int(max_batch)
        self.crop_shape = tuple(int(size) for size in crop_shape)
        self.model_id = model_id
        self.model_errors = 0
        self.crops_run = 0

    @abc.abstractmethod
    def _infer_batch(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Run at most ``max_batch`` crops, ``(n, C, H, W)`` float32 C-contiguous.

        Returns:
            ``(anomaly_map (n, 1, H, W), image_score (n,), reconstruction (n, C, H, W))`` as
            numpy arrays (any float dtype; :meth:`infer` converts to float32).
        """

    def close(self) -> None:  # noqa: B027 - optional hook; most backends hold nothing to free
        """Free what the backend holds (sessions, worker processes, GPU memory)."""

    def describe(self) -> dict:
        """What runs where: name, device, precision, max batch and model id."""
        return {
            "backend": self.name,
            "device": self.device,
            "precision": self.precision,
            "max_batch": self.max_batch,
            "model_id": self.model_id,
        }

    def _check_crops(self, crops: np.ndarray) -> np.ndarray:
        if not isinstance(crops, np.ndarray):
            raise TypeError(f"crops must be a numpy array, got {type(crops).__name__}")
        if crops.dtype != np.float32:
            raise ValueError(
                f"crops must be float32 in pixel units [0, 255], got {crops.dtype} "
                "(16-bit crops are scaled by 255 / 65535 when cut)"
            )
        if crops.ndim != 4 or tuple(crops.shape[1:]) != self.crop_shape:
            raise ValueError(
                f"crops must have shape (batch, {', '.join(map(str, self.crop_shape))}), "
                f"got {tuple(crops.shape)}"
            )
        return np.ascontiguousarray(crops)

    def infer(self, crops: np.ndarray) -> InferenceResult:
        """Score crops, any batch size; batches over ``max_batch`` are split.

        Args:
            crops: float32 ``(batch, C, H, W)`` in pixel units ``[0, 255]``.
        Returns:
            an :class:`InferenceResult`; crops whose outputs hold NaN or inf are marked not
            ``ok``, listed in ``errors`` and added to :attr:`model_errors`.
        """
        crops = self._check_crops(crops)
        channels, height, width = self.crop_shape
        if crops.shape[0] == 0:
            empty = np.zeros((0,), dtype=np.float32)
            return InferenceResult(
                anomaly_map=np.zeros((0, 1, height, width), dtype=np.float32),
                image_score=empty,
                reconstruction=np.zeros((0, channels, height, width), dtype=np.float32),
                ok=np.zeros((0,), dtype=bool),
            )
        parts = [
            self._infer_batch(crops[start : start + self.max_batch])
            for start in range(0, crops.shape[0], self.max_batch)
        ]
        result = check_outputs(*(np.concatenate([part[i] for part in parts]) for i in range(3)))
        self.crops_run += len(result)
        if result.errors:
            self.model_errors += len(result.errors)
            for error in result.errors:
                log.warning(
                    "model_error",
                    backend=self.name,
                    crop_index=error.index,
                    reason=error.reason,
                    model_errors_total=self.model_errors,
                )
        return result

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
