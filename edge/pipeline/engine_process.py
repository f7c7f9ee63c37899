"""The engine process: crops in, scores (and, for alarms, images) out.

1. Open the backend (:func:`edge.engine.backends.open_backend`); no CUDA was touched before
   this process was spawned, and the TensorRT backend starts its own worker from here.
2. Self-test: one inference on fixed crops (mid grey, a ramp); a non-finite output refuses
   the model. Only then is ``ready`` sent, which the supervisor turns into systemd's READY=1.
3. Load the thresholds file for this model id: the engine needs the threshold only to decide
   which crops get images (the publisher decides the alarms, from the same file).
4. Loop: take every crop batch waiting on the ``crops`` PULL (at least one, at most about
   ``max_batch`` crops), run them as one batch, send one ``scores`` message per batch. A
   heartbeat goes out between batches, so the supervisor sees a stuck inference as a stall.

Known limit: batching is greedy (whatever is waiting, up to about ``max_batch``; it never
waits to fill a batch), so batches are small while the engine keeps up and grow when it falls
behind. A batch must finish within the supervisor's ``stall_timeout_s``.

Only what the publisher needs leaves this process: per crop its score, ok flag and error;
per alarm its heatmap overlay PNG, the defect hints and (for reports) the crop and
reconstruction as grey PNGs. Anomaly maps and reconstructions of normal crops stay here.
"""

from __future__ import annotations

import time
from collections import deque

import cv2
import numpy as np
import zmq

from edge.engine.backends import open_backend
from edge.errors import ModelInvalidError
from edge.evaluate.heatmaps import overlay_png
from edge.logs import get_logger
from edge.pipeline import wire
from edge.pipeline.child import ControlLink
from edge.pipeline.settings import EngineSettings
from edge.publisher.schema import DefectHints
from edge.publisher.thresholds import load_thresholds

log = get_logger(__name__)

_HWM = 10_000


def self_test_crops(crop_shape: tuple[int, int, int]) -> np.ndarray:
    """Fixed crops for the self-test: mid grey and a left-to-right ramp.

    Returns:
        float32 ``(2, C, H, W)`` in ``[0, 255]``.
    """
    channels, height, width = crop_shape
    crops = np.full((2, channels, height, width), 128.0, dtype=np.float32)
    crops[1] = np.linspace(0.0, 255.0, width, dtype=np.float32)[None, None, :]
    return crops


def grey_png(image: np.ndarray) -> bytes:
    """``(C, H, W)`` float in ``[0, 255]`` (grey or RGB) -> PNG bytes."""
    pixels = np.clip(np.rint(np.asarray(image).transpose(1, 2, 0)), 0, 255).astype(np.uint8)
    if pixels.shape[2] == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".png", pixels)
    if not ok:
        raise RuntimeError("OpenCV could not encode a PNG")
    return buffer.tobytes()


def score_batch(
    backend, tags: list, pixels: np.ndarray, threshold: float, settings: EngineSettings
) -> tuple[list[dict], list[bytes]]:
    """Run one batch and shape the results for the publisher.

    Args:
        backend: an open :class:`~edge.engine.backends.Backend`.
        tags: one :class:`~edge.records.CropTag` per crop.
        pixels: float32 ``(n, C, H, W)`` in ``[0, 255]``.
        threshold: crops scoring over it get images.
    Returns:
        ``(results, images)``: one dict per crop (see :mod:`edge.pipeline.wire`) and the PNG
        frames the results index.
    """
    result = backend.infer(pixels)
    errors = {error.index: error.reason for error in result.errors}
    results: list[dict] = []
    images: list[bytes] = []
    for index, tag in enumerate(tags):
        ok = bool(result.ok[index])
        score = float(result.image_score[index]) if ok else None
        entry = {
            "crop_id": tag.crop_id,
            "tag": tag.to_dict(),
            "score": score,
            "ok": ok,
            "error": errors.get(index),
        }
        if ok and score > threshold:
            anomaly_map = result.anomaly_map[index]
            entry["images"] = {"heatmap": len(images)}
            images.append(overlay_png(pixels[index], anomaly_map, vmax=settings.heatmap_vmax))
            if settings.report_images:
                entry["images"]["crop"] = len(images)
                images.append(grey_png(pixels[index]))
                entry["images"]["reconstruction"] = len(images)
                images.append(grey_png(result.reconstruction[index]))
            hints = DefectHints.from_anomaly_map(anomaly_map)
            entry["hints"] = {
                "peak_x": hints.peak_x,
                "peak_y": hints.peak_y,
                "peak_value": hints.peak_value,
                "area_fraction": hints.area_fraction,
                "pixel_threshold": hints.pixel_threshold,
                "region": list(hints.region) if hints.region is not None else None,
            }
        results.append(entry)
    return results, images


