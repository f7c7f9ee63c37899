"""The grabber process: frames -> fastener crops with tags -> the engine, within a window.

1. Open the source (:func:`edge.grabber.sources.open_source`), the geometry, the positioner
   (from the sidecars of ``positions_from``, default the recording itself) and the fastener
   finder; send ``ready``.
2. Per frame: (``pace=realtime``: wait until the frame's recorded time) push it to the finder;
   per fastener found: place it (:class:`~edge.telemetry.position.Positioner`), tag it
   (:class:`~edge.records.CropTag`, ids counted from ``first_crop_id``), turn the crop into
   model input (:func:`model_input`) and hand it to the :class:`InFlight` window.
3. The window is the retransmit buffer and the flow control in one: it holds every crop sent
   and not yet acknowledged by the publisher (acknowledgements come through the supervisor),
   at most ``max_in_flight``. On ``resend`` (after the engine or the publisher was restarted)
   all of them go out again.
   - replay: a full window blocks the grabber (it keeps serving commands and heartbeats):
     backpressure, nothing is lost, the run goes as fast as the engine allows;
   - live: a full window never blocks the camera: the crop is dropped, counted, and the run
     of consecutive drops becomes one coverage gap (reason ``engine_behind``) with its
     mileage range, sent to the supervisor for the publisher when the next crop fits.
4. At the end of the source: the finder's last fasteners, then ``eos`` with the frame and
   crop counts and whether the recording was cut short; then keep serving acknowledgements
   and resends until ``stop``. ``finish`` (the supervisor draining on SIGTERM) ends the
   reading early the same way. A fastener whose crop runs past the last recorded line (at
   the end of a recording, or where one was cut short) is not scored: half a clip padded
   with repeated lines is neither a normal nor a defective fastener. It takes its crop id
   and is reported as a coverage gap (reason ``other``), so the stretch shows as not
   inspected.

Known limits:

- A grabber restarted on a recording reads it again from the start (crop ids come from the
  order the finder cuts, so the finder must see every frame again); the crops already
  acknowledged are cut but not sent. A restart late in a long recording costs that re-read.
- A live camera has no line positions of its own here: ``positions_from`` must name a
  recording whose sidecars describe the run; a live GPS and encoder feed is not implemented.
- Live mode drops crops only at the window; if the finder itself cannot keep up with the
  camera, frames queue in the camera driver, which this process cannot see or report.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque

import cv2
import numpy as np
import zmq

from edge.config import ConfigError
from edge.errors import ConfigInvalidError
from edge.grabber.crops import FoundFastener
from edge.grabber.geometry import TrackGeometry
from edge.grabber.locate import FastenerFinder
from edge.grabber.sources import RecordingSource, open_source
from edge.logs import get_logger
from edge.pipeline import wire
from edge.pipeline.child import ControlLink
from edge.pipeline.settings import GrabberSettings
from edge.publisher.schema import CoverageGap
from edge.records import CropTag, Mileage
from edge.telemetry.position import Positioner
from edge.telemetry.run import sidecars

log = get_logger(__name__)

_HWM = 10_000


def cut_by_end(fastener: FoundFastener, recorded_to: int) -> bool:
    """Whether the fastener's crop runs past ``recorded_to``, the line after the last recorded."""
    return fastener.truncated and fastener.line + fastener.crop.shape[0] / 2 > recorded_to


def model_input(crop: np.ndarray, crop_shape: tuple[int, int, int]) -> np.ndarray:
    """A fastener crop as the model takes it.

    Args:
        crop: ``(lines, px)`` grey, ``uint8`` or ``uint16``, canonical orientation.
        crop_shape: ``(C, H, W)`` of the model.
    Returns:
        float32 ``(C, H, W)`` in ``[0, 255]``: resized with ``INTER_AREA``, 16-bit scaled by
        ``255 / 65535``, grey repeated over the channels of a colour model.
    """
    channels, height, width = crop_shape
    resized = cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA)
    grey = resized.astype(np.float32)
    if crop.dtype == np.uint16:
        grey *= np.float32(255.0 / 65535.0)
    return np.ascontiguousarray(np.broadcast_to(grey, (channels, height, width)))


