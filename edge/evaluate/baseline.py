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

import hashlib
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

    @property
    def model_id(self) -> str:
        """``zscore-`` and 12 hex digits of the SHA-256 of its statistics and ``top_k``."""
        digest = hashlib.sha256()
        for array in (self.mean, self.std):
            digest.update(str(array.shape).encode())
            digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
        digest.update(str(self.top_k).encode())
        return "zscore-" + digest.hexdigest()[:12]

    def export_onnx(self, path: str | Path, model_id: str | None = None) -> Path:
        """Write the baseline as an ONNX graph with the detector's interface, and its metadata.

        The graph has the input and outputs of ``edge export``'s Diff-Fastener graph, so every
        backend and the whole pipeline run it unchanged: ``crops`` float32
        ``(batch, C, H, W)`` in ``[0, 255]`` -> ``anomaly_map`` ``(batch, 1, H, W)`` (the
        z-score map of :meth:`anomaly_maps`), ``image_score`` ``(batch,)`` (mean of its
        ``top_k`` largest values, as :meth:`score`) and ``reconstruction``
        ``(batch, C, H, W)`` (the mean crop: what a normal crop should look like). It is
        deterministic and needs no training, which is what pipeline tests want of a detector.

        Known limit: the anomaly map is a z-score, not a probability in ``[0, 1]``; heatmaps
        drawn on the detector's fixed ``[0, 1]`` scale saturate (draw with a larger vmax).

        Steps: (1) build the graph at opset 17, (2) ``onnx.checker``, (3) compare ONNX Runtime
        with :meth:`score` on the mean crop and noisy crops, refused over 1e-3, (4) write the
        graph, then ``PATH.json`` (:class:`edge.engine.metadata.ExportMetadata`).

        Returns:
            the path of the graph.
        """
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        from edge.engine.backends.base import OUTPUT_NAMES
        from edge.engine.metadata import TensorSpec, write_metadata

        path = Path(path)
        model_id = model_id or self.model_id
        channels, height, width = self.mean.shape
        if height != width:
            raise ValueError(
                f"square crops only (the export metadata has one size), {height}x{width}"
            )
        # 1. The graph: |x - mean| * (1 / std), channel mean, top-k mean; the mean crop.
        constants = [
            numpy_helper.from_array(self.mean[None].astype(np.float32), "mean"),
            numpy_helper.from_array((1.0 / self.std)[None].astype(np.float32), "inv_std"),
            numpy_helper.from_array(np.array([self.top_k], np.int64), "top_k"),
        ]
        nodes = [
            helper.make_node("Sub", ["crops", "mean"], ["centred"]),
            helper.make_node("Abs", ["centred"], ["distance"]),
            helper.make_node("Mul", ["distance", "inv_std"], ["z"]),
            helper.make_node("ReduceMean", ["z"], ["anomaly_map"], axes=[1], keepdims=1),
            helper.make_node("Flatten", ["anomaly_map"], ["flat"], axis=1),
            helper.make_node("TopK", ["flat", "top_k"], ["top_values", "top_indices"], axis=1),
            helper.make_node("ReduceMean", ["top_values"], ["image_score"], axes=[1], keepdims=0),
            helper.make_node("Shape", ["crops"], ["crops_shape"]),
            helper.make_node("Expand", ["mean", "crops_shape"], ["reconstruction"]),
        ]
        shapes = {
            "anomaly_map": ["batch", 1, height, width],
            "image_score": ["batch"],
            "reconstruction": ["batch", channels, height, width],
        }
        graph = helper.make_graph(
            nodes,
            "zscore_baseline",
            [
                helper.make_tensor_value_info(
                    "crops", TensorProto.FLOAT, ["batch", channels, height, width]
                )
            ],
            [
                helper.make_tensor_value_info(name, TensorProto.FLOAT, shapes[name])
                for name in OUTPUT_NAMES
            ],
            initializer=constants,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        helper.set_model_props(
            model, {"model_id": model_id, "preset": "zscore-baseline", "format": FORMAT}
        )
        # 2. Checker.
        onnx.checker.check_model(model, full_check=True)
        # 3. ONNX Runtime against numpy.
        rng = np.random.default_rng(0)
        crops = np.clip(
            self.mean[None] + rng.normal(0.0, 20.0, (3, channels, height, width)), 0, 255
        ).astype(np.float32)
        crops[0] = self.mean
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        ort_map, ort_score, _ = session.run(list(OUTPUT_NAMES), {"crops": crops})
        numpy_map, numpy_score = self.score(crops)
        differences = {
            "anomaly_map_max_abs": float(np.max(np.abs(ort_map - numpy_map))),
            "image_score_max_abs": float(np.max(np.abs(ort_score - numpy_score))),
        }
        if max(differences.values()) > 1e-3:
            raise ModelInvalidError(f"{path}: ONNX graph differs from the baseline ({differences})")
        # 4. Graph, then metadata.
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
        tensor = ["batch", channels, height, width]
        write_metadata(
            path,
            model_id=model_id,
            preset="zscore-baseline",
            model={
                "kind": "zscore-baseline",
                "top_k": self.top_k,
                "std_floor": self.std_floor,
                "num_train_crops": self.num_train_crops,
            },
            input_spec=TensorSpec(name="crops", dtype="float32", shape=tensor),
            output_specs=[
                TensorSpec(name=name, dtype="float32", shape=shapes[name]) for name in OUTPUT_NAMES
            ],
            opset=17,
            exporter={"onnx": onnx.__version__},
            export_check=differences,
        )
        return path