def run(settings: EngineSettings, link: ControlLink, context: zmq.Context, folder: str) -> None:
    """The engine's life (steps in the module docstring)."""
    # 1. The backend.
    threads = settings.threads or (len(settings.cpus) if settings.cpus else None)
    options = {"threads": threads} if threads else {}
    if settings.backend == "onnxruntime":
        # Idle threads may spin only on cores of the engine's own: elsewhere they would take
        # the cores the grabber and publisher need.
        options["spin_wait"] = settings.cpus is not None
    backend = open_backend(
        settings.backend,
        settings.model,
        device=settings.device,
        precision=settings.precision,
        max_batch=settings.max_batch,
        **options,
    )
    try:
        # 2. Self-test.
        started = time.monotonic()
        test = backend.infer(self_test_crops(backend.crop_shape))
        self_test_s = time.monotonic() - started
        if not bool(np.all(test.ok)):
            reasons = "; ".join(error.reason for error in test.errors)
            raise ModelInvalidError(
                f"{settings.model}: self-test inference gave non-finite outputs ({reasons})"
            )
        # 3. The threshold for images.
        thresholds = load_thresholds(settings.thresholds, backend.model_id)
        _serve(settings, link, context, folder, backend, thresholds.threshold, self_test_s)
    finally:
        backend.close()


def _serve(
    settings: EngineSettings,
    link: ControlLink,
    context: zmq.Context,
    folder: str,
    backend,
    threshold: float,
    self_test_s: float,
) -> None:
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, _HWM)
    pull.bind(wire.endpoint(folder, wire.CROPS))
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, _HWM)
    push.connect(wire.endpoint(folder, wire.SCORES))
    link.send(
        "ready",
        model_id=backend.model_id or "unknown",
        crop_shape=list(backend.crop_shape),
        backend=backend.describe(),
        threshold=threshold,
        self_test_s=round(self_test_s, 4),
    )
    log.info("engine_ready", self_test_s=round(self_test_s, 4), **backend.describe())
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    poller.register(link.socket, zmq.POLLIN)
    outbox: deque[list[bytes]] = deque()
    crops_done = batches = resent = 0
    infer_s = 0.0
    wait_ms = int(settings.heartbeat_interval_s * 1000)
    try:
        while True:
            # 4. Wait for crops or a command; take every batch waiting, up to about max_batch.
            events = dict(poller.poll(10 if outbox else wait_ms))
            if any(command["type"] == "stop" for command in link.commands()):
                break
            tags: list = []
            parts: list[np.ndarray] = []
            while pull in events and len(tags) < settings.max_batch:
                try:
                    frames = pull.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                batch_tags, pixels, was_resent = wire.decode_crops(frames)
                resent += len(batch_tags) if was_resent else 0
                tags += batch_tags
                parts.append(pixels)
            if tags:
                started = time.monotonic()
                results, images = score_batch(
                    backend, tags, np.concatenate(parts), threshold, settings
                )
                infer_s += time.monotonic() - started
                crops_done += len(tags)
                batches += 1
                outbox.append(wire.encode_scores(results, images))
            while outbox:
                try:
                    push.send_multipart(outbox[0], zmq.NOBLOCK)
                except zmq.Again:
                    break
                outbox.popleft()
            link.beat(
                crops=crops_done,
                batches=batches,
                resent=resent,
                infer_s=round(infer_s, 4),
                model_errors=backend.model_errors,
                outbox=len(outbox),
            )
    finally:
        pull.close(linger=0)
        push.close(linger=1000)
    link.send("stopped", crops=crops_done, batches=batches, infer_s=round(infer_s, 4))
    log.info("engine_stopped", crops=crops_done, batches=batches, infer_s=round(infer_s, 4))