def make_tag(crop_id: int, found: FoundFastener, positioner: Positioner, camera_id: str) -> CropTag:
    """The :class:`CropTag` of a found fastener: where on the line and when it was scanned."""
    position = positioner.locate(max(0.0, found.line))
    return CropTag(
        crop_id=crop_id,
        frame_index=found.frame_index,
        box=found.box,
        line_index=found.line_index,
        along_track_m=position.along_track_m,
        capture_time=position.capture_time,
        rail=found.rail,
        side=found.side,
        camera_id=camera_id,
        gps=position.gps,
        mileage=position.mileage,
    )


class InFlight:
    """Crops sent and not yet acknowledged: the retransmit buffer and the window (step 3).

    ``pending`` lists crop ids waiting to be handed to the socket (first sends and resends),
    in id order; a send that would block leaves them pending for the next turn.
    """

    def __init__(self, push: zmq.Socket, window: int, max_batch: int) -> None:
        self.push = push
        self.window = window
        self.max_batch = max_batch
        self.crops: OrderedDict[int, tuple[CropTag, np.ndarray]] = OrderedDict()
        self.pending: deque[int] = deque()
        self.resending: set[int] = set()  # ids in ``pending`` that were sent before
        self.sent = self.resent = self.acked = 0

    def has_room(self) -> bool:
        return len(self.crops) < self.window

    def add(self, tag: CropTag, pixels: np.ndarray) -> None:
        self.crops[tag.crop_id] = (tag, pixels)
        self.pending.append(tag.crop_id)

    def ack(self, crop_ids: list[int]) -> None:
        for crop_id in crop_ids:
            if self.crops.pop(crop_id, None) is not None:
                self.acked += 1

    def resend(self) -> int:
        """Queue every unacknowledged crop again; returns how many."""
        queued = set(self.pending)
        again = [crop_id for crop_id in self.crops if crop_id not in queued]
        self.resending.update(again)
        self.pending = deque(sorted(queued.union(again)))
        return len(again)

    def flush(self) -> None:
        """Hand pending crops to the socket in batches, without blocking."""
        while self.pending:
            ids: list[int] = []
            while self.pending and len(ids) < self.max_batch:
                crop_id = self.pending.popleft()
                if crop_id in self.crops:
                    ids.append(crop_id)
            if not ids:
                return
            resend = any(crop_id in self.resending for crop_id in ids)
            tags = [self.crops[crop_id][0] for crop_id in ids]
            pixels = np.stack([self.crops[crop_id][1] for crop_id in ids])
            try:
                self.push.send_multipart(wire.encode_crops(tags, pixels, resend), zmq.NOBLOCK)
            except zmq.Again:
                self.pending.extendleft(reversed(ids))
                return
            self.resending.difference_update(ids)
            if resend:
                self.resent += len(ids)
            else:
                self.sent += len(ids)


class DropGap:
    """Consecutive crops dropped in live mode, as one coverage gap (step 3)."""

    def __init__(self) -> None:
        self.first: CropTag | None = None
        self.last: CropTag | None = None
        self.count = 0
        self.total = 0

    def drop(self, tag: CropTag) -> None:
        if self.first is None:
            self.first = tag
        self.last = tag
        self.count += 1
        self.total += 1

    def close(self) -> tuple[CoverageGap, tuple[int, int]] | None:
        """The gap and the range of crop ids dropped in it (first, last), or None."""
        if self.first is None:
            return None
        ids = (self.first.crop_id, self.last.crop_id)
        gap = CoverageGap.from_crops(
            self.first,
            self.last,
            "engine_behind",
            self.count,
            f"{self.count} crops dropped: the engine was behind the camera",
        )
        self.first = self.last = None
        self.count = 0
        return gap, ids


LINE_PITCH_TOLERANCE = 0.02
"""Largest relative difference between ``run.json``'s and the geometry's ``mm_per_line``."""


