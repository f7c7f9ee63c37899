"""The publisher process: scores in, alarms and coverage gaps out (spool first, then ZeroMQ).

1. Load the thresholds file for the engine's model id (a file fitted for another model is
   refused: its numbers mean nothing for these scores).
2. Read back what the spool already holds for this run: the crop id of every alarm and the
   range of every coverage gap. A crop processed again (resent after an engine or publisher
   restart, or a recording run again after a service restart) then raises no second alarm,
   and a gap reported twice is published once.
3. Open :class:`~edge.publisher.Publisher` (XPUB, replay ROUTER, heartbeats on ``health/``);
   alarms left unsent by an earlier publisher go out from its I/O thread. Optionally wait for
   a first subscription. Then ``ready``.
4. Loop: per ``scores`` message, write the alarm images (reports only), spool and queue the
   alarms in one transaction, then acknowledge every crop of the message to the supervisor,
   which passes the acknowledgement on to the grabber. An acknowledgement therefore means
   "decided, and if an alarm, committed to disk".
5. On ``stop``: close the publisher (sends what is unsent, a last heartbeat, bounded linger).

A crop whose outputs held NaN or inf has no score: it is acknowledged and reported as a
coverage gap (reason ``other``), never taken for a clean crop.

Known limits: step 2 reads every alarm and gap of the run from the spool at each start (fast
for thousands, slower for a run with hundreds of thousands of alarms) and keeps a map of the
alarmed crop ids in memory. De-duplication is by crop id, so it holds only while crop ids
name the same fastener: always for a recording (ids follow the finder's order), and for a
camera because the supervisor starts ids above every id the spool holds for the run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import zmq

from edge.logs import get_logger
from edge.pipeline import wire
from edge.pipeline.child import ControlLink
from edge.pipeline.settings import LOCAL_ENDPOINT, PublisherSettings
from edge.publisher import (
    CoverageGap,
    DefectHints,
    Publisher,
    PublisherConfig,
    PublisherError,
    ScoredCrop,
)
from edge.publisher.publish import BUILT_IN_COUNTERS
from edge.publisher.schema import ALARM_TOPIC, COVERAGE_TOPIC
from edge.publisher.spool import Spool
from edge.publisher.thresholds import load_thresholds
from edge.records import CropTag

log = get_logger(__name__)

_HWM = 10_000


def spool_state(
    spool_path: Path, vehicle_id: str, run_id: str
) -> tuple[dict[int, int], set[tuple[str, float, float]]]:
    """What the spool holds for a run: ``({crop_id: alarm seq}, {gap keys})``."""
    alarmed: dict[int, int] = {}
    gaps: set[tuple[str, float, float]] = set()
    if not Path(spool_path).exists():
        return alarmed, gaps
    with Spool(spool_path, synchronous="NORMAL") as spool:
        for topic in (ALARM_TOPIC, COVERAGE_TOPIC):
            next_seq = 1
            while True:
                batch = spool.read_from(topic, vehicle_id, run_id, next_seq, limit=1000)
                if not batch:
                    break
                for message in batch:
                    body = json.loads(message.body)
                    if topic == ALARM_TOPIC:
                        alarmed[int(body["crop"]["crop_id"])] = message.seq
                    else:
                        gaps.add(
                            (
                                body["reason"],
                                round(body["start"]["along_track_m"], 3),
                                round(body["end"]["along_track_m"], 3),
                            )
                        )
                next_seq = batch[-1].seq + 1
    return alarmed, gaps


def _hints(data: dict | None) -> DefectHints | None:
    if not data:
        return None
    region = data.get("region")
    return DefectHints(
        peak_x=data["peak_x"],
        peak_y=data["peak_y"],
        peak_value=data["peak_value"],
        area_fraction=data["area_fraction"],
        pixel_threshold=data["pixel_threshold"],
        region=tuple(region) if region is not None else None,
    )


def report_image_path(report_dir: Path, crop_id: int, kind: str) -> Path:
    """``REPORT/alarms/crop-0000123-heatmap.png`` (``kind``: heatmap, crop, reconstruction)."""
    return Path(report_dir) / "alarms" / f"crop-{crop_id:07d}-{kind}.png"


class ScoreHandler:
    """Steps 2 and 4: turns score messages into alarms, gaps and acknowledgements."""

    def __init__(
        self,
        publisher: Publisher,
        threshold: float,
        alarmed: dict[int, int],
        gaps: set,
        report_dir: Path | None,
    ) -> None:
        self.publisher = publisher
        self.threshold = threshold
        self.alarmed = alarmed
        self.gaps = gaps
        self.report_dir = report_dir
        self.crops = self.duplicates = self.model_errors = 0

    def handle(self, results: list[dict], images: list[bytes]) -> list[dict]:
        """Spool the alarms of one message; returns its acknowledgements (one per crop)."""
        scored: list[tuple[int, ScoredCrop]] = []
        acks: list[dict] = []
        for entry in results:
            crop_id = int(entry["crop_id"])
            tag = CropTag.from_dict(entry["tag"])
            self.crops += 1
            ack = {
                "id": crop_id,
                "score": entry["score"],
                "ok": entry["ok"],
                "seq": self.alarmed.get(crop_id),
                "along_track_m": tag.along_track_m,
                "capture_time": tag.capture_time,
                "mileage": tag.to_dict()["mileage"],
                "mileage_m": tag.mileage.mileage_m if tag.mileage else None,
                "rail": tag.rail,
                "side": tag.side,
            }
            acks.append(ack)
            if crop_id in self.alarmed:
                self.duplicates += 1
                continue
            if not entry["ok"]:
                self.model_errors += 1
                self._gap(
                    CoverageGap.from_crops(tag, tag, "other", 1, f"model error: {entry['error']}")
                )
                continue
            if not entry["score"] > self.threshold:
                continue
            if any(scored_id == crop_id for scored_id, _ in scored):
                continue  # the same crop twice in one message (a resend overtook it)
            refs = entry.get("images", {})
            heatmap = images[refs["heatmap"]] if "heatmap" in refs else None
            if self.report_dir is not None:
                for kind, index in refs.items():
                    path = report_image_path(self.report_dir, crop_id, kind)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(images[index])
            scored.append(
                (
                    crop_id,
                    ScoredCrop(
                        tag, entry["score"], self.threshold, heatmap, _hints(entry.get("hints"))
                    ),
                )
            )
        if scored:
            seqs = self.publisher.publish_alarms([one for _, one in scored])
            for (crop_id, _), seq in zip(scored, seqs):
                self.alarmed[crop_id] = seq
            for ack in acks:
                ack["seq"] = self.alarmed.get(ack["id"])
        return acks

    def gap(self, gap: CoverageGap) -> None:
        self._gap(gap)

    def _gap(self, gap: CoverageGap) -> None:
        key = wire.gap_key(gap)
        if key in self.gaps:
            return
        self.publisher.publish_coverage_gap(gap)
        self.gaps.add(key)


def run(settings: PublisherSettings, link: ControlLink, context: zmq.Context, folder: str) -> None:
    """The publisher's life (steps in the module docstring)."""
    # 1. Threshold.
    thresholds = load_thresholds(settings.thresholds, settings.model_id or None)
    # 2. What the spool holds.
    alarmed, gaps = spool_state(settings.spool_path, settings.vehicle_id, settings.run_id)
    # 3. The publisher.
    config = PublisherConfig(
        vehicle_id=settings.vehicle_id,
        run_id=settings.run_id,
        model_id=settings.model_id or thresholds.model_id,
        spool_path=settings.spool_path,
        publish_endpoint=(
            wire.endpoint(folder, "alarms")
            if settings.publish_endpoint == LOCAL_ENDPOINT
            else settings.publish_endpoint
        ),
        replay_endpoint=settings.replay_endpoint,
        keys_dir=settings.keys_dir,
        sndhwm=settings.sndhwm,
        linger_ms=settings.linger_ms,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        startup_hold_s=settings.startup_hold_s,
    )
    publisher = Publisher(config)
    try:
        handler = ScoreHandler(publisher, thresholds.threshold, alarmed, gaps, settings.report_dir)
        pull = context.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVHWM, _HWM)
        pull.bind(wire.endpoint(folder, wire.SCORES))
        try:
            _wait_for_subscriber(publisher, link, settings.wait_for_subscriber_s)
            link.send(
                "ready",
                publish=publisher.publish_address,
                replay=publisher.replay_address,
                threshold=thresholds.threshold,
                alarms_in_spool=len(alarmed),
                max_alarm_crop_id=max(alarmed, default=-1),
            )
            log.info(
                "publisher_ready",
                threshold=thresholds.threshold,
                alarms_in_spool=len(alarmed),
                gaps_in_spool=len(gaps),
            )
            _serve(settings, link, pull, publisher, handler)
        finally:
            pull.close(linger=0)
    finally:
        # 5. Close: unsent alarms go out, then a bounded linger.
        publisher.close()
    link.send("stopped", **publisher.counters())


