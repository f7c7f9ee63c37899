"""The TensorRT worker: a spawned process that owns the CUDA context, the plan and its buffers.

It must never import torch (torch and pycuda in one process fight over CUDA contexts and give
"invalid resource handle", research/edge-anchors.md 2.6). This module and the packages above it
import numpy, structlog and pydantic only; TensorRT and pycuda are imported inside the process.
It is started with the ``spawn`` method, never ``fork``: CUDA does not survive a fork.

Protocol over one ``multiprocessing`` pipe (parent -> worker, worker -> parent):

- worker: ``("hello", facts)`` with its pid, whether torch is loaded, TensorRT version, GPU name
  and compute capability; or ``("error", kind, message, facts)`` and exit.
- parent: ``("load", plan_path, max_batch)``; worker: ``("loaded", io)`` or
  ``("error", "plan_invalid", message, {})``.
- parent: ``("infer", n)`` then the crops' float32 bytes; worker: ``("outputs", n)`` then the
  float32 bytes of anomaly map, image score and reconstruction; or ``("error", ...)``.
- parent: ``("close",)``.

Buffers: page-locked host and device buffers for the largest batch, one stream and one
execution context, made once at ``load`` and kept until the worker ends; tensor addresses are
set once. Crops arrive straight into a staging buffer (``recv_bytes_into``), no pickling.
Engine I/O dtypes are read from the engine, never assumed.

Known limits: pycuda, as the design chose; NVIDIA's own samples moved to cuda-python in
TensorRT 10.13 (NVIDIA/TensorRT CHANGELOG) and pycuda must be built from source on Jetson
(inducer/pycuda#242 for its context pitfalls). The worker uses the device's primary context,
the one TensorRT's runtime API uses, pushed once on its only thread.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

OUTPUT_ORDER = ("anomaly_map", "image_score", "reconstruction")


class PlanLoadError(Exception):
    """The plan cannot be deserialised or run here."""


def machine_identity(device_index: int = 0) -> dict[str, str]:
    """TensorRT version, GPU name and compute capability of CUDA device ``device_index``.

    Needs ``tensorrt`` and ``pycuda``; creates no CUDA context.
    """
    import pycuda.driver as cuda
    import tensorrt as trt

    cuda.init()
    device = cuda.Device(device_index)
    major, minor = device.compute_capability()
    return {
        "tensorrt_version": trt.__version__,
        "gpu_name": device.name(),
        "compute_capability": f"{major}.{minor}",
    }


class _Binding:
    """One I/O tensor: name, dtype from the engine, page-locked host and device buffers."""

    def __init__(self, cuda, name: str, dtype: np.dtype, max_shape: tuple[int, ...]):
        self.name = name
        self.dtype = dtype
        self.max_shape = max_shape
        self.host = cuda.pagelocked_empty(max_shape, dtype)
        self.device = cuda.mem_alloc(max(self.host.nbytes, 1))


class PlanRunner:
    """A deserialised plan with its context, stream and buffers for ``max_batch`` crops."""

    def __init__(self, trt, cuda, plan_path: str, max_batch: int):
        self._cuda = cuda
        plan_path = Path(plan_path)
        try:
            blob = plan_path.read_bytes()
        except OSError as error:
            raise PlanLoadError(f"{plan_path}: cannot read ({error.strerror})") from error
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        engine = self.runtime.deserialize_cuda_engine(blob)
        if engine is None:  # TensorRT says why only in its log (research/edge-anchors.md 2.2)
            raise PlanLoadError(
                f"{plan_path}: TensorRT {trt.__version__} could not deserialise the plan "
                "(deserialize_cuda_engine returned None: built by another TensorRT version or "
                "for another GPU, or damaged; see the TensorRT log above); rebuild it with "
                "`edge build-engine`"
            )
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise PlanLoadError(f"{plan_path}: TensorRT could not create an execution context")
        self.stream = cuda.Stream()

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or sorted(outputs) != sorted(OUTPUT_ORDER):
            raise PlanLoadError(
                f"{plan_path}: expected one input and outputs {OUTPUT_ORDER}, got "
                f"{inputs} -> {outputs}"
            )
        input_name = inputs[0]
        profile_max = tuple(engine.get_tensor_profile_shape(input_name, 0)[2])
        self.max_batch = min(int(max_batch), int(profile_max[0]))
        self.crop_shape = tuple(int(size) for size in profile_max[1:])
        dtype_of = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self.input = _Binding(cuda, input_name, dtype_of[input_name], profile_max)
        self.staging = np.empty(profile_max, dtype=np.float32)

        # Output shapes at the largest batch, from the context once the input shape is set.
        self.context.set_input_shape(input_name, profile_max)
        self.outputs = {
            name: _Binding(cuda, name, dtype_of[name], tuple(self.context.get_tensor_shape(name)))
            for name in OUTPUT_ORDER
        }
        for binding in (self.input, *self.outputs.values()):
            self.context.set_tensor_address(binding.name, int(binding.device))

    def describe(self) -> dict:
        return {
            "max_batch": self.max_batch,
            "crop_shape": list(self.crop_shape),
            "input_dtype": str(self.input.dtype),
            "output_dtypes": {name: str(b.dtype) for name, b in self.outputs.items()},
        }

    def staging_view(self, count: int) -> memoryview:
        """Writable bytes of the first ``count`` crops of the float32 staging buffer."""
        return memoryview(self.staging[:count].reshape(-1)).cast("B")

    def run(self, count: int) -> list[np.ndarray]:
        """Run the first ``count`` staged crops; float32 outputs in :data:`OUTPUT_ORDER`."""
        cuda = self._cuda
        self.input.host[:count] = self.staging[:count]  # casts to the engine's input dtype
        self.context.set_input_shape(self.input.name, (count, *self.crop_shape))
        cuda.memcpy_htod_async(self.input.device, self.input.host[:count], self.stream)
        if not self.context.execute_async_v3(self.stream.handle):
            raise RuntimeError("execute_async_v3 returned False (see the TensorRT log)")
        for binding in self.outputs.values():
            cuda.memcpy_dtoh_async(binding.host[:count], binding.device, self.stream)
        self.stream.synchronize()
        return [
            np.ascontiguousarray(self.outputs[name].host[:count], dtype=np.float32)
            for name in OUTPUT_ORDER
        ]

    def free(self) -> None:
        for binding in (self.input, *self.outputs.values()):
            binding.device.free()
        self.context = None
        self.engine = None


def worker_main(conn, device_index: int) -> None:
    """Entry point of the spawned worker (see the module docstring for the protocol)."""
    from edge.logs import configure, get_logger

    configure("engine-trt")
    log = get_logger(__name__)
    facts = {"pid": os.getpid(), "torch_imported": "torch" in sys.modules}
    if facts["torch_imported"]:
        conn.send(("error", "torch_loaded", "TensorRT worker: torch is loaded here", facts))
        conn.close()
        return
    try:
        import pycuda.driver as cuda
        import tensorrt as trt
    except ImportError as error:
        conn.send(("error", "unavailable", f"TensorRT worker: {error}", facts))
        conn.close()
        return
    try:
        facts.update(machine_identity(device_index))
        context = cuda.Device(device_index).retain_primary_context()
        context.push()
    except cuda.Error as error:
        conn.send(("error", "unavailable", f"CUDA device {device_index}: {error}", facts))
        conn.close()
        return
    conn.send(("hello", facts))
    log.info("trt_worker_started", device=device_index, **facts)
    runner: PlanRunner | None = None
    try:
        while True:
            message = conn.recv()
            if message[0] == "close":
                break
            if message[0] == "load":
                try:
                    runner = PlanRunner(trt, cuda, message[1], message[2])
                except PlanLoadError as error:
                    conn.send(("error", "plan_invalid", str(error), {}))
                    continue
                conn.send(("loaded", runner.describe()))
            elif message[0] == "infer":
                count = int(message[1])
                if runner is None or count > runner.max_batch:
                    conn.send(("error", "protocol", f"cannot run {count} crops now", {}))
                    break
                conn.recv_bytes_into(runner.staging_view(count))
                try:
                    outputs = runner.run(count)
                except (cuda.Error, RuntimeError) as error:
                    conn.send(("error", "runtime", f"TensorRT run failed: {error}", {}))
                    break
                conn.send(("outputs", count))
                for output in outputs:
                    conn.send_bytes(output)
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass  # the parent went away: nothing left to answer
    finally:
        if runner is not None:
            runner.free()
        context.pop()
        context.detach()
        log.info("trt_worker_stopped")
