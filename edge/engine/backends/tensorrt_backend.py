"""TensorRT backend: a serialized plan, run in its own spawned worker process.

The parent (this object) never imports TensorRT, pycuda or CUDA: it checks that they are
installed, starts :mod:`edge.engine.backends.tensorrt_worker` with the ``spawn`` method, checks
the plan's sidecar against the TensorRT version and GPU the worker reports
(:func:`edge.engine.plan.check_plan`) before the worker deserialises anything, and then passes
crops and outputs as raw float32 bytes over a pipe.

``model_path`` is either a plan (``engines/NAME-KEY.plan``, with its sidecar) or the graph
(``engines/NAME.onnx``), in which case the plan for this machine is looked up in the cache by
key. A plan built elsewhere, a missing or corrupt one raises :class:`PlanInvalidError`
(``needs_rebuild``): run ``edge build-engine``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing
import sys
from pathlib import Path

import numpy as np

from edge.engine.backends.base import (
    Backend,
    BackendFailedError,
    BackendUnavailableError,
)
from edge.engine.backends.tensorrt_worker import worker_main
from edge.engine.metadata import read_metadata
from edge.engine.plan import (
    MachineIdentity,
    PlanInvalidError,
    PlanKey,
    mark_plan_stale,
    plan_path_for,
    read_sidecar,
    require_plan,
)
from edge.logs import get_logger

log = get_logger(__name__)

REQUIRED_MODULES = {"tensorrt": "TensorRT Python bindings", "pycuda": "pycuda"}


def require_tensorrt() -> None:
    """Raise :class:`BackendUnavailableError` naming what is missing for TensorRT here."""
    missing = [
        f"{label} (import {module})"
        for module, label in REQUIRED_MODULES.items()
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        raise BackendUnavailableError(
            f"tensorrt backend: {' and '.join(missing)} not installed; it needs an NVIDIA GPU "
            "with CUDA, TensorRT and pycuda (pip install '.[vehicle]', or JetPack's TensorRT)"
        )


def parse_cuda_device(device: str) -> int:
    """``"cuda"`` / ``"cuda:N"`` -> N; TensorRT runs on CUDA devices only."""
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise BackendUnavailableError(f"tensorrt backend runs on cuda[:N] only, not {device!r}")


@contextlib.contextmanager
def _parent_main_hidden():
    """Keep a spawned child from running the parent's main script.

    A spawned child normally imports the parent's ``__main__`` again (by path, as
    ``__mp_main__``), so a script that imports torch at its top would load torch into the
    worker. The worker's entry point lives in an importable module, so the child does not need
    the main module: while the process starts, ``__main__`` shows spawn neither ``__file__`` nor
    ``__spec__`` (what ``multiprocessing.spawn.get_preparation_data`` reads), and the child
    skips it. Checked by tests/test_backends.py with a parent script that imports torch.
    """
    main = sys.modules.get("__main__")
    saved = {name: vars(main)[name] for name in ("__file__", "__spec__") if name in vars(main)}
    try:
        main.__spec__ = None
        if "__file__" in vars(main):
            del main.__file__
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)


def start_worker(device_index: int):
    """Start the worker with the spawn method; returns ``(process, parent_connection)``."""
    context = multiprocessing.get_context("spawn")
    parent_conn, child_conn = context.Pipe(duplex=True)
    process = context.Process(
        target=worker_main, args=(child_conn, device_index), name="engine-trt", daemon=True
    )
    with _parent_main_hidden():
        process.start()
    child_conn.close()
    return process, parent_conn


class TensorRTBackend(Backend):
    """A TensorRT plan in a spawned worker process.

    Args:
        model_path: ``NAME-KEY.plan`` (sidecar beside it) or ``NAME.onnx`` (plan looked up).
        device: ``"cuda"`` or ``"cuda:N"``.
        precision: None (the plan's), or the precision to look up when ``model_path`` is a graph
            (default fp16).
        max_batch: crops per run; capped by the plan's profile.
        timeout_s: longest wait for one batch before the worker is declared stuck.
        startup_timeout_s: longest wait for the worker to start and load the plan.
    """

    name = "tensorrt"

    def __init__(
        self,
        model_path: str | Path,
        device: str = "cuda:0",
        precision: str | None = None,
        max_batch: int = 8,
        timeout_s: float = 60.0,
        startup_timeout_s: float = 300.0,
    ):
        require_tensorrt()
        device_index = parse_cuda_device(device)
        self._timeout_s = timeout_s
        self._process, self._conn = start_worker(device_index)
        try:
            facts = self._receive("hello", startup_timeout_s)
            machine = MachineIdentity(
                **{k: facts[k] for k in ("tensorrt_version", "gpu_name", "compute_capability")}
            )
            plan_path, sidecar = self._resolve_plan(Path(model_path), machine, precision, max_batch)
            self._conn.send(("load", str(plan_path), max_batch))
            try:
                loaded = self._receive("loaded", startup_timeout_s)
            except PlanInvalidError as error:
                mark_plan_stale(plan_path, str(error))  # so the next build rebuilds it
                raise
        except BaseException:
            self._stop_worker()
            raise
        super().__init__(
            device=f"cuda:{device_index}",
            precision=sidecar.key_fields.precision,
            max_batch=loaded["max_batch"],
            crop_shape=tuple(loaded["crop_shape"]),
            model_id=sidecar.model_id,
        )
        self.plan_path = plan_path
        log.info(
            "backend_opened",
            backend=self.name,
            device=self.device,
            precision=self.precision,
            plan=str(plan_path),
            worker_pid=self._process.pid,
            **loaded,
        )

    @staticmethod
    def _resolve_plan(model_path: Path, machine: MachineIdentity, precision, max_batch):
        if model_path.suffix == ".onnx":
            metadata = read_metadata(model_path)
            key = PlanKey.for_machine(machine, metadata.onnx_sha256, precision or "fp16", max_batch)
            plan_path = plan_path_for(model_path, key.digest())
            return plan_path, require_plan(plan_path, key)
        fields = read_sidecar(model_path).key_fields
        if precision is not None and precision != fields.precision:
            raise PlanInvalidError(
                f"{model_path}: built for {fields.precision}, {precision} asked for; rebuild"
            )
        key = PlanKey.for_machine(machine, fields.onnx_sha256, fields.precision, fields.max_batch)
        return model_path, require_plan(model_path, key)

    def _receive(self, expected: str, timeout_s: float):
        """The next message from the worker, which must be ``expected``; errors are raised."""
        try:
            if not self._conn.poll(timeout_s):
                raise BackendFailedError(
                    f"tensorrt worker (pid {self._process.pid}) did not answer within "
                    f"{timeout_s:g} s"
                )
            message = self._conn.recv()
        except (EOFError, OSError) as error:
            self._process.join(timeout=5)
            raise BackendFailedError(
                f"tensorrt worker (pid {self._process.pid}) exited with code "
                f"{self._process.exitcode}"
            ) from error
        if message[0] == "error":
            _, kind, text, _facts = message
            if kind == "unavailable":
                raise BackendUnavailableError(text)
            if kind == "plan_invalid":
                raise PlanInvalidError(text)
            raise BackendFailedError(text)
        if message[0] != expected:
            raise BackendFailedError(f"tensorrt worker sent {message[0]!r}, not {expected!r}")
        return message[1]

    def _infer_batch(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        count = crops.shape[0]
        channels, height, width = self.crop_shape
        self._conn.send(("infer", count))
        self._conn.send_bytes(crops)
        self._receive("outputs", self._timeout_s)
        shapes = ((count, 1, height, width), (count,), (count, channels, height, width))
        return tuple(
            np.frombuffer(self._conn.recv_bytes(), dtype=np.float32).reshape(shape)
            for shape in shapes
        )

    def _stop_worker(self) -> None:
        if self._process is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self._conn.send(("close",))
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5)
        self._conn.close()
        self._process = None

    def close(self) -> None:
        self._stop_worker()