def _wait_for_subscriber(publisher: Publisher, link: ControlLink, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and publisher.counters()["subscriptions"] == 0:
        link.beat()
        time.sleep(0.02)
    if seconds:
        log.info("subscriber_wait_ended", subscriptions=publisher.counters()["subscriptions"])


def _serve(
    settings: PublisherSettings,
    link: ControlLink,
    pull: zmq.Socket,
    publisher: Publisher,
    handler: ScoreHandler,
) -> None:
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    poller.register(link.socket, zmq.POLLIN)
    wait_ms = int(settings.child_heartbeat_s * 1000)
    while True:
        # 4. Commands first (a stop ends the loop), then every score message waiting.
        events = dict(poller.poll(wait_ms))
        for command in link.commands():
            kind = command["type"]
            if kind == "stop":
                return
            if kind == "gap":
                handler.gap(wire.gap_from_dict(command["gap"]))
                link.send("gap_ack", id=command["id"])
            elif kind == "counters":
                counters = {
                    name: int(value)
                    for name, value in command["counters"].items()
                    if name not in BUILT_IN_COUNTERS
                }
                publisher.update_counters(**counters)
        while pull in events:
            try:
                frames = pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            results, images = wire.decode_scores(frames)
            acks = handler.handle(results, images)
            link.send("ack", crops=acks)
        if not publisher.alive:
            raise PublisherError("the publisher's I/O thread died; restart to resend")
        link.beat(
            crops=handler.crops,
            duplicates=handler.duplicates,
            model_errors=handler.model_errors,
            **publisher.counters(),
        )
