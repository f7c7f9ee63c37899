"""The engine: crops in, anomaly maps and image scores out, on whatever the product runs on.

- ``export``: the detector as one ONNX graph, with a metadata file beside it (``edge export``);
  ``metadata``: that file's format.
- ``backends``: one interface over PyTorch, ONNX Runtime and TensorRT, chosen by name; the
  TensorRT one runs its plan in a spawned worker process (``backends.tensorrt_worker``).
- ``plan``: the plan cache key, plan sidecars and their check, the gate against ONNX Runtime
  FP32 and ``edge build-engine``; ``trt_build`` and ``int8``: the parts that need TensorRT.

Nothing here imports torch, TensorRT or pycuda at import time: each backend brings its own
runtime in only when it is chosen, so the TensorRT worker process never loads torch.
"""
