"""The replay protocol: a subscriber asks the publisher's ROUTER for spooled messages it missed.

Served straight from the spool, so anything ever acknowledged by :meth:`Spool.append` can be
fetched again, from this process or from one that ran before it.

Request (a REQ socket sends one JSON frame; a DEALER sends an empty frame, then the JSON)::

    {"op": "replay", "vehicle_id": "TIV-07", "run_id": "r42", "topic": "alarm/",
     "from_seq": 120, "max_count": 256}

``topic`` is ``alarm/`` or ``coverage/``; ``max_count`` is optional and capped by the server.

Reply (after the empty delimiter frame): a JSON header, then two frames per message, the JSON
exactly as it was published and the heatmap PNG (an empty frame when there is none)::

    [header, json_1, png_1, json_2, png_2, ...]
    header = {"status": "ok", "vehicle_id": ..., "run_id": ..., "topic": ..., "from_seq": 120,
              "count": 2, "last_seq": 131, "more": true}

Messages are in sequence order starting at ``from_seq``; a batch holds at most ``max_count``
messages and stops before the server's byte limit (one message always fits). ``last_seq`` is the
last number allocated to that stream and ``more`` says whether messages after this batch exist,
so a client asks again from the next number until ``more`` is false. ``count == 0`` while
``from_seq <= last_seq`` means those messages were deleted from the spool (retention) and cannot
be replayed. Errors answer ``{"status": "error", "error": "..."}`` and nothing else.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from edge.publisher.schema import SEQUENCED_TOPICS
from edge.publisher.spool import Spool

DEFAULT_REPLAY_PORT_OFFSET = 1


def replay_endpoint_for(publish: str) -> str | None:
    """The default replay endpoint beside a PUB endpoint, the next port up:
    ``tcp://HOST:PORT`` -> ``tcp://HOST:PORT+1``; None when the port is not a number."""
    match = re.fullmatch(r"(tcp://.+):(\d+)", publish)
    if not match:
        return None
    return f"{match.group(1)}:{int(match.group(2)) + DEFAULT_REPLAY_PORT_OFFSET}"


REPLAY_MAX_COUNT = 256
REPLAY_MAX_BYTES = 8 * 1024 * 1024


class ReplayError(RuntimeError):
    """The replay endpoint answered with an error, or something that is not a reply."""


@dataclass(frozen=True)
class ReplayReply:
    """A decoded reply: the header and ``(json, png or None)`` per message."""

    header: dict
    messages: list[tuple[bytes, bytes | None]]

    @property
    def more(self) -> bool:
        return bool(self.header["more"])

    @property
    def last_seq(self) -> int:
        return int(self.header["last_seq"])


def encode_request(
    vehicle_id: str, run_id: str, topic: str, from_seq: int, max_count: int = REPLAY_MAX_COUNT
) -> bytes:
    """The JSON frame of a replay request."""
    request = {
        "op": "replay",
        "vehicle_id": vehicle_id,
        "run_id": run_id,
        "topic": topic,
        "from_seq": int(from_seq),
        "max_count": int(max_count),
    }
    return json.dumps(request, separators=(",", ":")).encode("utf-8")


def serve_request(
    spool: Spool,
    request_frame: bytes,
    *,
    max_count: int = REPLAY_MAX_COUNT,
    max_bytes: int = REPLAY_MAX_BYTES,
) -> list[bytes]:
    """The reply frames (without the envelope) to one request frame."""
    try:
        request = json.loads(request_frame)
        if not isinstance(request, dict) or request.get("op") != "replay":
            raise ValueError("op must be 'replay'")
        topic = request["topic"]
        if topic not in SEQUENCED_TOPICS:
            raise ValueError(f"topic must be one of {list(SEQUENCED_TOPICS)}")
        vehicle_id, run_id = request["vehicle_id"], request["run_id"]
        if not (isinstance(vehicle_id, str) and isinstance(run_id, str)):
            raise ValueError("vehicle_id and run_id must be strings")
        from_seq = request["from_seq"]
        count = request.get("max_count", max_count)
        if not (_positive_int(from_seq) and _positive_int(count)):
            raise ValueError("from_seq and max_count must be integers >= 1")
    except (ValueError, KeyError, TypeError) as error:
        return [_error(f"bad request: {error}")]
    messages = spool.read_from(
        topic, vehicle_id, run_id, from_seq, limit=min(count, max_count), max_bytes=max_bytes
    )
    last_seq = spool.last_seq(topic, vehicle_id, run_id)
    header = {
        "status": "ok",
        "vehicle_id": vehicle_id,
        "run_id": run_id,
        "topic": topic,
        "from_seq": from_seq,
        "count": len(messages),
        "last_seq": last_seq,
        "more": bool(messages) and messages[-1].seq < last_seq,
    }
    frames = [json.dumps(header, separators=(",", ":")).encode("utf-8")]
    for message in messages:
        frames += [message.body, message.heatmap_png or b""]
    return frames


def decode_reply(frames: list[bytes]) -> ReplayReply:
    """Parse reply frames (after the delimiter); ReplayError on an error reply."""
    try:
        header = json.loads(frames[0])
    except (IndexError, ValueError) as error:
        raise ReplayError(f"not a replay reply ({error})") from error
    if header.get("status") != "ok":
        raise ReplayError(str(header.get("error", header)))
    parts = frames[1:]
    if len(parts) != 2 * int(header["count"]):
        raise ReplayError(
            f"reply announces {header['count']} messages, carries {len(parts)} frames"
        )
    messages = [(parts[i], parts[i + 1] or None) for i in range(0, len(parts), 2)]
    return ReplayReply(header=header, messages=messages)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _error(text: str) -> bytes:
    return json.dumps({"status": "error", "error": text}).encode("utf-8")