def open_positioner(settings: GrabberSettings, source, geometry: TrackGeometry) -> Positioner:
    """Step 1: the positioner from the sidecars of ``positions_from`` (or the recording).

    Raises :class:`ConfigInvalidError` when the source's frames are not as tall as ``run.json``
    says (``lines_per_frame``): a file that is not this run's recording, or a wrong sidecar; or
    when ``run.json`` and the geometry file disagree on ``mm_per_line`` by more than
    :data:`LINE_PITCH_TOLERANCE`: mileages or crop sizes would be wrong.
    """
    recording = settings.positions_from
    if recording is None:
        if not isinstance(source, RecordingSource):
            raise ConfigInvalidError(
                f"{source.name}: a live camera needs positions_from (a run.json with telemetry "
                "sidecars); a live GPS and encoder feed is not implemented"
            )
        recording = source.path
    positioner = Positioner.for_recording(recording)
    frame_shape = getattr(source, "frame_shape", None)
    lines_per_frame = positioner.run.lines_per_frame
    if frame_shape is not None and frame_shape[0] != lines_per_frame:
        raise ConfigInvalidError(
            f"{source.name}: its frames have {frame_shape[0]} lines, "
            f"{sidecars(recording).run_json} says lines_per_frame {lines_per_frame}: every "
            "fastener would be placed at the wrong mileage (is this the run's recording?)"
        )
    run_pitch, camera_pitch = positioner.run.mm_per_line, geometry.mm_per_line
    if abs(run_pitch - camera_pitch) > LINE_PITCH_TOLERANCE * camera_pitch:
        raise ConfigInvalidError(
            f"{sidecars(recording).run_json} says mm_per_line {run_pitch:g}, "
            f"{settings.geometry} says {camera_pitch:g}: one of them is wrong, and with it "
            "every mileage or every crop (they may differ by 2 % at most)"
        )
    return positioner


def frames_estimate(source) -> int | None:
    """The frame count a recording's header claims (an estimate, for a progress bar only)."""
    if not isinstance(source, RecordingSource):
        return None
    capture = cv2.VideoCapture(str(source.path), cv2.CAP_FFMPEG)
    try:
        count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
    finally:
        capture.release()
    return int(count) if count and count > 0 else None


