"""What travels between the pipeline's processes, and how: ZeroMQ ipc sockets, JSON headers,
raw pixel buffers. Nothing here is pickled.

Sockets (all ``ipc://`` in one run folder; the ``sun_path`` limit of about 107 bytes applies,
so the folder is short, see :func:`make_run_folder`):

============  =========================  ============================================
endpoint      sockets                    frames
============  =========================  ============================================
``ctl``       supervisor ROUTER (bind),  one JSON frame; children send ``heartbeat``,
              one DEALER per child,      ``ready``, ``fatal``, ``ack``, ``gap``, ``eos``,
              identity = child name      ``stopped``; the supervisor sends commands
``crops``     grabber PUSH (connect) ->  ``[header JSON, float32 (n, C, H, W) bytes]``
              engine PULL (bind)
``scores``    engine PUSH (connect) ->   ``[header JSON, png, png, ...]``
              publisher PULL (bind)
============  =========================  ============================================

The crop header carries the :class:`~edge.records.CropTag` of each crop plus ``dtype`` and
``shape`` of the buffer that follows; the receiver views that buffer with ``np.frombuffer``
(no copy). The score header carries one result per crop (``crop_id``, tag, ``image_score``,
``ok``, ``error``) and, for alarms, the index of the frames that hold its heatmap overlay PNG
and (for reports) the crop and reconstruction as grey PNGs.

The binding side of ``crops`` and ``scores`` is the downstream process, so a restarted engine
or publisher binds the same path again and its upstream's connecting socket reconnects by
itself; messages queued upstream while it was down are delivered to the new process.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import zmq

from edge.publisher.schema import CoverageGap
from edge.records import CropTag, Mileage

CTL = "ctl"
CROPS = "crops"
SCORES = "scores"

# The longest ipc path libzmq accepts is sizeof(sun_path) - 1 on Linux.
_MAX_IPC_PATH = 107


def make_run_folder(base: str | os.PathLike | None = None) -> Path:
    """A fresh private folder for the run's ipc sockets: under ``base``, else under
    ``$RUNTIME_DIRECTORY`` (systemd's ``RuntimeDirectory=``), else the temp folder.

    Raises:
        ValueError: the folder's path is too long for an ipc socket name.
    """
    base = base or os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
    folder = Path(tempfile.mkdtemp(prefix="edge-", dir=base))
    longest = folder / (max((CTL, CROPS, SCORES), key=len))
    if len(str(longest)) > _MAX_IPC_PATH:
        raise ValueError(
            f"{folder}: too long for ipc socket names ({len(str(longest))} > {_MAX_IPC_PATH} "
            "bytes); set RUNTIME_DIRECTORY to a shorter folder"
        )
    return folder


def endpoint(folder: str | os.PathLike, name: str) -> str:
    """``ipc://FOLDER/NAME``."""
    return f"ipc://{Path(folder) / name}"


def send_json(socket: zmq.Socket, message: dict, flags: int = 0) -> None:
    """One JSON frame (NaN refused: a NaN score must never pass silently)."""
    socket.send(json.dumps(message, separators=(",", ":"), allow_nan=False).encode(), flags)


def recv_json(socket: zmq.Socket, flags: int = 0) -> dict:
    return json.loads(socket.recv(flags))


# Crops: grabber -> engine ---------------------------------------------------------------


def encode_crops(tags: list[CropTag], pixels: np.ndarray, resend: bool = False) -> list:
    """The frames of one crop batch.

    Args:
        tags: one tag per crop.
        pixels: float32 ``(n, C, H, W)`` in ``[0, 255]``, C-contiguous; sent as raw bytes.
        resend: these crops were sent before (to an engine that died or whose results were
            lost); only logged by the receiver.
    """
    if pixels.dtype != np.float32 or pixels.ndim != 4 or len(tags) != pixels.shape[0]:
        raise ValueError(f"need float32 (n, C, H, W) for {len(tags)} tags, got {pixels.shape}")
    header = {
        "type": "crops",
        "dtype": "float32",
        "shape": list(pixels.shape),
        "tags": [tag.to_dict() for tag in tags],
        "resend": resend,
    }
    return [json.dumps(header, separators=(",", ":")).encode(), np.ascontiguousarray(pixels)]


def decode_crops(frames: list) -> tuple[list[CropTag], np.ndarray, bool]:
    """``(tags, pixels float32 (n, C, H, W), resend)``; pixels view the received buffer."""
    header = json.loads(bytes(frames[0]))
    if header.get("type") != "crops" or header.get("dtype") != "float32":
        raise ValueError(f"not a float32 crop batch: {str(header)[:200]}")
    shape = tuple(int(size) for size in header["shape"])
    buffer = frames[1].buffer if isinstance(frames[1], zmq.Frame) else frames[1]
    pixels = np.frombuffer(buffer, dtype=np.float32)
    if pixels.size != int(np.prod(shape)):
        raise ValueError(f"crop buffer holds {pixels.size} values, header says {shape}")
    tags = [CropTag.from_dict(tag) for tag in header["tags"]]
    return tags, pixels.reshape(shape), bool(header.get("resend", False))


# Scores: engine -> publisher ------------------------------------------------------------


def encode_scores(results: list[dict], images: list[bytes]) -> list[bytes]:
    """The frames of one scored batch: the header, then the PNG frames the results index."""
    header = {"type": "scores", "results": results}
    return [json.dumps(header, separators=(",", ":"), allow_nan=False).encode(), *images]


def decode_scores(frames: list[bytes]) -> tuple[list[dict], list[bytes]]:
    header = json.loads(frames[0])
    if header.get("type") != "scores":
        raise ValueError(f"not a score batch: {str(header)[:200]}")
    return header["results"], list(frames[1:])


# Coverage gaps: grabber -> supervisor -> publisher ---------------------------------------


def gap_to_dict(gap: CoverageGap) -> dict:
    """A :class:`~edge.publisher.schema.CoverageGap` as plain JSON data."""
    return asdict(gap)


def gap_from_dict(data: dict) -> CoverageGap:
    data = dict(data)
    for end in ("start_mileage", "end_mileage"):
        if data.get(end) is not None:
            data[end] = Mileage(**data[end])
    return CoverageGap(**data)


def gap_key(gap: CoverageGap) -> tuple[str, float, float]:
    """What makes two gap reports the same gap (a gap resent after a restart is one gap)."""
    return (gap.reason, round(gap.start_along_track_m, 3), round(gap.end_along_track_m, 3))