class Grabber:
    """Steps 2 to 4 around one source (see the module docstring)."""

    def __init__(self, settings: GrabberSettings, link: ControlLink, push: zmq.Socket) -> None:
        self.settings = settings
        self.link = link
        self.window = InFlight(push, settings.max_in_flight, settings.max_batch)
        self.drops = DropGap()
        self.next_crop_id = settings.first_crop_id
        self.frames = self.skipped = 0
        self.finishing = self.stopping = False
        self.restart_gap_from = settings.restart_gap_from
        self.gap_count = 0

    # Commands, heartbeats and sending: one turn of the loop.

    def service(self, wait_s: float = 0.0) -> None:
        """Serve commands (waiting up to ``wait_s`` for one), send what is pending, beat."""
        if wait_s > 0:
            # With crops pending (the socket would block) look again soon, not at once.
            self.link.socket.poll(
                int(1000 * (min(wait_s, 0.01) if self.window.pending else wait_s))
            )
        for command in self.link.commands():
            kind = command["type"]
            if kind == "ack":
                self.window.ack(command["crop_ids"])
            elif kind == "resend":
                count = self.window.resend()
                log.info("crops_resent", count=count)
            elif kind == "finish":
                self.finishing = True
            elif kind == "stop":
                self.finishing = self.stopping = True
        self.window.flush()
        self.link.beat(
            frames=self.frames,
            crops=self.next_crop_id - self.settings.first_crop_id,
            in_flight=len(self.window.crops),
            sent=self.window.sent,
            resent=self.window.resent,
            dropped=self.drops.total,
        )

    def send_gap(self, gap: CoverageGap, crop_ids: tuple[int, int] | None = None) -> None:
        """Report a gap; ``crop_ids`` (first, last) are the ids dropped in it, which the
        supervisor then counts as settled (they will never be acknowledged)."""
        self.gap_count += 1
        self.link.send("gap", gap=wire.gap_to_dict(gap), crop_ids=crop_ids)
        log.warning(
            "coverage_gap",
            reason=gap.reason,
            crops_dropped=gap.crops_dropped,
            start_along_track_m=round(gap.start_along_track_m, 3),
            end_along_track_m=round(gap.end_along_track_m, 3),
        )

    # Step 2: one fastener.

    def offer(self, tag: CropTag, pixels: np.ndarray) -> None:
        """Hand one crop to the window: wait for room (replay) or drop it (live)."""
        if self.restart_gap_from is not None:
            start = self.restart_gap_from
            mileage = start.get("mileage")
            self.send_gap(
                CoverageGap(
                    reason="process_restart",
                    start_along_track_m=start["along_track_m"],
                    end_along_track_m=tag.along_track_m,
                    start_time=start["capture_time"],
                    end_time=tag.capture_time,
                    start_mileage=Mileage(**mileage) if mileage else None,
                    end_mileage=tag.mileage,
                    camera_id=tag.camera_id,
                    detail="the grabber was restarted; crops it held were lost",
                )
            )
            self.restart_gap_from = None
        if self.settings.mode == "replay":
            while not self.window.has_room() and not self.stopping:
                self.service(self.settings.heartbeat_interval_s)
            if self.stopping:
                return
            self.window.add(tag, pixels)
        elif self.window.has_room():
            closed = self.drops.close()
            if closed is not None:
                self.send_gap(*closed)
            self.window.add(tag, pixels)
        else:
            self.drops.drop(tag)
        self.window.flush()

    def cut(self, found: list[FoundFastener], positioner: Positioner, camera_id: str) -> None:
        for fastener in found:
            crop_id = self.next_crop_id
            self.next_crop_id += 1
            if crop_id < self.settings.skip_below:
                self.skipped += 1
                continue
            tag = make_tag(crop_id, fastener, positioner, camera_id)
            self.offer(tag, model_input(fastener.crop, self.settings.crop_shape))
            if self.stopping:
                return

    def skip_cut_short(
        self, found: list[FoundFastener], positioner: Positioner, camera_id: str
    ) -> None:
        """Fasteners cut by the end of the recording: ids taken, one coverage gap, no score."""
        if not found:
            return
        first_id = self.next_crop_id
        tags = [
            make_tag(first_id + k, fastener, positioner, camera_id)
            for k, fastener in enumerate(found)
        ]
        self.next_crop_id += len(found)
        gap = CoverageGap.from_crops(
            tags[0],
            tags[-1],
            "other",
            len(found),
            f"{len(found)} fastener(s) cut by the end of the recording, not inspected",
        )
        self.send_gap(gap, crop_ids=(first_id, self.next_crop_id - 1))

    # Steps 2 to 4.

    def run(self, source, finder: FastenerFinder, positioner: Positioner) -> None:
        camera_id = positioner.run.camera_id
        paced = self.settings.pace == "realtime"
        started = time.monotonic()
        first_time: float | None = None
        truncated = False
        for frame in source.frames():
            self.service()
            if self.finishing:
                break
            if paced:
                first_time = frame.timestamp_s if first_time is None else first_time
                due = started + (frame.timestamp_s - first_time)
                while (wait := due - time.monotonic()) > 0 and not self.finishing:
                    self.service(min(wait, self.settings.heartbeat_interval_s))
            self.cut(finder.push(frame.image, frame.index), positioner, camera_id)
            self.frames += 1
            if self.finishing:
                break
        else:
            whole, cut_short = [], []
            for fastener in finder.flush():
                (cut_short if cut_by_end(fastener, finder.buffer.end) else whole).append(fastener)
            self.cut(whole, positioner, camera_id)
            self.skip_cut_short(cut_short, positioner, camera_id)
            truncated = bool(source.truncated)
        closed = self.drops.close()
        if closed is not None:
            self.send_gap(*closed)
        # Step 4: the end of the source, then serve until told to stop.
        self.link.send(
            "eos",
            frames=self.frames,
            first_crop_id=self.settings.first_crop_id,
            crops=self.next_crop_id - self.settings.first_crop_id,
            skipped=self.skipped,
            dropped=self.drops.total,
            gaps=self.gap_count,
            truncated=truncated,
            finished_early=self.finishing,
            source=source.name,
        )
        log.info(
            "source_ended",
            frames=self.frames,
            crops=self.next_crop_id - self.settings.first_crop_id,
            truncated=truncated,
            finished_early=self.finishing,
        )
        while not self.stopping:
            self.service(self.settings.heartbeat_interval_s)


def run(settings: GrabberSettings, link: ControlLink, context: zmq.Context, folder: str) -> None:
    """The grabber's life (steps in the module docstring)."""
    # 1. Source, geometry, positioner, finder.
    source = open_source(settings.source)
    try:
        try:
            geometry = TrackGeometry.load(settings.geometry)
        except ConfigError as error:
            raise ConfigInvalidError(str(error)) from error
        positioner = open_positioner(settings, source, geometry)
        finder = FastenerFinder(geometry, positioner.run.direction)
        push = context.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, _HWM)
        push.connect(wire.endpoint(folder, wire.CROPS))
        try:
            link.send(
                "ready",
                source=source.name,
                frames_estimate=frames_estimate(source),
                is_file=isinstance(source, RecordingSource),
                vehicle_id=positioner.run.vehicle_id,
                run_id=positioner.run.run_id,
            )
            Grabber(settings, link, push).run(source, finder, positioner)
        finally:
            push.close(linger=0)
    finally:
        source.close()
